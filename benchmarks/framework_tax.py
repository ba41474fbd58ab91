"""Framework tax of recovery training: the Lightning pipeline against a bare PyTorch loop, same steps, same batches.

The dense SmolLM2 is pruned once (acts, 16×256 Wikipedia calibration tokens) to the default job's final widths
(6/2 heads, MLP 768); both sides then train a copy of that student with the default job's objective
(``DistillationLM``, alpha 0.5, the full teacher) on the same ``--steps`` batches of 2×256 tokens:

- bare: ``compute_loss`` → backward → AdamW step → LR scheduler step → zero_grad, the module's own optimizer
  and scheduler (``configure_optimizers``), nothing else;
- lightning: ``Trainer.fit`` as configs/smollm2_transact.yaml sets it up for training: its ProgressBar,
  ModelCheckpoint every ``--checkpoint-every`` steps with the default job's save_last, RunPictures, CSVLogger with
  log_every_n_steps 1, the atomic checkpoint plugin; no validation (the bare loop has none).

Timed: steps 1..N−1 of each run (step 0 is the warm-up: the teacher loads, the optimizer state is created), from
the start of step 1 to the end of step N−1; Lightning runs one batch more and its window ends at the start of that
batch, so the checkpoint written after step N−1 counts (N = 11: 10 timed steps, one checkpoint and last.ckpt).
Wall and process CPU time.
The runs go bare, lightning, bare, and lightning is compared with the mean of the two bare runs (load from
other processes drifts over minutes). Both sides must end with equal weights (checked, reported).

    OMP_NUM_THREADS=1 python -m benchmarks.framework_tax   # writes benchmarks/results/framework_tax.{json,png}
"""

from __future__ import annotations

import argparse
import copy
import gc
import tempfile
import time
from pathlib import Path

import lightning as L
import matplotlib
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from benchmarks.common import RESULTS_DIR, batches, check_cpu_threads, console, load_dense, markdown_table, print_table
from benchmarks.common import pruned_copy, widths_for, write_results
from benchmarks.texts import calibration_blocks
from callbacks.atomic_checkpoint import AtomicCheckpointIO, AtomicModelCheckpoint
from callbacks.progress import ProgressBar
from callbacks.run_pictures import RunPictures
from transact_pl.arch import model_widths
from transact_pl.infra.assets import EMBEDDED_MODEL
from transact_pl.lightning_modules.distillation_lm import DistillationLM
from transact_pl.pruning import compute_scores

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402

TARGET = 0.95  # lightning tokens/s ÷ bare tokens/s
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2_transact.yaml"


def default_job_checkpointing() -> dict:
    """The default job's ModelCheckpoint arguments (every_n_train_steps, save_top_k, save_last), from its config."""
    callbacks = yaml.safe_load(DEFAULT_CONFIG.read_text())["trainer"]["callbacks"]
    return next(c["init_args"] for c in callbacks if c["class_path"].endswith("ModelCheckpoint"))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=11, help="steps per run; step 0 is not timed")
    checkpointing = default_job_checkpointing()
    parser.add_argument("--checkpoint-every", type=int, default=checkpointing["every_n_train_steps"],
                        help="ModelCheckpoint every_n_train_steps (default: the default job's)")
    parser.add_argument("--save-last", default=str(checkpointing["save_last"]).lower(), choices=["true", "false", "link"],
                        help="ModelCheckpoint save_last (default: the default job's)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


class StepClock(L.Callback):
    """Wall and CPU time at the start of every training batch; the student's weights at the start of batch
    ``weights_at`` (after the mark, so the copy is not timed)."""

    def __init__(self, weights_at: int) -> None:
        self.marks: list[tuple[float, float]] = []
        self.weights_at = weights_at
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))
        if batch_idx == self.weights_at:
            self.weights = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


