"""Bad values and unreadable inputs: each ends the CLI with ONE line `error: ...` (exit 2) naming the option as typed
and the fix, found at startup; none is accepted in silence. The CLI runs are grouped (one startup, many problems);
the finer points (real line numbers, byte offsets, where `--ckpt_path=last` looks) are checked on the functions."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from callbacks.resume import checkpoint_directories, last_checkpoint
from datamodules.sources import load_documents
from datamodules.text import TextDataModule
from tests.family_models import save_family_dir
from tests.test_bad_input import error_line
from transact_pl.errors import ConfigError
from transact_pl.lightning_modules.transact_lm import TransActLM
from transact_pl.infra.validation import context_problems

REPO = Path(__file__).resolve().parents[1]


def run_cli(cwd: Path, config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """train.py fit in a subprocess; the caches live in ``cwd`` and the export goes to ``cwd/export``."""
    command = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(config), f"--export.output_dir={cwd}/export", *args]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "TRANSACT_PL_CACHE": str(cwd / "cache"), **(env or {})}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=environment, timeout=300)


@pytest.fixture(scope="module")
def tiny(tiny_cli_dir: Path) -> Path:
    return tiny_cli_dir


# ----- the CLI: unreadable files, impossible values -----------------------------------------------------------------
def test_unreadable_data_files_name_the_file_and_the_place(tiny: Path, tmp_path: Path) -> None:
    lines = (tiny / "corpus.jsonl").read_text().splitlines()
    (tmp_path / "malformed.jsonl").write_text("\n".join(lines[:2]) + '\n\n{"text": "unclosed"\n' + "\n".join(lines[2:]) + "\n")
    (tmp_path / "binary.txt").write_bytes(b"t2 t3 t4\n\x89PNG\r\n\x1a\n\x00\xff")
    (tmp_path / "nulls.jsonl").write_text(lines[0] + '\n{"text": null}\n')
    (tmp_path / "numbers.json").write_text(json.dumps([{"text": "t2 t3"}, {"text": 12345}]))
    line = error_line(run_cli(tmp_path, tiny / "tiny.yaml", f"--data.dataset={tmp_path}/malformed.jsonl",
                              "--data.calibration_file=hf:no_such_user/no_such_dataset", "--report.evaluate=true",
                              f"--report.extra_eval=[{tmp_path}/binary.txt, {tmp_path}/nulls.jsonl, {tmp_path}/numbers.json]",
                              env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}))
    assert f"`--data.dataset={tmp_path}/malformed.jsonl`: line 4 is not valid JSON" in line  # the blank line 3 counts
    assert "`--data.calibration_file=hf:no_such_user/no_such_dataset` could not be loaded (" in line
    assert "without the hub (offline) give a local .txt/.jsonl file" in line
    assert f"`--report.extra_eval={tmp_path}/binary.txt` is not UTF-8 text (byte 0x89 at offset 9)" in line
    assert f"`--report.extra_eval={tmp_path}/nulls.jsonl`: line 2 has a `text` field of type null, not a string" in line
    assert f"`--report.extra_eval={tmp_path}/numbers.json`: record 1 has a `text` field of type int, not a string" in line


def test_model_without_tokenizer_and_with_corrupt_weights_is_refused_at_start(tiny: Path, tmp_path: Path) -> None:
    broken = save_family_dir("llama3", tmp_path / "broken")
    for tokenizer_file in broken.glob("tokenizer*"):
        tokenizer_file.unlink()
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # the header promises bytes that are not there
    line = error_line(run_cli(tmp_path, tiny / "tiny.yaml", f"--model.model={broken}"))
    assert f"`--model.model={broken}`: model.safetensors is truncated or corrupted (" in line
    assert f"`--model.model={broken}` has no usable tokenizer (no tokenizer.json, tokenizer.model or tokenizer_config.json" in line
    assert "tokenizer.save_pretrained(<dir>)" in line
    assert not (tmp_path / "export").exists()


def test_impossible_model_and_distillation_options_are_reported_together(tiny: Path, tmp_path: Path) -> None:
    line = error_line(run_cli(tmp_path, tiny / "tiny.yaml", "--model=transact_pl.lightning_modules.distillation_lm.DistillationLM",
                              "--model.teacher_precision=fp8", "--model.alpha=1.5", "--model.temperature=0",
                              "--model.learning_rate=0", "--model.min_lr_ratio=-0.5", "--data.block_size=513",
                              "--report.evaluate=true", "--report.sample_new_tokens=510"))
    assert "`--model.teacher_precision=fp8` is not one of full, bf16, int8, nf4" in line
    assert "`--model.alpha=1.5` must lie in [0, 1]" in line and "`--model.temperature=0.0` must be > 0" in line
    assert "`--model.learning_rate=0.0` must be > 0" in line and "`--model.min_lr_ratio=-0.5` must lie in [0, 1]" in line
    assert "`--data.block_size=513` is above the model's context of 512 tokens (max_position_embeddings): use at most 512" in line
    # the longest prompt is "Once upon a time, in a small village," → 9 words, each an unknown token of the tiny vocabulary
    assert re.search(r"`--report.sample_new_tokens=510` plus the longest prompt's \d+ tokens exceeds the model's context "
                     r"of 512 tokens: use at most \d+", line)


def test_seed_outside_the_generator_range_is_refused(tiny: Path, tmp_path: Path) -> None:
    line = error_line(run_cli(tmp_path, tiny / "tiny.yaml", "--data.seed=99999999999999999999"))
    assert line == "error: `--data.seed=99999999999999999999` must lie in 0..4294967295"
    with pytest.raises(ConfigError, match=r"`--data.seed=-1` must lie in 0..4294967295"):
        TextDataModule(tokenizer="unused", seed=-1)


# ----- the CLI: resuming ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tiny: Path) -> Path:
    """A 3-step run whose checkpoints follow the CSV logger (run/logs/version_0/checkpoints), as in debug_tiny.yaml."""
    result = run_cli(tiny, tiny / "tiny.yaml", *logger_layout(tiny))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tiny / "run" / "logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    return tiny


def logger_layout(root: Path) -> list[str]:
    """Options that move the checkpoints from a fixed dirpath to the logger's version directory."""
    return ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={root}/run",
            "--trainer.logger.name=logs", "--trainer.callbacks.init_args.dirpath=null"]


