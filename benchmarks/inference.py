"""Inference speed of the dense model against a pruned one: prefill and decode tokens/s, latency, KV-cache
bytes and peak memory, next to the theoretical bounds (weight-bytes ratio, KV-bytes ratio).

Greedy generation with a DynamicCache, batch 1. Prefill is the prompt in one forward (logits of the last
position only, as ``generate`` does); decode is one token per forward. The two models run in lockstep
(prefills alternate, then one decode step of each in turn) so that load from other processes hits both
alike; decode speed is taken from the median step time. Peak memory: on CUDA the allocator's peak above
the loaded model; on CPU the RSS high-water mark of a fresh process serving the longest point, in total and
above the loaded model.

    python -m benchmarks.inference                                     # prune SmolLM2 here (one shot, acts)
    python -m benchmarks.inference --pruned exports/smollm2_transact     # a given pruned export
    python -m benchmarks.inference --dense-config D --pruned-config P    # random weights of those shapes
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from benchmarks.common import RESULTS_DIR, batches, check_cpu_threads, console, load_dense, markdown_table, peak_rss_bytes
from benchmarks.common import print_table, pruned_copy, reset_peak_rss, size_figures, widths_for, write_results
from transact_pl.arch import model_widths
from transact_pl.infra.assets import ensure_embedded_model
from transact_pl.infra.plots import plot_series
from transact_pl.pruning import compute_scores

PROMPT_LENGTHS = (64, 256, 512, 960)
DECODE_LENGTHS = (64, 256, 768)
CPU_DECODE_LENGTHS = (64, 256)
PRUNED_DIR = RESULTS_DIR / "tmp" / "inference_pruned"  # the model pruned here, for the memory subprocess


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pruned", type=Path, help="a pruned Hugging Face export (default: prune SmolLM2 here, one shot, acts)")
    parser.add_argument("--kv-groups", type=int, default=2, help="KV groups kept when pruning here")
    parser.add_argument("--mlp", type=int, default=768, help="MLP width kept when pruning here")
    parser.add_argument("--dense-config", type=Path, help="directory with the dense config.json: random weights, no download")
    parser.add_argument("--pruned-config", type=Path, help="directory with the pruned config.json (with --dense-config)")
    parser.add_argument("--repeats", type=int, default=3, help="prefills per point and model (median kept)")
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=list(PROMPT_LENGTHS), help="prompt lengths (64 decoded)")
    parser.add_argument("--decode-lengths", type=int, nargs="+", help="decode lengths after a 256-token prompt")
    parser.add_argument("--peak-rss-worker", nargs=3, metavar=("SOURCE", "PROMPT", "NEW"), help=argparse.SUPPRESS)
    return parser.parse_args()


def cache_argument(model: PreTrainedModel) -> str:
    """transformers ≥ 5.2x names the cache argument ``cache``; earlier 5.x ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def forward_timed(model: PreTrainedModel, input_ids: torch.Tensor, cache=None) -> tuple[float, object, torch.Tensor]:
    """(seconds, cache, greedy next token (1, 1)) of one forward that keeps only the last position's logits."""
    kwargs = {} if cache is None else {cache_argument(model): cache}
    synchronize(input_ids.device)
    start = time.perf_counter()
    output = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **kwargs)
    token = output.logits[:, -1:].argmax(-1)
    synchronize(input_ids.device)
    return time.perf_counter() - start, getattr(output, "cache", None) or output.past_key_values, token


