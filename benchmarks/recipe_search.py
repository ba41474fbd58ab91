"""Recipe search for the default job: the same model, widths, data and 40 training steps (the same tokens), with
one recipe option changed at a time, each run a real ``train.py fit`` of configs/smollm2_transact.yaml.

Every recipe is measured the way the default job reports itself: validation perplexity (blocks spread over the
validation split) and held-out news / Shakespeare perplexity (4 blocks of 256 tokens each, spread over the text),
dense vs final, from the run's summary.json. Common tasks and samples are switched off to save time (they do not
change the model). Results: benchmarks/results/recipe_search.{json,png}, one run after the other (a run per
process; the machine's load is recorded, and wall times are only comparable within one invocation).

    python -m benchmarks.recipe_search                       # every recipe (~30 min each on 2 loaded cores)
    python -m benchmarks.recipe_search --only before default # some of them
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.common import RESULTS_DIR, console, markdown_table, print_table, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "smollm2_transact.yaml"
FAST = ["--report.common_tasks=[]", "--report.sample_new_tokens=0"]
BEFORE = ["--pruning.num_shots=2", "--pruning.reconstruction=null", "--data.num_calibration_samples=16",
          "--model.learning_rate=2e-4"]

# name → (what it is, overrides of configs/smollm2_transact.yaml). Every recipe trains 40 steps of 2 × 256 tokens;
# the default config is one shot at step 0 + least-squares refit (64 calibration blocks), lr 6e-4, KD+CE.
RECIPES: dict[str, tuple[str, list[str]]] = {
    "before": ("the default job before this search: 2 shots (steps 0, 20), no refit, 16 calibration blocks, lr 2e-4",
               BEFORE),
    "default": ("one shot + refit (dense), 64 calibration blocks, lr 6e-4 (the default job now)", []),
    "two_shots": ("the default with 2 shots (steps 0, 20)", ["--pruning.num_shots=2"]),
    "two_shots_0_14": ("the default with 2 shots at steps 0 and 14 (global cosine): two_shots_per_shot_lr's shots",
                       ["--pruning.num_shots=2", "--pruning.shot_steps=[0, 14]"]),
    "two_shots_per_shot_lr": ("2 shots at steps 0 and 14, per-shot warm-up + cosine, peak ×1.5",
                              ["--pruning.num_shots=2", "--pruning.shot_steps=[0, 14]", "--model.lr_schedule=per_shot",
                               "--model.lr_peak_growth=1.5"]),
    "no_refit": ("the default without the refit (16 calibration blocks)",
                 ["--pruning.reconstruction=null", "--data.num_calibration_samples=16"]),
    "lr1e-3": ("the default with lr 1e-3", ["--model.learning_rate=1e-3"]),
    "kd_only": ("the default with KD only (alpha 1)", ["--model.alpha=1.0"]),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, choices=list(RECIPES), help="recipes to run (default: all)")
    parser.add_argument("--work", default=str(REPO / "runs" / "recipe_search"), help="where the runs go")
    parser.add_argument("--name", default="recipe_search", help="results name")
    parser.add_argument("--merge", action="store_true", help="keep the recipes of an earlier results file not rerun")
    parser.add_argument("--from-run", nargs=3, action="append", default=[], metavar=("NAME", "RUN_ROOT", "WALL_S"),
                        help="add a finished run instead of launching one: its recipe name (a key of RECIPES, run "
                             "with those overrides), its --trainer.default_root_dir and its measured wall time")
    return parser.parse_args()


def run_recipe(name: str, overrides: list[str], work: Path) -> dict:
    """One ``train.py fit`` of the default config with ``overrides``; its summary and wall time."""
    root = work / name
    args = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(CONFIG), *FAST, *overrides,
            f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
            f"--export.output_dir={root.with_name(root.name + '_export')}"]
    console.print(f"[bold]{name}[/]: {' '.join(overrides) or '(default config)'}")
    started = time.perf_counter()
    log = root.with_suffix(".log")
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        process = subprocess.run(args, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"recipe {name} failed (exit {process.returncode}); see {log}")
    return summary_row(name, overrides, root, wall)


def summary_row(name: str, overrides: list[str], root: Path, wall: float) -> dict:
    """The recipe's row from the newest summary.json under ``root`` (a run of the default config)."""
    summary = json.loads(max(root.glob("logs/version_*/summary.json"), key=os.path.getmtime).read_text())
    stages, heldout = summary["stages"], summary["heldout"]
    dense, final = stages[0], stages[-1]
    row = {"recipe": name, "change": RECIPES[name][0], "overrides": overrides, "wall_s": round(wall, 1),
           "dense_val_ppl": dense["val_ppl"], "final_val_ppl": final["val_ppl"],
           "val_ratio": final["val_ppl"] / dense["val_ppl"], "final_params": final["params"],
           "stages": [(stage["stage"], stage["val_ppl"]) for stage in stages]}
    for text, measured in heldout["final"]["perplexity"].items():
        row[f"{text}_ratio"] = measured["ppl"] / heldout["dense"]["perplexity"][text]["ppl"]
        row[f"{text}_final_ppl"] = measured["ppl"]
    console.print(f"  {name}: final/dense val ppl {row['final_val_ppl']:.1f}/{row['dense_val_ppl']:.1f} = "
                  f"{row['val_ratio']:.2f}× in {wall / 60:.1f} min")
    return row


