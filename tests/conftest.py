"""Shared pytest setup: the `slow` marker, repo-root imports and real data/asset fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # until the project is pip-installed in editable mode
    sys.path.insert(0, str(REPO_ROOT))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: needs downloads, the full model or minutes of CPU; -m 'not slow' skips")
    config.addinivalue_line("markers", "kill: SIGKILLs real runs at random moments (minutes); `make test-kill` runs them")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory in the user cache (converted once if missing)."""
    from transact_pl.assets import ensure_embedded_model

    return ensure_embedded_model()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: Path):
    """The real SmolLM2 tokenizer (EOS `<|im_end|>`, no BOS prepended)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)
