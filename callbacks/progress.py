"""Progress for the whole run: bars on a terminal, plain lines in a log file.

A run's longest silent parts happen outside Lightning's loops (calibration, evaluation, common tasks), and on a
terminal they get a task in the trainer's rich bar. Rich draws nothing when the output is not a terminal (``nohup``,
SLURM, CI logs), so there every such part prints a start line and a ``done in N s`` line, and
:class:`ProgressBar` prints a line every tenth of the training steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from rich.console import Console
from rich.errors import LiveError
from rich.progress import Progress

PLAIN_EVERY_S = 300  # a plain training line at least this often, whatever a tenth of the steps takes


def output_is_terminal() -> bool:
    """Whether rich draws live bars here: its own test (a TTY, or ``FORCE_COLOR``/``TTY_COMPATIBLE`` set) minus
    ``TERM=dumb`` (where its live display draws nothing), or a Jupyter kernel (where it draws widgets)."""
    console = Console()
    return console.is_jupyter or (console.is_terminal and not console.is_dumb_terminal)


@contextmanager
def progress_task(trainer: L.Trainer, description: str, total: int) -> Iterator[Callable[[], None]]:
    """Yield an ``advance()`` function; shows a task in the trainer's rich bar, or a bar of its own, or (output
    not a terminal) a start line and a ``done`` line."""
    if not trainer.is_global_zero:
        yield lambda: None
        return
    if not output_is_terminal():
        print(f"{description} ...", flush=True)
        started = time.perf_counter()
        yield lambda: None
        print(f"{description}: done in {time.perf_counter() - started:.0f} s", flush=True)
        return
    bar = trainer.progress_bar_callback
    shared = bar.progress if isinstance(bar, RichProgressBar) and bar.progress is not None else None
    if shared is not None:
        task = shared.add_task(f"[cyan]{description}", total=total)
        try:
            yield lambda: shared.advance(task)
        finally:
            shared.remove_task(task)
        return
    own = Progress(transient=True)
    try:
        own.start()
    except LiveError:  # another live display (not Lightning's bar) owns the terminal: run without a bar
        yield lambda: None
        return
    try:
        task = own.add_task(description, total=total)
        yield lambda: own.advance(task)
    finally:
        own.stop()


class ProgressBar(RichProgressBar):
    """Lightning's rich bar on a terminal; elsewhere a line every tenth of the training steps (step, loss,
    seconds per step, time left), since rich draws nothing into a log file."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plain = False  # print plain training lines: rank 0, output not a terminal (decided once per fit)
        self._plain_started: tuple[int, float] | None = None  # (step, time) after this run's first optimizer step
        self._plain_printed: tuple[int, float] = (-1, 0.0)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._plain = trainer.is_global_zero and trainer.max_steps > 0 and not output_is_terminal()

    def _get_train_description(self, current_epoch: int) -> str:
        """``Training`` for a run bounded by steps; Lightning's own would read ``Epoch 0/-2`` (max_epochs -1)."""
        max_epochs = self.trainer.max_epochs
        if self.trainer.max_steps > 0 and (max_epochs is None or max_epochs < 0):
            return f"{'Training':{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self._plain:
            return
        step, now = trainer.global_step, time.perf_counter()
        if self._plain_started is None:
            if step > 0:  # the first optimizer step (with its warm-up) is done; a resumed run starts mid-way
                self._plain_started = self._plain_printed = (step, now)
            return
        every = max(1, trainer.max_steps // 10)
        last_step, last_time = self._plain_printed
        due = step % every == 0 or step == trainer.max_steps or now - last_time >= PLAIN_EVERY_S
        if step == last_step or not due:  # gradient accumulation: several batches end at one step
            return
        self._plain_printed = (step, now)
        first, started = self._plain_started
        per_step = (now - started) / max(1, step - first)
        loss = trainer.callback_metrics.get("train_loss")
        shown = f", train_loss {float(loss):.3f}" if loss is not None else ""
        left = per_step * (trainer.max_steps - step)
        remaining = f"~{left / 60:.1f} min" if left >= 60 else f"~{left:.0f} s"
        print(f"step {step}/{trainer.max_steps}{shown}, {per_step:.3g} s/step, {remaining} of training left", flush=True)
