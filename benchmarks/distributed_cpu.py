"""One process against DDP and FSDP2 over 2 processes on the CPU (gloo): same plans, same weights, and the time.

Every variant runs the real CLI (``train.py fit``) on the same job: the 2-layer cut of SmolLM2, 2 shots
of TransAct pruning (steps 0 and S/2) with KD recovery from the dense teacher, the same global batch
(1 × B or 2 × B/2) and steps. Reported per variant: wall time, the kept heads/channels of every shot
against the one-process run, the largest exported-weight difference, and the teacher's memory per
process (FSDP2 shards it).

    python -m benchmarks.distributed_cpu     # writes benchmarks/results/distributed_cpu.{json,png}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from benchmarks.common import RESULTS_DIR, console, markdown_table, print_table, write_results  # noqa: E402
from callbacks.run_pictures import read_metrics_csv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORK_DIR = RESULTS_DIR / "tmp" / "distributed_cpu"  # run directories (git-ignored)
EXPORT = Path("exports") / "debug_tiny"
FSDP2 = "callbacks.atomic_checkpoint.AtomicModelParallelStrategy"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="training steps (shots at 0 and steps/2)")
    parser.add_argument("--batch-size", type=int, default=4, help="global batch; each of 2 processes takes half")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=2, help="decoder layers of SmolLM2 kept (30 = all)")
    return parser.parse_args()


def variants(batch_size: int) -> dict[str, list[str]]:
    half = str(batch_size // 2)
    return {
        "1 process": ["--trainer.devices=1", f"--data.batch_size={batch_size}"],
        "DDP, 2 processes": ["--trainer.devices=2", "--trainer.strategy=ddp", f"--data.batch_size={half}"],
        "FSDP2, 2 processes": ["--trainer.devices=2", f"--trainer.strategy={FSDP2}",
                               "--trainer.strategy.data_parallel_size=2", "--trainer.strategy.tensor_parallel_size=1",
                               f"--data.batch_size={half}"],
    }


def run(directory: Path, args: argparse.Namespace, extra: list[str]) -> float:
    """One CLI run in ``directory``; returns its wall time in seconds."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    command = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(REPO / "configs" / "debug_tiny.yaml"),
               f"--trainer.max_steps={args.steps}", f"--pruning.steps_between_shots={args.steps // 2}",
               f"--trainer.val_check_interval={args.steps // 2}", f"--data.block_size={args.block_size}",
               "--model=transact_pl.lightning_modules.distillation_lm.DistillationLM", f"--model.num_layers={args.num_layers}",
               "--model.alpha=0.5", "--model.learning_rate=1e-4", "--model.warmup_steps=2", *extra]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=directory, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(extra)} failed:\n{result.stderr[-3000:]}")
    return elapsed


def teacher_memory_bytes(directory: Path) -> float:
    return read_metrics_csv(directory / "runs" / "debug_tiny" / "logs" / "version_0" / "metrics.csv")["teacher_memory_bytes"][0][1]


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    results = {}
    for name, extra in variants(args.batch_size).items():
        console.print(f"[bold]{name}[/bold] …")
        directory = WORK_DIR / name.split(",")[0].replace(" ", "_").lower()
        results[name] = {"wall_s": run(directory, args, extra), "dir": directory}
    reference = results["1 process"]
    reference_plans = json.loads((reference["dir"] / EXPORT / "transact_plans.json").read_text())
    reference_weights = load_file(reference["dir"] / EXPORT / "model.safetensors")
    rows = []
    for name, result in results.items():
        plans = json.loads((result["dir"] / EXPORT / "transact_plans.json").read_text())
        weights = load_file(result["dir"] / EXPORT / "model.safetensors")
        result["plans_equal"] = plans == reference_plans
        result["max_weight_difference"] = max((weights[k] - reference_weights[k]).abs().max().item() for k in weights)
        result["teacher_mib_per_process"] = teacher_memory_bytes(result["dir"]) / 2**20
        rows.append([name, result["wall_s"], "yes" if result["plans_equal"] else "NO", f"{result['max_weight_difference']:.2e}",
                     result["teacher_mib_per_process"]])
    headers = ["run", "wall s", "plans = 1 process", "max |Δ weight|", "teacher MiB / process"]
    print_table("1 process vs 2 processes (CPU, gloo)", headers, rows)
    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.barh([row[0] for row in rows], [row[1] for row in rows], color=["tab:gray", "tab:blue", "tab:orange"])
    axis.set_xlabel("wall time of the whole run (s)")
    axis.set_title(f"{args.num_layers}-layer SmolLM2, 2 shots, {args.steps} KD steps × {args.batch_size}×{args.block_size} tokens")
    figure.tight_layout()
    figure.savefig(RESULTS_DIR / "distributed_cpu.png", dpi=120)
    settings = vars(args)
    payload = {"settings": settings,
               "runs": {name: {k: v for k, v in result.items() if k != "dir"} for name, result in results.items()},
               "markdown": markdown_table(headers, rows)}
    write_results("distributed_cpu", payload, started)


if __name__ == "__main__":
    main()
