"""Safe by default: a crafted checkpoint never runs code, `overwrite` never deletes what an export did not write,
export problems are found at startup, and a run that fails at startup leaves nothing behind.

Crafted files are built here; their payload would only create a marker file (builtins.open), and every test
asserts that the marker never appears."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.family_models import run_cli
from tests.tiny_models import random_batches, tiny_llama, tiny_tokenizer
from transact_pl.errors import ConfigError
from transact_pl.infra.export import export_model
from transact_pl.infra.export_checkpoint import main as export_checkpoint_main
from transact_pl.infra.export_dir import MANIFEST_FILE, export_dir_problem, make_staging_dir, move_into_place, run_dir_problem
from transact_pl.infra.safe_dcp import check_distributed_checkpoint, load_distributed
from transact_pl.infra.safe_load import UnsafeCheckpointError, load_checkpoint_file

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this calls open(marker, "w"): harmless, but proof that the file's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def crafted_checkpoints(root: Path, marker: Path) -> dict[str, Path]:
    """A zip .ckpt, a raw-pickle .ckpt and three distributed checkpoint directories, each carrying the payload."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {"zip": root / "zip.ckpt", "raw": root / "raw.ckpt"}
    torch.save({"state_dict": {}, "hyper_parameters": {"model": "x"}, "extra": Payload(marker)}, paths["zip"])
    with open(paths["raw"], "wb") as handle:
        pickle.dump({"state_dict": {}, "extra": Payload(marker)}, handle)
    tensors = {"state_dict": {"model.w": torch.zeros(2, 3)}, "optimizer_0": {"lr": 1e-3}}
    for name in ("dcp_meta", "dcp_metadata", "dcp_item"):
        directory = paths[name] = root / f"{name}.ckpt"
        state = {**tensors, "optimizer_0": {"lr": Payload(marker)}} if name == "dcp_item" else tensors
        with pytest.warns(UserWarning):  # no process group: dcp says it saves as one process
            dcp.save(state, checkpoint_id=directory, no_dist=True)
        torch.save({"transact": None, "extra": Payload(marker)} if name == "dcp_meta" else {"transact": None}, directory / "meta.pt")
        assert not marker.exists()  # saving pickles the payload; only loading could run it
    with open(paths["dcp_metadata"] / ".metadata", "wb") as handle:
        pickle.dump(Payload(marker), handle)
    return paths


@pytest.fixture()
def crafted(tmp_path) -> tuple[dict[str, Path], Path]:
    marker = tmp_path / "code_ran"
    return crafted_checkpoints(tmp_path / "crafted", marker), marker


def test_crafted_files_are_refused_by_the_weights_only_readers(crafted):
    paths, marker = crafted
    with pytest.raises(UnsafeCheckpointError, match=r"holds a reference to (io|builtins)\.open.*could run code"):
        load_checkpoint_file(paths["zip"])
    with pytest.raises(ConfigError, match="is truncated or corrupted, or not a checkpoint"):  # refused before any reference is seen
        load_checkpoint_file(paths["raw"])
    for name in ("dcp_meta", "dcp_metadata", "dcp_item"):
        with pytest.raises(UnsafeCheckpointError, match="could run code"):
            check_distributed_checkpoint(paths[name])
    assert not marker.exists()


