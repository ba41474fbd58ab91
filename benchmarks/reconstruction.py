"""Least-squares reconstruction on the real SmolLM2: one shot, no recovery training, at the five compression points
of the quality-vs-compression benchmark, for acts, acts + LS (dense inputs), acts + LS (sequential), taylor and
taylor + LS (dense inputs); then calibration-size sensitivity with and without LS at 6 of 9 heads and MLP 768.

Calibration: a simple random sample (``torch.randperm`` seeded by ``--seed``) of blocks of the packed Wikipedia
*train* split (every train document joined with EOS and cut into blocks, as the datamodule packs it); the sizes
of the sensitivity study are prefixes of that one permutation (8 ⊂ 32 ⊂ 128 ⊂ 512), so the moments of one pass
over the largest sample, summed chunk by chunk, give every size. Held-out perplexity: ``--eval-blocks`` blocks
evenly spaced over the whole packed Wikipedia test split, the news corpus and the Shakespeare corpus.

    OMP_NUM_THREADS=1 python -m benchmarks.reconstruction            # writes benchmarks/results/reconstruction.{json,png}
    OMP_NUM_THREADS=1 python -m benchmarks.reconstruction --quick    # a few minutes: small calibration, one point
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import time
from collections.abc import Callable

import torch
from torch import Tensor

from benchmarks.common import RESULTS_DIR, batches, check_cpu_threads, console, load_dense, markdown_table, print_table
from benchmarks.common import peak_rss_bytes, reset_peak_rss, size_figures, widths_for, write_results
from benchmarks.quality_vs_compression import POINTS
from datamodules.sources import load_documents, split_documents
from datamodules.text import evenly_spaced, pack_blocks, tokenize_documents
from transact_pl.arch import all_layer_parts, model_widths
from transact_pl.eval_suite import perplexity_suite
from transact_pl.importance import collect_activation_stats
from transact_pl.infra.plots import plot_series
from transact_pl.plan import PruningPlan
from transact_pl.pruning import compute_scores, plan_shot
from transact_pl.reconstruction import DEFAULT_DAMPING, SecondMoments, collect_second_moments, load_refit, refit_weights
from transact_pl.scoring import ChannelScores, acts_scores
from transact_pl.sequential_reconstruction import sequential_refit
from transact_pl.surgery import apply_plan

TARGET_POINT = (2, 768)  # 6 of 9 heads, MLP 768: the target (acts + LS ≤ 0.5 × acts on every text)
TEXTS = ("wikipedia_test", "news", "shakespeare")
METHODS = ("acts", "acts+LS dense", "acts+LS sequential", "taylor", "taylor+LS dense")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--calibration-blocks", type=int, default=128, help="calibration blocks of the main table")
    parser.add_argument("--sensitivity-blocks", type=int, nargs="*", default=[8, 32, 128, 512])
    parser.add_argument("--eval-blocks", type=int, default=8, help="blocks per held-out text, evenly spaced")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--damping", type=float, default=DEFAULT_DAMPING)
    parser.add_argument("--damping-sweep", type=float, nargs="*", default=None,
                        help="other dampings tried for acts + LS (dense) at the target point (default: those of "
                             "1e-4, 1e-3, 1e-2, 1e-1 that are not --damping)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    parser.add_argument("--quick", action="store_true", help="16 calibration blocks, sensitivity 4/16, the target point only")
    parser.add_argument("--name", default=None, help="results name (default reconstruction, or reconstruction_quick)")
    args = parser.parse_args()
    if args.damping_sweep is None:
        args.damping_sweep = [damping for damping in (1e-4, 1e-3, 1e-2, 1e-1) if damping != args.damping]
    if args.quick:
        args.calibration_blocks, args.sensitivity_blocks, args.eval_blocks, args.damping_sweep = 16, [4, 16], 4, [1e-1]
    args.points = [TARGET_POINT] if args.quick else list(POINTS)
    args.name = args.name or ("reconstruction_quick" if args.quick else "reconstruction")
    return args


# ----- data ----------------------------------------------------------------------------------------------------------
def packed(documents: list[str], tokenizer, block_size: int) -> Tensor:
    return pack_blocks(tokenize_documents(documents, tokenizer), tokenizer.eos_token_id, block_size)


def calibration_sample(tokenizer, block_size: int, count: int, seed: int) -> Tensor:
    """(count, block_size): blocks of the packed Wikipedia train split in the order of a seeded permutation."""
    blocks = packed(split_documents(load_documents("wikipedia"))["train"], tokenizer, block_size)
    if count > blocks.shape[0]:
        raise ValueError(f"the Wikipedia train split has only {blocks.shape[0]} blocks of {block_size} tokens")
    return blocks[torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))[:count]]


def heldout(tokenizer, block_size: int, count: int) -> dict[str, Tensor]:
    """``count`` blocks evenly spaced over each whole held-out text."""
    documents = {"wikipedia_test": split_documents(load_documents("wikipedia"))["test"],
                 "news": load_documents("news"), "shakespeare": load_documents("shakespeare")}
    blocks = {name: packed(texts, tokenizer, block_size) for name, texts in documents.items()}
    return {name: all_blocks[evenly_spaced(all_blocks.shape[0], count)] for name, all_blocks in blocks.items()}


# ----- moments over nested samples -----------------------------------------------------------------------------------
def add_moments(total: SecondMoments | None, part: SecondMoments) -> SecondMoments:
    """Moments of the union of two disjoint sets of batches."""
    if total is None:
        return part
    for mine, theirs in zip(total.attention + total.mlp + total.attention_sum_sq + total.mlp_sum_sq,
                            part.attention + part.mlp + part.attention_sum_sq + part.mlp_sum_sq):
        mine.add_(theirs)
    total.num_tokens += part.num_tokens
    return total


def nested_moments(dense, blocks: Tensor, sizes: list[int], batch_size: int,
                   at_size: Callable[[int, SecondMoments], None], timings: dict) -> None:
    """One pass over ``blocks``, chunk by chunk; ``at_size(n, moments of the first n blocks)`` at every size."""
    total, start = None, 0
    for size in sorted(sizes):
        started = time.perf_counter()
        total = add_moments(total, collect_second_moments(dense, batches(blocks[start:size], batch_size)))
        timings[f"moments_blocks_{start}_{size}_s"] = round(time.perf_counter() - started, 1)
        at_size(size, total)
        start = size


def _pass_peak(kind: str, blocks: Tensor, batch_size: int) -> int:
    """Peak RSS (bytes) above the loaded model of one calibration pass of ``kind`` (run in a fresh process)."""
    torch.set_num_threads(1)
    dense, _ = load_dense()
    base = reset_peak_rss()
    collect = collect_second_moments if kind == "moments" else collect_activation_stats
    collect(dense, batches(blocks, batch_size))
    return peak_rss_bytes() - base


def pass_peaks(blocks: Tensor, batch_size: int) -> dict[str, int]:
    """Peak extra memory (MiB) of the acts pass and of the moments pass, each in a fresh process: in this one,
    memory freed by earlier passes would be reused and hide the moments' own."""
    context = multiprocessing.get_context("spawn")
    peaks = {}
    for kind in ("acts", "moments"):
        with context.Pool(1) as pool:
            peaks[f"{kind}_pass_peak_extra_rss_mib"] = round(pool.apply(_pass_peak, (kind, blocks, batch_size)) / 2**20)
    return peaks


