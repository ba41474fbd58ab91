"""One-shot against iterative pruning: k = 1, 2, 4 shots to the same final widths with the same recovery budget.

Each run is the project's own pipeline in process (TransActLM + TextDataModule + TransActPruning in a
Lightning Trainer): shots at steps 0, S/k, 2S/k, ... of S training steps, so every k trains the same
number of tokens; then perplexity on the held-out texts and greedy samples from fixed prompts.

    python -m benchmarks.iterative           # writes benchmarks/results/iterative.{json,png}
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from benchmarks.common import RESULTS_DIR, check_cpu_threads, console, load_dense, markdown_table, print_table, size_figures
from benchmarks.common import write_results
from benchmarks.texts import evaluate_suite
from callbacks.run_pictures import read_metrics_csv
from callbacks.transact_pruning import TransActPruning
from datamodules.text import TextDataModule
from transact_pl.infra.assets import EMBEDDED_MODEL
from transact_pl.eval_suite import generate_samples
from transact_pl.lightning_modules.transact_lm import TransActLM
from transact_pl.infra.plots import plot_series

WORK_DIR = RESULTS_DIR / "tmp" / "iterative"  # CSV logs of the runs (git-ignored)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--target-attention", type=int, default=384, help="final heads·head_dim (384 = 2 of 3 KV groups)")
    parser.add_argument("--target-mlp", type=int, default=768, help="final MLP width")
    parser.add_argument("--steps", type=int, default=12, help="recovery training steps, the same for every k")
    parser.add_argument("--block-size", type=int, default=128, help="training and calibration block size")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--calibration-blocks", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--eval-block-size", type=int, default=256)
    parser.add_argument("--eval-blocks", type=int, default=8, help="blocks per held-out text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="iterative", help="results file stem: benchmarks/results/<name>.{json,png}")
    return parser.parse_args()


def run_schedule(num_shots: int, args: argparse.Namespace) -> TransActLM:
    """Fit one schedule with the project's module, datamodule and pruning callback; return the trained module."""
    if args.steps % num_shots:
        raise ValueError(f"--steps={args.steps} must be a multiple of every k (got k={num_shots})")
    L.seed_everything(args.seed, verbose=False)
    module = TransActLM(model=EMBEDDED_MODEL, learning_rate=args.learning_rate, warmup_steps=2)
    data = TextDataModule(tokenizer=EMBEDDED_MODEL, dataset="wikipedia", block_size=args.block_size, batch_size=args.batch_size,
                          num_calibration_samples=args.calibration_blocks, seed=args.seed)
    pruning = TransActPruning(target_attention=args.target_attention, target_mlp=args.target_mlp, num_shots=num_shots,
                              first_shot_step=0, steps_between_shots=args.steps // num_shots, scorer="acts")
    trainer = L.Trainer(max_steps=args.steps, accelerator="auto", devices=1, logger=CSVLogger(WORK_DIR, name=f"k{num_shots}", version=0),
                        callbacks=[pruning], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(module, datamodule=data)
    return module


def main() -> None:
    args = parse_args()
    check_cpu_threads()
    started = time.perf_counter()
    dense, tokenizer = load_dense()
    rows = [{"schedule": "dense", **size_figures(dense), **suite_row(dense, tokenizer, args)}]
    del dense
    curves = {}
    for num_shots in args.shots:
        run_started = time.perf_counter()
        module = run_schedule(num_shots, args)
        model = module.model.eval()
        widths_after_shots = [[plan.after.num_kv_heads, plan.after.intermediate_size] for plan in module.plans]
        rows.append({"schedule": f"k={num_shots}", **size_figures(model), **suite_row(model, tokenizer, args),
                     "kv_groups_and_mlp_after_shots": widths_after_shots, "run_s": round(time.perf_counter() - run_started, 1)})
        metrics = read_metrics_csv(Path(WORK_DIR) / f"k{num_shots}" / "version_0" / "metrics.csv")
        curves[f"k={num_shots}"] = tuple(zip(*metrics["train_loss"]))
        console.print(f"k={num_shots}: " + ", ".join(f"{n} ppl {rows[-1][n]:.1f}" for n in rows[-1]["texts"]))
        del module, model
    report(rows, curves, args, started)


def suite_row(model, tokenizer, args: argparse.Namespace) -> dict:
    """Held-out perplexities (flattened as <text>: ppl) and greedy samples of one model."""
    suite = evaluate_suite(model, tokenizer, args.eval_block_size, args.eval_blocks, batch_size=4)
    return {**{name: result["ppl"] for name, result in suite.items()}, "texts": list(suite),
            "samples": generate_samples(model, tokenizer, max_new_tokens=16)}


def report(rows: list[dict], curves: dict, args: argparse.Namespace, started: float) -> None:
    texts = rows[0]["texts"]
    headers = ["schedule", "heads (q/kv)", "MLP", "non-emb params (M)", *[f"{t} ppl" for t in texts], "run s"]
    table = [[r["schedule"], f"{r['heads']}/{r['kv_heads']}", r["mlp"], r["non_embedding_params"] / 1e6, *[r[t] for t in texts],
              r.get("run_s", "-")] for r in rows]
    tokens = args.steps * args.batch_size * args.block_size
    settings = (f"SmolLM2-135M → attention {args.target_attention}, MLP {args.target_mlp}; acts; {args.steps} recovery steps × "
                f"{args.batch_size}×{args.block_size} = {tokens:,} tokens for every k; {args.calibration_blocks}×{args.block_size} "
                f"calibration tokens per shot; {args.eval_blocks}×{args.eval_block_size} tokens per held-out text")
    print_table(f"One-shot vs iterative — {settings}", headers, table)
    for row in rows:
        console.print(f"[bold]{row['schedule']}[/bold]: " + " | ".join(repr(s) for s in row["samples"]))
    plot_series({name: (steps, losses) for name, (steps, losses) in curves.items()}, RESULTS_DIR / f"{args.name}.png",
                "global step", "training loss (next-token CE)", f"Recovery with k shots ({tokens:,} training tokens each)")
    write_results(args.name, {"settings": vars(args) | {"description": settings, "recovery_tokens": tokens}, "rows": rows,
                                "train_loss": {k: list(zip(*v)) for k, v in curves.items()}, "markdown": markdown_table(headers, table)},
                  started)


if __name__ == "__main__":
    main()