def test_a_real_checkpoint_directory_passes_the_check(tmp_path):
    directory = tmp_path / "ok.ckpt"
    state = {"state_dict": {"model.w": torch.ones(2, 3)}, "optimizer_0": {"param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99)}]}}
    with pytest.warns(UserWarning):
        dcp.save(state, checkpoint_id=directory, no_dist=True)
    torch.save({"transact": {"plans": []}, "global_step": 3}, directory / "meta.pt")
    checked = check_distributed_checkpoint(directory)
    assert checked.meta["global_step"] == 3
    state = {"state_dict": {"model.w": torch.zeros(2, 3)}, "optimizer_0": {"param_groups": [{"lr": 0.0, "betas": (0.0, 0.0)}]}}
    load_distributed(state, checked, no_dist=True)
    assert torch.equal(state["state_dict"]["model.w"], torch.ones(2, 3)) and state["optimizer_0"]["param_groups"][0]["lr"] == 1e-3


def real_directory(path: Path) -> Path:
    with pytest.warns(UserWarning):
        dcp.save({"state_dict": {"model.w": torch.ones(2, 3)}}, checkpoint_id=path, no_dist=True)
    torch.save({"transact": None}, path / "meta.pt")
    return path


def test_metadata_cannot_reach_modules_or_set_state_on_them(tmp_path):
    marker = tmp_path / "code_ran"
    dotted = tmp_path / "dotted.ckpt"  # protocol 4 resolves dotted names: metadata module → its `os` → os.system
    real_directory(dotted).joinpath(".metadata").write_bytes(
        b"\x80\x04\x8c\x25torch.distributed.checkpoint.metadata\x94\x8c\x09os.system\x94\x93"
        + b"\x8c" + bytes([len(f"touch {marker}")]) + f"touch {marker}".encode() + b"\x85R.")
    with pytest.raises(UnsafeCheckpointError, match="os.system"):
        check_distributed_checkpoint(dotted)
    build = tmp_path / "build.ckpt"  # BUILD on a class would set attributes process-wide
    real_directory(build).joinpath(".metadata").write_bytes(
        b"\x80\x02ctorch.distributed.checkpoint.metadata\nStorageMeta\n}X\x04\x00\x00\x00spamK\x01sb.")
    with pytest.raises(UnsafeCheckpointError, match="state set on"):
        check_distributed_checkpoint(build)
    assert not marker.exists()


def test_storage_records_may_only_name_files_of_the_directory(tmp_path):
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    outside = real_directory(tmp_path / "someone_elses.ckpt")
    handed = real_directory(tmp_path / "handed.ckpt")
    metadata = FileSystemReader(handed).read_metadata()
    for info in metadata.storage_data.values():
        info.relative_path = str(outside / "__0_0.distcp")  # the other checkpoint's data, by absolute path
    with open(handed / ".metadata", "wb") as handle:
        pickle.dump(metadata, handle)
    with pytest.raises(ConfigError, match="not a file of this directory"):
        check_distributed_checkpoint(handed)


def test_loading_never_falls_back_to_unchecked_rank_metadata(tmp_path):
    from torch.distributed.checkpoint.metadata import Metadata

    marker = tmp_path / "code_ran"
    directory = real_directory(tmp_path / "fallback.ckpt")
    with open(directory / ".metadata", "wb") as handle:  # checks out, but makes torch's own reader fail over
        pickle.dump(Metadata(state_dict_metadata={}, storage_data={}, storage_meta=0), handle)
    with open(directory / "__0.metadata", "wb") as handle:  # the per-rank file torch would then unpickle
        pickle.dump(Payload(marker), handle)
    with pytest.raises(ConfigError, match="wrong type"):
        check_distributed_checkpoint(directory)
    assert not marker.exists()


def test_export_checkpoint_refuses_crafted_files_in_one_line(crafted, tmp_path, capsys):
    paths, marker = crafted
    for name, path in paths.items():
        assert export_checkpoint_main([str(path), str(tmp_path / f"out_{name}")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, (name, err)
        assert ("is truncated or corrupted, or not a checkpoint" if name == "raw" else "could run code") in err, (name, err)
        assert not (tmp_path / f"out_{name}").exists()
    assert not marker.exists()


def test_export_checkpoint_says_random_bytes_are_no_checkpoint(tmp_path, capsys):
    (tmp_path / "noise.ckpt").write_bytes(os.urandom(4096))
    assert export_checkpoint_main([str(tmp_path / "noise.ckpt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: `checkpoint=") and "is truncated or corrupted, or not a checkpoint" in err and "\n" not in err


@pytest.fixture(scope="module")
def tiny(tiny_cli_dir: Path) -> Path:
    return tiny_cli_dir


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and sum(line.startswith("error: ") for line in lines) == 1, result.stderr[-3000:]
    return lines[-1]


def test_fit_refuses_crafted_checkpoints_before_reading_them(tiny, crafted, tmp_path, capsys, monkeypatch):
    import train

    paths, marker = crafted
    monkeypatch.chdir(tmp_path)
    for name, path in paths.items():  # the real CLI, in this process (each refusal comes before any model loads)
        with pytest.raises(SystemExit) as exit_info:
            train.main(["fit", "--config", str(tiny / "tiny.yaml"), "--ckpt_path", str(path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and err[-1].startswith("error: `--ckpt_path="), (name, err)
        assert ("is truncated or corrupted, or not a checkpoint" if name == "raw" else "could run code") in err[-1], (name, err)
    line = one_error_line(run_cli(tmp_path, tiny / "tiny.yaml", "--weights_only=false"))  # and once as a real process
    assert "--weights_only=false" in line
    assert not marker.exists()
    assert not (tiny / "run").exists()  # nothing was started


def test_a_base_model_with_a_crafted_pickle_is_refused_at_startup(tiny, tmp_path, capsys, monkeypatch):
    import train
    from safetensors.torch import load_file

    marker = tmp_path / "code_ran"
    base = tmp_path / "base"
    shutil.copytree(tiny / "base", base)
    weights = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()  # the weights as a pickle instead, with the payload beside them
    torch.save({**weights, "extra": Payload(marker)}, base / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["fit", "--config", str(tiny / "tiny.yaml"), f"--model.model={base}", f"--export.output_dir={tmp_path}/e"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "pytorch_model.bin" in err[-1] and "could run code" in err[-1], err[-3:]
    assert not marker.exists()


def test_lightning_misconfiguration_is_one_line_not_a_traceback(tiny, tmp_path, capsys, monkeypatch):
    import train

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["fit", "--config", str(tiny / "tiny.yaml"), "--trainer.enable_progress_bar=false",
                    "--trainer.callbacks+=lightning.pytorch.callbacks.RichProgressBar", f"--export.output_dir={tmp_path}/e"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith("error: ") and "RichProgressBar" in err[-1], err[-3:]


def test_overwrite_replaces_an_earlier_export_only(tmp_path):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    first = export_model(model, tokenizer, tmp_path / "export", [])
    manifest = json.loads((first / MANIFEST_FILE).read_text())["files"]
    assert {"config.json", "model.safetensors", "README.md", "transact_plans.json"} <= set(manifest)
    export_model(model, tokenizer, tmp_path / "export", [], overwrite=True)  # our own export: replaced
    (tmp_path / "export" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"notes\.txt.*never other files"):
        export_model(model, tokenizer, tmp_path / "export", [], overwrite=True)
    assert (tmp_path / "export" / "notes.txt").read_text() == "mine"


def test_overwrite_never_deletes_a_user_directory(tmp_path):
    user = tmp_path / "project"
    (user / ".git").mkdir(parents=True)
    (user / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (user / "config.json").write_text("{}")  # a name an export also writes: not enough to be ours
    with pytest.raises(ConfigError, match=r"\.git"):
        export_model(tiny_llama(), tiny_tokenizer(), user, [], overwrite=True)
    assert (user / ".git" / "HEAD").is_file() and (user / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # no staging left behind


def test_an_export_written_before_manifests_is_still_recognised(tmp_path):
    legacy = export_model(tiny_llama(), tiny_tokenizer(), tmp_path / "export", [])
    (legacy / MANIFEST_FILE).unlink()
    assert export_dir_problem(legacy, overwrite=True) is None
    (legacy / "weights.bin").write_bytes(b"user data")
    assert "weights.bin" in export_dir_problem(legacy, overwrite=True)


def test_the_run_directory_is_never_an_export_target(tmp_path):
    root, logs = tmp_path / "runs" / "job", tmp_path / "runs" / "job" / "logs"
    assert "is or contains the run's own directory" in run_dir_problem(root, [root], [logs])
    assert "is or contains the run's own directory" in run_dir_problem(tmp_path / "runs", [root], [logs])
    assert "is or contains the run's own directory" in run_dir_problem(logs, [root], [logs])
    assert "where the run writes its logs or checkpoints" in run_dir_problem(logs / "version_0" / "export", [root], [logs])
    assert run_dir_problem(root / "export", [root], [logs]) is None  # beside the logs, below the root: fine
    assert run_dir_problem(tmp_path / "exports" / "job", [root], [logs]) is None


def test_two_exports_to_one_directory_cannot_both_succeed(tmp_path):
    output = tmp_path / "export"
    first, second = make_staging_dir(output), make_staging_dir(output)
    (first / "model.safetensors").write_text("first")
    (second / "model.safetensors").write_text("second")
    move_into_place(first, output, overwrite=False)
    with pytest.raises(ConfigError, match="appeared while this export was being written"):
        move_into_place(second, output, overwrite=False)
    assert (output / "model.safetensors").read_text() == "first"


def test_export_has_the_users_permissions_and_no_custom_code_pointers(tmp_path):
    model = tiny_llama()
    model.config.auto_map = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    previous = os.umask(0o022)
    try:
        out = export_model(model, tiny_tokenizer(), tmp_path / "export", [], check_input_ids=random_batches(num_batches=1)[0]["input_ids"])
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    # every file too: safetensors writes model.safetensors as 0600
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {f.name: 0o644 for f in out.iterdir()}
    assert "auto_map" not in json.loads((out / "config.json").read_text())


def test_export_problems_are_found_at_startup_and_leave_nothing(tiny, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    line = one_error_line(run_cli(tmp_path, tiny / "tiny.yaml", f"--export.output_dir={blocker}/export",
                                  "--export.tolerance=-1", f"--trainer.default_root_dir={tmp_path}/run"))
    assert "a_file is a file" in line and "--export.tolerance=-1" in line
    line = one_error_line(run_cli(tmp_path, tiny / "tiny.yaml", f"--export.output_dir={tmp_path}/run",
                                  f"--trainer.default_root_dir={tmp_path}/run", "--export.overwrite=true"))
    assert "the run's own directory" in line
    assert not (tmp_path / "run").exists()


def test_a_run_failing_after_setup_takes_its_config_yaml_back(tiny, tmp_path):
    first = run_cli(tmp_path, tiny / "tiny.yaml", f"--trainer.default_root_dir={tmp_path}/first",
                    f"--trainer.callbacks.init_args.dirpath={tmp_path}/first/checkpoints", f"--export.output_dir={tmp_path}/e1")
    assert first.returncode == 0, first.stderr[-3000:]
    # Resuming with another schedule is refused once the checkpoint's plans are known (after config.yaml is written).
    line = one_error_line(run_cli(tmp_path, tiny / "tiny.yaml", "--pruning.num_shots=1", f"--trainer.default_root_dir={tmp_path}/second",
                                  f"--export.output_dir={tmp_path}/e2", "--ckpt_path", str(tmp_path / "first" / "checkpoints" / "last.ckpt")))
    assert "resume with the pruning options the checkpoint was written with" in line
    assert not (tmp_path / "second").exists() and not (tmp_path / "e2").exists()
