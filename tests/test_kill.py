"""Nothing lost: checkpoints are written whole or not at all, runs killed with SIGKILL at random moments
resume from their last checkpoint to the export of the run that never stopped, runs sent SIGTERM or SIGINT
at random moments stop within seconds (non-zero status, one line with the command that resumes them) and
resume to that same export, and the same config and seed give bit-identical plans and weights on CPU.

The SIGKILL and signal tests take minutes (every launch pays Python's imports) and are marked ``kill``:
``make test-kill`` runs them (CI does too); the rest is in the default suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from callbacks.atomic_checkpoint import AtomicCheckpointIO, finish_interrupted_replace
from tests.family_models import fit, save_family_dir, tiny_cli_config, write_corpus

REPO = Path(__file__).resolve().parents[1]
KILL_SEEDS = (0, 1, 2)
KILLS_PER_TRIAL = 3
MAX_STEPS = 12  # of every launched run: 3 shots at steps 0, 4 and 8, a checkpoint after every step
EXPORT_FILES = ("model.safetensors", "config.json", "transact_plans.json", "generation_config.json")


# ----- atomic checkpoint files --------------------------------------------------------------------------------------
def test_every_config_writes_checkpoints_atomically() -> None:
    for path in sorted((REPO / "configs").glob("**/*.yaml")):
        first = path.read_text().splitlines()[0].split()
        files = [REPO / first[i + 1] for i, word in enumerate(first) if word == "--config"]  # an overlay's base first
        plugins = [plugin for file in files for plugin in (yaml.safe_load(file.read_text()).get("trainer") or {}).get("plugins") or []]
        assert {"class_path": "callbacks.atomic_checkpoint.AtomicCheckpointIO"} in plugins, path.name


def test_failed_save_keeps_the_previous_checkpoint_and_no_staging_file(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "weight": torch.arange(5.0)}, path)
    with pytest.raises(Exception):
        io.save_checkpoint({"step": 2, "unpicklable": lambda: None}, path)  # torch.save fails half-way
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    loaded = io.load_checkpoint(path, weights_only=False)
    assert loaded["step"] == 1 and torch.equal(loaded["weight"], torch.arange(5.0))


SAVER = """
import sys, torch
from callbacks.atomic_checkpoint import atomic_torch_save
for step in range(10**9):
    atomic_torch_save({"step": step, "weight": torch.full((2_000_000,), float(step))}, sys.argv[1])
    print(step, flush=True)
"""


def kill_saver_at_random(script: str, path: Path, generator: random.Random) -> int:
    """Run a saver loop (``script`` saving to ``path`` and printing each finished step), SIGKILL it at a random
    moment after its first save, and return the last step it reported finished."""
    saver = subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    reported = [int(saver.stdout.readline())]  # saving has started
    time.sleep(generator.uniform(0.0, 0.5))
    saver.send_signal(signal.SIGKILL)
    reported += [int(line) for line in saver.stdout.read().split()]
    saver.wait()
    return max(reported)


@pytest.mark.slow
@pytest.mark.kill
def test_sigkill_during_saves_never_leaves_a_partial_checkpoint(tmp_path: Path) -> None:
    """A process saving an 8 MB checkpoint in a loop is killed at random moments: the file always loads whole."""
    path = tmp_path / "last.ckpt"
    generator = random.Random(0)
    for trial in range(5):
        last_reported = kill_saver_at_random(SAVER, path, generator)
        checkpoint = torch.load(path, weights_only=True)
        assert checkpoint["step"] >= last_reported, trial
        assert torch.equal(checkpoint["weight"], torch.full((2_000_000,), float(checkpoint["step"])))


DIRECTORY_SAVER = """
import sys
from pathlib import Path
from callbacks.atomic_checkpoint import replace_directory
target = Path(sys.argv[1])
staging = target.with_name(target.name + ".tmp")
for step in range(10**9):
    staging.mkdir()
    for shard in range(4):  # like a distributed checkpoint: shard files and a metadata file
        (staging / f"__{shard}_0.distcp").write_bytes(str(step).encode() * 200_000)
    (staging / "meta.pt").write_text(str(step))
    replace_directory(staging, target)
    print(step, flush=True)
