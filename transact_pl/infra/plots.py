"""PNG pictures of a pruning run and of benchmark results (matplotlib, Agg backend, no display).

Every function takes plain data (score tensors, plans, widths, metric series, table rows), writes one
PNG to ``path`` and returns that path. Nothing here reads run directories; ``callbacks/run_pictures.py``
and the benchmark scripts gather the data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; must precede pyplot so no GUI backend is ever picked
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch import Tensor  # noqa: E402

from transact_pl.arch import Widths  # noqa: E402
from transact_pl.plan import PruningPlan  # noqa: E402
from transact_pl.scoring import head_scores  # noqa: E402

# (step, value) pairs of one logged metric, in logging order.
Series = Sequence[tuple[float, float]]
# Cell states of a kept/removed map.
KEPT, REMOVED_NOW, REMOVED_BEFORE = 2, 1, 0
_MAP_COLORS = ListedColormap(["#d9d9d9", "#d62728", "#2ca02c"])  # removed earlier, removed this shot, kept


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def _mark_groups(axis, num_heads: int, group_size: int) -> None:
    """White lines between KV groups on a heads axis drawn as image rows (GQA keeps or drops whole groups)."""
    for boundary in range(group_size, num_heads, group_size):
        axis.axhline(boundary - 0.5, color="white", linewidth=1.5)


def plot_score_distributions(
    attention: Sequence[Tensor],
    mlp: Sequence[Tensor],
    head_dim: int,
    path: str | Path,
    title: str = "Channel importance",
    group_size: int = 1,
) -> Path:
    """Per-layer score distributions of one shot.

    attention[i]: (heads · head_dim,) channel scores of layer i; mlp[i]: (intermediate,) channel scores.
    Panels: attention-channel boxplots per layer, per-head scores S_h as a layers × heads heatmap
    (each layer divided by its maximum; lines separate KV groups of ``group_size`` heads), MLP-channel
    boxplots per layer. Log scale for the boxplots.
    """
    layers = np.arange(len(attention))
    figure, axes = plt.subplots(3, 1, figsize=(max(8.0, 0.32 * len(layers) + 3), 10.5), constrained_layout=True)
    for axis, scores, name in ((axes[0], attention, "attention channels (o_proj input)"), (axes[2], mlp, "MLP channels (down_proj input)")):
        data = [np.clip(s.float().numpy(), 1e-12, None) for s in scores]
        axis.boxplot(data, positions=layers, widths=0.6, showfliers=True, flierprops={"markersize": 1.5, "alpha": 0.4})
        axis.set_yscale("log")
        axis.set_ylabel("score (L2 norm)")
        axis.set_title(name)
        axis.set_xlabel("layer")
    per_head = np.stack([head_scores(s.float(), head_dim).numpy() for s in attention])  # (layers, heads)
    normalised = per_head / np.maximum(per_head.max(axis=1, keepdims=True), 1e-12)
    image = axes[1].imshow(normalised.T, aspect="auto", cmap="viridis", origin="lower", interpolation="nearest")
    axes[1].set_title("head score S_h / max of the layer")
    axes[1].set_xlabel("layer")
    axes[1].set_ylabel("query head")
    axes[1].set_yticks(range(per_head.shape[1]))
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    _mark_groups(axes[1], per_head.shape[1], group_size)
    figure.colorbar(image, ax=axes[1], fraction=0.03)
    figure.suptitle(title)
    return _save(figure, path)


def original_indices_after_shots(plans: Sequence[PruningPlan]) -> list[tuple[list[list[int]], list[list[int]]]]:
    """For each shot, per layer, the *dense-model* indices still kept: [(heads per layer, MLP channels per layer)].

    Plan indices refer to the model before that shot; composing them maps survivors back to the dense model.
    """
    if not plans:
        return []
    heads = [list(range(plans[0].before.num_heads)) for _ in plans[0].layers]
    channels = [list(range(plans[0].before.intermediate_size)) for _ in plans[0].layers]
    history = []
    for plan in plans:
        heads = [[current[i] for i in layer.kept_heads] for current, layer in zip(heads, plan.layers)]
        channels = [[current[i] for i in layer.kept_mlp_channels] for current, layer in zip(channels, plan.layers)]
        history.append((heads, channels))
    return history


def kept_state_maps(plans: Sequence[PruningPlan]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per shot: (layers × dense heads, layers × dense MLP channels) maps of KEPT / REMOVED_NOW / REMOVED_BEFORE."""
    maps = []
    previous_heads: list[list[int]] | None = None
    previous_channels: list[list[int]] | None = None
    for heads, channels in original_indices_after_shots(plans):
        dense = plans[0].before
        head_map = np.full((len(heads), dense.num_heads), REMOVED_BEFORE)
        channel_map = np.full((len(channels), dense.intermediate_size), REMOVED_BEFORE)
        for layer, (kept_h, kept_c) in enumerate(zip(heads, channels)):
            alive_h = previous_heads[layer] if previous_heads else range(dense.num_heads)
            alive_c = previous_channels[layer] if previous_channels else range(dense.intermediate_size)
            head_map[layer, list(alive_h)] = REMOVED_NOW
            channel_map[layer, list(alive_c)] = REMOVED_NOW
            head_map[layer, kept_h] = KEPT
            channel_map[layer, kept_c] = KEPT
        maps.append((head_map, channel_map))
        previous_heads, previous_channels = heads, channels
    return maps