class TimedCheckpointIO(AtomicCheckpointIO):
    """The default job's checkpoint plugin, recording the wall and CPU seconds of every file it writes."""

    def __init__(self) -> None:
        super().__init__()
        self.saves: list[dict] = []

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        super().save_checkpoint(checkpoint, path, storage_options)
        self.saves.append({"file": Path(path).name, "bytes": Path(path).stat().st_size,
                           "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu})


def student(pruned, plan) -> DistillationLM:
    """The default job's recovery module around a copy of the pruned model."""
    module = DistillationLM(model=EMBEDDED_MODEL, learning_rate=2e-4, warmup_steps=5, alpha=0.5, chunk_size=128)
    module.model, module.plans = copy.deepcopy(pruned).train(), [plan]
    return module


def window(marks: list[tuple[float, float]]) -> dict:
    """Wall and CPU seconds from the start of step 1 to the start of the last step, and of each timed step
    (a checkpoint counts in the step it follows)."""
    steps = [{"wall_s": after[0] - before[0], "cpu_s": after[1] - before[1]} for before, after in zip(marks[1:-1], marks[2:])]
    return {"wall_s": marks[-1][0] - marks[1][0], "cpu_s": marks[-1][1] - marks[1][1], "timed_steps": len(marks) - 2,
            "steps": steps}


def bare_run(pruned, plan, train: list[dict], args: argparse.Namespace) -> tuple[dict, dict]:
    """The steps in a plain loop with the module's own optimizer and scheduler; (timings, final weights)."""
    module = student(pruned, plan)
    # The same max_steps as the lightning run (its LR schedule spans it); only read by lr_factor, never fitted.
    module.trainer = L.Trainer(max_steps=args.steps + 1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                               enable_model_summary=False)
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    marks = []
    for batch in train:
        marks.append((time.perf_counter(), time.process_time()))
        optimizer.zero_grad(set_to_none=True)
        loss, _ = module.compute_loss(batch["input_ids"])
        loss.backward()
        optimizer.step()
        scheduler.step()
    marks.append((time.perf_counter(), time.process_time()))
    return window(marks), {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def lightning_run(pruned, plan, train: list[dict], args: argparse.Namespace, root: Path) -> tuple[dict, dict]:
    """``Trainer.fit`` with the default job's training callbacks, logger and checkpoint plugin."""
    module = student(pruned, plan)
    clock, checkpoint_io = StepClock(weights_at=args.steps), TimedCheckpointIO()
    checkpoints = AtomicModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=args.checkpoint_every, save_top_k=-1,
                                  save_last={"true": True, "false": False}.get(args.save_last, args.save_last))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps + 1, log_every_n_steps=1, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=root, plugins=[checkpoint_io],
                        logger=CSVLogger(root, name="logs"), callbacks=[ProgressBar(), checkpoints, RunPictures(), clock])
    started = time.perf_counter()
    # One batch more than the bare run: its start closes the window after the last timed step's checkpoint.
    trainer.fit(module, train_dataloaders=DataLoader([*train, train[-1]], batch_size=None))
    fit_s = time.perf_counter() - started
    timings = window(clock.marks) | {"fit_wall_s": fit_s, "checkpoints": len(list((root / "checkpoints").glob("*.ckpt"))),
                                     "checkpoint_saves": checkpoint_io.saves}
    return timings, clock.weights


def main() -> None:
    args = parse_args()
    check_cpu_threads()
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    dense, tokenizer = load_dense()
    blocks = calibration_blocks(tokenizer, args.block_size, 16 + args.steps * args.batch_size)
    calibration, train = batches(blocks[:16], 8), batches(blocks[16:], args.batch_size)
    scores = compute_scores(dense, "acts", calibration, args.seed)
    pruned, plan = pruned_copy(dense, scores, widths_for(model_widths(dense), 2, 768), "acts")
    del dense
    gc.collect()
    runs = []
    for side in ("bare", "lightning", "bare"):
        if side == "bare":
            timings, weights = bare_run(pruned, plan, train, args)
        else:
            with tempfile.TemporaryDirectory(dir=RESULTS_DIR.parent.parent / "runs") as root:
                timings, weights = lightning_run(pruned, plan, train, args, Path(root))
        runs.append({"side": side, **timings, "weights": weights})
        console.print(f"{side}: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items() if isinstance(v, (int, float))))
        gc.collect()
    report(runs, args, started)


def report(runs: list[dict], args: argparse.Namespace, started: float) -> None:
    tokens = (args.steps - 1) * args.batch_size * args.block_size
    bare = [r for r in runs if r["side"] == "bare"]
    lightning = next(r for r in runs if r["side"] == "lightning")
    difference = max((lightning["weights"][k] - bare[0]["weights"][k]).abs().max().item() for k in bare[0]["weights"])
    ratio = {clock: sum(r[clock] for r in bare) / len(bare) / lightning[clock] for clock in ("wall_s", "cpu_s")}
    saves = lightning["checkpoint_saves"]
    saved = {clock: sum(save[clock] for save in saves) for clock in ("wall_s", "cpu_s")}
    without_saves = {clock: sum(r[clock] for r in bare) / len(bare) / (lightning[clock] - saved[clock]) for clock in saved}
    headers = ["run", "timed steps", "wall s", "CPU s", "tokens/s (wall)", "checkpoint writes (wall s / CPU s)"]
    rows = [[r["side"], r["timed_steps"], r["wall_s"], r["cpu_s"], tokens / r["wall_s"],
             " + ".join(f"{s['file']} {s['bytes'] / 2**30:.2f} GiB {s['wall_s']:.1f}/{s['cpu_s']:.1f}" for s in r["checkpoint_saves"])
             if r["side"] == "lightning" else "–"] for r in runs]
    description = (f"SmolLM2 pruned to 6/2 heads + MLP 768, DistillationLM alpha 0.5 (full teacher), {args.steps - 1} timed steps "
                   f"× {args.batch_size}×{args.block_size} tokens, checkpoint every {args.checkpoint_every} steps, save_last {args.save_last}, "
                   f"{torch.get_num_threads()} thread(s)")
    print_table(f"Framework tax — {description}", headers, rows)
    verdict = (f"lightning / bare tokens/s: {ratio['wall_s']:.3f} (wall), {ratio['cpu_s']:.3f} (CPU); target ≥ {TARGET}: "
               f"{'met' if ratio['wall_s'] >= TARGET else 'missed'}; without the checkpoint writes ({saved['wall_s']:.1f} s wall, "
               f"{saved['cpu_s']:.1f} s CPU): {without_saves['wall_s']:.3f} (wall), {without_saves['cpu_s']:.3f} (CPU); "
               f"final weights differ by at most {difference:.3g}")
    console.print(verdict)
    figure, (axes, per_step) = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    drawn = axes.bar([f"{r['side']} {i + 1}" for i, r in enumerate(runs)], [tokens / r["wall_s"] for r in runs],
                     color=["tab:gray" if r["side"] == "bare" else "tab:purple" for r in runs])
    axes.bar_label(drawn, fmt="%.1f")
    axes.set(ylabel="training tokens/s (wall)", title=f"Lightning ÷ bare loop: {ratio['wall_s']:.3f} (target ≥ {TARGET})")
    for index, run in enumerate(runs):
        for clock, style in (("wall_s", "-"), ("cpu_s", ":")):
            per_step.plot(range(1, len(run["steps"]) + 1), [step[clock] for step in run["steps"]], style, marker="o", markersize=3,
                          color="tab:gray" if run["side"] == "bare" else "tab:purple", alpha=0.5 + 0.25 * (run["side"] != "bare"),
                          label=f"{run['side']} {index + 1}, {clock[:-2]}")
    per_step.set(xlabel="step (a checkpoint follows step 9: global step 10)", ylabel="seconds",
                 title="Each timed step: wall (solid) and CPU (dotted)")
    per_step.legend(fontsize=7, ncols=2)
    figure.savefig(RESULTS_DIR / "framework_tax.png", dpi=110)
    plt.close(figure)
    for run in runs:
        run.pop("weights")
    write_results("framework_tax", {"settings": vars(args) | {"description": description}, "runs": runs, "ratio": ratio,
                                    "checkpoint_write_s": saved, "ratio_without_checkpoint_writes": without_saves,
                                    "max_weight_difference": difference, "target": TARGET, "verdict": verdict,
                                    "markdown": markdown_table(headers, rows)}, started)


if __name__ == "__main__":
    main()
