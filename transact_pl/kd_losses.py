"""Distillation losses between a dense teacher and a pruned student (pure PyTorch).

Shapes: B batch, T sequence, H hidden size (the same in teacher and student: TransAct keeps it),
V vocabulary. Logits are only ever materialised for a chunk of ``chunk_size`` positions at a time,
in fp32, so neither teacher nor student logits exist in full for the batch, and no teacher
probability survives until backward. Two formulations:

- ``fused_logit_loss`` (training): one pass per chunk computes the KL and CE values and their
  analytic gradient w.r.t. the chunk's logits, and turns it at once into the gradients of the
  hidden states and the LM head weight; backward only scales them. Nothing is recomputed.
- ``chunked_logit_losses`` (the reference, and any head that is not a bias-free ``nn.Linear``):
  autograd through each chunk, with the student's chunk recomputed in backward (checkpointing).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from transact_pl.arch import decoder_layers

DIVERGENCES = ("forward", "reverse")
HIDDEN_LOSSES = ("mse", "cosine")
IGNORE_INDEX = -100


def kl_divergence_sum(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, divergence: str = "forward") -> Tensor:
    """Σ over tokens of KL at temperature T, times T²; logits (..., V) → scalar (fp32).

    forward: KL(teacher ‖ student) = Σ_v p_t (log p_t − log p_s)  (mean-seeking; Hinton et al.).
    reverse: KL(student ‖ teacher) = Σ_v p_s (log p_s − log p_t)  (mode-seeking).
    The T² factor keeps gradient magnitudes comparable across temperatures.
    """
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if divergence == "forward":
        kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="sum")
    elif divergence == "reverse":
        kl = F.kl_div(teacher_log_probs, student_log_probs, log_target=True, reduction="sum")
    else:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, not {divergence!r}")
    return kl * temperature**2


def next_token_targets(input_ids: Tensor) -> Tensor:
    """Targets (B, T) for every position: input_ids shifted left, the last position ignored (-100)."""
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = input_ids[:, 1:]
    return targets


@dataclass
class LogitLossSums:
    """Sums over tokens of one batch (fp32 scalars) and the token counts they are means over."""

    kl: Tensor
    ce: Tensor
    kl_tokens: int
    ce_tokens: int

    @property
    def kl_mean(self) -> Tensor:
        return self.kl / max(1, self.kl_tokens)

    @property
    def ce_mean(self) -> Tensor:
        return self.ce / max(1, self.ce_tokens)


def chunk_ce_sum(student_logits: Tensor, targets: Tensor) -> Tensor:
    """Σ next-token cross-entropy of one chunk: logits (B, c, V) fp32, targets (B, c) (-100 ignored) → scalar."""
    return F.cross_entropy(student_logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def chunk_losses(
    student_chunk: Tensor,
    teacher_chunk: Tensor | None,
    targets: Tensor,
    student_head: nn.Module,
    teacher_head: nn.Module | None,
    temperature: float,
    divergence: str,
) -> tuple[Tensor, Tensor]:
    """(KL sum, CE sum) of one chunk of positions, from hidden states (B, c, H) and targets (B, c).

    Logits (B, c, V) exist in fp32 for this chunk only; the teacher's carry no graph. KL is 0 without a teacher.
    """
    student_logits = student_head(student_chunk).float()
    ce = chunk_ce_sum(student_logits, targets)
    if teacher_chunk is None:
        return student_logits.new_zeros(()), ce
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_chunk).float()
    return kl_divergence_sum(student_logits, teacher_logits, temperature, divergence), ce


def chunked_logit_losses(
    student_hidden: Tensor,
    teacher_hidden: Tensor | None,
    student_head: nn.Module,
    teacher_head: nn.Module | None,
    input_ids: Tensor,
    temperature: float = 1.0,
    divergence: str = "forward",
    chunk_size: int = 128,
) -> LogitLossSums:
    """KL and next-token CE sums from final hidden states, ``chunk_size`` positions at a time.

    Args:
        student_hidden: (B, T, H) the student's final (normed) hidden states, with grad.
        teacher_hidden: (B, T, H) the teacher's, without grad; None skips the KL (it is then 0).
        student_head / teacher_head: the LM heads, (…, H) → (…, V).
        input_ids: (B, T) the tokens; CE predicts position t+1 from t, KL covers every position.
    Returns sums over B·T positions (KL) and B·(T−1) positions (CE). While grad is on, each chunk's
    logits are recomputed in backward (activation checkpointing) instead of kept alive as (B, c, V).
    """
    targets = next_token_targets(input_ids)
    kl_total = student_hidden.new_zeros((), dtype=torch.float32)
    ce_total = student_hidden.new_zeros((), dtype=torch.float32)
    recompute = torch.is_grad_enabled() and student_hidden.requires_grad
    for start in range(0, input_ids.shape[1], chunk_size):
        end = start + chunk_size
        teacher_chunk = None if teacher_hidden is None else teacher_hidden[:, start:end]
        arguments = (student_hidden[:, start:end], teacher_chunk, targets[:, start:end], student_head, teacher_head,
                     temperature, divergence)
        kl, ce = checkpoint(chunk_losses, *arguments, use_reentrant=False) if recompute else chunk_losses(*arguments)
        kl_total, ce_total = kl_total + kl, ce_total + ce
    num_tokens = input_ids.numel()
    return LogitLossSums(kl_total, ce_total, num_tokens if teacher_hidden is not None else 0, num_tokens - input_ids.shape[0])


def fusable_head(head: nn.Module) -> bool:
    """Whether ``fused_logit_loss`` can stand for ``head``: a bias-free nn.Linear without forward hooks."""
    return type(head) is nn.Linear and head.bias is None and not head._forward_hooks and not head._forward_pre_hooks


# Rows of (rows, V) fp32 element-wise work done at a time: a few MB per buffer, so the ~10 passes over a row
# block (log-softmaxes, exponentials, KL, gradient) run in cache instead of streaming the chunk from memory.
ROW_BLOCK = 16


def chunk_logit_gradient(student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor, kl_scale: float,
                         ce_scale: float, temperature: float, divergence: str, needs_grad: bool = True,
                         ) -> tuple[Tensor, Tensor, Tensor | None]:
    """KL sum, CE sum and d(kl_scale · KL + ce_scale · CE)/d logits of one chunk, logits (N, V) fp32, targets (N,).

    The values are those of ``chunk_losses`` (the same operations, summed per row block); the gradient is analytic,
    with q = softmax(z / T):
    forward KL · T²: T · (q_s − q_t); reverse KL · T²: T · q_s ⊙ (d − Σ q_s d), d = log q_s − log q_t;
    CE: softmax(z) − onehot(target) on the rows whose target is not ignored, 0 on the others.
    Returns (kl, ce, gradient (N, V) fp32 or None without needs_grad); kl is 0 without teacher logits.
    Works in place: the gradient is written over ``student_logits`` and ``teacher_logits`` is overwritten.
    """
    kl = student_logits.new_zeros(())
    ce = student_logits.new_zeros(())
    terms = _forward_kl_block if divergence == "forward" and temperature == 1.0 else _any_kl_block
    for start in range(0, student_logits.shape[0], ROW_BLOCK):
        rows = slice(start, start + ROW_BLOCK)
        block_kl, block_ce = terms(student_logits[rows], None if teacher_logits is None else teacher_logits[rows],
                                   targets[rows], kl_scale, ce_scale, temperature, divergence, needs_grad)
        kl, ce = kl + block_kl, ce + block_ce
    return kl, ce, student_logits if needs_grad else None


def _subtract_targets(gradient: Tensor, targets: Tensor, ce_scale: float) -> None:
    """gradient[i, targets[i]] −= ce_scale on the rows whose target is not ignored."""
    valid = targets != IGNORE_INDEX
    gradient[torch.arange(targets.numel(), device=targets.device)[valid], targets[valid]] -= ce_scale


def _forward_kl_block(student: Tensor, teacher: Tensor | None, targets: Tensor, kl_scale: float, ce_scale: float,
                      temperature: float, divergence: str, needs_grad: bool) -> tuple[Tensor, Tensor]:
    """Forward KL at T = 1 and CE of a row block, (rows, V); the gradient ce_scale · (p_s − onehot) + kl_scale ·
    (p_s − p_t) is written over ``student`` with a per-row weight (CE only on rows with a target)."""
    log_probs = F.log_softmax(student, dim=-1)
    ce = F.nll_loss(log_probs, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    kl = student.new_zeros(())
    if teacher is not None:
        teacher_log_probs = F.log_softmax(teacher, dim=-1)
        teacher_probs = torch.exp(teacher_log_probs, out=teacher)
        kl = teacher_log_probs.sub_(log_probs).mul_(teacher_probs).sum()  # Σ p_t (log p_t − log p_s), as F.kl_div
    if needs_grad:
        row_weight = (targets != IGNORE_INDEX).unsqueeze(-1) * ce_scale + (kl_scale if teacher is not None else 0.0)
        torch.exp(log_probs, out=student).mul_(row_weight)
        if teacher is not None:
            student.sub_(teacher_probs, alpha=kl_scale)
        _subtract_targets(student, targets, ce_scale)
    return kl, ce


def _any_kl_block(student: Tensor, teacher: Tensor | None, targets: Tensor, kl_scale: float, ce_scale: float,
                  temperature: float, divergence: str, needs_grad: bool) -> tuple[Tensor, Tensor]:
    """Either divergence at any temperature and CE of a row block (rows, V); the gradient is written over ``student``."""
    student_log_probs = F.log_softmax(student / temperature, dim=-1)
    log_probs = student_log_probs if temperature == 1.0 else F.log_softmax(student, dim=-1)
    ce = F.nll_loss(log_probs, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    gradient = torch.zeros_like(student) if needs_grad else None
    if needs_grad and ce_scale != 0:
        gradient = log_probs.exp().mul_((targets != IGNORE_INDEX).unsqueeze(-1) * ce_scale)
        _subtract_targets(gradient, targets, ce_scale)
    kl = student.new_zeros(())
    if teacher is not None:
        teacher_log_probs = F.log_softmax(teacher / temperature, dim=-1)
        if divergence == "forward":
            kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="sum") * temperature**2
            if needs_grad:
                kl_gradient = student_log_probs.exp_().sub_(teacher_log_probs.exp_())
        else:
            kl = F.kl_div(teacher_log_probs, student_log_probs, log_target=True, reduction="sum") * temperature**2
            if needs_grad:
                difference = teacher_log_probs.neg_().add_(student_log_probs)
                student_probs = student_log_probs.exp_()
                kl_gradient = difference.sub_((student_probs * difference).sum(-1, keepdim=True)).mul_(student_probs)
        if needs_grad:
            gradient.add_(kl_gradient, alpha=kl_scale * temperature)
    if needs_grad:
        student.copy_(gradient)
    return kl, ce


class FusedLogitLoss(torch.autograd.Function):
    """kl_weight · KL mean + ce_weight · CE mean over the LM head's logits, the gradients computed during forward.

    forward(hidden (B, T, H), weight (V, H), teacher_hidden (B, T, H) | None, teacher_head | None, targets (B, T),
    kl_weight, ce_weight, kl_tokens, ce_tokens, temperature, divergence, chunk_size, needs_grad)
    → (loss, Σ KL, Σ CE), fp32 scalars.
    Per chunk of positions it computes the student's logits once, the loss values and their gradient, and
    accumulates the gradients of hidden (B, T, H) and weight (V, H) in their dtypes (as autograd would); the
    logits and the gradient exist for one chunk at a time. Backward multiplies the stored gradients by the
    loss's incoming gradient; Σ KL and Σ CE are for reporting and carry no gradient.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, teacher_hidden: Tensor | None, teacher_head: nn.Module | None,
                targets: Tensor, kl_weight: float, ce_weight: float, kl_tokens: int, ce_tokens: int, temperature: float,
                divergence: str, chunk_size: int, needs_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
        kl_total = hidden.new_zeros((), dtype=torch.float32)
        ce_total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.zeros_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight) if needs_grad else None
        kl_scale, ce_scale = kl_weight / max(1, kl_tokens), ce_weight / max(1, ce_tokens)
        for start in range(0, hidden.shape[1], chunk_size):
            positions = slice(start, start + chunk_size)
            chunk = hidden[:, positions].flatten(0, 1)
            student_logits = F.linear(chunk, weight).float()
            # 2-D, contiguous: a linear on a 3-D slice of (B, T, H) runs as a batched matmul, ~40 % slower on the CPU.
            teacher_logits = None if teacher_head is None else teacher_head(teacher_hidden[:, positions].flatten(0, 1)).float()
            kl, ce, gradient = chunk_logit_gradient(student_logits, teacher_logits, targets[:, positions].flatten(), kl_scale,
                                                    ce_scale, temperature, divergence, needs_grad)
            del student_logits, teacher_logits
            kl_total, ce_total = kl_total + kl, ce_total + ce
            if needs_grad:
                gradient = gradient.to(weight.dtype)
                grad_hidden[:, positions] = (gradient @ weight).view_as(hidden[:, positions])
                torch.addmm(grad_weight, gradient.T, chunk, out=grad_weight)  # not addmm_: FLOP counters skip it
        ctx.grad_hidden, ctx.grad_weight = grad_hidden, grad_weight
        loss = ce_weight * (ce_total / max(1, ce_tokens))  # as compute_loss combines the means: equal values
        if teacher_head is not None:
            loss = loss + kl_weight * (kl_total / max(1, kl_tokens))
        ctx.mark_non_differentiable(kl_total, ce_total)
        return loss, kl_total, ce_total

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_kl: Tensor, grad_ce: Tensor) -> tuple:
        grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
        ctx.grad_hidden = ctx.grad_weight = None  # handed over: not kept alive by the graph
        if grad_hidden is None:
            raise RuntimeError("FusedLogitLoss ran with needs_grad=False (under no_grad); it has no gradient to give")
        if grad_loss.device.type != "cpu" or grad_loss.item() != 1.0:  # 1 when the loss is backpropagated as is
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
            grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return (grad_hidden, grad_weight) + (None,) * 11