"""


@pytest.mark.slow
@pytest.mark.kill
def test_sigkill_during_directory_saves_always_leaves_a_whole_checkpoint_directory(tmp_path: Path) -> None:
    """FSDP2 checkpoint directories: a saver killed at random moments leaves the last reported step whole."""
    target = tmp_path / "last.ckpt"
    generator = random.Random(0)
    for trial in range(8):
        shutil.rmtree(target.with_name(target.name + ".tmp"), ignore_errors=True)  # as the next save does
        last_reported = kill_saver_at_random(DIRECTORY_SAVER, target, generator)
        finish_interrupted_replace(target)  # what a resume does first
        step = int((target / "meta.pt").read_text())
        assert step >= last_reported, trial
        assert sorted(p.name for p in target.iterdir()) == [f"__{shard}_0.distcp" for shard in range(4)] + ["meta.pt"]
        assert all((target / f"__{shard}_0.distcp").read_bytes() == str(step).encode() * 200_000 for shard in range(4))


# ----- killed runs resume to the same export -------------------------------------------------------------------------
# Validation/test perplexity at every shot and greedy samples at the start and the end: kills and signals land there too.
EVALUATION = ("--report.evaluate=true", "--report.sample_new_tokens=12")


def export_dir(root: Path) -> Path:
    """Where the run in ``root`` exports: beside it (an export inside the run's own directory is refused)."""
    return root.with_name(root.name + "_export")


def launch(config: Path, root: Path, log_name: str, *args: str) -> subprocess.Popen:
    """train.py on ``config`` in ``root``; stderr goes to ``root/<log_name>.err`` (a pipe could fill and block)."""
    command = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(config), f"--trainer.max_steps={MAX_STEPS}",
               "--pruning.num_shots=3", "--pruning.steps_between_shots=4", *EVALUATION,
               f"--export.output_dir={export_dir(root)}", "--export.overwrite=true", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRANSACT_PL_CACHE": str(root.parent / "cache")}
    with open(root / f"{log_name}.err", "w") as stderr:
        return subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=stderr, env=env)


def export_digests(export: Path) -> dict[str, str]:
    return {name: hashlib.sha256((export / name).read_bytes()).hexdigest() for name in EXPORT_FILES}


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory) -> tuple[Path, Path]:
    """(work dir, a reference run's root): a tiny Llama 3, 3 shots in 12 steps, evaluated, never interrupted."""
    work = tmp_path_factory.mktemp("kill")
    save_family_dir("llama3", work / "base")
    write_corpus(work / "corpus.jsonl")
    reference = work / "reference"
    reference.mkdir()
    config = tiny_cli_config(work / "reference.yaml", work / "base", work / "corpus.jsonl", reference)
    process = launch(config, reference, "reference")
    assert process.wait(timeout=600) == 0, (reference / "reference.err").read_text()[-3000:]
    return work, reference


