"""RunGuard: a run stops cleanly on SIGTERM / SIGINT, and never saves or exports a model with NaN/Inf weights.

Signals. Lightning's signal connector only *notes* a SIGTERM (``trainer.received_sigterm``); its loops raise
``SIGTERMException`` at the next batch boundary, a ``SystemExit`` without a code (exit status 0), and work done
outside those loops (calibration, held-out evaluation, greedy sampling, the export) never looks at the flag.
:func:`interruptible` therefore installs, for the whole CLI run, handlers that raise :class:`RunInterrupted` (a
``SIGTERMException`` with exit status 128 + signal) as soon as SIGTERM or SIGINT arrives. Inside ``fit`` Lightning
puts its own SIGTERM handler in front of ours (the flag is set and processes it launched get the signal first),
and the exception goes through Lightning's ``on_exception`` hooks and teardown like its own. Checkpoints are
written atomically (``callbacks.atomic_checkpoint``), so whatever the signal interrupted, the last completed
checkpoint is whole: :meth:`RunGuard.on_exception` notes it in the exception for the line ``train.py`` prints.

Divergence. Before every checkpoint is written and before the end-of-fit export, the weights are checked: a
NaN/Inf anywhere stops the run with ``FloatingPointError`` naming the step and the parameter, so the last
finite ``last.ckpt`` is never replaced by a diverged one. (Non-finite training and validation losses are
caught by the LightningModule, which knows the step.)
"""

from __future__ import annotations