def fused_logit_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor | None,
    student_head: nn.Module,
    teacher_head: nn.Module | None,
    input_ids: Tensor,
    kl_weight: float,
    ce_weight: float,
    temperature: float = 1.0,
    divergence: str = "forward",
    chunk_size: int = 128,
) -> tuple[Tensor, LogitLossSums]:
    """``kl_weight · KL mean + ce_weight · CE mean`` and the sums it is made of, the student's logits computed once.

    Args as ``chunked_logit_losses``; kl_weight/ce_weight weigh the per-token means (KL over B·T positions,
    CE over B·(T−1)). Returns (loss with grad, LogitLossSums without grad). Values equal those of
    ``chunked_logit_losses``; a head that is not a bias-free nn.Linear goes through it.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, not {divergence!r}")
    if not fusable_head(student_head):
        sums = chunked_logit_losses(student_hidden, teacher_hidden, student_head, teacher_head, input_ids, temperature,
                                    divergence, chunk_size)
        loss = ce_weight * sums.ce_mean
        if teacher_hidden is not None:
            loss = loss + kl_weight * sums.kl_mean
        return loss, LogitLossSums(sums.kl.detach(), sums.ce.detach(), sums.kl_tokens, sums.ce_tokens)
    num_tokens = input_ids.numel()
    kl_tokens = num_tokens if teacher_hidden is not None else 0
    ce_tokens = num_tokens - input_ids.shape[0]
    weight = student_head.weight
    needs_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or weight.requires_grad)
    loss, kl, ce = FusedLogitLoss.apply(student_hidden, weight, teacher_hidden, teacher_head, next_token_targets(input_ids),
                                        kl_weight, ce_weight, kl_tokens, ce_tokens, temperature, divergence, chunk_size,
                                        needs_grad)
    return loss, LogitLossSums(kl, ce, kl_tokens, ce_tokens)


def hidden_state_loss(student_states: Sequence[Tensor], teacher_states: Sequence[Tensor], kind: str = "mse") -> Tensor:
    """Mean over layers of a scale-free distance between residual streams, each (B, T, H) → scalar.

    mse: mean((s − t)²) / mean(t²), a relative error (1.0 = as far as predicting zeros), so its
    size does not depend on the model's activation scale. cosine: mean over tokens of 1 − cos(s, t).
    """
    if len(student_states) != len(teacher_states) or not student_states:
        raise ValueError(f"need the same non-zero number of layers, got {len(student_states)} and {len(teacher_states)}")
    losses = []
    for student, teacher in zip(student_states, teacher_states):
        student, teacher = student.float(), teacher.float().detach()
        if kind == "mse":
            scale = teacher.pow(2).mean().clamp_min(1e-12)
            losses.append((student - teacher).pow(2).mean() / scale)
        elif kind == "cosine":
            losses.append((1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean())
        else:
            raise ValueError(f"hidden loss must be one of {HIDDEN_LOSSES}, not {kind!r}")
    return torch.stack(losses).mean()


def final_hidden_states(model: nn.Module, input_ids: Tensor) -> Tensor:
    """The final-norm output (B, T, H) of a causal LM for input_ids (B, T), without computing any logits.

    Runs the model's own (root) forward, so wrappers such as FSDP2 gather the root's parameters, and asks
    for logits at no position (``logits_to_keep`` = empty index); the LM head is then applied in chunks.
    """
    captured: list[Tensor] = []
    handle = model.model.norm.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        model(input_ids=input_ids, use_cache=False, logits_to_keep=input_ids.new_empty(0))
    finally:
        handle.remove()
    return captured[-1]


@contextmanager
def recorded_layer_outputs(model: nn.Module, layer_indices: Sequence[int]) -> Iterator[dict[int, Tensor]]:
    """Record the residual-stream output (B, T, H) of the given decoder layers during forwards.

    Yields a dict layer index → output of the latest forward; the hooks are removed on exit.
    """
    outputs: dict[int, Tensor] = {}
    layers = decoder_layers(model)

    def recorder(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor | tuple) -> None:
            outputs[index] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [layers[index].register_forward_hook(recorder(index)) for index in layer_indices]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
