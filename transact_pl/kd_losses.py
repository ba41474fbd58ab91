"""Distillation losses between a dense teacher and a pruned student (pure PyTorch).

Shapes: B batch, T sequence, H hidden size (the same in teacher and student: TransAct keeps it),
V vocabulary. Logits are only ever materialised for a chunk of ``chunk_size`` positions at a time,
in fp32, and the student's chunk is recomputed during backward (activation checkpointing), so
neither teacher nor student logits exist in full for the batch, and no teacher probability
survives until backward.
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
