"""What every benchmark script shares: the dense model, one-shot pruning to given widths, peak memory,
results written as JSON next to a PNG, and tables printed with rich."""

from __future__ import annotations

import copy
import json
import os
import platform
import resource
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from transact_pl.arch import Widths, model_widths
from transact_pl.infra.assets import EMBEDDED_MODEL
from transact_pl.eval_suite import block_batches
from transact_pl.evaluation import kv_cache_bytes_per_token, parameter_counts
from transact_pl.infra.loading import load_causal_lm, load_tokenizer
from transact_pl.plan import PruningPlan
from transact_pl.pruning import plan_shot
from transact_pl.scoring import ChannelScores
from transact_pl.surgery import apply_plan

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Wide enough for the benchmark tables when the output is a file or a pipe (rich assumes 80 columns there).
console = Console(width=None if sys.stdout.isatty() else 160)


def check_cpu_threads() -> None:
    """Warn when torch's CPU threads outnumber the cores that are free: oversubscribed OpenMP threads wait on
    each other, and on the shared 2-core machine a decode step took 10× longer with 2 threads than with 1."""
    if torch.cuda.is_available() or torch.get_num_threads() == 1:
        return
    free_cores = (os.cpu_count() or 1) - os.getloadavg()[0]
    if free_cores < torch.get_num_threads():
        warnings.warn(f"{torch.get_num_threads()} torch threads but only ~{max(free_cores, 0):.1f} idle cores "
                      f"(load average {os.getloadavg()[0]:.1f}): timings will be inflated; run with OMP_NUM_THREADS=1")


def load_dense(num_layers: int | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The embedded SmolLM2-135M-Instruct (fp32, eval mode) and its tokenizer."""
    return load_causal_lm(EMBEDDED_MODEL, num_layers).eval(), load_tokenizer(EMBEDDED_MODEL)


def widths_for(dense: Widths, kv_groups: int, mlp: int) -> Widths:
    """Widths keeping ``kv_groups`` whole KV groups (their query heads too) and ``mlp`` MLP channels."""
    return Widths(kv_groups * dense.group_size, kv_groups, dense.head_dim, mlp)


def pruned_copy(dense: PreTrainedModel, scores: ChannelScores, after: Widths, scorer: str) -> tuple[PreTrainedModel, PruningPlan]:
    """A deep copy of ``dense`` pruned in one shot to ``after`` by ``scores`` (the dense model is untouched)."""
    model = copy.deepcopy(dense)
    plan = plan_shot(model, scores, after, 1, scorer)
    apply_plan(model, plan)
    return model, plan


def size_figures(model: PreTrainedModel) -> dict:
    """Widths, parameter counts and 16-bit KV-cache bytes per token of ``model``."""
    widths = model_widths(model)
    total, non_embedding = parameter_counts(model)
    return {"heads": widths.num_heads, "kv_heads": widths.num_kv_heads, "mlp": widths.intermediate_size,
            "params": total, "non_embedding_params": non_embedding, "kv_bytes_per_token": kv_cache_bytes_per_token(model)}


def batches(blocks: Tensor, batch_size: int) -> list[dict[str, Tensor]]:
    return block_batches(blocks, batch_size)


@dataclass
class PeakMemory:
    """Peak memory above the starting point while the context ran (filled in when it exits)."""

    device: str
    peak_bytes: int = 0


def _rss() -> int:
    return psutil.Process(os.getpid()).memory_info().rss


@contextmanager
def peak_memory(device: torch.device, interval_s: float = 0.002) -> Iterator[PeakMemory]:
    """Peak extra memory of the block: ``torch.cuda.max_memory_allocated`` on CUDA, else the process RSS
    sampled every ``interval_s`` by a thread (a lower bound: shorter-lived allocations can be missed)."""
    result = PeakMemory(str(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result.peak_bytes = torch.cuda.max_memory_allocated(device) - baseline
        return
    baseline = _rss()
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval_s):
            peak[0] = max(peak[0], _rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        result.peak_bytes = max(peak[0], _rss()) - baseline


def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status in bytes (Linux), None elsewhere."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return None


def peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM of its own address space (Linux), else ru_maxrss. A child started by
    fork+exec must use VmHWM: Linux carries the parent's RSS at fork into the child's ru_maxrss."""
    peak = _proc_status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak_rss() -> int:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: ``5`` into /proc/self/clear_refs); return the current RSS,
    so that ``peak_rss_bytes() - returned`` is the peak of what runs next. Raises where that is unsupported."""
    Path("/proc/self/clear_refs").write_text("5")
    current = _proc_status_bytes("VmRSS")
    if current is None:
        raise OSError("no /proc/self/status: peak RSS of a pass cannot be isolated on this system")
    return current


def environment() -> dict:
    """Where the numbers were taken (timings depend on it)."""
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def write_results(name: str, payload: dict, started: float) -> Path:
    """benchmarks/results/<name>.json with the payload, the environment and the script's wall time."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {**payload, "environment": environment(), "wall_time_s": round(time.perf_counter() - started, 1)}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    console.print(f"wrote {path.relative_to(RESULTS_DIR.parent.parent)} (wall time {payload['wall_time_s']} s)")
    return path


def format_cell(cell: object) -> str:
    """Floats with two decimals and thousands separators; everything else as str."""
    return f"{cell:,.2f}" if isinstance(cell, float) else str(cell)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    table = Table(title=title)
    for index, header in enumerate(headers):
        table.add_column(header, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*[format_cell(cell) for cell in row])
    console.print(table)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """The same table as Markdown (for README sections)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(format_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
