"""SIGTERM and SIGINT stop a run at once, wherever it is, with a non-zero status and the command that resumes it.

Real signals sent to this very process, a real Lightning Trainer (whose own SIGTERM handler runs in front of
ours) on a tiny random model. The runs killed at random moments through ``train.py`` are in ``test_kill.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from callbacks import atomic_checkpoint
from callbacks.atomic_checkpoint import AtomicCheckpointIO, AtomicModelCheckpoint, atomic_torch_save, atomic_write
from callbacks.hf_export import HFExport
from callbacks.run_guard import RunGuard, RunInterrupted, interruptible, interruption_behind, resume_command
from callbacks.transact_pruning import TransActPruning
from datamodules.text import TextDataModule
from tests.family_models import REPO, save_family_dir, write_corpus
from tests.tiny_models import tiny_llama, tiny_tokenizer
from transact_pl.eval_suite import generate_samples
from transact_pl.lightning_modules.transact_lm import TransActLM


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_raises_at_once_with_status_128_plus_signal_and_handlers_come_back(signum: int) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(RunInterrupted) as caught:
        with interruptible():
            os.kill(os.getpid(), signum)
            time.sleep(5)  # never reached in full: the handler raises in this thread
    assert caught.value.code == 128 + signum and caught.value.signal_name == signal.Signals(signum).name
    assert {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} == before


class SignallingFile:
    """A real file whose ``write`` number ``signal_at`` sends this process SIGTERM first (a signal mid-record)."""

    def __init__(self, handle, signal_at: int) -> None:
        self.handle, self.signal_at, self.writes = handle, signal_at, 0

    def write(self, data) -> int:
        self.writes += 1
        if self.writes == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises RunInterrupted inside torch.save's writer
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def test_sigterm_inside_a_checkpoint_write_stops_once_the_file_is_complete(tmp_path: Path) -> None:
    """The signal arrives mid-record: the write goes on to a whole file, then the run stops (exit 143)."""
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)
    payload = {"step": 2, "weight": torch.zeros(300_000), "other": torch.ones(300_000)}

    def write(staging: Path) -> None:
        with open(staging, "wb") as handle:
            torch.save(payload, SignallingFile(handle, signal_at=3))

    with pytest.raises(RunInterrupted) as caught:
        with interruptible():
            atomic_write(path, write)
    assert caught.value.code == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 2 and torch.equal(loaded["other"], payload["other"])


SIGNALLED_SAVER = """
import os, random, signal, sys, threading, torch
from callbacks.atomic_checkpoint import atomic_torch_save
from callbacks.run_guard import RunInterrupted, interruptible
payload = {f"w{i}": torch.full((250_000,), float(i)) for i in range(16)}
threading.Timer(random.Random(int(sys.argv[2])).uniform(0.05, 0.5), os.kill, (os.getpid(), signal.SIGTERM)).start()
try:
    with interruptible():
        for step in range(10**9):
            atomic_torch_save({"step": step, **payload}, sys.argv[1])
except RunInterrupted as interruption:
    print("stopped", flush=True)
    sys.exit(interruption.code)