def plot(rows: list[dict], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(10.5, 4.5))
    names = [row["recipe"] for row in rows]
    positions = range(len(rows))
    for offset, (key, label) in enumerate((("val_ratio", "validation (Wikipedia)"), ("news_ratio", "news"),
                                           ("shakespeare_ratio", "Shakespeare"))):
        axis.bar([p + (offset - 1) * 0.27 for p in positions], [row.get(key, float("nan")) for row in rows], 0.27,
                 label=label)
    axis.axhline(3.0, color="black", linestyle="--", linewidth=1, label="target 3×")
    axis.set_xticks(list(positions), names, rotation=25, ha="right", fontsize=8)
    axis.set_ylabel("final / dense perplexity")
    axis.set_title("Default job recipes: SmolLM2-135M → 6/9 heads, MLP 768, 40 steps × 512 tokens")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the bars reach every corner
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    results_path = RESULTS_DIR / f"{args.name}.json"
    rows = {}
    if args.merge and results_path.is_file():
        rows = {row["recipe"]: row for row in json.loads(results_path.read_text())["rows"]}
    for name, root, wall in args.from_run:
        if name not in RECIPES:
            raise SystemExit(f"--from-run {name}: not a recipe; choose one of {', '.join(RECIPES)}")
        rows[name] = summary_row(name, RECIPES[name][1], Path(root), float(wall))
        save(rows, args.name, started)
    for name in args.only or ([] if args.from_run else list(RECIPES)):
        rows[name] = run_recipe(name, RECIPES[name][1], Path(args.work))
        save(rows, args.name, started)  # after every recipe: a search stopped half-way keeps what it measured
    print_table("Recipes (final / dense perplexity)", *table([rows[n] for n in RECIPES if n in rows]))


def save(rows: dict[str, dict], name: str, started: float) -> None:
    """benchmarks/results/<name>.{json,png} with the rows in RECIPES order."""
    ordered = [rows[recipe] for recipe in RECIPES if recipe in rows]
    write_results(name, {"protocol": __doc__.split("\n\n")[1].replace("\n", " "), "rows": ordered,
                         "markdown": markdown_table(*table(ordered))}, started)
    plot(ordered, RESULTS_DIR / f"{name}.png")


def table(rows: list[dict]) -> tuple[list[str], list[list[object]]]:
    headers = ["recipe", "change", "val ppl final/dense", "val ×", "news ×", "Shakespeare ×", "wall (min)"]
    return headers, [[row["recipe"], row["change"], f"{row['final_val_ppl']:.1f}/{row['dense_val_ppl']:.1f}",
                      round(row["val_ratio"], 2), round(row.get("news_ratio", float("nan")), 2),
                      round(row.get("shakespeare_ratio", float("nan")), 2), round(row["wall_s"] / 60, 1)]
                     for row in rows]


if __name__ == "__main__":
    main()
