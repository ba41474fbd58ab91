"""One GPU check of the distributed code path on a real NCCL process group (one H200, under 8 minutes).

    bash benchmarks/gpu_check.sh          # or: python -m benchmarks.gpu_check [--dry-run]

Phase 1, side by side on the one GPU (a world of one still initialises NCCL through the strategy):
  * three real ``train.py fit`` runs of SmolLM2-135M (all 30 layers) in bf16-mixed, 2 TransAct shots + KD recovery,
    verified export: DDP (devices=1) with an int8 teacher, DDP with an nf4 teacher, FSDP2
    (AtomicModelParallelStrategy, data_parallel_size=1) with a bf16 teacher (bitsandbytes weights cannot be sharded);
  * ``benchmarks.distillation_cuda_check`` (KD steps in a Trainer with full/bf16/int8/nf4 teachers, chunked losses).
Phase 2, alone so that its timings are clean: ``benchmarks.gpu_fsdp_7b`` (LLaMA-7B shape, random weights, FSDP2 on
NCCL: calibration tokens/s, shrink time, KD and CE step time, peak memory), with MFU computed here.

Writes benchmarks/results/gpu_check.json and prints one table. Each part runs as its own process with a deadline;
a part that fails or runs out of time is recorded as such and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from benchmarks.common import RESULTS_DIR, console

REPO = Path(__file__).resolve().parents[1]
WORK_DIR = RESULTS_DIR / "tmp" / "gpu_check"  # run directories and logs (git-ignored)
FSDP2 = "callbacks.atomic_checkpoint.AtomicModelParallelStrategy"
# Dense bf16 peak of one GPU (FLOP/s), for MFU; matched against torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}
SMOLLM2_VARIANTS = {
    "ddp_int8": (["--trainer.strategy=ddp"], "int8"),
    "ddp_nf4": (["--trainer.strategy=ddp"], "nf4"),
    "fsdp2_bf16": ([f"--trainer.strategy={FSDP2}", "--trainer.strategy.data_parallel_size=1",
                    "--trainer.strategy.tensor_parallel_size=1"], "bf16"),
}


@dataclass
class Job:
    """One part of the check: a command run in ``cwd`` with its output in ``log``."""

    name: str
    command: list[str]
    cwd: Path
    log: Path
    fresh: bool = False  # cwd is this job's own run directory: emptied first (an old export would be refused)
    process: subprocess.Popen | None = None
    started: float = 0.0
    result: dict = field(default_factory=dict)


def parse_args(args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase1-s", type=int, default=230, help="deadline of the SmolLM2 runs and the KD check")
    parser.add_argument("--phase2-s", type=int, default=200, help="deadline of the 7B-shape FSDP2 timing")
    parser.add_argument("--steps", type=int, default=8, help="training steps of each SmolLM2 run (shots at 0 and half)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit (no GPU needed)")
    return parser.parse_args(args)


def smollm2_job(name: str, steps: int) -> Job:
    strategy, teacher = SMOLLM2_VARIANTS[name]
    command = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(REPO / "configs" / "debug_tiny.yaml"),
               "--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.precision=bf16-mixed", *strategy,
               f"--trainer.max_steps={steps}", f"--pruning.steps_between_shots={steps // 2}",
               f"--trainer.val_check_interval={steps // 2}", "--model=transact_pl.lightning_modules.distillation_lm.DistillationLM",
               "--model.num_layers=null", f"--model.teacher_precision={teacher}", "--model.alpha=0.5",
               "--data.block_size=256", "--data.max_val_blocks=16", "--data.max_test_blocks=16"]
    return Job(name, command, WORK_DIR / name, WORK_DIR / f"{name}.log", fresh=True)


def module_job(name: str, module: str, *args: str) -> Job:
    return Job(name, [sys.executable, "-m", module, *args], REPO, WORK_DIR / f"{name}.log")


def start(job: Job) -> None:
    """Start ``job`` in its own session (so that a deadline can end it and its children, and nothing else)."""
    if job.fresh:
        shutil.rmtree(job.cwd, ignore_errors=True)
    job.cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "NCCL_DEBUG": "VERSION"}
    job.started = time.perf_counter()
    with job.log.open("w") as log:
        job.process = subprocess.Popen(job.command, cwd=job.cwd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)


def finish(jobs: list[Job], deadline_s: float) -> None:
    """Wait for every job until ``deadline_s`` after the first started; kill the process group of any still running."""
    deadline = min(job.started for job in jobs) + deadline_s
    for job in jobs:
        try:
            returncode = job.process.wait(timeout=max(1.0, deadline - time.perf_counter()))
            status = "ok" if returncode == 0 else f"exit {returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(job.process.pid, signal.SIGKILL)
            job.process.wait()
            status = f"timeout ({deadline_s:.0f} s)"
        log = job.log.read_text(errors="replace")
        job.result.update(status=status, seconds=round(time.perf_counter() - job.started, 1),
                          nccl="NCCL version" in log,  # printed when a communicator is created (NCCL_DEBUG=VERSION)
                          log=str(job.log.relative_to(REPO)), log_tail=log[-1500:] if status != "ok" else "")


def read_if_new(path: Path, since: float) -> dict | None:
    """The JSON a part wrote during this check (None when it is absent or older: a stale file is never reported)."""
    if not path.is_file() or path.stat().st_mtime < since:
        return None
    return json.loads(path.read_text())


def smollm2_summary(directory: Path) -> dict:
    """Stages (widths, perplexity) of a train.py run, its teacher memory and whether its export landed."""
    from callbacks.run_pictures import read_metrics_csv

    run = directory / "runs" / "debug_tiny"
    summaries = sorted(run.rglob("summary.json"))
    found: dict = {"export": (directory / "exports" / "debug_tiny" / "config.json").is_file()}
    if summaries:
        stages = json.loads(summaries[-1].read_text())["stages"]
        found.update(dense=stages[0], final=stages[-1])
    metrics = sorted(run.rglob("metrics.csv"))
    if metrics:
        memory = read_metrics_csv(metrics[-1]).get("teacher_memory_bytes")
        found["teacher_mib"] = round(memory[0][1] / 2**20, 1) if memory else None
    return found


def mfu(record: dict) -> dict:
    """Model FLOPs utilisation of the 7B-shape CE and KD steps, before and after the shrink.

    FLOPs per token: 6·N + 12·L·A·T for a training step (N: matmul parameters = all but the input embedding,
    L layers, A = heads·head_dim, T tokens per sequence; PaLM's appendix B) plus 2·N_t + 4·L·A_t·T for the KD
    teacher's forward (the dense model)."""
    from benchmarks.gpu_fsdp_7b import LLAMA_7B

    peak = next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in record.get("device", "")), None)
    if peak is None:
        return {"mfu_note": f"no bf16 peak known for {record.get('device')}"}
    layers, seq, embedding = LLAMA_7B["num_hidden_layers"], record["seq"], LLAMA_7B["vocab_size"] * LLAMA_7B["hidden_size"]
    dense_attention = LLAMA_7B["hidden_size"]  # 32 heads × 128
    after = record["widths_after"]
    teacher = 2 * (record["params_before"] - embedding) + 4 * layers * dense_attention * seq
    out = {"peak_bf16_flops": peak}
    for when, params, attention in (("before", record["params_before"], dense_attention),
                                    ("after", record["params_after"], after["num_heads"] * after["head_dim"])):
        student = 6 * (params - embedding) + 12 * layers * attention * seq
        for kind, flops in (("ce", student), ("kd", student + teacher)):
            out[f"{kind}_mfu_{when}"] = round(record[f"{kind}_tokens_per_s_{when}"] * flops / peak, 4)
    return out