"""


@pytest.mark.parametrize("seed", range(2))
def test_sigterm_during_back_to_back_saves_exits_143_with_a_whole_file(tmp_path: Path, seed: int) -> None:
    """A real process saving 16 MB checkpoints in a loop, signalled at a random moment: it stops with exit 143
    (not an abort from a zip writer finishing on a closed file) and leaves one loadable file and no staging file."""
    path = tmp_path / "last.ckpt"
    saver = subprocess.run([sys.executable, "-c", SIGNALLED_SAVER, str(path), str(seed)], cwd=REPO,
                           capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert saver.returncode == 128 + signal.SIGTERM and saver.stdout == "stopped\n", saver.stderr[-2000:]
    assert "terminate called" not in saver.stderr
    if path.exists():  # (signalled before the first save finished: none)
        assert torch.load(path, weights_only=True)["w15"][0] == 15.0
    assert not path.with_name("last.ckpt.tmp").exists()


def test_an_error_that_hides_an_interruption_is_traced_back_to_it() -> None:
    interruption = RunInterrupted(signal.SIGINT)
    try:
        try:
            raise interruption
        except RunInterrupted:
            raise RuntimeError("unexpected pos 147648 vs 147540")
    except RuntimeError as error:
        assert interruption_behind(error) is interruption
    assert interruption_behind(ValueError("x")) is None


def test_greedy_sampling_stops_within_a_second_of_sigterm() -> None:
    """Lightning only flags a SIGTERM; generation, outside its loops, used to run on to the end."""
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    prompts = ["t5 t6 t7"] * 10_000  # minutes of generation
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    started = time.monotonic()
    with pytest.raises(RunInterrupted):
        with interruptible():
            timer.start()
            generate_samples(model, tokenizer, prompts, max_new_tokens=24)
    timer.join()
    assert time.monotonic() - started < 1.5
    assert not model.training  # tiny_llama is in eval mode; generate_samples restored it on the way out


def test_resume_command_replaces_any_ckpt_path() -> None:
    args = ["fit", "--config", "my run.yaml", "--ckpt_path", "old.ckpt", "--trainer.max_steps=8", "--ckpt_path=x"]
    assert resume_command(args, "/r/last.ckpt") == \
        "python train.py fit --config 'my run.yaml' --trainer.max_steps=8 --ckpt_path=/r/last.ckpt"


class SignalAtStep(Callback):
    """Sends ``signum`` to this process at the end of training step ``step`` (before that step's checkpoint)."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def fit_tiny(model_dir: Path, corpus: Path, root: Path, *extra: Callback, ckpt_path: str | None = None,
             checkpoint: type[ModelCheckpoint] = ModelCheckpoint, save_last: bool | str = True) -> TransActLM:
    """2 shots (steps 0 and 2), 5 steps, a checkpoint after every step (last.ckpt too), export to <root>_export."""
    module = TransActLM(model=str(model_dir), learning_rate=1e-3, warmup_steps=0)
    data = TextDataModule(tokenizer=str(model_dir), dataset=str(corpus), block_size=16, batch_size=2, eval_batch_size=4,
                          num_calibration_samples=4, max_val_blocks=2, max_test_blocks=2)
    callbacks = [TransActPruning(target_attention=16, target_mlp=19, num_shots=2, steps_between_shots=2),
                 *extra, checkpoint(dirpath=root / "checkpoints", every_n_train_steps=1, save_top_k=-1, save_last=save_last),
                 HFExport(str(root.with_name(root.name + "_export"))), RunGuard()]
    trainer = L.Trainer(max_steps=5, callbacks=callbacks, plugins=[AtomicCheckpointIO()], logger=False, deterministic=True,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=root)
    L.seed_everything(0)
    trainer.ckpt_path = ckpt_path  # as train.py does: the plans are replayed before the weights load
    trainer.fit(module, datamodule=data)
    return module


def test_sigterm_mid_training_names_the_last_checkpoint_and_resumes_to_the_same_model(tmp_path: Path,
                                                                                        monkeypatch) -> None:
    monkeypatch.setenv("TRANSACT_PL_CACHE", str(tmp_path / "cache"))
    model_dir, corpus = save_family_dir("llama3", tmp_path / "base"), write_corpus(tmp_path / "corpus.jsonl")
    reference = fit_tiny(model_dir, corpus, tmp_path / "reference")

    with pytest.raises(RunInterrupted) as caught:
        with interruptible():
            fit_tiny(model_dir, corpus, tmp_path / "run", SignalAtStep(signal.SIGTERM, step=3))
    interruption = caught.value
    # The signal came before step 3's checkpoint: the last complete one is step 2's, and nothing was exported.
    assert interruption.code == 143 and interruption.step == 3
    assert torch.load(interruption.checkpoint, weights_only=True)["global_step"] == 2
    assert Path(interruption.checkpoint).parent == tmp_path / "run" / "checkpoints"
    assert not (tmp_path / "run_export").exists()
    assert f"--ckpt_path={interruption.checkpoint}" in interruption.resume_line(["fit", "--config", "c.yaml"])

    resumed = fit_tiny(model_dir, corpus, tmp_path / "run", ckpt_path=interruption.checkpoint)
    assert [plan.to_json() for plan in resumed.plans] == [plan.to_json() for plan in reference.plans]
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert (tmp_path / "run_export" / "model.safetensors").read_bytes() == \
        (tmp_path / "reference_export" / "model.safetensors").read_bytes()


