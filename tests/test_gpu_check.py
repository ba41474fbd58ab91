"""The GPU check's CPU-runnable parts: its commands parse as train.py's CLI, and the MFU arithmetic."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from benchmarks.gpu_check import SMOLLM2_VARIANTS, main, mfu, smollm2_job

REPO = Path(__file__).resolve().parents[1]


def test_the_dry_run_lists_every_part(capsys):
    main(["--dry-run"])
    printed = capsys.readouterr().out
    assert all(f"[{name}]" in printed for name in [*SMOLLM2_VARIANTS, "distillation_cuda", "fsdp2_7b"])
    assert "--model.teacher_precision=int8" in printed and "--model.teacher_precision=nf4" in printed


def test_mfu_of_the_7b_steps_follows_the_flops_formula():
    timing = {f"{kind}_tokens_per_s_{when}": 1000.0 for kind in ("ce", "kd") for when in ("before", "after")}
    record = {"device": "NVIDIA H200", "seq": 2048, "params_before": 6_738_415_616, "params_after": 3_000_000_000,
              "widths_after": {"num_heads": 16, "head_dim": 128}, **timing}
    result = mfu(record)
    embedding, attention = 32000 * 4096, 12 * 32 * 4096 * 2048
    assert result["ce_mfu_before"] == round(1000 * (6 * (6_738_415_616 - embedding) + attention) / 989.4e12, 4)
    assert result["kd_mfu_after"] > result["ce_mfu_after"] > 0  # the teacher's forward counts too
    assert "no bf16 peak" in mfu({**record, "device": "Some GPU"})["mfu_note"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMOLLM2_VARIANTS))
def test_each_smollm2_run_parses_as_a_train_py_command(name: str, tmp_path: Path):
    command = smollm2_job(name, steps=8).command + ["--print_config"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "precision: bf16-mixed" in result.stdout and "num_layers: null" in result.stdout, shlex.join(command)
