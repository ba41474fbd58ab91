"""Which module is more redundant? Prune only attention or only the MLP of SmolLM2 to the same parameter count.

One KV group of SmolLM2 (3 query heads + 1 K/V head, head_dim 64, hidden 576) holds 576·64·(3+1+1+3) =
294,912 weights per layer; one MLP channel holds 3·576 = 1,728. Removing g groups is matched by removing
round(g · 294,912 / 1,728) MLP channels. One shot, acts scores, no recovery; Wikipedia test perplexity.

    python -m benchmarks.module_redundancy      # writes benchmarks/results/module_redundancy.{json,png}
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import RESULTS_DIR, batches, check_cpu_threads, console, load_dense, markdown_table, print_table
from benchmarks.common import pruned_copy
from benchmarks.common import size_figures, write_results
from benchmarks.texts import calibration_blocks, heldout_blocks
from transact_pl.arch import Widths, model_widths
from transact_pl.evaluation import perplexity
from transact_pl.infra.plots import plot_series
from transact_pl.pruning import compute_scores


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--calibration-blocks", type=int, default=8)
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--scorer", default="acts")
    return parser.parse_args()


def matched_mlp_width(dense: Widths, hidden_size: int, removed_groups: int) -> int:
    """MLP width whose removed channels hold as many weights as ``removed_groups`` KV groups."""
    group_weights = hidden_size * dense.head_dim * (2 * dense.group_size + 2)  # q rows + o columns of its heads, k and v rows
    return dense.intermediate_size - round(removed_groups * group_weights / (3 * hidden_size))


def main() -> None:
    args = parse_args()
    check_cpu_threads()
    started = time.perf_counter()
    dense, tokenizer = load_dense()
    widths = model_widths(dense)
    test = batches(heldout_blocks(tokenizer, args.block_size, args.eval_blocks, ("wikipedia_test",))["wikipedia_test"], args.batch_size)
    calibration = batches(calibration_blocks(tokenizer, args.block_size, args.calibration_blocks), args.batch_size)
    scores = compute_scores(dense, args.scorer, calibration, 0)
    rows = [{"pruned": "nothing", "removed_groups": 0, **size_figures(dense), "test_ppl": perplexity(dense, test)}]
    for removed in range(1, widths.num_kv_heads):
        kept_groups = widths.num_kv_heads - removed
        attention_only = Widths(kept_groups * widths.group_size, kept_groups, widths.head_dim, widths.intermediate_size)
        matched_mlp = matched_mlp_width(widths, dense.config.hidden_size, removed)
        mlp_only = Widths(widths.num_heads, widths.num_kv_heads, widths.head_dim, matched_mlp)
        for label, after in (("attention only", attention_only), ("MLP only", mlp_only)):
            model, _ = pruned_copy(dense, scores, after, args.scorer)
            rows.append({"pruned": label, "removed_groups": removed, **size_figures(model), "test_ppl": perplexity(model, test)})
            console.print(f"{label}, budget of {removed} group(s): test ppl {rows[-1]['test_ppl']:.1f}")
            del model
    report(rows, args, started)


def report(rows: list[dict], args: argparse.Namespace, started: float) -> None:
    headers = ["pruned", "heads (q/kv)", "MLP", "non-emb params (M)", "KV B/token", "test ppl"]
    table = [[r["pruned"], f"{r['heads']}/{r['kv_heads']}", r["mlp"], r["non_embedding_params"] / 1e6, r["kv_bytes_per_token"],
              r["test_ppl"]] for r in rows]
    settings = (f"one shot, {args.scorer} scores on {args.calibration_blocks}×{args.block_size} calibration tokens, no recovery, "
                f"{args.eval_blocks}×{args.block_size} Wikipedia test tokens")
    print_table(f"Attention vs MLP redundancy — {settings}", headers, table)
    series = {label: ([r["non_embedding_params"] / 1e6 for r in rows if r["pruned"] in (label, "nothing")],
                      [r["test_ppl"] for r in rows if r["pruned"] in (label, "nothing")]) for label in ("attention only", "MLP only")}
    plot_series(series, RESULTS_DIR / "module_redundancy.png", "non-embedding parameters (M)", "test perplexity (log)",
                "Same parameter budget removed from attention or from the MLP", log_y=True)
    write_results("module_redundancy", {"settings": vars(args) | {"description": settings}, "rows": rows,
                                        "markdown": markdown_table(headers, table)}, started)


if __name__ == "__main__":
    main()
