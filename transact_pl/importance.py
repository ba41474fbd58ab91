"""Collecting calibration statistics: forward passes for ``acts`` (Σa²), forward and backward for the Taylor scorers.

TransAct scores the *transitional* activations: the input of ``o_proj`` (per-head
attention context, width heads·head_dim) and the input of ``down_proj``
(act(gate(x)) * up(x), width intermediate_size). For every channel c we keep
Σ a_c² over every calibration token, accumulated in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from transact_pl.arch import PRUNABLE_LINEARS, all_layer_parts, eval_mode
from transact_pl.errors import NonFiniteError

Batch = dict[str, Tensor]
# Sums a tensor in place over every process; the identity on one process.
ReduceFn = Callable[[Tensor], None]


@dataclass
class ActivationStats:
    """Per-layer sums of squared transitional activations.

    attention_sum_sq[i]: (num_heads · head_dim,) fp64, Σ over tokens of (o_proj input)².
    mlp_sum_sq[i]: (intermediate_size,) fp64, Σ over tokens of (down_proj input)².
    num_tokens: tokens seen (kept for reporting; scores are not normalised by it).
    """

    attention_sum_sq: list[Tensor]
    mlp_sum_sq: list[Tensor]
    num_tokens: int

    def all_reduce(self, reduce_fn: ReduceFn) -> None:
        """Sum the statistics over processes so every rank scores identically."""
        for tensor in [*self.attention_sum_sq, *self.mlp_sum_sq]:
            reduce_fn(tensor)
        # On the statistics' (the model's) device: NCCL only takes CUDA tensors, and a tensor made without a device
        # is a CPU tensor.
        count = torch.tensor([self.num_tokens], dtype=torch.float64, device=self.attention_sum_sq[0].device)
        reduce_fn(count)
        self.num_tokens = int(count.item())


def channel_sum_squares(activation: Tensor) -> Tensor:
    """(tokens, width) → (width,) fp32: this batch's Σa² per channel.

    One fused fp32 pass (no copy, no a² temporary); callers sum batches and ranks in fp64. A batch's partial sum
    does not depend on the rank that computes it, so ranks still agree with one process; fp64 per element made
    calibration ~7 % slower than a plain forward, this ~0 %. ``transact_pl.reconstruction`` uses the same kernel,
    so its sums (and the ``acts`` selection from them) are bit-identical to these.
    """
    return torch.linalg.vector_norm(activation, dim=0, dtype=torch.float32).square()


def _sum_squares_into(accumulator: Tensor) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
    def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        partial = channel_sum_squares(inputs[0].detach().reshape(-1, inputs[0].shape[-1]))
        accumulator.add_(partial.to(device=accumulator.device, dtype=accumulator.dtype))

    return hook


def _as_batches(batches: Iterable[Batch], device: torch.device) -> Iterable[Tensor]:
    for batch in batches:
        yield batch["input_ids"].to(device)


@torch.no_grad()
def collect_activation_stats(
    model: nn.Module, batches: Iterable[Batch], on_batch: Callable[[], None] | None = None
) -> ActivationStats:
    """Run the calibration batches through ``model`` in eval mode and accumulate Σa² per channel.

    The model is left in the training mode it had; its weights are not touched.
    """
    parts = all_layer_parts(model)
    device = next(model.parameters()).device
    # fp64 accumulators: sums over processes then agree with one process to far below fp32 resolution.
    attention = [torch.zeros(p.o_proj.in_features, dtype=torch.float64, device=device) for p in parts]
    mlp = [torch.zeros(p.down_proj.in_features, dtype=torch.float64, device=device) for p in parts]
    handles = [p.o_proj.register_forward_pre_hook(_sum_squares_into(a)) for p, a in zip(parts, attention)]
    handles += [p.down_proj.register_forward_pre_hook(_sum_squares_into(m)) for p, m in zip(parts, mlp)]
    num_tokens = hooked_passes(model, handles, batches, on_batch)
    check_finite(attention, mlp, "activations")
    return ActivationStats(attention, mlp, num_tokens)


@torch.no_grad()
def hooked_passes(model: nn.Module, handles: list, batches: Iterable[Batch], on_batch: Callable[[], None] | None = None) -> int:
    """Forward every batch in eval mode for the statistics its hooks gather; returns the number of tokens.

    Only the hooks' inputs and outputs matter, so the LM head runs at the last position only (~20 % of a
    pass and (B, T, V) logits saved). The hooks are removed and the model's training mode restored after.
    """
    device = next(model.parameters()).device
    num_tokens = 0
    try:
        with eval_mode(model):
            for input_ids in _as_batches(batches, device):
                model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
                num_tokens += input_ids.numel()
                if on_batch is not None:
                    on_batch()
    finally:
        for handle in handles:
            handle.remove()
    return num_tokens


def check_finite(attention: list[Tensor], mlp: list[Tensor], what: str) -> None:
    """Raise ``NonFiniteError`` naming the first layer whose attention or MLP statistics hold NaN/Inf."""
    for index, (attention_sums, mlp_sums) in enumerate(zip(attention, mlp)):
        for part, sums in (("attention (input of o_proj)", attention_sums), ("MLP (input of down_proj)", mlp_sums)):
            if not torch.isfinite(sums).all():
                raise NonFiniteError(
                    f"calibration {what} of layer {index} {part} are NaN/Inf: the model has diverged or its weights are "
                    "corrupt; resume from an earlier checkpoint or lower --model.learning_rate"
                )


@dataclass
class GradientStats:
    """Σ over calibration batches of ∂L/∂W (or of |∂L/∂W|) for every prunable linear weight, by layer and name.

    grad_sums[i][name]: fp32, the weight's shape; under FSDP2 a DTensor sharded like the weight.
    """

    grad_sums: list[dict[str, Tensor]]

    def all_reduce(self, reduce_fn: ReduceFn) -> None:
        """Sum over processes so every rank scores what one process running every batch would.

        Plain gradients (one device, DDP: the calibration passes bypass DDP's hooks) hold this process's
        batches only and are summed by ``reduce_fn``. Sharded ones (FSDP2) were already reduce-scattered
        by every backward as the *mean* over the W processes of the mesh: each shard holds Σ/W, so it is
        multiplied by W instead of being reduced a second time (no collective exists for a DTensor sum).
        """
        for layer in self.grad_sums:
            for tensor in layer.values():
                if isinstance(tensor, DTensor):
                    tensor.mul_(tensor.device_mesh.size())
                else:
                    reduce_fn(tensor)




def collect_gradient_stats(
    model: nn.Module, batches: Iterable[Batch], on_batch: Callable[[], None] | None = None, absolute: bool = False
) -> GradientStats:
    """Accumulate the LM-loss gradient of every prunable weight over the calibration batches (fp32).

    absolute: sum |∂L/∂W| of each batch (the reference's Taylor accumulation, scorer ``taylor_abs``) instead of
    ∂L/∂W (``taylor``). Under FSDP2 each backward's gradient is already the mean over the ranks' batches of that
    step, so there a "batch" of the |·| sum is the union of the ranks' batches of one step.
    Gradients already stored on the parameters (none between optimizer steps) are set aside
    and put back, so a training step in progress is not disturbed.
    """
    parts = all_layer_parts(model)
    device = next(model.parameters()).device
    saved_grads = {p: p.grad for p in model.parameters()}
    sums = [{name: torch.zeros_like(getattr(p, name).weight, dtype=torch.float32) for name in PRUNABLE_LINEARS} for p in parts]
    try:
        with eval_mode(model):
            for input_ids in _as_batches(batches, device):
                model.zero_grad(set_to_none=True)
                loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise NonFiniteError(f"calibration loss is {loss.item()}: the model has diverged or its weights are "
                                         "corrupt; resume from an earlier checkpoint or lower --model.learning_rate")
                loss.backward()
                for part, layer_sums in zip(parts, sums):
                    for name, total in layer_sums.items():
                        grad = getattr(part, name).weight.grad.float()
                        total += grad.abs() if absolute else grad
                if on_batch is not None:
                    on_batch()
    finally:
        for parameter, grad in saved_grads.items():
            parameter.grad = grad
    return GradientStats(sums)