def test_ckpt_path_last_resumes_the_previous_version(finished: Path, tmp_path: Path) -> None:
    result = run_cli(tmp_path, finished / "tiny.yaml", *logger_layout(finished), "--ckpt_path=last", "--trainer.max_steps=4")
    assert result.returncode == 0, result.stderr[-3000:]
    last = finished / "run" / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert f"Restored all states from the checkpoint at {last}" in result.stderr
    resumed = finished / "run" / "logs" / "version_1" / "checkpoints"
    assert torch.load(resumed / "last.ckpt", weights_only=True)["global_step"] == 4
    assert not (resumed / "epoch=0-step=1.ckpt").exists()  # continued from step 3, not started over


def test_model_options_that_differ_from_the_checkpoint_are_refused(finished: Path, tmp_path: Path) -> None:
    checkpoint = finished / "run" / "logs" / "version_0" / "checkpoints" / "epoch=0-step=2.ckpt"
    line = error_line(run_cli(tmp_path, finished / "tiny.yaml", f"--ckpt_path={checkpoint}", "--model.learning_rate=0.5",
                              "--model.warmup_steps=3"))
    assert (f"`--ckpt_path={checkpoint}` was written with --model.learning_rate=0.001 --model.warmup_steps=1 but this run "
            "gives --model.learning_rate=0.5 --model.warmup_steps=3") in line
    assert "start a new run without --ckpt_path" in line
    assert not (tmp_path / "export").exists()


# ----- the functions behind them ------------------------------------------------------------------------------------
def test_last_checkpoint_looks_where_model_checkpoint_writes(tmp_path: Path) -> None:
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path), "name": "logs"}}
    config = {"default_root_dir": str(tmp_path), "logger": logger, "callbacks": []}
    with pytest.raises(ConfigError, match=r"`--ckpt_path=last` found no last.ckpt in .*version_\*.*; give the checkpoint's path"):
        last_checkpoint(config)
    for version, name in ((0, "last.ckpt"), (1, "last-v1.ckpt"), (1, "last.ckpt.tmp")):
        directory = tmp_path / "logs" / f"version_{version}" / "checkpoints"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(b"")
        os.utime(directory / name, (version, version))
    assert last_checkpoint(config) == str(tmp_path / "logs" / "version_1" / "checkpoints" / "last-v1.ckpt")
    assert checkpoint_directories({**config, "logger": False}) == [tmp_path / "checkpoints"]
    fixed = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(tmp_path / "c")}}
    assert checkpoint_directories({**config, "callbacks": [fixed]}) == [tmp_path / "c"]


