"""Common-task accuracy of the dense SmolLM2 and of exported models: BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e,
ARC-c and OpenBookQA validation splits with lm-eval 0.4.13's prompts, scored in process
(transact_pl.infra.common_tasks: the per-example log-likelihoods of lm-eval's HFLM).

    python -m benchmarks.common_tasks [EXPORT_DIR ...] [--limit 200] [--cross-check 20] [--one-shot 2:768 1:768]
    # writes benchmarks/results/common_tasks.{json,png} (and common_tasks_vs_params.png with --one-shot)

--limit scores a seeded sample of rows spread over each split (all rows without it); --cross-check N also runs lm-eval
itself (its own built-in arc_easy task, reading the local split) on N of the dense model's rows and compares prompts
and per-choice log-likelihoods.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.common import RESULTS_DIR, check_cpu_threads, console, load_dense, markdown_table, print_table  # noqa: E402
from benchmarks.common import batches, widths_for, write_results  # noqa: E402
from benchmarks.reconstruction import calibration_sample, pruned_model  # noqa: E402
from transact_pl.arch import model_widths  # noqa: E402
from transact_pl.pruning import plan_shot  # noqa: E402
from transact_pl.reconstruction import DEFAULT_DAMPING, collect_second_moments, refit_weights  # noqa: E402
from transact_pl.scoring import acts_scores  # noqa: E402
from transact_pl.evaluation import parameter_counts  # noqa: E402
from transact_pl.infra.assets import COMMON_TASK_SOURCES, common_task_file, common_task_records  # noqa: E402
from transact_pl.infra.common_tasks import COMMON_TASKS, DEFAULT_SEED, TASKS, evaluate_common_tasks  # noqa: E402
from transact_pl.infra.common_tasks import request_pairs, score_task  # noqa: E402
from transact_pl.infra.loading import load_causal_lm, load_tokenizer  # noqa: E402

SHORT_NAMES = {"boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
               "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA"}
HARNESS_YAML = {"boolq": "super_glue/boolq/default.yaml", "piqa": "piqa/piqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
                "winogrande": "winogrande/default.yaml", "arc_easy": "arc/arc_easy.yaml",
                "arc_challenge": "arc/arc_challenge.yaml", "openbookqa": "openbookqa/openbookqa.yaml"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exports", nargs="*", type=Path, help="exported model directories to score after the dense model")
    parser.add_argument("--limit", type=int, default=None, help="rows per task (a seeded spread sample); all rows if unset")
    parser.add_argument("--tasks", nargs="+", default=list(COMMON_TASKS), choices=COMMON_TASKS)
    parser.add_argument("--setting", default="zeroshot", choices=("zeroshot", "reference"))
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per forward")
    parser.add_argument("--cross-check", type=int, default=0, metavar="N",
                        help="also score N ARC-e rows of the dense model with lm-eval's own arc_easy task (needs lm-eval)")
    parser.add_argument("--one-shot", nargs="*", default=[], metavar="KV:MLP",
                        help="also score one-shot models (no recovery) at these (KV groups, MLP width) points, pruned "
                             "by acts and by acts + least-squares refit, e.g. 2:768 1:768")
    parser.add_argument("--calibration-blocks", type=int, default=128,
                        help="one-shot models: random 256-token blocks of the Wikipedia train split (seed 0)")
    parser.add_argument("--name", default="common_tasks", help="results file stem under benchmarks/results")
    return parser.parse_args()


def one_shot_models(dense, tokenizer, points: list[str], calibration_blocks: int):
    """(label, method, model) for every point: acts alone and acts + least-squares refit (dense variant), from one
    hooked pass over the calibration blocks (the dense model is untouched)."""
    blocks = calibration_sample(tokenizer, 256, calibration_blocks, seed=0)
    moments = collect_second_moments(dense, batches(blocks, 4))
    scores, dense_widths = acts_scores(moments.activation_stats()), model_widths(dense)
    for point in points:
        kv_groups, mlp = (int(value) for value in point.split(":"))
        plan = plan_shot(dense, scores, widths_for(dense_widths, kv_groups, mlp), 1, "acts")
        yield f"one-shot acts {point}", "one-shot acts", pruned_model(dense, plan, None)
        refits = refit_weights(dense, plan, moments, DEFAULT_DAMPING)
        yield f"one-shot acts+LS {point}", "one-shot acts+LS", pruned_model(dense, plan, refits)


def harness_builtin_task_config(task: str) -> dict:
    """lm-eval's own task config for ``task`` (its installed YAML), reading the local validation split, not the hub."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(Path(lm_eval.tasks.__file__).parent / HARNESS_YAML[task])
    config.pop("tag", None)
    return {**config, "task": f"harness_{task}", "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"validation": str(common_task_file(task))}},
            "training_split": None, "validation_split": "validation", "test_split": "validation"}