def summary_table(results: dict) -> Table:
    table = Table(title=f"GPU check on {results.get('device', '?')} ({results['total_s']:.0f} s)")
    for header in ("check", "status", "s", "NCCL", "result"):
        table.add_column(header, justify="left" if header in ("check", "result") else "right")
    for name, part in results["parts"].items():
        table.add_row(name, part["status"], f"{part['seconds']:.0f}", "yes" if part["nccl"] else "no", describe(name, part))
    return table


def describe(name: str, part: dict) -> str:
    """The few numbers of a part that fit one table cell."""
    data = part.get("data") or {}
    if name in SMOLLM2_VARIANTS and "final" in data:
        dense, final = data["dense"], data["final"]
        return (f"heads {dense['heads']}/{dense['kv_heads']}→{final['heads']}/{final['kv_heads']}, MLP {dense['mlp']}→"
                f"{final['mlp']}; test ppl {dense.get('test_ppl', float('nan')):.1f}→{final.get('test_ppl', float('nan')):.1f}; "
                f"teacher {data.get('teacher_mib')} MiB; export {'ok' if data['export'] else 'missing'}")
    if name == "distillation_cuda" and data:
        return "; ".join(f"{p} {'error' if 'error' in data.get(p, {}) else 'ok'}" for p in ("full", "bf16", "int8", "nf4"))
    if name == "fsdp2_7b" and data:
        return (f"calib {data['calibration_tokens_per_s']:,.0f} tok/s; shrink {data['shrink_s']:.1f} s; CE "
                f"{data['ce_step_s_before']:.2f}→{data['ce_step_s_after']:.2f} s, KD {data['kd_step_s_before']:.2f}→"
                f"{data['kd_step_s_after']:.2f} s; peak {data['kd_peak_gib_before']:.0f} GiB; MFU CE "
                f"{data.get('ce_mfu_before', float('nan')):.0%}")
    return "no result (see log)"


def main(args: list[str] | None = None) -> None:
    options = parse_args(args)
    started = time.time()
    phase1 = [smollm2_job(name, options.steps) for name in SMOLLM2_VARIANTS]
    phase1.append(module_job("distillation_cuda", "benchmarks.distillation_cuda_check"))
    phase2 = [module_job("fsdp2_7b", "benchmarks.gpu_fsdp_7b", "--out", str(RESULTS_DIR / "gpu_fsdp_7b.json"))]
    if options.dry_run:
        for job in phase1 + phase2:
            console.print(f"[{job.name}] (cd {job.cwd} && {shlex.join(job.command)})", soft_wrap=True, markup=False)
        return
    import torch

    WORK_DIR.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "parts": {}}
    for jobs, deadline in ((phase1, options.phase1_s), (phase2, options.phase2_s)):
        for job in jobs:
            start(job)
        finish(jobs, deadline)
    for job in phase1[:-1]:
        job.result["data"] = smollm2_summary(job.cwd)
    phase1[-1].result["data"] = read_if_new(RESULTS_DIR / "distillation_cuda.json", started)
    record = read_if_new(RESULTS_DIR / "gpu_fsdp_7b.json", started)
    phase2[0].result["data"] = None if record is None else {**record, **mfu(record)}
    results["parts"] = {job.name: job.result for job in phase1 + phase2}
    results["total_s"] = round(time.time() - started, 1)
    options.out.write_text(json.dumps(results, indent=1) + "\n")
    console.print(summary_table(results))
    console.print(f"wrote {options.out}")


if __name__ == "__main__":
    main()