def _stamp(path: Path) -> tuple[int, int] | None:
    """Identity of the file now at ``path`` (os.replace gives every saved checkpoint a new inode)."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_ino, status.st_mtime_ns


def kill_after_saves(process: subprocess.Popen, last: Path, saves: int, extra_s: float,
                     signum: int = signal.SIGKILL) -> float | None:
    """Send ``signum`` to ``process`` ``extra_s`` seconds after it has saved ``last`` ``saves`` times, unless it
    ends first; returns when it was sent (``time.monotonic()``), None if the process had ended."""
    seen, stamp = 0, _stamp(last)
    while process.poll() is None and seen < saves:
        time.sleep(0.01)
        if _stamp(last) != stamp:
            seen, stamp = seen + 1, _stamp(last)
    time.sleep(extra_s)
    if process.poll() is not None:
        return None
    process.send_signal(signum)
    return time.monotonic()


def run_with_kills(work: Path, root: Path, seed: int) -> list[str]:
    """Launch; SIGKILL at a random moment (a random 1–3 checkpoint saves into the launch, plus 0–0.5 s: inside
    training steps, shots, checkpoint writes or the export); resume from last.ckpt; KILLS_PER_TRIAL times, then
    run to the end. Returns what happened to each launch ('killed 2 saves + 0.31 s in (resumed from step 4)', ...)."""
    root.mkdir()
    config = tiny_cli_config(work / f"{root.name}.yaml", work / "base", work / "corpus.jsonl", root)
    generator = random.Random(seed)
    last = root / "checkpoints" / "last.ckpt"
    log = []
    for launch_index in range(KILLS_PER_TRIAL + 1):
        resume_step = torch.load(last, weights_only=False)["global_step"] if last.exists() else None
        process = launch(config, root, f"launch_{launch_index}", *([f"--ckpt_path={last}"] if last.exists() else []))
        saves, extra_s = generator.randint(1, 3), generator.uniform(0.0, 0.5)
        if launch_index < KILLS_PER_TRIAL:
            kill_after_saves(process, last, saves, extra_s)
        process.wait(timeout=600)
        outcome = (f"killed {saves} saves + {extra_s:.2f} s in" if process.returncode == -signal.SIGKILL
                   else f"exit {process.returncode}")
        log.append(f"{outcome} (resumed from step {resume_step})")
        assert process.returncode in (0, -signal.SIGKILL), (root / f"launch_{launch_index}.err").read_text()[-3000:]
        if process.returncode == 0:
            break
    assert process.returncode == 0
    return log


@pytest.mark.slow
@pytest.mark.kill
@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_run_killed_at_random_moments_ends_with_the_uninterrupted_export(tiny_setup, seed: int) -> None:
    work, reference = tiny_setup
    root = work / f"killed_{seed}"
    log = run_with_kills(work, root, seed)
    print(f"seed {seed}: " + "; ".join(log))
    assert log[0].startswith("killed"), log  # 12 saves to go, killed after at most 3
    assert export_digests(export_dir(root)) == export_digests(export_dir(reference)), log
    plans = json.loads((export_dir(root) / "transact_plans.json").read_text())
    assert [plan["shot"] for plan in plans] == [1, 2, 3]


# ----- SIGTERM / SIGINT: a clean stop that says how to resume -------------------------------------------------------
SIGNAL_SEEDS = (0, 1)
SIGNALS_PER_TRIAL = 2
STOP_WITHIN_S = 5.0  # from the signal to the line saying how to resume (the run's work has stopped)
EXIT_WITHIN_S = 30.0  # to the process's end: Python's own shutdown takes seconds more on a loaded CPU
def resume_checkpoint(stderr: str, signum: int) -> str | None:
    """The ``--ckpt_path`` of the one line an interrupted run ends with (None: it says there is nothing to resume)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and lines[-1].startswith(f"stopped by {signal.Signals(signum).name} at step "), \
        stderr[-3000:]
    assert sum(line.startswith("stopped by ") for line in lines) == 1
    if "nothing to resume" in lines[-1]:
        return None
    command = shlex.split(lines[-1].split("resume from its last checkpoint with: ", 1)[1])
    assert command[:3] == ["python", "train.py", "fit"] and command[-1].startswith("--ckpt_path=")
    return command[-1].removeprefix("--ckpt_path=")


def wait_for_stop_line(process: subprocess.Popen, err: Path, sent_at: float) -> float:
    """Seconds from ``sent_at`` until the process has written its 'stopped by ...' line or ended."""
    while process.poll() is None and "stopped by " not in err.read_text():
        time.sleep(0.01)
    return time.monotonic() - sent_at