def moments_bytes(model) -> int:
    """Bytes of every layer's fp64 G (o_proj and down_proj inputs)."""
    return sum(8 * (p.o_proj.in_features**2 + p.down_proj.in_features**2) for p in all_layer_parts(model))


# ----- models --------------------------------------------------------------------------------------------------------
def pruned_model(dense, plan: PruningPlan, refits: dict[str, Tensor] | None):
    model = copy.deepcopy(dense)
    apply_plan(model, plan)
    if refits is not None:
        load_refit(model, refits)
    return model


def evaluate(model, evaluation: dict[str, Tensor], batch_size: int) -> dict[str, float]:
    return {name: result["ppl"] for name, result in perplexity_suite(model, evaluation, batch_size).items()}


def main() -> None:
    args = parse_args()
    check_cpu_threads()
    started = time.perf_counter()
    dense, tokenizer = load_dense()
    widths = model_widths(dense)
    sizes = sorted(set(args.sensitivity_blocks) | {args.calibration_blocks})
    sample = calibration_sample(tokenizer, args.block_size, sizes[-1], args.seed)
    calibration = batches(sample[: args.calibration_blocks], args.batch_size)
    evaluation = heldout(tokenizer, args.block_size, args.eval_blocks)
    timings: dict = {**pass_peaks(sample[: args.batch_size], args.batch_size), "moments_mib": round(moments_bytes(dense) / 2**20)}
    rows = [{"method": "dense", "kv_groups": widths.num_kv_heads, "calibration_blocks": 0, **size_figures(dense),
             **evaluate(dense, evaluation, args.batch_size)}]

    clock = time.perf_counter()
    taylor = compute_scores(dense, "taylor", calibration, args.seed)
    timings["taylor_scores_s"] = round(time.perf_counter() - clock, 1)
    plans: dict[tuple, PruningPlan] = {}
    refits: dict[tuple, dict[str, Tensor] | None] = {}

    def plan_at(scores: ChannelScores, point: tuple[int, int], scorer: str) -> PruningPlan:
        return plan_shot(dense, scores, widths_for(widths, *point), 1, scorer)

    def at_size(size: int, moments: SecondMoments) -> None:
        clock = time.perf_counter()
        acts = acts_scores(moments.activation_stats())
        if size == args.calibration_blocks:
            for point in args.points:
                for scorer, scores in (("acts", acts), ("taylor", taylor)):
                    plans[scorer, point] = plan_at(scores, point, scorer)
                    refits[f"{scorer}+LS dense", point] = refit_weights(dense, plans[scorer, point], moments, args.damping)
            for damping in args.damping_sweep:
                refits[f"acts+LS dense λ={damping:g}", TARGET_POINT] = refit_weights(dense, plans["acts", TARGET_POINT], moments, damping)
        if size in args.sensitivity_blocks:
            plans["acts", TARGET_POINT, size] = plan_at(acts, TARGET_POINT, "acts")
            refits["acts+LS dense", TARGET_POINT, size] = refit_weights(dense, plans["acts", TARGET_POINT, size], moments, args.damping)
        timings[f"plans_and_solves_at_{size}_s"] = round(time.perf_counter() - clock, 1)

    nested_moments(dense, sample, sizes, args.batch_size, at_size, timings)
    for point in args.points:
        clock = time.perf_counter()
        refits["acts+LS sequential", point] = sequential_refit(dense, plans["acts", point], calibration, args.damping)
        timings[f"sequential_{point[0]}_{point[1]}_s"] = round(time.perf_counter() - clock, 1)

    def add_row(method: str, point: tuple[int, int], plan: PruningPlan, weights: dict | None, blocks: int) -> None:
        clock = time.perf_counter()
        model = pruned_model(dense, plan, weights)
        rows.append({"method": method, "kv_groups": point[0], "calibration_blocks": blocks, **size_figures(model),
                     **evaluate(model, evaluation, args.batch_size), "eval_s": round(time.perf_counter() - clock, 1)})
        console.print(f"{method} {point} ({blocks} blocks): " + ", ".join(f"{t} {rows[-1][t]:.1f}" for t in TEXTS))

    for point in args.points:
        for method in METHODS:
            scorer = method.split("+")[0]
            add_row(method, point, plans[scorer, point], refits.get((method, point)), args.calibration_blocks)
    for damping in args.damping_sweep:
        method = f"acts+LS dense λ={damping:g}"
        add_row(method, TARGET_POINT, plans["acts", TARGET_POINT], refits[method, TARGET_POINT], args.calibration_blocks)
    for size in args.sensitivity_blocks:
        if size != args.calibration_blocks:
            add_row("acts", TARGET_POINT, plans["acts", TARGET_POINT, size], None, size)
            add_row("acts+LS dense", TARGET_POINT, plans["acts", TARGET_POINT, size], refits["acts+LS dense", TARGET_POINT, size], size)
    report(rows, args, timings, started)


