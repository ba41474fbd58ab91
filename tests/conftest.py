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