def run_with_signals(work: Path, root: Path, seed: int) -> list[str]:
    """Launch; at a random moment (after a random number of the steps left, each saving last.ckpt, plus 0–0.2 s: in
    training, a shot's calibration, a checkpoint write, the final evaluation, sampling or the export) send SIGTERM
    or SIGINT (in turn); check the stop (within seconds, exit 128 + signal, one line with the resume command) and
    resume with that command's ``--ckpt_path``; SIGNALS_PER_TRIAL times, then run to the end. Returns what
    happened to each launch."""
    root.mkdir()
    config = tiny_cli_config(work / f"{root.name}.yaml", work / "base", work / "corpus.jsonl", root)
    generator = random.Random(seed)
    checkpoint, log = None, []
    for launch_index in range(SIGNALS_PER_TRIAL + 1):
        err = root / f"launch_{launch_index}.err"
        process = launch(config, root, err.stem, *([f"--ckpt_path={checkpoint}"] if checkpoint else []))
        signum = (signal.SIGTERM, signal.SIGINT)[(seed + launch_index) % 2]
        steps_left = MAX_STEPS - (torch.load(checkpoint, weights_only=True)["global_step"] if checkpoint else 0)
        # (none left: resumed after the last step, the launch ends with no save and is not signalled)
        saves, extra_s = generator.randint(1, max(1, steps_left)), generator.uniform(0.0, 0.2)
        sent_at = None
        if launch_index < SIGNALS_PER_TRIAL:
            sent_at = kill_after_saves(process, root / "checkpoints" / "last.ckpt", saves, extra_s, signum)
        stopped_after_s = wait_for_stop_line(process, err, sent_at) if sent_at is not None else None
        process.wait(timeout=600)
        if sent_at is None or process.returncode == 0:  # (a signal after the run's end: it has finished whole)
            assert process.returncode == 0 and "stopped by " not in err.read_text(), err.read_text()[-3000:]
            log.append(f"exit 0 (resumed from {checkpoint}" + (", signalled after the end)" if sent_at else ")"))
            break
        exited_after_s = time.monotonic() - sent_at
        assert process.returncode == 128 + signum, err.read_text()[-3000:]
        assert stopped_after_s < STOP_WITHIN_S and exited_after_s < EXIT_WITHIN_S, \
            (stopped_after_s, exited_after_s, err.read_text()[-3000:])
        resumed_from, checkpoint = checkpoint, resume_checkpoint(err.read_text(), signum)
        assert checkpoint is None or Path(checkpoint).is_file()
        log.append(f"{signal.Signals(signum).name} {saves} saves + {extra_s:.2f} s in, stopped in {stopped_after_s:.1f} s "
                   f"(resumed from {resumed_from}; resume from {checkpoint})")
    assert process.returncode == 0, log
    return log


@pytest.mark.slow
@pytest.mark.kill
@pytest.mark.parametrize("seed", SIGNAL_SEEDS)
def test_sigterm_and_sigint_at_random_moments_stop_cleanly_and_resume_to_the_uninterrupted_export(
        tiny_setup, seed: int) -> None:
    work, reference = tiny_setup
    root = work / f"signalled_{seed}"
    log = run_with_signals(work, root, seed)
    print(f"seed {seed}: " + "; ".join(log))
    assert log[0].startswith("SIGTERM" if seed % 2 == 0 else "SIGINT"), log  # the first launch stops mid-run
    assert export_digests(export_dir(root)) == export_digests(export_dir(reference)), log


# ----- determinism -------------------------------------------------------------------------------------------------
def test_same_config_and_seed_give_bit_identical_plans_and_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSACT_PL_CACHE", str(tmp_path / "cache"))
    model_dir = save_family_dir("qwen2", tmp_path / "base")
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    first = fit(str(model_dir), str(corpus), tmp_path / "first", (16, 19))
    second = fit(str(model_dir), str(corpus), tmp_path / "second", (16, 19))
    assert [plan.to_json() for plan in first.plans] == [plan.to_json() for plan in second.plans]
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name
    assert (tmp_path / "first" / "export" / "model.safetensors").read_bytes() == \
        (tmp_path / "second" / "export" / "model.safetensors").read_bytes()
