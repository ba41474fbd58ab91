"""Where a decode step's time goes, dense against pruned: is the pruned model's decode speed-up held back by
the weight bytes it reads, or by work that pruning does not shrink?

The dense SmolLM2 and the same model pruned in one shot to the default job's widths (6/2 heads, MLP 768; as in
``benchmarks.inference``) decode in lockstep after a ``--prompt``-token prompt, one token per forward (batch 1,
DynamicCache, last-position logits, as ``generate`` does). Three measurements, each in one run for both models:

- decode step: median wall time of ``--steps`` steps, models alternating step by step;
- weight GEMVs: the same step's linear layers alone (every q/k/v/o/gate/up/down projection and the LM head applied
  to one token's activation, with the model's own weights), median of ``--steps`` rounds, models alternating:
  the part of a step whose cost follows the weight bytes;
- profile: ``torch.profiler`` over ``--profile-steps`` decode steps per model, self CPU time by operator group.

The weight-bytes bound of the speed-up is dense/pruned parameter bytes; the rest of a step (norms, RoPE,
attention over the cache, cache growth, module dispatch) shrinks far less with pruning (the same 30 layers and
module calls), so the reachable speed-up is (GEMVs_dense + rest_dense) / (GEMVs_pruned + rest_pruned).

    OMP_NUM_THREADS=1 python -m benchmarks.decode_profile     # writes benchmarks/results/decode_profile.{json,png}
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import RESULTS_DIR, check_cpu_threads, console, markdown_table, print_table, write_results
from benchmarks.inference import forward_timed, load_models, load_source

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402

TARGET = 0.90  # decode speed-up ÷ weight-bytes bound
# Operator groups of the profile (self CPU time); anything else is "other".
GROUPS = {"weight GEMVs": ("aten::addmm", "aten::mm", "aten::matmul", "aten::linear", "aten::bmm"),
          "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
          "cache growth": ("aten::cat",),
          "norms, RoPE, activations": ("aten::mul", "aten::add", "aten::pow", "aten::mean", "aten::rsqrt", "aten::silu", "aten::neg",
                                       "aten::cos", "aten::sin", "aten::to", "aten::_to_copy", "aten::copy_", "aten::div")}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens before decoding")
    parser.add_argument("--steps", type=int, default=64, help="decode steps (and GEMV rounds) per model")
    parser.add_argument("--profile-steps", type=int, default=16)
    parser.add_argument("--kv-groups", type=int, default=2)
    parser.add_argument("--mlp", type=int, default=768)
    parser.add_argument("--pruned", type=Path, help="a pruned export instead of pruning here (as benchmarks.inference)")
    parser.add_argument("--dense-config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pruned-config", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    """Every nn.Linear a decode step runs (the LM head included), in module order."""
    return [module for module in model.modules() if isinstance(module, nn.Linear)]


@torch.no_grad()
def gemv_seconds(model: nn.Module) -> float:
    """Seconds to apply every linear layer of the model to one token's (random) input: the weight reads of a step."""
    inputs = [torch.randn(1, 1, layer.in_features) for layer in linear_layers(model)]
    start = time.perf_counter()
    for layer, hidden in zip(linear_layers(model), inputs):
        F.linear(hidden, layer.weight, layer.bias)
    return time.perf_counter() - start


def lockstep(models: dict[str, nn.Module], function, rounds: int) -> dict[str, float]:
    """Median seconds of ``function(name, model)`` over ``rounds`` rounds, models alternating."""
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            seconds[name].append(function(name, model))
    return {name: statistics.median(values) for name, values in seconds.items()}


