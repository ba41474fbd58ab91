"""The interface of callbacks whose options are checked at CLI startup, before any weights load."""

from __future__ import annotations

import lightning as L

from transact_pl.arch import Widths


class StartupChecks:
    """A callback that can name every problem of its options from the configuration alone."""

    def config_problems(self, trainer: L.Trainer, dense: Widths | None, model_config=None) -> list[str]:
        """Every problem, as one-line messages naming the option; ``dense`` is None when the model is unreadable."""
        return []