def plot_kept_maps(plans: Sequence[PruningPlan], path: str | Path) -> Path:
    """One row per shot: attention heads and MLP channels of every layer, in dense-model indices,
    coloured kept (green), removed at this shot (red) or removed at an earlier shot (grey)."""
    maps = kept_state_maps(plans)
    if not maps:
        raise ValueError("plot_kept_maps needs at least one plan")
    figure, axes = plt.subplots(len(maps), 2, figsize=(13, 3.2 * len(maps) + 0.6), squeeze=False,
                                gridspec_kw={"width_ratios": [1, 4]}, constrained_layout=True)
    for row, (plan, (head_map, channel_map)) in enumerate(zip(plans, maps)):
        for axis, data, what in ((axes[row, 0], head_map, "query heads"), (axes[row, 1], channel_map, "MLP channels")):
            axis.imshow(data.T, aspect="auto", cmap=_MAP_COLORS, vmin=0, vmax=2, origin="lower", interpolation="nearest")
            axis.set_xlabel("layer")
            axis.set_ylabel(f"dense {what}")
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[row, 0].set_yticks(range(head_map.shape[1]))
        _mark_groups(axes[row, 0], head_map.shape[1], plans[0].before.group_size)
        axes[row, 0].set_title(f"shot {plan.shot}: heads {plan.before.num_heads}→{plan.after.num_heads} "
                               f"(KV {plan.before.num_kv_heads}→{plan.after.num_kv_heads})")
        axes[row, 1].set_title(f"shot {plan.shot} ({plan.scorer}): MLP {plan.before.intermediate_size}→{plan.after.intermediate_size}")
    legend = [Patch(color=_MAP_COLORS(KEPT), label="kept"), Patch(color=_MAP_COLORS(REMOVED_NOW), label="removed this shot"),
              Patch(color=_MAP_COLORS(REMOVED_BEFORE), label="removed earlier")]
    figure.legend(handles=legend, loc="outside lower center", ncols=3)
    return _save(figure, path)


def plot_width_schedule(widths: Sequence[Widths], path: str | Path, title: str = "Width schedule") -> Path:
    """Grouped bars per stage (index 0 = dense, then after every shot): attention width, KV heads and MLP
    width as fractions of dense, each bar labelled with its absolute value."""
    if not widths:
        raise ValueError("plot_width_schedule needs at least the dense widths")
    dense = widths[0]
    series = {
        "attention width (heads·head_dim)": ([w.attention_width for w in widths], dense.attention_width),
        "KV heads (KV cache)": ([w.num_kv_heads for w in widths], dense.num_kv_heads),
        "MLP width": ([w.intermediate_size for w in widths], dense.intermediate_size),
    }
    stages = np.arange(len(widths))
    bar_width = 0.8 / len(series)
    figure, axis = plt.subplots(figsize=(max(6.0, 1.6 * len(widths) + 2), 4.5), constrained_layout=True)
    for offset, (label, (values, denominator)) in enumerate(series.items()):
        bars = axis.bar(stages + (offset - 1) * bar_width, np.array(values) / denominator, bar_width, label=label)
        axis.bar_label(bars, labels=[str(v) for v in values], fontsize=8, padding=2)
    axis.set_xticks(stages, ["dense"] + [f"after shot {i}" for i in stages[1:]])
    axis.set_ylim(0, 1.25)
    axis.set_ylabel("fraction of the dense model")
    axis.set_title(title)
    axis.grid(alpha=0.3, axis="y")
    axis.legend(loc="upper right", ncols=3, fontsize=8)
    return _save(figure, path)


