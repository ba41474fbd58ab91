"""The bad-input catalogue: each wrong input ends the run with ONE line `error: ...` naming the option (exit 2;
NaN/Inf: exit 1), no traceback, nothing half-written. Most cases go through the real CLI as a subprocess on a
tiny random Llama-3-style model (GQA, llama3 rope) saved as a local directory."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from callbacks.atomic_checkpoint import AtomicCheckpointIO
from tests.family_models import family_model, run_cli, save_family_dir, save_gpt2_dir, save_model_dir, tiny_cli_config, write_corpus
from tests.tiny_models import random_batches, tiny_llama, tiny_tokenizer
from transact_pl.errors import ConfigError, NonFiniteError
from transact_pl.infra.export import export_model
from transact_pl.importance import collect_activation_stats

REPO = Path(__file__).resolve().parents[1]


def error_line(result: subprocess.CompletedProcess, exit_code: int = 2) -> str:
    """The single `error:` line, after checking the exit code, that it is the last line and that no traceback shows."""
    assert result.returncode == exit_code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A directory with base/ (tiny Llama 3), corpus.jsonl, tiny.yaml and run/ (a finished 6-step run)."""
    root = tmp_path_factory.mktemp("tiny")
    save_family_dir("llama3", root / "base")
    write_corpus(root / "corpus.jsonl")
    tiny_cli_config(root / "tiny.yaml", root / "base", root / "corpus.jsonl", root / "run")
    result = run_cli(root, root / "tiny.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def fresh_run(tiny: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """The tiny config writing into tmp_path (checkpoints and export), with extra CLI options."""
    return run_cli(tmp_path, tiny / "tiny.yaml", f"--trainer.default_root_dir={tmp_path}/run",
                   f"--trainer.callbacks.init_args.dirpath={tmp_path}/run/checkpoints",
                   f"--export.output_dir={tmp_path}/run/export", *args)


def test_every_config_problem_is_reported_at_once_in_one_line(tiny: Path, tmp_path: Path) -> None:
    line = error_line(run_cli(tmp_path, tiny / "tiny.yaml", "--pruning.target_attention=640", "--pruning.target_mlp=0",
                              "--pruning.scorer=bogus", "--pruning.num_shots=10", "--data.num_calibration_samples=100000",
                              "--pruning.head_dim_target=5", f"--report.extra_eval=[{tiny}/corpus.jsonl, no_such_text]",
                              "--report.extra_eval_blocks=0", "--report.sample_new_tokens=-1"))
    assert "`--pruning.target_attention=640` is outside 1..32 (the model's heads · head_dim); valid widths: 16, 32" in line
    assert "`--pruning.target_mlp=0` is outside 1..37" in line
    assert "`--pruning.scorer=bogus` is unknown; choose one of acts, taylor" in line
    assert "last shot is at step 27 but `--trainer.max_steps=6`" in line
    assert "`--pruning.head_dim_target=5` must be an even number in 2..8" in line
    assert "`--report.extra_eval=no_such_text` does not exist; give an embedded corpus (wikipedia, news, shakespeare)" in line
    assert f"extra_eval={tiny}/corpus.jsonl" not in line  # a readable text is no problem
    assert "`--report.extra_eval_blocks=0` must be at least 1" in line and "`--report.sample_new_tokens=-1` must be at least 0" in line
    assert "`--data.num_calibration_samples=100000` exceeds the" in line
    assert f"`--export.output_dir={tiny}/run/export` already exists" in line  # the fixture's finished run


@pytest.mark.parametrize("attention,mlp,messages", [
    ("20", "-5", ["`--pruning.target_attention=20` is not a whole number of KV groups (2 heads × 8 = 16 channels each); valid widths: 16, 32",
                  "`--pruning.target_mlp=-5` is outside 1..37"]),
    ("1.5", "0.0", ["`--pruning.target_attention=1.5` is a fraction outside (0, 1]",
                    "`--pruning.target_mlp=0.0` is a fraction outside (0, 1]"]),
])
def test_unreachable_negative_and_fractional_targets(tiny: Path, tmp_path: Path, attention: str, mlp: str, messages: list[str]) -> None:
    line = error_line(fresh_run(tiny, tmp_path, f"--pruning.target_attention={attention}", f"--pruning.target_mlp={mlp}"))
    assert all(message in line for message in messages), line


def test_missing_data_file_and_empty_calibration_file_are_both_reported(tiny: Path, tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text(" \n")
    line = error_line(fresh_run(tiny, tmp_path, f"--data.dataset={tmp_path}/missing.txt", f"--data.calibration_file={tmp_path}/empty.txt"))
    assert f"`--data.dataset={tmp_path}/missing.txt` does not exist" in line
    assert f"`--data.calibration_file={tmp_path}/empty.txt` holds no non-empty documents" in line


def test_tokenizer_larger_than_the_model_vocabulary_is_refused_at_start(tiny: Path, tmp_path: Path) -> None:
    save_model_dir(family_model("llama3"), tmp_path / "mismatch", tokenizer_vocab=120)
    line = error_line(fresh_run(tiny, tmp_path, f"--model.model={tmp_path}/mismatch"))
    assert "its tokenizer has 120 tokens but the model's vocab_size is 99" in line and "--model.model=" in line


def test_unsupported_architecture_is_refused_with_the_supported_list(tiny: Path, tmp_path: Path) -> None:
    save_gpt2_dir(tmp_path / "gpt2")
    line = error_line(fresh_run(tiny, tmp_path, f"--model.model={tmp_path}/gpt2", "--model.num_layers=5"))
    assert f"`--model.model={tmp_path}/gpt2`: model_type 'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3" in line
    assert "`--model.num_layers=5` must lie in 1..2" in line


def test_checkpoint_of_a_different_base_model_is_refused(tiny: Path, tmp_path: Path) -> None:
    checkpoint = tiny / "run" / "checkpoints" / "epoch=0-step=4.ckpt"
    line = error_line(fresh_run(tiny, tmp_path, f"--ckpt_path={checkpoint}", "--model.num_layers=1"))
    assert "was written for --model.model=" in line and "this run asks for" in line and "--model.num_layers=1" in line


def test_checkpoint_of_another_pruning_config_is_refused(tiny: Path, tmp_path: Path) -> None:
    checkpoint = tiny / "run" / "checkpoints" / "epoch=0-step=4.ckpt"
    line = error_line(fresh_run(tiny, tmp_path, f"--ckpt_path={checkpoint}", "--pruning.target_mlp=25"))
    assert "the checkpoint's shot 1 (acts, reconstruction None) pruned to 4 heads (2 KV) × 8, MLP 28 but this config's shot 1 (acts, " in line
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_truncated_or_corrupted_checkpoint_gets_a_clear_message(tiny: Path, tmp_path: Path, damage: str) -> None:
    good = (tiny / "run" / "checkpoints" / "epoch=0-step=4.ckpt").read_bytes()
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(good[: len(good) // 2] if damage == "truncated" else b"not a checkpoint at all\n" * 40)
    if damage == "truncated":
        line = error_line(fresh_run(tiny, tmp_path, f"--ckpt_path={broken}"))
        assert f"`--ckpt_path={broken}` is truncated or corrupted" in line
    with pytest.raises(ConfigError, match=r"`--ckpt_path=.*broken.ckpt` is truncated or corrupted"):
        AtomicCheckpointIO().load_checkpoint(broken)


def poisoned_checkpoint(source: Path, target: Path, parameter: str) -> Path:
    checkpoint = torch.load(source, weights_only=False)
    checkpoint["state_dict"][parameter].fill_(float("nan"))
    torch.save(checkpoint, target)
    return target


def test_nan_activations_stop_the_shot_naming_the_layer(tiny: Path, tmp_path: Path) -> None:
    # step 3's checkpoint is just before shot 2 (steps_between_shots=3): the shot calibrates on NaN weights of layer 1
    poisoned = poisoned_checkpoint(tiny / "run" / "checkpoints" / "epoch=0-step=3.ckpt", tmp_path / "nan.ckpt",
                                   "model.model.layers.1.self_attn.q_proj.weight")
    line = error_line(fresh_run(tiny, tmp_path, f"--ckpt_path={poisoned}"), exit_code=1)
    assert "calibration activations of layer 1 attention (input of o_proj) are NaN/Inf" in line


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny: Path, tmp_path: Path) -> None:
    checkpoints = tmp_path / "run" / "checkpoints"
    shutil.copytree(tiny / "run" / "checkpoints", checkpoints)
    poisoned = poisoned_checkpoint(checkpoints / "epoch=0-step=1.ckpt", tmp_path / "nan.ckpt", "model.model.norm.weight")
    before = digests(checkpoints)
    line = error_line(fresh_run(tiny, tmp_path, f"--ckpt_path={poisoned}"), exit_code=1)
    assert "training loss is nan at step 1" in line
    assert digests(checkpoints) == before  # nothing overwritten, no partial file left
    assert AtomicCheckpointIO().load_checkpoint(checkpoints / "last.ckpt")["global_step"] == 6


def test_nan_in_calibration_activations_names_the_first_bad_layer() -> None:
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"layer 1 MLP \(input of down_proj\) are NaN/Inf"):
        collect_activation_stats(model, random_batches())


def test_export_dir_that_exists_is_refused_unless_overwrite(tmp_path: Path) -> None:
    (tmp_path / "export").mkdir()
    with pytest.raises(ConfigError, match=r"`--export.output_dir=.*export` already exists"):
        export_model(tiny_llama(), tiny_tokenizer(), tmp_path / "export", [])
    assert export_model(tiny_llama(), tiny_tokenizer(), tmp_path / "export", [], overwrite=True).joinpath("config.json").exists()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 192 KiB tmpfs (needs root; skipped where mounting is not permitted)."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount_point)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_export_without_disk_space_says_so_and_leaves_nothing(small_disk: Path) -> None:
    model = tiny_llama(vocab_size=2000)  # ~0.3 MB of weights: does not fit
    with pytest.raises(ConfigError, match=r"no space left on the device of `--export.output_dir=.*out`.*nothing was written"):
        export_model(model, tiny_tokenizer(), small_disk / "out", [])
    assert list(small_disk.iterdir()) == []  # the staging directory is gone


@pytest.mark.parametrize("strategy", ["fsdp", "lightning.pytorch.strategies.FSDPStrategy", "deepspeed_stage_3"])
def test_strategies_that_cannot_shrink_mid_run_are_refused_before_the_trainer_exists(tiny: Path, tmp_path: Path,
                                                                                      strategy: str) -> None:
    line = error_line(fresh_run(tiny, tmp_path, f"--trainer.strategy={strategy}", "--trainer.devices=2"))
    assert f"`--trainer.strategy={strategy}` is not supported" in line
    assert "configs/variants/fsdp.yaml" in line and "--trainer.strategy=ddp" in line
