"""RunPictures: at the end of ``fit`` draw the run directory's plans, scores, summary and metrics as PNGs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from callbacks.run_files import run_dir
from callbacks.transact_pruning import TransActPruning
from transact_pl.plan import PruningPlan
from transact_pl.infra.plots import (
    Series,
    plot_kept_maps,
    plot_score_distributions,
    plot_stage_perplexity,
    plot_training_curves,
    plot_width_schedule,
)

PICTURES_DIR = "pictures"


def read_metrics_csv(path: Path) -> dict[str, list[tuple[float, float]]]:
    """CSVLogger's metrics.csv as {metric: [(step, value), ...]}; empty cells are skipped."""
    metrics: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as handle:
        for record in csv.DictReader(handle):
            step = float(record.get("step") or "nan")
            for name, cell in record.items():
                if name in ("step", "epoch") or not cell:
                    continue
                value = float(cell)
                if math.isfinite(step) and math.isfinite(value):
                    metrics.setdefault(name, []).append((step, value))
    return metrics


def _shot_files(directory: Path, suffix: str) -> list[Path]:
    """shot_<i><suffix> files sorted by i (shot_10 after shot_9)."""
    return sorted(directory.glob(f"shot_*{suffix}"), key=lambda p: int(p.stem.split("_")[1]))


def draw_run_pictures(directory: Path, shot_steps: list[int] | tuple[int, ...] = ()) -> list[Path]:
    """Write every picture the run directory has data for into ``<directory>/pictures/``; return their paths.

    Reads plans/shot_<i>.json (kept maps, width schedule), scores/shot_<i>.pt (score distributions),
    summary.json (``stages``: perplexity per stage) and metrics.csv (loss and validation-perplexity curves).
    """
    out = directory / PICTURES_DIR
    written: list[Path] = []
    plans = [PruningPlan.from_json(p.read_text()) for p in _shot_files(directory / "plans", ".json")]
    if plans:
        written.append(plot_kept_maps(plans, out / "kept_maps.png"))
        written.append(plot_width_schedule([plans[0].before] + [p.after for p in plans], out / "width_schedule.png"))
    widths_before = {plan.shot: plan.before for plan in plans}
    for path in _shot_files(directory / "scores", ".pt"):
        scores = torch.load(path, map_location="cpu", weights_only=True)
        shot = int(path.stem.split("_")[1])
        if shot in widths_before:
            before = widths_before[shot]
            title = f"Channel importance before shot {shot} ({scores['scorer']})"
            written.append(plot_score_distributions(scores["attention"], scores["mlp"], before.head_dim,
                                                    out / f"scores_shot_{shot}.png", title, before.group_size))
    if (directory / "summary.json").exists():
        stages = json.loads((directory / "summary.json").read_text())["stages"]
        written.append(plot_stage_perplexity(stages, out / "stage_perplexity.png"))
    if (directory / "metrics.csv").exists():
        metrics: dict[str, Series] = read_metrics_csv(directory / "metrics.csv")
        written.append(plot_training_curves(metrics, out / "training_curves.png", shot_steps))
    return written


class RunPictures(Callback):
    def __init__(self, enabled: bool = True) -> None:
        """Draw the run as PNGs in ``<run dir>/pictures/`` when ``fit`` ends (global rank 0 only).

        The run dir is the logger's directory (see ``callbacks.run_files.run_dir``). Drawn in the
        ``teardown`` hook, after every callback's ``on_fit_end`` (so the summary of a prune-only run is
        there too); the loggers are flushed first so metrics.csv is complete.

        Args:
            enabled: draw the pictures (False skips them, e.g. for timing runs).
        """
        self.enabled = enabled

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.save()
        pruning = next((c for c in trainer.callbacks if isinstance(c, TransActPruning)), None)
        num_shots = len(pl_module.plans)
        shot_steps = [pruning.shot_step(i) for i in range(1, num_shots + 1)] if pruning is not None else []
        written = draw_run_pictures(run_dir(trainer), shot_steps)
        pl_module.print(f"wrote {len(written)} pictures to {run_dir(trainer) / PICTURES_DIR}")
