"""What calibration costs: the acts statistics pass (forward pre-hooks on every o_proj and down_proj that
accumulate Σa²) and the statistics pass of the least-squares reconstruction (Σa² and the second moments
G = Σ x xᵀ of the same inputs, ``collect_second_moments``) against a plain no-grad forward over the same
batches; targets: Σa² ≤ 1.05×, Σa² + G ≤ 2× the plain forward.

Timing: every pass runs in eval mode without a KV cache, in ``--repeats`` rounds back to back (the order
rotates from round to round); each overhead is the median over rounds of the ratio pass / plain, in wall
time and in process CPU time, so that load from other processes, which drifts over seconds, hits both sides
of a ratio alike. Nothing else runs in the process while timing (no memory sampler).
Memory: the peak above the loaded model during one more pass of each kind: on CUDA the allocator's peak;
on CPU the RSS high-water mark of a fresh process, reset once the model and data are loaded.

    python -m benchmarks.pipeline_cost        # writes benchmarks/results/pipeline_cost.{json,png}
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import RESULTS_DIR, batches, check_cpu_threads, console, load_dense, markdown_table  # noqa: E402
from benchmarks.common import peak_memory, peak_rss_bytes, print_table, reset_peak_rss, write_results  # noqa: E402
from benchmarks.texts import calibration_blocks  # noqa: E402
from transact_pl.importance import collect_activation_stats  # noqa: E402
from transact_pl.reconstruction import collect_second_moments  # noqa: E402

PASSES = ("plain forward", "acts statistics (hooks)", "acts + second moments (G = Σ x xᵀ)")
TARGET_RATIO = {PASSES[1]: 1.05, PASSES[2]: 2.0}  # pass / plain forward


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--calibration-blocks", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=8, help="back-to-back rounds of every pass")
    parser.add_argument("--memory-worker", choices=PASSES, help=argparse.SUPPRESS)
    return parser.parse_args()


@torch.no_grad()
def plain_forward(model, calibration: list[dict]) -> None:
    """The same forward passes as the statistics pass (no cache, last-position logits only), without hooks."""
    for batch in calibration:
        model(input_ids=batch["input_ids"], use_cache=False, logits_to_keep=1)


def run_pass(name: str, model, calibration: list[dict]) -> None:
    if name == PASSES[0]:
        plain_forward(model, calibration)
    elif name == PASSES[1]:
        collect_activation_stats(model, calibration)
    else:
        collect_second_moments(model, calibration)


def timed(name: str, model, calibration: list[dict], device: torch.device) -> dict:
    """Wall and process CPU seconds of one pass."""
    start, cpu_start = time.perf_counter(), time.process_time()
    run_pass(name, model, calibration)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu_start}


def setup(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, list[dict]]:
    dense, tokenizer = load_dense()
    blocks = calibration_blocks(tokenizer, args.block_size, args.calibration_blocks)
    return dense.to(device), [{"input_ids": b["input_ids"].to(device)} for b in batches(blocks, args.batch_size)]


def peak_memory_bytes(name: str, model, calibration: list[dict], device: torch.device, args: argparse.Namespace) -> int:
    """Peak memory of one pass above the loaded model and data: the CUDA allocator's peak, or on CPU the RSS
    high-water mark of a fresh process, reset after loading (so that allocator reuse in this process hides nothing)."""
    if device.type == "cuda":
        with peak_memory(device) as memory:
            run_pass(name, model, calibration)
        return memory.peak_bytes
    command = [sys.executable, "-m", "benchmarks.pipeline_cost", "--memory-worker", name, "--block-size", str(args.block_size),
               "--calibration-blocks", str(args.calibration_blocks), "--batch-size", str(args.batch_size)]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_extra_rss_bytes"]


def main() -> None:
    args = parse_args()
    check_cpu_threads()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.memory_worker:
        model, calibration = setup(args, device)
        plain_forward(model, calibration[:1])  # fault in the lazily mapped weights before the reset
        loaded = reset_peak_rss()
        run_pass(args.memory_worker, model, calibration)
        print(json.dumps({"peak_extra_rss_bytes": peak_rss_bytes() - loaded}))
        return
    started = time.perf_counter()
    model, calibration = setup(args, device)
    plain_forward(model, calibration[:1])  # warm-up
    runs: dict[str, list[dict]] = {name: [] for name in PASSES}
    for repeat in range(args.repeats):
        shift = repeat % len(PASSES)
        for name in PASSES[shift:] + PASSES[:shift]:
            runs[name].append(timed(name, model, calibration, device))
        timings = ", ".join(f"{n}: {r[-1]['wall_s']:.2f} s wall, {r[-1]['cpu_s']:.2f} s CPU" for n, r in runs.items())
        console.print(f"round {repeat + 1}: {timings}")
    tokens = args.calibration_blocks * args.block_size
    summary = {name: {"median_wall_s": statistics.median(r["wall_s"] for r in runs[name]),
                      "median_cpu_s": statistics.median(r["cpu_s"] for r in runs[name]), "runs": runs[name],
                      "peak_memory_bytes": peak_memory_bytes(name, model, calibration, device, args)} for name in PASSES}
    for entry in summary.values():
        entry["tokens_per_s"] = tokens / entry["median_wall_s"]
    overhead = {name: {clock: statistics.median(h[clock] / p[clock] for p, h in zip(runs[PASSES[0]], runs[name])) - 1
                       for clock in ("wall_s", "cpu_s")} for name in PASSES[1:]}
    report(summary, overhead, args, device, tokens, started)


def report(summary: dict, overhead: dict, args, device: torch.device, tokens: int, started: float) -> None:
    memory_label = "peak memory above the loaded model (MB)"
    headers = ["pass", "median wall s", "median CPU s", "tokens/s (wall)", memory_label]
    rows = [[name, s["median_wall_s"], s["median_cpu_s"], s["tokens_per_s"], s["peak_memory_bytes"] / 2**20]
            for name, s in summary.items()]
    settings = (f"SmolLM2-135M fp32 on {device.type} ({torch.get_num_threads()} threads), {args.calibration_blocks}×{args.block_size} "
                f"tokens in batches of {args.batch_size}, {args.repeats} back-to-back rounds")
    print_table(f"Calibration cost — {settings}", headers, rows)
    verdict = "; ".join(
        f"{name}: {1 + o['cpu_s']:.3f}× the plain forward in CPU time, {1 + o['wall_s']:.3f}× in wall time (median ratio; "
        f"{'within' if 1 + o['cpu_s'] <= TARGET_RATIO[name] else 'above'} the {TARGET_RATIO[name]}× target)"
        for name, o in overhead.items())
    console.print(verdict)
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    width = 0.38
    labels = [name.replace(" (", "\n(") for name in PASSES]
    for offset, (key, label) in enumerate((("median_cpu_s", "CPU time"), ("median_wall_s", "wall time"))):
        drawn = axes[0].bar([i + (offset - 0.5) * width for i in range(len(PASSES))], [summary[n][key] for n in PASSES], width,
                            label=label)
        if key == "median_cpu_s":
            axes[0].bar_label(drawn, labels=["1×", *(f"{1 + overhead[n]['cpu_s']:.2f}×" for n in PASSES[1:])], fontsize=8)
    axes[0].set_xticks(range(len(PASSES)), labels, fontsize=8)
    axes[0].set_ylabel(f"seconds for {tokens} tokens (median)")
    axes[0].set_title("statistics pass / plain forward (CPU time)")
    axes[0].set_ylim(0, 1.25 * max(summary[n][key] for n in PASSES for key in ("median_cpu_s", "median_wall_s")))
    axes[0].legend(loc="upper center", ncols=2)  # in the headroom above the bars
    axes[1].bar(labels, [summary[n]["peak_memory_bytes"] / 2**20 for n in PASSES], color=["tab:gray", "tab:blue", "tab:orange"])
    axes[1].tick_params(axis="x", labelsize=8)
    axes[1].set_ylabel(memory_label)
    axes[1].set_title("peak memory of one pass")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    figure.savefig(RESULTS_DIR / "pipeline_cost.png", dpi=110)
    plt.close(figure)
    write_results("pipeline_cost", {"settings": vars(args) | {"device": str(device), "description": settings}, "summary": summary,
                                    "overhead": overhead, "verdict": verdict, "markdown": markdown_table(headers, rows)}, started)


if __name__ == "__main__":
    main()
