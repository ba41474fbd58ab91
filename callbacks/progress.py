"""Progress bars for work the callbacks do outside Lightning's loops (calibration, evaluation)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from rich.errors import LiveError
from rich.progress import Progress


@contextmanager
def progress_task(trainer: L.Trainer, description: str, total: int) -> Iterator[Callable[[], None]]:
    """Yield an ``advance()`` function; shows a task in the trainer's rich bar, or a bar of its own."""
    if not trainer.is_global_zero:
        yield lambda: None
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
