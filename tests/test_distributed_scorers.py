"""The weight-based scorers under FSDP2 (2 processes, gloo, CPU): the same plans as one process.

``taylor`` sums gradients that FSDP2 has already reduce-scattered as means over the processes, and both
``taylor`` and ``magnitude`` read weights that are sharded DTensors; every shot must still choose what one
process choosing from the whole calibration set chooses. Slow-marked (4 real runs): `make test-dist`.
"""

from pathlib import Path

import pytest

from test_distributed import STRATEGIES, plans, run

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
# Only the plans are compared: skip the perplexity measurements of every stage.
NO_EVALUATION = "--report.evaluate=false"


@pytest.mark.parametrize("scorer", ["taylor", "magnitude"])
def test_fsdp2_scorer_makes_the_single_process_plans(tmp_path: Path, smollm2_dir, scorer):
    for strategy in ("single", "fsdp2"):
        (tmp_path / strategy).mkdir()
        run(tmp_path / strategy, *STRATEGIES[strategy], f"--pruning.scorer={scorer}", NO_EVALUATION)
    single, sharded = plans(tmp_path / "single"), plans(tmp_path / "fsdp2")
    assert [plan["scorer"] for plan in single] == [scorer, scorer]  # both shots ran, with this scorer
    assert sharded == single
