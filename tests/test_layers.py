"""The three layers import one way: the core (transact_pl/*.py) → run infrastructure (transact_pl/infra) →
the Lightning layer (transact_pl/lightning_modules, callbacks, datamodules, train.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIGHTNING_LAYER = ("lightning", "pytorch_lightning", "callbacks", "datamodules", "transact_pl.lightning_modules", "train")
CORE_FORBIDDEN = LIGHTNING_LAYER + ("transact_pl.infra",)


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth of its code (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def offending(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(name for name in imported_modules(path)
                  if any(name == prefix or name.startswith(prefix + ".") for prefix in forbidden))


CORE = sorted((ROOT / "transact_pl").glob("*.py"))
INFRA = sorted((ROOT / "transact_pl" / "infra").glob("*.py"))
# The dry run parses a train.py YAML with train.py's own classes (inside its entry point), so it may see them.
READS_TRAIN_CONFIGS = {"plan_preview.py"}


def test_the_layers_have_their_modules():
    """The walk below must see the modules it guards (a moved folder would make it vacuous)."""
    core_names = {path.stem for path in CORE}
    assert {"arch", "importance", "scoring", "plan", "surgery", "schedule", "head_dim", "kd_losses", "distributed",
            "optim_state"} <= core_names
    assert {"assets", "plots", "report", "export_checkpoint"} <= {path.stem for path in INFRA}


@pytest.mark.parametrize("path", CORE, ids=lambda path: path.name)
def test_core_imports_no_lightning_and_no_outer_layer(path: Path):
    assert offending(path, CORE_FORBIDDEN) == [], f"{path.relative_to(ROOT)} imports an outer layer"


@pytest.mark.parametrize("path", INFRA, ids=lambda path: path.name)
def test_infrastructure_imports_no_lightning_layer(path: Path):
    allowed = ("callbacks.transact_pruning", "transact_pl.lightning_modules.transact_lm") if path.name in READS_TRAIN_CONFIGS else ()
    assert [name for name in offending(path, LIGHTNING_LAYER) if name not in allowed] == [], \
        f"{path.relative_to(ROOT)} imports the Lightning layer"