def kv_cache_bytes(cache) -> int:
    """Bytes of every K and V tensor held by a DynamicCache."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def measure_point(models: dict[str, PreTrainedModel], prompt_len: int, new_tokens: int, repeats: int) -> dict[str, dict]:
    """One (prompt length, decode length) point for every model, in lockstep; random prompt token ids."""
    names = list(models)
    vocab = min(m.config.vocab_size for m in models.values())
    device = next(models[names[0]].parameters()).device
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len)).to(device)
    prefill_s: dict[str, list[float]] = {name: [] for name in names}
    state = {}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            seconds, cache, token = forward_timed(models[name], prompt)
            prefill_s[name].append(seconds)
            state[name] = (cache, token)
    step_s: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(new_tokens - 1):
        for name in names:
            seconds, cache, token = forward_timed(models[name], state[name][1], state[name][0])
            step_s[name].append(seconds)
            state[name] = (cache, token)
    points = {}
    for name in names:
        prefill, step = statistics.median(prefill_s[name]), statistics.median(step_s[name])
        points[name] = {"prompt": prompt_len, "new_tokens": new_tokens, "prefill_s": prefill, "decode_s": step * (new_tokens - 1),
                        "latency_s": prefill + step * (new_tokens - 1), "prefill_tok_s": prompt_len / prefill, "decode_tok_s": 1 / step,
                        "kv_cache_bytes": kv_cache_bytes(state[name][0])}
    return points


@torch.no_grad()
def cuda_peak_bytes(model: PreTrainedModel, prompt_len: int, new_tokens: int) -> int:
    """Allocator peak above the loaded model while serving one point (an untimed run)."""
    device = next(model.parameters()).device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    _, cache, token = forward_timed(model, torch.zeros(1, prompt_len, dtype=torch.long, device=device))
    for _ in range(new_tokens - 1):
        _, cache, token = forward_timed(model, token, cache)
    return torch.cuda.max_memory_allocated(device) - baseline


def peak_rss_of_fresh_process(source: str, prompt_len: int, new_tokens: int) -> dict:
    """{"max_rss_bytes": peak RSS while serving one point (weights included), "extra_rss_bytes": the part above the
    loaded model} of a new process that loads ``source`` (a model or config directory)."""
    command = [sys.executable, "-m", "benchmarks.inference", "--peak-rss-worker", source, str(prompt_len), str(new_tokens)]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(result.stdout.strip().splitlines()[-1])


def peak_rss_worker(source: str, prompt_len: int, new_tokens: int) -> None:
    model = load_source(Path(source), torch.float32).eval()
    measure_point({"model": model}, 16, 2, 1)  # touch every weight page once
    loaded = reset_peak_rss()
    measure_point({"model": model}, prompt_len, new_tokens, 1)
    print(json.dumps({"max_rss_bytes": peak_rss_bytes(), "extra_rss_bytes": peak_rss_bytes() - loaded}))


def load_source(path: Path, dtype: torch.dtype) -> PreTrainedModel:
    """A model directory (weights), or a directory with only config.json (random weights of that shape)."""
    if (path / "model.safetensors").exists() or any(path.glob("*.safetensors")):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)


def load_models(args: argparse.Namespace, dtype: torch.dtype) -> tuple[dict[str, Path], str]:
    """Directories of the dense and pruned models (the pruned one is written here when needed) and its origin."""
    if args.dense_config is not None:
        return {"dense": args.dense_config, "pruned": args.pruned_config}, f"random weights, shapes of {args.pruned_config}"
    if args.pruned is not None:
        return {"dense": ensure_embedded_model(), "pruned": args.pruned}, f"export {args.pruned}"
    from benchmarks.texts import calibration_blocks  # the data pipeline is not needed with a given model

    dense, tokenizer = load_dense()
    scores = compute_scores(dense, "acts", batches(calibration_blocks(tokenizer, 256, 4), 4), 0)
    pruned, _ = pruned_copy(dense, scores, widths_for(model_widths(dense), args.kv_groups, args.mlp), "acts")
    pruned.save_pretrained(PRUNED_DIR)
    origin = f"SmolLM2 pruned here in one shot (acts, 4×256 calibration tokens) to {args.kv_groups} KV groups, MLP {args.mlp}"
    return {"dense": ensure_embedded_model(), "pruned": PRUNED_DIR}, origin


def main() -> None:
    args = parse_args()
    check_cpu_threads()
    if args.peak_rss_worker:
        source, prompt_len, new_tokens = args.peak_rss_worker
        return peak_rss_worker(source, int(prompt_len), int(new_tokens))
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sources, origin = load_models(args, dtype)
    models = {name: load_source(Path(path), dtype).to(device).eval() for name, path in sources.items()}
    decode_lengths = tuple(args.decode_lengths or (DECODE_LENGTHS if device.type == "cuda" else CPU_DECODE_LENGTHS))
    points = [(p, 64) for p in args.prompt_lengths] + [(256, n) for n in decode_lengths if n != 64]
    measure_point(models, 16, 4, 1)  # warm-up: allocator, kernels, lazily mapped weights
    results = {name: {"size": size_figures(model), "points": []} for name, model in models.items()}
    for prompt_len, new_tokens in points:
        for name, point in measure_point(models, prompt_len, new_tokens, args.repeats).items():
            if device.type == "cuda":
                point["peak_memory_bytes"] = cuda_peak_bytes(models[name], prompt_len, new_tokens)
            results[name]["points"].append(point)
            console.print(f"{name} {prompt_len}+{new_tokens}: prefill {point['prefill_tok_s']:.0f} tok/s, "
                          f"decode {point['decode_tok_s']:.1f} tok/s")
    if device.type == "cpu":
        longest = max(points)
        for name, path in sources.items():
            results[name]["peak_rss"] = peak_rss_of_fresh_process(str(path), *longest)
            results[name]["peak_rss_point"] = list(longest)
    report(results, device, dtype, origin, args.repeats, started)


def report(results: dict, device: torch.device, dtype: torch.dtype, origin: str, repeats: int, started: float) -> None:
    dense, pruned = results["dense"], results["pruned"]
    bounds = {"weight_bytes_ratio": dense["size"]["params"] / pruned["size"]["params"],
              "non_embedding_weight_ratio": dense["size"]["non_embedding_params"] / pruned["size"]["non_embedding_params"],
              "kv_bytes_ratio": dense["size"]["kv_bytes_per_token"] / pruned["size"]["kv_bytes_per_token"]}
    headers = ["prompt+new", "dense prefill tok/s", "pruned prefill tok/s", "dense decode tok/s", "pruned decode tok/s",
               "dense latency s", "pruned latency s", "speedup", "dense KV MB", "pruned KV MB"]
    rows = [[f"{d['prompt']}+{d['new_tokens']}", d["prefill_tok_s"], p["prefill_tok_s"], d["decode_tok_s"], p["decode_tok_s"],
             d["latency_s"], p["latency_s"], d["latency_s"] / p["latency_s"], d["kv_cache_bytes"] / 2**20, p["kv_cache_bytes"] / 2**20]
            for d, p in zip(dense["points"], pruned["points"])]
    if device.type == "cuda":
        headers += ["dense peak MB", "pruned peak MB"]
        for row, d, p in zip(rows, dense["points"], pruned["points"]):
            row += [d["peak_memory_bytes"] / 2**20, p["peak_memory_bytes"] / 2**20]
    title = (f"Inference on {device.type} ({dtype}), batch 1, lockstep, {repeats} prefills per point; bounds: weight bytes "
             f"×{bounds['weight_bytes_ratio']:.2f}, KV bytes ×{bounds['kv_bytes_ratio']:.2f}")
    print_table(title, headers, rows)
    memory_note = ""
    if device.type == "cpu":
        point = "+".join(map(str, dense["peak_rss_point"]))
        memory_note = (f"peak RSS serving {point} in a fresh process: dense {dense['peak_rss']['max_rss_bytes'] / 2**20:.0f} MB "
                       f"({dense['peak_rss']['extra_rss_bytes'] / 2**20:.0f} MB above the loaded model), pruned "
                       f"{pruned['peak_rss']['max_rss_bytes'] / 2**20:.0f} MB ({pruned['peak_rss']['extra_rss_bytes'] / 2**20:.0f} MB)")
        console.print(memory_note)
    console.print(f"pruned model: {origin}")
    prompt_points = [(d, p) for d, p in zip(dense["points"], pruned["points"]) if d["new_tokens"] == 64]
    lengths = [d["prompt"] for d, _ in prompt_points]
    series = {"prefill speedup": (lengths, [p["prefill_tok_s"] / d["prefill_tok_s"] for d, p in prompt_points]),
              "decode speedup": (lengths, [p["decode_tok_s"] / d["decode_tok_s"] for d, p in prompt_points]),
              "weight-bytes bound": (lengths, [bounds["weight_bytes_ratio"]] * len(lengths)),
              "non-embedding weights bound": (lengths, [bounds["non_embedding_weight_ratio"]] * len(lengths)),
              "KV-bytes bound": (lengths, [bounds["kv_bytes_ratio"]] * len(lengths))}
    name = "inference" if device.type == "cpu" else f"inference_{device.type}"
    plot_series(series, RESULTS_DIR / f"{name}.png", "prompt length (tokens), 64 decoded", "pruned / dense tokens per second",
                f"Speedup of the pruned model ({device.type}, {dtype}, batch 1)", reference=1.0, reference_label="no speedup")
    write_results(name, {"settings": {"device": str(device), "dtype": str(dtype), "prefill_repeats": repeats, "pruned_model": origin},
                         "bounds": bounds, "results": results, "memory_note": memory_note, "markdown": markdown_table(headers, rows)},
                  started)


if __name__ == "__main__":
    main()