def plot_training_curves(metrics: Mapping[str, Series], path: str | Path, shot_steps: Sequence[int] = ()) -> Path:
    """Training loss and validation perplexity against the global step; dashed lines mark the shots.

    ``metrics`` maps a logged name (``train_loss``, ``val_ppl``, ...) to its (step, value) pairs; a
    missing name leaves its panel with a note instead of a curve.
    """
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    for axis, name, log_scale in ((axes[0], "train_loss", False), (axes[1], "val_ppl", True)):
        points = metrics.get(name, ())
        if points:
            steps, values = zip(*points)
            axis.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3)
            if log_scale:
                axis.set_yscale("log")
        else:
            axis.text(0.5, 0.5, f"no {name} logged", ha="center", va="center", transform=axis.transAxes)
        for index, step in enumerate(shot_steps):
            axis.axvline(step, color="tab:red", linestyle="--", alpha=0.6, label="shot" if index == 0 else None)
        axis.set_xlabel("global step")
        axis.set_ylabel(name)
        axis.set_title(name.replace("_", " "))
        axis.grid(alpha=0.3)
        if shot_steps:
            axis.legend()
    return _save(figure, path)


def plot_stage_perplexity(rows: Sequence[Mapping], path: str | Path) -> Path:
    """Validation/test perplexity (log scale) and non-embedding parameters at every summary stage."""
    if not rows:
        raise ValueError("plot_stage_perplexity needs at least one summary row")
    stages = [str(row["stage"]) for row in rows]
    x = np.arange(len(rows))
    figure, axis = plt.subplots(figsize=(max(7.0, 1.1 * len(rows) + 2), 4.8), constrained_layout=True)
    for key, marker in (("val_ppl", "o"), ("test_ppl", "s")):
        values = [row.get(key) for row in rows]
        if any(v is not None for v in values):
            axis.plot(x, [np.nan if v is None else v for v in values], marker=marker, label=key.replace("_", " "))
    axis.set_yscale("log")
    axis.set_ylabel("perplexity")
    axis.set_xticks(x, stages, rotation=25, ha="right")
    axis.grid(alpha=0.3)
    params = axis.twinx()
    params.bar(x, [row["non_embedding_params"] / 1e6 for row in rows], alpha=0.15, color="gray", label="non-emb params (M)")
    params.set_ylabel("non-embedding parameters (M)")
    handles = axis.get_legend_handles_labels()[0] + params.get_legend_handles_labels()[0]
    axis.legend(handles=handles, loc="upper left")
    axis.set_title("Perplexity and size at every stage")
    return _save(figure, path)


def plot_series(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    xlabel: str,
    ylabel: str,
    title: str,
    log_y: bool = False,
    reference: float | None = None,
    reference_label: str = "dense",
) -> Path:
    """Named (x, y) lines with markers, e.g. perplexity against parameters for several scorers."""
    figure, axis = plt.subplots(figsize=(7.5, 4.8), constrained_layout=True)
    for (label, (xs, ys)), marker in zip(series.items(), "osD^v<>p*h"):
        axis.plot(xs, ys, marker=marker, label=label)
    if reference is not None:
        axis.axhline(reference, color="black", linestyle=":", label=reference_label)
    if log_y:
        axis.set_yscale("log")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3, which="both")
    figure.legend(loc="outside right center")  # beside the axes: never over a line or the title
    return _save(figure, path)
