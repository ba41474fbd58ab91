"""Where a run writes its own files (plans, scores, summary.json, pictures)."""

from __future__ import annotations

from pathlib import Path

import lightning as L


def run_dir(trainer: L.Trainer) -> Path:
    """The logger's directory, else default_root_dir (created if missing)."""
    # Not trainer.log_dir: that broadcasts (a collective), and this is called on rank 0 alone.
    log_dir = trainer.loggers[0].log_dir if trainer.loggers else None
    path = Path(log_dir or trainer.default_root_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path