def decoding(models: dict[str, nn.Module], prompt: int):
    """A function (name, model) → seconds of that model's next decode step, each model with its own cache."""
    ids = torch.randint(0, 49152, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    state = {}
    for name, model in models.items():
        _, cache, token = forward_timed(model, ids)
        state[name] = (cache, token)

    def step(name: str, model: nn.Module) -> float:
        seconds, cache, token = forward_timed(model, state[name][1], state[name][0])
        state[name] = (cache, token)
        return seconds

    return step


def profiled_groups(model: nn.Module, prompt: int, steps: int) -> dict[str, float]:
    """Self CPU seconds per decode step by operator group, and the step's wall time, under the profiler."""
    step = decoding({"model": model}, prompt)
    step("model", model)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        started = time.perf_counter()
        for _ in range(steps):
            step("model", model)
        wall = time.perf_counter() - started
    groups = dict.fromkeys([*GROUPS, "other operators"], 0.0)
    for event in profiler.key_averages():
        group = next((g for g, prefixes in GROUPS.items() if event.key.startswith(prefixes)), "other operators")
        groups[group] += event.self_cpu_time_total / 1e6 / steps
    groups["outside operators (Python, dispatch, profiler)"] = max(0.0, wall / steps - sum(groups.values()))
    return groups


def main() -> None:
    args = parse_args()
    check_cpu_threads()
    started = time.perf_counter()
    sources, origin = load_models(args, torch.float32)
    models = {name: load_source(Path(path), torch.float32).eval() for name, path in sources.items()}
    bytes_ = {name: sum(p.numel() * p.element_size() for p in model.parameters()) for name, model in models.items()}
    with torch.no_grad():
        lockstep(models, lambda name, model: gemv_seconds(model), 3)  # warm-up: fault the weight pages in
        step = lockstep(models, decoding(models, args.prompt), args.steps)
        gemv = lockstep(models, lambda name, model: gemv_seconds(model), args.steps)
    profiles = {name: profiled_groups(model, args.prompt, args.profile_steps) for name, model in models.items()}
    report(models, bytes_, step, gemv, profiles, origin, args, started)


def report(models, bytes_, step, gemv, profiles, origin: str, args, started: float) -> None:
    bound = bytes_["dense"] / bytes_["pruned"]
    rest = {name: step[name] - gemv[name] for name in models}
    speedup = step["dense"] / step["pruned"]
    figures = {"bound": bound, "decode_speedup": speedup, "fraction_of_bound": speedup / bound,
               "gemv_speedup": gemv["dense"] / gemv["pruned"], "rest_ratio": rest["dense"] / rest["pruned"]}
    headers = ["model", "weight MB", "decode step ms", "weight GEMVs ms", "rest of the step ms", "GEMV share"]
    rows = [[name, bytes_[name] / 2**20, 1e3 * step[name], 1e3 * gemv[name], 1e3 * rest[name], f"{gemv[name] / step[name]:.0%}"]
            for name in models]
    print_table(f"Decode step after a {args.prompt}-token prompt (medians of {args.steps}; {torch.get_num_threads()} thread)",
                headers, rows)
    group_headers = ["self CPU ms per step (profiled)", *models]
    group_rows = [[group, *(1e3 * profiles[name][group] for name in models)] for group in profiles["dense"]]
    print_table(f"Profile of {args.profile_steps} decode steps", group_headers, group_rows)
    verdict = (f"decode speed-up {speedup:.3f}× against a weight-bytes bound of {bound:.3f}× = {speedup / bound:.1%} "
               f"({'met' if speedup / bound >= TARGET else 'missed'}: target {TARGET:.0%}); the weight GEMVs alone speed up "
               f"{figures['gemv_speedup']:.2f}×, the rest of the step {figures['rest_ratio']:.2f}× "
               f"({1e3 * rest['pruned']:.1f} ms of the pruned step's {1e3 * step['pruned']:.1f} ms)")
    console.print(verdict)
    plot(models, step, gemv, bound, speedup)
    write_results("decode_profile", {"settings": vars(args) | {"pruned_model": origin}, "weight_bytes": bytes_,
                                     "step_s": step, "gemv_s": gemv, "rest_s": rest, "profiles": profiles, "figures": figures,
                                     "verdict": verdict, "markdown": {"step": markdown_table(headers, rows),
                                                                      "profile": markdown_table(group_headers, group_rows)}},
                  started)


def plot(models, step, gemv, bound: float, speedup: float) -> None:
    """Stacked bars: the weight GEMVs and the rest of a decode step, per model."""
    figure, axes = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
    names = list(models)
    axes.bar(names, [1e3 * gemv[n] for n in names], label="weight GEMVs (follow the weight bytes)", color="tab:blue")
    axes.bar(names, [1e3 * (step[n] - gemv[n]) for n in names], bottom=[1e3 * gemv[n] for n in names],
             label="rest of the step (norms, attention, KV cache, dispatch)", color="tab:gray")
    for index, name in enumerate(names):
        axes.text(index, 1e3 * step[name], f"{1e3 * step[name]:.1f} ms", ha="center", va="bottom")
    axes.set(ylabel="ms per decode step (median)", ylim=(0, 1.2e3 * max(step.values())),
             title=f"decode speed-up {speedup:.2f}× vs weight-bytes bound {bound:.2f}× ({speedup / bound:.0%})")
    axes.legend(loc="upper right", fontsize=8)
    figure.savefig(RESULTS_DIR / "decode_profile.png", dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
