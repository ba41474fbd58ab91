"""Head-dim pruning that keeps RoPE exact: fewer channels inside every head, the same rotary frequencies.

Stock transformers gives q, k and v one ``head_dim`` d and builds RoPE once per model (one rotary module
shared by every layer) from ``rope_parameters`` and d: channels j and j + d/2 of every q/k head form a
rotary pair turning at ω_j = θ^(−2j/d) (HF's rotate_half layout). A head shrunk to d' = 2m channels keeps
m pairs S = (p_0 < … < p_{m−1}): new channel i and i + m are old channels p_i and p_i + d/2, and stock RoPE
turns them at ω'_i = f⁻¹·θ'^(−2i/d') for a rope_theta θ' and (``linear`` rope) a factor f.

Exact construction: ω'_i = ω_{p_i} for every i holds exactly when S is an arithmetic progression
p_i = a + s·i: θ' = θ^(s·d'/d) and f = f₀·θ^(2a/d). ``default`` and ``linear`` RoPE take any offset a (a > 0
switches ``default`` to ``linear``); ``llama3`` scales each frequency by a function of that frequency alone, so
it stays exact with θ' but has no factor for an offset (a = 0). Other rope types (dynamic, yarn, longrope)
derive frequencies from d itself and are refused. Because the rotary module is shared, one S serves every
layer and head: the scores only choose (a, s), the progression whose pairs carry the most q·k energy.
Arbitrary pairs per head (the best-scored ones) cannot be expressed: ω_{p_i} is then no geometric sequence
in i; ``fitted_rope_parameters`` gives its least-squares θ', f (``add_head_dim(..., exact=False)``), whose
logit error the tests and ``benchmarks/head_dim.py`` measure.

V and O carry no rotation: each KV head keeps any d' of its value channels, chosen by the activation norm
of the o_proj input summed over the group's query heads. Stock transformers needs the same d' for q, k, v.
The attention scale 1/√d becomes 1/√d', so q rows (and bias) are multiplied by c = √(d'/d); the gradient of
the new q is then g/c, so its carried Adam moments are rescaled too (exp_avg · 1/c, exp_avg_sq · 1/c²; see
``optim_state``), as if it had been trained in that parametrisation all along. Qwen3's per-head q_norm/k_norm normalise over d, so it is refused too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from transact_pl.arch import Widths, all_layer_parts
from transact_pl.importance import ReduceFn, hooked_passes
from transact_pl.plan import LayerPlan, PruningPlan, top_indices

OFFSET_ROPE_TYPES = ("default", "linear")  # frequencies f⁻¹·θ^(−2j/d): any progression a + s·i
EXACT_ROPE_TYPES = (*OFFSET_ROPE_TYPES, "llama3")  # llama3: progressions from 0 only
HEAD_NORM_MODEL_TYPES = ("qwen3",)


# ----- configuration -------------------------------------------------------------------------------------------------
def head_dim_problems(target: int, head_dim: int, config, option: str = "--pruning.head_dim_target") -> list[str]:
    """Why ``target`` cannot be reached on a model with ``config`` whose heads have ``head_dim`` channels."""
    problems = []
    if target < 2 or target > head_dim or target % 2:
        problems.append(f"`{option}={target}` must be an even number in 2..{head_dim} (rotary pairs are kept whole)")
    if config is None:
        return problems
    if config.model_type in HEAD_NORM_MODEL_TYPES:
        problems.append(f"`{option}` is not supported for {config.model_type}: its per-head q_norm/k_norm normalise over head_dim")
    rope = config.rope_parameters or {}
    if rope.get("rope_type", "default") not in EXACT_ROPE_TYPES or rope.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"`{option}` needs {', '.join(EXACT_ROPE_TYPES)} RoPE over the whole head; this model has "
                        f"rope_type {rope.get('rope_type')!r} (its frequencies depend on head_dim itself)")
    return problems


def next_head_dim(current: int, target: int, shot: int, num_shots: int) -> int:
    """head_dim after shot ``shot`` of ``num_shots``, moving linearly to ``target``, rounded up to even."""
    remaining = num_shots - shot + 1
    next_dim = current - (current - target) // remaining
    return next_dim + next_dim % 2


# ----- statistics and scores -----------------------------------------------------------------------------------------
@dataclass
class HeadDimStats:
    """Per layer, Σ over calibration tokens of the squared outputs of q_proj (heads·d,) and k_proj (kv·d,)
    and of the squared input of o_proj (heads·d,), fp32."""

    query: list[Tensor]
    key: list[Tensor]
    output: list[Tensor]

    def all_reduce(self, reduce_fn: ReduceFn) -> None:
        for tensor in [*self.query, *self.key, *self.output]:
            reduce_fn(tensor)


def _accumulate(total: Tensor, of_input: bool) -> Callable:
    def hook(module: nn.Module, args: tuple, output: Tensor | None = None) -> None:
        values = (args[0] if of_input else output).detach().float()
        total.add_(values.pow(2).reshape(-1, values.shape[-1]).sum(dim=0))

    return hook


@torch.no_grad()
def collect_head_dim_stats(model: nn.Module, batches: Iterable[dict[str, Tensor]],
                           on_batch: Callable[[], None] | None = None) -> HeadDimStats:
    """Run the calibration batches (eval mode, weights untouched) and sum the squares of q, k and o's input."""
    parts = all_layer_parts(model)
    device = next(model.parameters()).device
    stats = HeadDimStats(query=[torch.zeros(p.q_proj.out_features, device=device) for p in parts],
                         key=[torch.zeros(p.k_proj.out_features, device=device) for p in parts],
                         output=[torch.zeros(p.o_proj.in_features, device=device) for p in parts])
    handles = [p.q_proj.register_forward_hook(_accumulate(q, False)) for p, q in zip(parts, stats.query)]
    handles += [p.k_proj.register_forward_hook(_accumulate(k, False)) for p, k in zip(parts, stats.key)]
    handles += [p.o_proj.register_forward_pre_hook(_accumulate(o, True)) for p, o in zip(parts, stats.output)]
    hooked_passes(model, handles, batches, on_batch)
    return stats