def test_last_checkpoint_follows_a_save_last_link_and_refuses_a_dangling_one(tmp_path: Path) -> None:
    """`save_last: link` (the default job's) makes last.ckpt a relative symlink to the newest step checkpoint."""
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path), "name": "logs"}}
    config = {"default_root_dir": str(tmp_path), "logger": logger, "callbacks": []}
    for version in (0, 1):
        directory = tmp_path / "logs" / f"version_{version}" / "checkpoints"
        directory.mkdir(parents=True)
        (directory / "epoch=0-step=10.ckpt").write_bytes(b"")
        os.utime(directory / "epoch=0-step=10.ckpt", (version, version))
        (directory / "last.ckpt").symlink_to("epoch=0-step=10.ckpt")
        os.utime(directory / "last.ckpt", (version, version), follow_symlinks=False)
    assert last_checkpoint(config) == str(tmp_path / "logs" / "version_1" / "checkpoints" / "last.ckpt")
    (tmp_path / "logs" / "version_1" / "checkpoints" / "epoch=0-step=10.ckpt").unlink()  # the user removed its target
    with pytest.raises(ConfigError, match=r"version_1/checkpoints/last.ckpt, links to epoch=0-step=10.ckpt, which was "
                                          r"deleted; give a step checkpoint's path"):
        last_checkpoint(config)  # never silently an older run's


def test_jsonl_errors_give_the_real_line_and_utf8_errors_the_byte(tmp_path: Path) -> None:
    source = tmp_path / "a.jsonl"
    source.write_text('{"text": "one\u2028two"}\n\n  \n{"text": 7}\n', encoding="utf-8")  # U+2028 is no line break
    with pytest.raises(ConfigError, match=r"`--data.dataset=.*a.jsonl`: line 4 has a `text` field of type int"):
        load_documents(str(source))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"`--data.calibration_file=.*folder`: file .*latin1.txt is not UTF-8 text "
                                          r"\(byte 0xe9 at offset 3\)"):
        load_documents(str(folder), "--data.calibration_file")
    (folder / "latin1.txt").write_text("t2 t3\r\nt4", encoding="utf-8")
    assert load_documents(str(folder)) == ["t2 t3\nt4"]  # newlines as text-mode reading gave them


def test_learning_rate_options_are_checked_without_loading_the_model() -> None:
    assert TransActLM(learning_rate=1e-4, min_lr_ratio=0.0).hparam_problems() == []
    problems = TransActLM(learning_rate=-1e-4, min_lr_ratio=1.5, warmup_steps=-1).hparam_problems()
    assert problems == ["`--model.learning_rate=-0.0001` must be > 0",
                        "`--model.min_lr_ratio=1.5` must lie in [0, 1] (the learning rate's floor as a fraction of "
                        "--model.learning_rate)", "`--model.warmup_steps=-1` must be >= 0"]


def test_context_limits_only_when_the_model_says_it() -> None:
    from transformers import LlamaConfig, PretrainedConfig

    config = LlamaConfig(max_position_embeddings=64)
    assert context_problems(config, 64, 54, [10]) == []
    assert context_problems(config, 65, 55, [10]) == [
        "`--data.block_size=65` is above the model's context of 64 tokens (max_position_embeddings): use at most 64",
        "`--report.sample_new_tokens=55` plus the longest prompt's 10 tokens exceeds the model's context of 64 tokens: "
        "use at most 54"]
    assert context_problems(PretrainedConfig(), 10**6, 10**6, [10]) == []


def test_a_checkpoint_directory_is_compared_by_its_saved_hyper_parameters() -> None:
    from callbacks.resume import changed_options_problem, checkpoint_model_options

    saved = checkpoint_model_options({"hyper_parameters": {"_class_path": "transact_pl.lightning_modules.transact_lm.TransActLM", "_instantiator": "x",
                                                           "learning_rate": 1e-3, "warmup_steps": 1}})
    assert saved == {"class_path": "transact_pl.lightning_modules.transact_lm.TransActLM", "learning_rate": 1e-3, "warmup_steps": 1}
    asked = {"class_path": "transact_pl.lightning_modules.distillation_lm.DistillationLM", "learning_rate": 1e-3, "warmup_steps": 1, "alpha": 0.5}
    assert changed_options_problem("ckpt", dict(saved), saved) is None
    assert changed_options_problem("ckpt", asked, saved).startswith(
        "`--ckpt_path=ckpt` was written with --model=transact_pl.lightning_modules.transact_lm.TransActLM but this run gives "
        "--model=transact_pl.lightning_modules.distillation_lm.DistillationLM;")
