"""Head-dim pruning against whole-KV-group pruning at equal attention parameters, on the real SmolLM2.

SmolLM2-135M has 9 query heads in 3 KV groups of head_dim 64; attention weights per layer are
hidden × (q + k + v + o widths) = 576 × 24·head_dim with every head kept. Each point prunes attention only
(MLP untouched), in one shot, without recovery training, and compares at (at most) the same attention
parameters:
- groups: whole KV groups by the acts scorer (the default TransAct pruning);
- head_dim exact: every head kept, shrunk to the largest even head_dim with no more parameters, keeping
  the progression of rotary pairs with the most q·k energy (RoPE exact) and the strongest value channels;
- head_dim prefix: the same, but always the first pairs (the highest frequencies), as a naive baseline;
- head_dim approx: the best-scored pairs of every KV head with a fitted RoPE (not exact; transact_pl/head_dim.py).

    python -m benchmarks.head_dim          # writes benchmarks/results/head_dim.json
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace

import torch
from transformers import PreTrainedModel

from benchmarks.common import batches, console, load_dense, markdown_table, print_table, pruned_copy, write_results
from benchmarks.texts import calibration_blocks, heldout_blocks
from transact_pl.arch import Widths, all_layer_parts, model_widths
from transact_pl.evaluation import kv_cache_bytes_per_token, perplexity
from transact_pl.head_dim import add_head_dim, collect_head_dim_stats, exact_rope_parameters
from transact_pl.plan import LayerPlan, PruningPlan
from transact_pl.pruning import compute_scores
from transact_pl.surgery import apply_plan

KV_GROUPS = (2, 1)  # whole-group points: 2/3 and 1/3 of the attention parameters


def attention_parameters(model: PreTrainedModel) -> int:
    """Weights (and biases) of q, k, v and o summed over layers."""
    return sum(p.numel() for parts in all_layer_parts(model) for linear in (parts.q_proj, parts.k_proj, parts.v_proj, parts.o_proj)
               for p in linear.parameters())


def head_dim_for(dense: Widths, kv_groups: int) -> int:
    """The largest even head_dim whose all-heads attention has no more weights than ``kv_groups`` whole groups."""
    group_channels = kv_groups * (2 * dense.group_size + 2)  # q and o: group_size heads; k and v: one head
    all_channels = 2 * dense.num_heads + 2 * dense.num_kv_heads
    return (group_channels * dense.head_dim // all_channels) // 2 * 2


def head_dim_copy(dense: PreTrainedModel, stats, head_dim: int, variant: str) -> tuple[PreTrainedModel, PruningPlan]:
    """A copy of ``dense`` with every head shrunk to ``head_dim``: variant exact, prefix or approx."""
    before = model_widths(dense)
    keep_all = [LayerPlan(list(range(before.num_heads)), list(range(before.num_kv_heads)), list(range(before.intermediate_size)))
                for _ in all_layer_parts(dense)]
    plan = PruningPlan(1, "acts", before, replace(before, head_dim=head_dim), keep_all)
    rope = dense.config.rope_parameters
    plan = add_head_dim(plan, stats, rope, exact=variant != "approx")
    if variant == "prefix":
        prefix = list(range(head_dim // 2))
        plan = replace(plan, layers=[replace(layer, kept_qk_pairs=[prefix] * before.num_kv_heads) for layer in plan.layers],
                       rope_parameters=exact_rope_parameters(rope, before.head_dim, head_dim, 0, 1))
    model = copy.deepcopy(dense)
    apply_plan(model, plan)
    return model, plan


def row(method: str, model: PreTrainedModel, test: list, **extra) -> dict:
    widths = model_widths(model)
    result = {"method": method, "heads": widths.num_heads, "kv_heads": widths.num_kv_heads, "head_dim": widths.head_dim,
              "attention_params": attention_parameters(model), "kv_bytes_per_token": kv_cache_bytes_per_token(model),
              "test_ppl": perplexity(model, test), **extra}
    console.print(f"{method}: heads {widths.num_heads}/{widths.num_kv_heads} × {widths.head_dim}: test ppl {result['test_ppl']:.2f}")
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-size", type=int, default=256, help="tokens per calibration/evaluation block")
    parser.add_argument("--calibration-blocks", type=int, default=8, help="calibration blocks (Wikipedia train split)")
    parser.add_argument("--eval-blocks", type=int, default=16, help="evaluation blocks (Wikipedia test split)")
    parser.add_argument("--batch-size", type=int, default=4)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    dense, tokenizer = load_dense()
    calibration = batches(calibration_blocks(tokenizer, args.block_size, args.calibration_blocks), args.batch_size)
    test = batches(heldout_blocks(tokenizer, args.block_size, args.eval_blocks, ("wikipedia_test",))["wikipedia_test"], args.batch_size)
    widths = model_widths(dense)
    scores = compute_scores(dense, "acts", calibration, 0)
    stats = collect_head_dim_stats(dense, calibration)
    rows = [row("dense", dense, test)]
    for kv_groups in KV_GROUPS:
        model, _ = pruned_copy(dense, scores, Widths(kv_groups * widths.group_size, kv_groups, widths.head_dim, widths.intermediate_size), "acts")
        rows.append(row(f"groups ({kv_groups}/{widths.num_kv_heads})", model, test, budget=f"{kv_groups} groups"))
        del model
        head_dim = head_dim_for(widths, kv_groups)
        for variant in ("exact", "prefix", "approx"):
            model, plan = head_dim_copy(dense, stats, head_dim, variant)
            pairs = plan.layers[0].kept_qk_pairs[0]
            rows.append(row(f"head_dim {variant}", model, test, budget=f"{kv_groups} groups", kept_pairs_layer0_group0=pairs,
                            rope_parameters=plan.rope_parameters))
            del model
    report(rows, args, started)


def report(rows: list[dict], args: argparse.Namespace, started: float) -> None:
    headers = ["method", "heads (q/kv) × head_dim", "attention params (M)", "KV bytes/token", "test ppl"]
    table = [[r["method"], f"{r['heads']}/{r['kv_heads']} × {r['head_dim']}", r["attention_params"] / 1e6,
              r["kv_bytes_per_token"], r["test_ppl"]] for r in rows]
    settings = (f"SmolLM2-135M-Instruct (30 layers), attention only, one shot, no recovery; {args.calibration_blocks}×"
                f"{args.block_size} calibration tokens (Wikipedia train), {args.eval_blocks}×{args.block_size} test tokens")
    print_table(f"Head-dim vs whole-group pruning — {settings}", headers, table)
    write_results("head_dim", {"settings": vars(args) | {"description": settings}, "rows": rows,
                               "markdown": markdown_table(headers, table)}, started)


if __name__ == "__main__":
    main()