def pair_scores(query: Tensor, key: Tensor, widths: Widths) -> Tensor:
    """(kv, d/2): √(Σ q-pair energy over the group's heads) · √(k-pair energy) — bounds the pair's |q·k| share."""
    half = widths.head_dim // 2
    q = query.view(widths.num_kv_heads, widths.group_size, widths.head_dim).sum(dim=1)
    k = key.view(widths.num_kv_heads, widths.head_dim)
    return (q[:, :half] + q[:, half:]).sqrt() * (k[:, :half] + k[:, half:]).sqrt()


def value_scores(output: Tensor, widths: Widths) -> Tensor:
    """(kv, d): L2 norm of each value channel's attention context, summed over the group's query heads."""
    return output.view(widths.num_kv_heads, widths.group_size, widths.head_dim).sum(dim=1).sqrt()


# ----- choosing channels ---------------------------------------------------------------------------------------------
def progressions(half: int, num_pairs: int, offsets: bool) -> list[tuple[int, int]]:
    """Every (offset a, stride s) with a + s·(num_pairs − 1) < half; a = 0 only without ``offsets``."""
    strides = range(1, (half - 1) // (num_pairs - 1) + 1) if num_pairs > 1 else range(1, 2)
    return [(a, s) for s in strides for a in (range(half - s * (num_pairs - 1)) if offsets else range(1))]


def best_progression(scores: list[Tensor], num_pairs: int, offsets: bool) -> tuple[int, int]:
    """The (a, s) whose pairs hold the largest total score over every layer and KV head (ties: smaller a, s)."""
    total = torch.stack([layer.double().sum(dim=0) for layer in scores]).sum(dim=0)  # (d/2,)
    candidates = progressions(total.numel(), num_pairs, offsets)
    sums = [total[a : a + s * num_pairs : s].sum().item() for a, s in candidates]
    return candidates[max(range(len(sums)), key=lambda index: (sums[index], -index))]


def exact_rope_parameters(rope: dict, head_dim: int, new_head_dim: int, offset: int, stride: int) -> dict:
    """rope_parameters reproducing the frequencies of pairs offset + stride·i at head_dim ``new_head_dim``."""
    theta = rope["rope_theta"]
    updated = {**rope, "rope_theta": theta ** (stride * new_head_dim / head_dim)}
    if offset:
        if rope.get("rope_type", "default") not in OFFSET_ROPE_TYPES:
            raise ValueError(f"rope_type {rope.get('rope_type')!r} cannot shift its frequencies: offset must be 0")
        updated.update(rope_type="linear", factor=rope.get("factor", 1.0) * theta ** (2 * offset / head_dim))
    return updated


def fitted_rope_parameters(pairs: list[list[int]], rope: dict, head_dim: int, new_head_dim: int) -> dict:
    """The least-squares (in log frequency) θ' and linear factor f for arbitrary pair sets (approximate RoPE).

    Fits log ω_{p_i} = −log f − (2i/d')·log θ' over every set; f ≥ 1 (otherwise refitted with f = 1)."""
    points = torch.tensor([(i, p) for kept in pairs for i, p in enumerate(kept)], dtype=torch.float64)
    x, y = 2 * points[:, 0] / new_head_dim, 2 * points[:, 1] / head_dim * math.log(rope["rope_theta"])
    slope, intercept = math.log(rope["rope_theta"]), 0.0
    if rope.get("rope_type", "default") in OFFSET_ROPE_TYPES and x.unique().numel() > 1:
        design = torch.stack([x, torch.ones_like(x)], dim=1)
        slope, intercept = torch.linalg.lstsq(design, y[:, None]).solution.flatten().tolist()
    if intercept <= 0.0 and (x * x).sum() > 0:
        slope, intercept = ((x * y).sum() / (x * x).sum()).item(), 0.0
    updated = {**rope, "rope_theta": math.exp(slope)}
    if intercept > 0.0:
        updated.update(rope_type="linear", factor=rope.get("factor", 1.0) * math.exp(intercept))
    return updated


def add_head_dim(plan: PruningPlan, stats: HeadDimStats, rope: dict, exact: bool = True) -> PruningPlan:
    """``plan`` (kept groups, MLP channels) extended to shrink every head to ``plan.after.head_dim`` channels.

    exact: one progression of rotary pairs for the whole model (RoPE reproduced exactly); otherwise the
    best-scored pairs of each KV head with fitted RoPE (approximate). V/O: the best value channels per KV head."""
    before, num_pairs = plan.before, plan.after.head_dim // 2
    layers, all_pairs = [], []
    qk = [pair_scores(q, k, before)[layer.kept_kv_heads] for q, k, layer in zip(stats.query, stats.key, plan.layers)]
    if exact:
        offset, stride = best_progression(qk, num_pairs, rope.get("rope_type", "default") in OFFSET_ROPE_TYPES)
        shared = list(range(offset, offset + stride * num_pairs, stride))
    for scores, output, layer in zip(qk, stats.output, plan.layers):
        values = value_scores(output, before)[layer.kept_kv_heads]
        pairs = [shared] * len(layer.kept_kv_heads) if exact else [top_indices(row, num_pairs) for row in scores]
        all_pairs += pairs
        layers.append(replace(layer, kept_qk_pairs=pairs, kept_v_channels=[top_indices(row, plan.after.head_dim) for row in values]))
    new_rope = (exact_rope_parameters(rope, before.head_dim, plan.after.head_dim, offset, stride) if exact
                else fitted_rope_parameters(all_pairs, rope, before.head_dim, plan.after.head_dim))
    return replace(plan, layers=layers, rope_parameters=new_rope)


# ----- surgery helpers -----------------------------------------------------------------------------------------------
def rotary_channels(pairs: list[int], head_dim: int) -> Tensor:
    """Channels of kept rotary pairs inside one head: (p_0, …, p_{m−1}, p_0 + d/2, …, p_{m−1} + d/2)."""
    kept = torch.tensor(pairs, dtype=torch.long)
    return torch.cat([kept, kept + head_dim // 2])


def _checked(indices: list[int], size: int, count: int, what: str) -> Tensor:
    if len(indices) != count or sorted(set(indices)) != list(indices) or indices[0] < 0 or indices[-1] >= size:
        raise ValueError(f"{what} must be {count} ascending unique indices in 0..{size - 1}, got {indices[:8]}...")
    return torch.tensor(indices, dtype=torch.long)


def within_head_channels(layer: LayerPlan, heads: Tensor, kv_heads: Tensor, before: Widths, after: Widths,
                         index: int) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """(q rows, k rows, v rows, o columns) kept by a head-dim plan for layer ``index``; None for whole heads."""
    if layer.kept_qk_pairs is None or layer.kept_v_channels is None:
        if after.head_dim != before.head_dim:
            raise ValueError(f"layer {index}: head_dim {before.head_dim} → {after.head_dim} needs kept_qk_pairs and kept_v_channels")
        return None
    d = before.head_dim
    qk = [rotary_channels(_checked(p, d // 2, after.head_dim // 2, f"layer {index} kept_qk_pairs").tolist(), d)
          for p in layer.kept_qk_pairs]
    v = [_checked(c, d, after.head_dim, f"layer {index} kept_v_channels") for c in layer.kept_v_channels]
    position = {group: i for i, group in enumerate(kv_heads.tolist())}
    group_of = [position[head // before.group_size] for head in heads.tolist()]
    query = torch.cat([head * d + qk[g] for head, g in zip(heads.tolist(), group_of)])
    output = torch.cat([head * d + v[g] for head, g in zip(heads.tolist(), group_of)])
    key = torch.cat([group * d + qk[i] for i, group in enumerate(kv_heads.tolist())])
    value = torch.cat([group * d + v[i] for i, group in enumerate(kv_heads.tolist())])
    return query, key, value, output


def query_scale(head_dim: int, new_head_dim: int) -> float:
    """c = √(d'/d): q's factor that keeps q·k/√d' equal to q·k/√d on the kept channels."""
    return math.sqrt(new_head_dim / head_dim)


@torch.no_grad()
def finish_head_dim_shrink(model: nn.Module, before: Widths, after: Widths, rope: dict) -> None:
    """After slicing: rescale q by √(d'/d), set every attention's head_dim and scale, the config's RoPE, and
    rebuild the shared rotary module so in-memory model and stock reload compute the same thing."""
    if rope is None:
        raise ValueError(f"a plan shrinking head_dim {before.head_dim} → {after.head_dim} must carry rope_parameters")
    factor = query_scale(before.head_dim, after.head_dim)
    for parts in all_layer_parts(model):
        parts.q_proj.weight.mul_(factor)
        if parts.q_proj.bias is not None:
            parts.q_proj.bias.mul_(factor)
        parts.attention.head_dim = after.head_dim
        parts.attention.scaling = after.head_dim**-0.5
    model.config.head_dim = after.head_dim
    model.config.rope_parameters = dict(rope)
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config).to(rotary.inv_freq.device)


# ----- serving-friendly sizes ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServingKernel:
    """A GPU server's fast attention path and the head sizes it takes (read from the server's own source)."""

    name: str
    sizes: str  # the sizes in words, for messages and the README
    accepts: Callable[[int], bool]


SERVING_KERNELS = (
    # vllm/v1/attention/backends/flash_attn.py supports_head_size (earlier releases: 32, 64, ..., 256 in steps of 32)
    ServingKernel("vLLM FlashAttention", "multiples of 8 up to 256", lambda size: size % 8 == 0 and size <= 256),
    # vllm/v1/attention/backends/flashinfer.py get_supported_head_sizes
    ServingKernel("vLLM FlashInfer", "64, 128, 256", lambda size: size in (64, 128, 256)),
    # ggml/src/ggml-cuda/fattn.cu ggml_cuda_get_best_fattn_kernel, K and V of one size (40 and 72: no tensor cores)
    ServingKernel("llama.cpp CUDA flash attention", "40, 64, 72, 80, 96, 112, 128, 256",
                  lambda size: size in (40, 64, 72, 80, 96, 112, 128, 256)),
)
SERVING_OPTION = "--pruning.serving_head_dims"


def serving_sizes_problems(sizes: int | list[int], head_dim: int, option: str = SERVING_OPTION) -> list[str]:
    """Why ``sizes`` (a step: every multiple of it, or an explicit list) cannot serve as head sizes ≤ ``head_dim``."""
    if isinstance(sizes, int):
        if sizes < 2 or sizes % 2 or sizes > head_dim:
            return [f"`{option}={sizes}` must be an even step in 2..{head_dim} (rotary pairs are kept whole), e.g. 16 or 32"]
        return []
    wrong = [size for size in sizes if size < 2 or size % 2 or size > head_dim]
    if not sizes or wrong:
        return [f"`{option}={list(sizes)}` must list even head sizes in 2..{head_dim} (rotary pairs are kept whole); "
                f"{'it is empty' if not sizes else f'{wrong} are not'}, e.g. [32, 64]"]
    return []


def allowed_head_dims(sizes: int | list[int], head_dim: int) -> list[int]:
    """Ascending head sizes ≤ ``head_dim`` that ``sizes`` allows (every multiple of a step, or the listed ones)."""
    if isinstance(sizes, int):
        return list(range(sizes, head_dim + 1, sizes))
    return sorted({size for size in sizes if size <= head_dim})


def round_head_dim(target: int, allowed: list[int]) -> int:
    """The allowed size nearest to ``target``; halfway between two, the larger (more channels kept)."""
    return min(allowed, key=lambda size: (abs(size - target), -size))


def rounded_next_head_dim(current: int, target: int, shot: int, num_shots: int, allowed: list[int]) -> int:
    """``next_head_dim`` moved to the nearest allowed size between ``target`` (allowed) and ``current``."""
    between = [size for size in allowed if target <= size <= current] + [current]
    return round_head_dim(next_head_dim(current, target, shot, num_shots), between)


def off_kernel_warning(head_dims: Iterable[int]) -> str | None:
    """One line naming every size in ``head_dims`` some server's fast attention kernel does not take, or None."""
    misses = []
    for size in sorted(set(head_dims), reverse=True):
        servers = [f"{kernel.name} ({kernel.sizes})" for kernel in SERVING_KERNELS if not kernel.accepts(size)]
        if servers:
            misses.append(f"head_dim {size} is not taken by {', '.join(servers)}")
    if not misses:
        return None
    everywhere = [size for size in (64, 128, 256) if all(kernel.accepts(size) for kernel in SERVING_KERNELS)]
    return (f"{'; '.join(misses)}: those servers fall back to slower attention or refuse the model (sizes all of them "
            f"take: {', '.join(map(str, everywhere))}); `{SERVING_OPTION}` keeps head_dim_target and every shot's "
            "head_dim on the sizes it allows (a step such as 32, or a list such as [40, 64])")