import os
import shlex
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(SIGTERMException):
    """SIGTERM or SIGINT arrived; ``code`` is the conventional exit status 128 + signal number.

    A ``SIGTERMException`` (so a ``SystemExit``): ``except Exception`` blocks in libraries let it through, and
    even uncaught it ends the process with a non-zero status. ``RunGuard.on_exception`` fills in ``step`` and
    ``checkpoint`` (the last complete checkpoint, None if the run has none yet).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name
        self.step: int | None = None
        self.checkpoint: str | None = None
        self.rank_zero = True

    def resume_line(self, args: Sequence[str]) -> str:
        """The one line for the user: where the run stopped and the command that resumes it (``args``: train.py's)."""
        stopped = f"stopped by {self.signal_name}"
        if self.step is None:
            return f"{stopped} while starting, before training; nothing to resume: run the same command again"
        if self.checkpoint is None:
            return (f"{stopped} at step {self.step}, before the run's first checkpoint; nothing to resume: "
                    "run the same command again")
        command = resume_command(args, self.checkpoint)
        return f"{stopped} at step {self.step}; resume from its last checkpoint with: {command}"


def interruption_behind(error: BaseException) -> RunInterrupted | None:
    """The :class:`RunInterrupted` that ``error`` is or hides, else None.

    A signal that lands inside a context manager's body can make its ``__exit__`` fail in turn (``torch.save``'s
    zip writer raises "unexpected pos" over a half-written record); the new error carries the interruption as its
    ``__context__``, and the run must still stop as interrupted, not as crashed.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, RunInterrupted):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def resume_command(args: Sequence[str], checkpoint: str) -> str:
    """``python train.py <args>`` with any ``--ckpt_path`` of ``args`` replaced by ``--ckpt_path=<checkpoint>``."""
    kept: list[str] = []
    skip_value = False
    for arg in args:
        if skip_value:
            skip_value = False
        elif arg == "--ckpt_path":
            skip_value = True
        elif not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return shlex.join(["python", "train.py", *kept, f"--ckpt_path={checkpoint}"])


class _StopState:
    """What the handlers of :func:`interruptible` share with :func:`stops_deferred` (the main thread's only)."""

    received = False  # a stop signal has arrived during this interruptible() section
    deferring = 0  # depth of stops_deferred() sections now open
    pending: int | None = None  # a signal that arrived inside one, raised when the outermost closes


@contextmanager
def interruptible() -> Iterator[None]:
    """While inside: the first SIGTERM or SIGINT raises :class:`RunInterrupted` wherever the main thread is
    (inside :func:`stops_deferred`, as that section ends).

    Later signals are ignored while the run shuts down (Lightning does the same for repeated Ctrl+C), so the
    on_exception hooks and teardown are not cut short. The previous handlers come back on leaving.
    """

    def stop(signum: int, frame: FrameType | None) -> None:
        if _StopState.received:
            return
        _StopState.received = True
        if _StopState.deferring:
            _StopState.pending = signum
            return
        raise RunInterrupted(signum)

    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    _StopState.received, _StopState.pending = False, None
    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def stops_deferred() -> Iterator[None]:
    """A section that a stop signal must not cut in two (a checkpoint write): a SIGTERM or SIGINT that arrives
    inside it raises :class:`RunInterrupted` once it has finished, so the file it writes is complete.

    A signal raised *inside* ``torch.save`` leaves its zip writer half-way; the writer finishes the archive when it
    is garbage-collected, after its file has been closed, and that write aborts the whole process (``terminate
    called after throwing ... write to closed file``) instead of the clean stop. A save takes seconds at most.
    """
    _StopState.deferring += 1
    try:
        yield
    finally:
        _StopState.deferring -= 1
    if not _StopState.deferring and _StopState.pending is not None:
        signum, _StopState.pending = _StopState.pending, None
        raise RunInterrupted(signum)


def ignore_stop_signals() -> None:
    """For a finished run's last seconds (Python's own shutdown): a signal then would only turn the completed run
    into a traceback (SIGINT) or a killed status (SIGTERM), so both are ignored until the process ends."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def last_complete_checkpoint(trainer: L.Trainer) -> str | None:
    """The newest checkpoint this launch finished writing, else the one it resumed from, else None.

    ``ModelCheckpoint._last_checkpoint_saved`` is set only once a save has returned, so the file is whole.
    """
    saved = [callback._last_checkpoint_saved for callback in trainer.checkpoint_callbacks
             if isinstance(callback, ModelCheckpoint) and callback._last_checkpoint_saved]
    saved = [path for path in saved if os.path.exists(path)]
    if saved:
        return os.path.abspath(max(saved, key=os.path.getmtime))
    resumed_from = trainer.ckpt_path
    return os.path.abspath(resumed_from) if resumed_from and os.path.exists(resumed_from) else None


def first_non_finite_parameter(model: nn.Module) -> str | None:
    """The name of the first parameter holding a NaN or Inf (this process's shard under FSDP2), else None."""
    named = [(name, parameter.to_local() if hasattr(parameter, "to_local") else parameter)
             for name, parameter in model.named_parameters()]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(tensor.detach()).all() for _, tensor in named]).cpu()  # one device sync
    return next((name for (name, _), ok in zip(named, finite.tolist()) if not ok), None)


class RunGuard(Callback):
    """Added to every ``train.py`` run (``trainer_defaults``): notes where an interrupted run can resume and
    stops a run whose weights became NaN/Inf before it saves or exports them."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        exception = interruption_behind(exception)
        if exception is not None:
            launcher = trainer.strategy.launcher
            if exception.signal_name == "SIGINT" and launcher is not None:
                launcher.kill(signal.SIGINT)  # what Lightning's handler does with a SIGTERM: processes it started stop too
            exception.step = trainer.global_step
            exception.checkpoint = last_complete_checkpoint(trainer)
            exception.rank_zero = trainer.is_global_zero

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Runs in every process before anything is written: raising here keeps the previous file in place.
        self.check_weights(trainer, pl_module, "not saving this checkpoint")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check_weights(trainer, pl_module, "not exporting the model")

    @staticmethod
    def check_weights(trainer: L.Trainer, pl_module: L.LightningModule, consequence: str) -> None:
        """Raise ``FloatingPointError`` (in every process alike) when any process holds a NaN/Inf weight."""
        bad = first_non_finite_parameter(pl_module.model)  # the model being trained (not a frozen teacher)
        if not trainer.strategy.reduce_boolean_decision(bad is not None, all=False):
            return
        kept = last_complete_checkpoint(trainer)
        where = f"`{bad}`" if bad is not None else "another process's shard"
        raise FloatingPointError(
            f"the weights hold NaN/Inf ({where}) at step {trainer.global_step}; {consequence}"
            + (f": the last finite checkpoint is {kept}" if kept else "")
            + "; lower --model.learning_rate (or check the data) and run again")