# ----- report --------------------------------------------------------------------------------------------------------
def target_verdict(rows: list[dict], calibration_blocks: int) -> dict:
    """acts + LS / acts perplexity on every text at the target point (the issue asks for ≤ 0.5)."""
    at_target = {r["method"]: r for r in rows if r["kv_groups"] == TARGET_POINT[0] and r["mlp"] == TARGET_POINT[1]
                 and r["calibration_blocks"] == calibration_blocks}
    verdict = {}
    for method in ("acts+LS dense", "acts+LS sequential"):
        if method in at_target:
            ratios = {t: round(at_target[method][t] / at_target["acts"][t], 3) for t in TEXTS}
            verdict[method] = {"ratios": ratios, "met": all(ratio <= 0.5 for ratio in ratios.values())}
    return verdict


def report(rows: list[dict], args: argparse.Namespace, timings: dict, started: float) -> None:
    headers = ["method", "KV groups", "MLP", "calib. blocks", "non-emb params (M)", *TEXTS]
    main = [r for r in rows if r["calibration_blocks"] in (0, args.calibration_blocks)]
    table = [[r["method"], r["kv_groups"], r["mlp"], r["calibration_blocks"], r["non_embedding_params"] / 1e6,
              *[r[t] for t in TEXTS]] for r in main]
    settings = (f"SmolLM2-135M-Instruct, one shot, no recovery; calibration {args.calibration_blocks}×{args.block_size} "
                f"tokens (random blocks of the Wikipedia train split, seed {args.seed}); damping {args.damping:g}; "
                f"{args.eval_blocks}×{args.block_size} tokens per held-out text, evenly spaced")
    print_table(f"Reconstruction — {settings}", headers, table)
    sensitivity = [r for r in rows if r["method"] in ("acts", "acts+LS dense") and r["kv_groups"] == TARGET_POINT[0]
                   and r["mlp"] == TARGET_POINT[1]]
    sensitivity_table = [[r["method"], r["calibration_blocks"], *[r[t] for t in TEXTS]]
                         for r in sorted(sensitivity, key=lambda r: (r["method"], r["calibration_blocks"]))]
    print_table("Calibration size at 6/9 heads, MLP 768", ["method", "calib. blocks", *TEXTS], sensitivity_table)
    verdict = target_verdict(rows, args.calibration_blocks)
    console.print(f"target (≤ 0.5 × acts on every text at {TARGET_POINT}): {verdict}")
    console.print(f"timings: {timings}")
    series = {method: ([r["non_embedding_params"] / 1e6 for r in main if r["method"] == method],
                       [r["wikipedia_test"] for r in main if r["method"] == method]) for method in METHODS}
    plot_series(series, RESULTS_DIR / f"{args.name}.png", "non-embedding parameters (M)", "Wikipedia test perplexity (log)",
                "One-shot pruning of SmolLM2-135M with least-squares reconstruction, no recovery", log_y=True,
                reference=rows[0]["wikipedia_test"], reference_label="dense")
    write_results(args.name, {"settings": vars(args) | {"description": settings}, "rows": rows, "timings": timings,
                              "target": verdict, "markdown": markdown_table(headers, table),
                              "markdown_sensitivity": markdown_table(["method", "calib. blocks", *TEXTS], sensitivity_table)},
                  started)


if __name__ == "__main__":
    main()
