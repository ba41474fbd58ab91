"""Quality against compression: the real SmolLM2 pruned in one shot, without recovery training, by every scorer.

For each scorer the channel scores are computed once on the dense model (acts, taylor: on the
calibration blocks; magnitude, random: from the weights / a seed); each compression point is then
a fresh deep copy of the dense model pruned to (KV groups, MLP width) and evaluated on the test split
of the embedded Wikipedia text. Does activation guidance beat blind (magnitude, random) pruning?

    python -m benchmarks.quality_vs_compression            # writes benchmarks/results/quality_vs_compression.{json,png}
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import RESULTS_DIR, batches, check_cpu_threads, console, load_dense, markdown_table, print_table
from benchmarks.common import pruned_copy, size_figures, widths_for, write_results
from benchmarks.texts import calibration_blocks, heldout_blocks
from transact_pl.arch import model_widths
from transact_pl.evaluation import perplexity
from transact_pl.infra.plots import plot_series
from transact_pl.pruning import SCORERS, compute_scores


# (KV groups, MLP width) from mild to severe: attention groups 3 → 2 → 1 and MLP 1536 → 1024 → 768 → 384.
POINTS = ((3, 1024), (2, 1024), (2, 768), (1, 768), (1, 384))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scorers", nargs="+", default=list(SCORERS), choices=SCORERS)
    parser.add_argument("--block-size", type=int, default=256, help="tokens per calibration/evaluation block")
    parser.add_argument("--calibration-blocks", type=int, default=8, help="calibration blocks (Wikipedia train split)")
    parser.add_argument("--eval-blocks", type=int, default=8, help="evaluation blocks (Wikipedia test split)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random scorer")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    check_cpu_threads()
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    dense, tokenizer = load_dense()
    calibration = batches(calibration_blocks(tokenizer, args.block_size, args.calibration_blocks), args.batch_size)
    test = batches(heldout_blocks(tokenizer, args.block_size, args.eval_blocks, ("wikipedia_test",))["wikipedia_test"], args.batch_size)
    rows = [{"scorer": "dense", "kv_groups": model_widths(dense).num_kv_heads, **size_figures(dense), "test_ppl": perplexity(dense, test)}]
    for scorer in args.scorers:
        scoring_started = time.perf_counter()
        scores = compute_scores(dense, scorer, calibration, args.seed)
        scoring_s = time.perf_counter() - scoring_started
        for kv_groups, mlp in POINTS:
            model, _ = pruned_copy(dense, scores, widths_for(model_widths(dense), kv_groups, mlp), scorer)
            rows.append({"scorer": scorer, "kv_groups": kv_groups, **size_figures(model), "test_ppl": perplexity(model, test),
                         "scoring_s": round(scoring_s, 1)})
            console.print(f"{scorer} groups={kv_groups} mlp={mlp}: test ppl {rows[-1]['test_ppl']:.1f}")
            del model
    report(rows, args, started)


def report(rows: list[dict], args: argparse.Namespace, started: float) -> None:
    headers = ["scorer", "KV groups", "MLP", "non-emb params (M)", "test ppl"]
    table = [[r["scorer"], r["kv_groups"], r["mlp"], r["non_embedding_params"] / 1e6, r["test_ppl"]] for r in rows]
    settings = (f"SmolLM2-135M-Instruct, one shot, no recovery; {args.calibration_blocks}×{args.block_size} calibration "
                f"tokens (Wikipedia train), {args.eval_blocks}×{args.block_size} test tokens (Wikipedia test split)")
    print_table(f"Quality vs compression — {settings}", headers, table)
    dense = rows[0]
    series = {scorer: ([r["non_embedding_params"] / 1e6 for r in rows if r["scorer"] == scorer],
                       [r["test_ppl"] for r in rows if r["scorer"] == scorer]) for scorer in args.scorers}
    plot_series(series, RESULTS_DIR / "quality_vs_compression.png", "non-embedding parameters (M)", "test perplexity (log)",
                "One-shot pruning of SmolLM2-135M, no recovery", log_y=True, reference=dense["test_ppl"], reference_label="dense")
    verdict = activation_verdict(rows)
    console.print(verdict)
    write_results("quality_vs_compression", {"settings": vars(args) | {"points": POINTS, "description": settings},
                                             "rows": rows, "verdict": verdict, "markdown": markdown_table(headers, table)}, started)


def activation_verdict(rows: list[dict]) -> str:
    """At how many compression points acts has the lowest perplexity of all scorers."""
    points = list(dict.fromkeys((r["kv_groups"], r["mlp"]) for r in rows if r["scorer"] != "dense"))  # mild → severe
    wins, lines = 0, []
    for point in points:
        at_point = {r["scorer"]: r["test_ppl"] for r in rows if (r["kv_groups"], r["mlp"]) == point and r["scorer"] != "dense"}
        best = min(at_point, key=at_point.get)
        wins += best == "acts"
        lines.append(f"groups={point[0]} mlp={point[1]}: best {best} ({at_point[best]:.1f})")
    return f"acts is best at {wins} of {len(points)} points; " + "; ".join(lines)


if __name__ == "__main__":
    main()