def test_save_last_link_is_replaced_in_one_step_and_falls_back_to_an_atomic_copy(tmp_path: Path, monkeypatch) -> None:
    """AtomicModelCheckpoint (the default job's, `save_last: link`): last.ckpt is a relative link to the newest step
    file; a stop landing inside the relink leaves the previous whole link (Lightning's own removes it first); where
    no symlink can be made, last.ckpt is a whole copy."""
    monkeypatch.setenv("TRANSACT_PL_CACHE", str(tmp_path / "cache"))
    model_dir, corpus = save_family_dir("llama3", tmp_path / "base"), write_corpus(tmp_path / "corpus.jsonl")
    fit_tiny(model_dir, corpus, tmp_path / "run", checkpoint=AtomicModelCheckpoint, save_last="link")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == "epoch=0-step=5.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 5

    real_replace = os.replace

    relinks = []

    def stopped_when_relinking(source, target):  # the stop arrives just before the third relink's rename
        if Path(source).is_symlink():
            relinks.append(target)
            if len(relinks) == 3:
                raise RunInterrupted(signal.SIGTERM)  # what the run's signal handler raises
        real_replace(source, target)

    monkeypatch.setattr(atomic_checkpoint.os, "replace", stopped_when_relinking)
    with pytest.raises(RunInterrupted):
        fit_tiny(model_dir, corpus, tmp_path / "stopped", checkpoint=AtomicModelCheckpoint, save_last="link")
    monkeypatch.setattr(atomic_checkpoint.os, "replace", real_replace)
    stopped = tmp_path / "stopped" / "checkpoints"
    assert os.readlink(stopped / "last.ckpt") == "epoch=0-step=2.ckpt"  # the previous link, whole
    assert torch.load(stopped / "last.ckpt", weights_only=True)["global_step"] == 2

    def no_symlinks(*args, **kwargs):
        raise OSError("symlinks are not supported here")

    monkeypatch.setattr(atomic_checkpoint.os, "symlink", no_symlinks)
    fit_tiny(model_dir, corpus, tmp_path / "copied", checkpoint=AtomicModelCheckpoint, save_last="link")
    copied = tmp_path / "copied" / "checkpoints"
    assert not (copied / "last.ckpt").is_symlink()
    assert (copied / "last.ckpt").read_bytes() == (copied / "epoch=0-step=5.ckpt").read_bytes()
    assert sorted(p.name for p in copied.iterdir() if p.name.endswith(".tmp")) == []


def write_checkpoint_directory(path: Path, step: int) -> Path:
    """A stand-in for an FSDP2 distributed checkpoint: a directory of files."""
    (path / "shards").mkdir(parents=True)
    (path / "meta.pt").write_bytes(bytes([step]) * 100)
    (path / "shards" / "__0_0.distcp").write_bytes(bytes([step]) * 1000)
    return path


def test_relinking_clears_a_leftover_staging_directory_and_handles_directory_checkpoints(tmp_path: Path,
                                                                                          monkeypatch) -> None:
    """A killed directory copy leaves ``last.ckpt.tmp/``: the next relink still links. Where symlinks fail, an FSDP2
    checkpoint directory is copied whole (the previous copy replaced, nothing left beside it); a ``last.ckpt``
    directory from an earlier save is replaced by the link."""
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    checkpoints = tmp_path / "checkpoints"
    first = write_checkpoint_directory(checkpoints / "epoch=0-step=1.ckpt", 1)
    second = write_checkpoint_directory(checkpoints / "epoch=0-step=2.ckpt", 2)
    last = checkpoints / "last.ckpt"
    write_checkpoint_directory(checkpoints / "last.ckpt.tmp", 9)  # the leftover
    AtomicModelCheckpoint._link_checkpoint(trainer, str(first), str(last))
    assert last.is_symlink() and os.readlink(last) == "epoch=0-step=1.ckpt"

    def no_symlinks(*args, **kwargs):
        raise OSError("symlinks are not supported here")

    monkeypatch.setattr(atomic_checkpoint.os, "symlink", no_symlinks)
    for source in (first, second):
        AtomicModelCheckpoint._link_checkpoint(trainer, str(source), str(last))
        assert last.is_dir() and not last.is_symlink()
        assert (last / "shards" / "__0_0.distcp").read_bytes() == (source / "shards" / "__0_0.distcp").read_bytes()
    monkeypatch.undo()
    AtomicModelCheckpoint._link_checkpoint(trainer, str(second), str(last))  # symlinks again: the copy gives way
    assert last.is_symlink() and os.readlink(last) == "epoch=0-step=2.ckpt"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"]
