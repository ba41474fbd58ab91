"""Documents of a text source, in source order, and their split by position.

A source is an embedded corpus, a local .txt/.jsonl/.json file or a directory of them, or ``hf:<name>[:<config>]``;
document i goes to test if i % 10 == 9, val if i % 10 == 8, the calibration share if i % 10 == 7 (only when it is
reserved), else train; the calibration sample spans the whole share. ``datamodules.text`` tokenizes and packs the
splits.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import torch

from transact_pl.infra.assets import CORPORA, corpus_documents
from transact_pl.errors import ConfigError, first_line

SPLIT_MODULUS = 10
VAL_POSITION = 8
TEST_POSITION = 9
CALIBRATION_POSITION = 7  # reserved only with --data.calibration=heldout, so other runs keep today's train split
_FILE_SUFFIXES = (".txt", ".jsonl", ".json")
_SOURCE_FORMS = (f"an embedded corpus ({', '.join(CORPORA)}), a .txt/.jsonl/.json file, a directory of them, "
                 "or hf:<name>[:<config>]")


def _decoded_text(path: Path, label: str) -> str:
    """The UTF-8 text of ``path``; a file with other bytes (binary, Latin-1, ...) names the first bad byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{label} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); save it as "
                          "UTF-8 text, or leave it out if it is not text") from error


def _record_text(record: object, where: str, label: str) -> str:
    """The ``text`` field of one json(l) record; anything but a string is refused (never trained on as "None")."""
    if not isinstance(record, dict) or "text" not in record:
        raise ConfigError(f"{label}: {where} has no `text` field; every record must be an object with a `text` field "
                          'holding a string, e.g. {"text": "..."}')
    if not isinstance(record["text"], str):
        found = "null" if record["text"] is None else type(record["text"]).__name__
        raise ConfigError(f"{label}: {where} has a `text` field of type {found}, not a string; give the document's text "
                          "as a JSON string or remove the record")
    return record["text"]


def _jsonl_documents(text: str, label: str) -> list[str]:
    """One document per non-blank line; errors give the file's real 1-based line number."""
    documents = []
    # split on "\n" only: str.splitlines would also cut at U+2028 and friends, which JSON strings may hold raw
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{label}: line {number} is not valid JSON ({error.msg} at column {error.colno}); fix or "
                              "remove that line (a .jsonl file holds one JSON object per line)") from error
        documents.append(_record_text(record, f"line {number}", label))
    return documents


def _json_documents(text: str, label: str) -> list[str]:
    """Documents of a .json file holding a list of records."""
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{label} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                          'give a list of records [{"text": "..."}, ...]') from error
    if not isinstance(records, list):
        raise ConfigError(f"{label}: every record must be an object with a `text` field, in a JSON list")
    return [_record_text(record, f"record {index}", label) for index, record in enumerate(records)]


def _read_file_documents(path: Path, label: str) -> list[str]:
    """Documents of one local file: a whole ``.txt`` file, or the ``text`` field of each json(l) record.

    ``label`` names the option and the file in errors (`--data.dataset=corpus.jsonl`).
    """
    text = _decoded_text(path, label)
    if path.suffix == ".txt":  # universal newlines, as text-mode reading gives
        return [text.replace("\r\n", "\n").replace("\r", "\n")]
    return _jsonl_documents(text, label) if path.suffix == ".jsonl" else _json_documents(text, label)


# What ``datasets.load_dataset`` raises without a network, for an unknown name or config, or a broken cache.
_HUB_ERRORS = (OSError, ValueError, KeyError, ImportError)


def _hub_documents(spec: str, option: str) -> list[str]:
    """The ``text`` column of the train split of ``hf:<name>[:<config>]``, in dataset order."""
    name, _, config = spec.removeprefix("hf:").partition(":")
    try:
        dataset = datasets.load_dataset(name, config or None, split="train")
    except _HUB_ERRORS as error:
        raise ConfigError(f"`{option}={spec}` could not be loaded ({first_line(error)}); without the hub (offline) give a local "
                          f".txt/.jsonl file or an embedded corpus ({', '.join(CORPORA)})") from error
    if "text" not in dataset.column_names:
        raise ConfigError(f"`{option}={spec}` has no `text` column (columns: {', '.join(dataset.column_names)}); "
                          "give a dataset with a `text` column")
    texts = dataset["text"]
    bad = next((index for index, text in enumerate(texts) if not isinstance(text, str)), None)
    if bad is not None:
        raise ConfigError(f"`{option}={spec}`: row {bad} of `text` is {texts[bad]!r}, not a string; give a dataset whose "
                          "`text` column holds strings")
    return list(texts)


def load_documents(source: str, option: str = "--data.dataset") -> list[str]:
    """Non-empty documents of ``source`` in source order; ``option`` names the CLI flag in errors."""
    path = Path(source).expanduser()
    if source in CORPORA:
        documents = corpus_documents(source)
    elif source.startswith("hf:"):
        documents = _hub_documents(source, option)
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _FILE_SUFFIXES)
        documents = [doc for file in files for doc in _read_file_documents(file, f"`{option}={source}`: file {file}")]
    elif path.is_file() and path.suffix in _FILE_SUFFIXES:
        documents = _read_file_documents(path, f"`{option}={source}`")
    elif path.exists():
        raise ConfigError(f"`{option}={source}` has an unsupported suffix; use one of {', '.join(_FILE_SUFFIXES)}")
    else:
        raise ConfigError(f"`{option}={source}` does not exist; give {_SOURCE_FORMS}")
    documents = [doc for doc in documents if doc.strip()]
    if not documents:
        raise ConfigError(f"`{option}={source}` holds no non-empty documents; point it at a file with text")
    return documents


def split_documents(documents: list[str], reserve_calibration: bool = False) -> dict[str, list[str]]:
    """Split by document position i: test if i % 10 == 9, val if i % 10 == 8, else train.

    With ``reserve_calibration`` a fourth split, ``calibration``, takes i % 10 == 7 away from train.
    """
    positions = {TEST_POSITION: "test", VAL_POSITION: "val"}
    if reserve_calibration:
        positions[CALIBRATION_POSITION] = "calibration"
    splits: dict[str, list[str]] = {name: [] for name in ("train", "val", "test", *positions.values())}
    for index, document in enumerate(documents):
        splits[positions.get(index % SPLIT_MODULUS, "train")].append(document)
    return splits


def stratified_sample(num_blocks: int, count: int, seed: int) -> torch.Tensor:
    """``count`` block indices (count ≤ num_blocks), one drawn uniformly from each of ``count`` consecutive strata
    ``[j * num_blocks // count, (j + 1) * num_blocks // count)``, in increasing order.

    Every block is (up to the rounding of stratum sizes) equally likely, as in a simple random sample, but
    the sample spans the whole range: over a share packed document by document, every document gets blocks
    in proportion to its length. Drawn with ``torch.rand(count, dtype=float64)`` from
    ``torch.Generator().manual_seed(seed)``.
    """
    bounds = torch.arange(count + 1) * num_blocks // count
    offsets = torch.rand(count, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return bounds[:-1] + (offsets * (bounds[1:] - bounds[:-1])).long()