def cross_check(model, tokenizer, rows: list[int], batch_tokens: int, task: str = "arc_easy") -> dict:
    """lm-eval's own ``task`` (through lm_eval.simple_evaluate and HFLM) against score_task on the same rows."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    output = simple_evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1), tasks=[harness_builtin_task_config(task)],
                             task_manager=TaskManager(include_defaults=False), samples={f"harness_{task}": rows},
                             log_samples=True)
    harness_seconds = time.perf_counter() - started
    logged = sorted(output["samples"][f"harness_{task}"], key=lambda sample: sample["doc_id"])
    ours, records = score_task(model, tokenizer, task, rows, 0, DEFAULT_SEED, batch_tokens), common_task_records(task)
    same_prompts = sum([tuple(a) for a in sample["arguments"]] == request_pairs(records, row, 0, TASKS[task], DEFAULT_SEED)
                       for row, sample in zip(rows, logged))
    differences = [abs(float(response[0][0]) - ll) for sample, lls in zip(logged, ours.loglikelihoods)
                   for response, ll in zip(sample["resps"], lls)]
    return {"task": f"lm-eval 0.4.13 built-in {task} on the local validation split", "rows": rows,
            "identical_prompts": same_prompts, "choices": len(differences), "max_abs_loglikelihood_difference": max(differences),
            "harness_acc": output["results"][f"harness_{task}"]["acc,none"],
            "in_process_acc": sum(ours.accuracies()["acc"]) / len(rows),
            "harness_seconds": round(harness_seconds, 1), "in_process_seconds": round(ours.seconds, 1)}


def score_model(label: str, model, tokenizer, args: argparse.Namespace) -> dict:
    total, non_embedding = parameter_counts(model)
    started = time.perf_counter()
    report = evaluate_common_tasks(model, tokenizer, args.tasks, args.limit, args.setting, args.seed, args.batch_tokens)
    console.print(f"{label}: average acc {report['average']['acc']:.4f} in {time.perf_counter() - started:.0f} s")
    return {"label": label, "params": total, "non_embedding_params": non_embedding,
            "seconds": round(time.perf_counter() - started, 1), **report}


def chance_accuracy(task: str) -> float:
    """Accuracy of uniform guessing: the mean of 1 / (number of choices) over the split."""
    counts = [len(TASKS[task].question(record).choices) for record in common_task_records(task)]
    return sum(1 / count for count in counts) / len(counts)


def plot_accuracy(models: list[dict], tasks: list[str], path: Path, title: str) -> Path:
    """Grouped bars: acc per task and the average, one bar per model with its standard error; chance as a tick."""
    columns = [SHORT_NAMES[task] for task in tasks] + ["average"]
    chance = [chance_accuracy(task) for task in tasks]
    chance.append(sum(chance) / len(chance))
    figure, axis = plt.subplots(figsize=(9, 4.6), constrained_layout=True)
    width = 0.8 / len(models)
    for index, model in enumerate(models):
        values = [model["tasks"][task]["acc"] for task in tasks] + [model["average"]["acc"]]
        errors = [model["tasks"][task]["acc_stderr"] for task in tasks] + [float("nan")]
        offsets = [column + (index - (len(models) - 1) / 2) * width for column in range(len(columns))]
        axis.bar(offsets, values, width, yerr=errors, capsize=2, label=model["label"])
    axis.hlines(chance, [c - 0.45 for c in range(len(columns))], [c + 0.45 for c in range(len(columns))],
                colors="black", linestyles=":", label="chance")
    axis.set_xticks(range(len(columns)), columns, rotation=20)
    axis.set_ylabel("accuracy (acc)")
    axis.set_ylim(0, 1)
    axis.set_title(title)
    axis.grid(alpha=0.3, axis="y")
    figure.legend(loc="outside right center")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_versus_parameters(models: list[dict], tasks: list[str], path: Path, title: str) -> Path:
    """Accuracy against non-embedding parameters: one panel for the average and one per task, one line per one-shot
    method, the dense model and every export (the default job's) as single points, chance dotted."""
    panels = ["average", *tasks]
    figure, axes = plt.subplots(2, 4, figsize=(13, 6.2), sharex=True, constrained_layout=True)
    methods = sorted({model["method"] for model in models if "method" in model})
    for axis, panel in zip(axes.flat, panels):
        value = (lambda m: m["average"]["acc"]) if panel == "average" else (lambda m, t=panel: m["tasks"][t]["acc"])
        for method in methods:
            line = sorted((m for m in models if m.get("method") == method), key=lambda m: m["non_embedding_params"])
            axis.plot([m["non_embedding_params"] / 1e6 for m in line], [value(m) for m in line], marker="o", label=method)
        for model in (m for m in models if "method" not in m):
            axis.plot(model["non_embedding_params"] / 1e6, value(model), marker="*" if "dense" in model["label"] else "s",
                      markersize=10, linestyle="none", label=model["label"])
        chance = (sum(chance_accuracy(t) for t in tasks) / len(tasks)) if panel == "average" else chance_accuracy(panel)
        axis.axhline(chance, color="black", linestyle=":", linewidth=1, label="chance")
        axis.set_title("average" if panel == "average" else SHORT_NAMES[panel])
        axis.grid(alpha=0.3)
    for axis in axes.flat[len(panels):]:
        axis.set_visible(False)
    for axis in axes[1]:
        axis.set_xlabel("non-embedding parameters (M)")
    for axis in axes[:, 0]:
        axis.set_ylabel("accuracy (acc)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8)
    figure.suptitle(title)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def table_rows(models: list[dict], tasks: list[str]) -> list[list[object]]:
    """One row per model: parameters, acc (acc_norm) per task, average acc."""
    rows = []
    for model in models:
        cells: list[object] = [model["label"], f"{model['params'] / 1e6:.1f}"]
        for task in tasks:
            entry = model["tasks"][task]
            norm = f" ({entry['acc_norm'] * 100:.1f})" if "acc_norm" in entry else ""
            cells.append(f"{entry['acc'] * 100:.1f}{norm}")
        rows.append(cells + [f"{model['average']['acc'] * 100:.1f}"])
    return rows


def main() -> None:
    args = parse_args()
    check_cpu_threads()
    started = time.perf_counter()
    dense, tokenizer = load_dense()
    models = [score_model("dense SmolLM2-135M", dense, tokenizer, args)]
    checked = None
    if args.cross_check:
        rows = sorted(range(0, 570, max(1, 570 // args.cross_check)))[:args.cross_check]
        checked = cross_check(dense, tokenizer, rows, args.batch_tokens)
        console.print(f"cross-check: {checked}")
    for label, method, model in one_shot_models(dense, tokenizer, args.one_shot, args.calibration_blocks):
        models.append({**score_model(label, model, tokenizer, args), "method": method})
        del model
        gc.collect()
    del dense
    gc.collect()
    for export in args.exports:
        model = load_causal_lm(str(export)).eval()
        models.append(score_model(str(export), model, load_tokenizer(str(export)), args))
        del model
        gc.collect()
    headers = ["model", "params (M)", *(SHORT_NAMES[task] for task in args.tasks), "average"]
    rows = table_rows(models, args.tasks)
    print_table(f"Common tasks, {args.setting}, acc (acc_norm) %", headers, rows)
    console.print(markdown_table(headers, rows))
    png = plot_accuracy(models, args.tasks, RESULTS_DIR / f"{args.name}.png",
                        f"Common tasks ({args.setting}, validation, {args.limit or 'all'} rows per task)")
    if args.one_shot:
        plot_versus_parameters(models, args.tasks, RESULTS_DIR / f"{args.name}_vs_params.png",
                               f"Common tasks vs size ({args.setting}, {args.limit or 'all'} rows per task)")
    examples = {task: models[0]["tasks"][task]["examples"] for task in args.tasks}
    write_results(args.name, {"setting": args.setting, "limit": args.limit, "seed": args.seed, "examples": examples,
                              "split_sizes": {task: COMMON_TASK_SOURCES[task][1] for task in args.tasks},
                              "models": models, "cross_check": checked, "png": png.name}, started)


if __name__ == "__main__":
    main()
