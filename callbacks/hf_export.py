"""HFExport: write the trained, pruned model as a stock Hugging Face directory at the end of ``fit``."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback

from transact_pl.errors import ConfigError
from transact_pl.distributed import full_copy, is_sharded
from transact_pl.export import check_export_dir, export_model
from transact_pl.loading import load_tokenizer


class HFExport(Callback):
    def __init__(self, output_dir: str, overwrite: bool = False, verify: bool = True, tolerance: float = 1e-4) -> None:
        """Export at the end of ``fit`` (rank 0 only), written whole or not at all.

        Args:
            output_dir: the Hugging Face directory to write; refused at startup if it exists, unless overwrite.
            overwrite: replace an existing ``output_dir`` (the old one is removed only once the new one is complete).
            verify: reload the export with stock transformers and compare logits with the in-memory model on the
                first validation batch; the export is not kept if they differ by more than ``tolerance``.
            tolerance: largest allowed |Δlogit| (fp32) for ``verify``.
        """
        self.output_dir = output_dir
        self.overwrite = overwrite
        self.verify = verify
        self.tolerance = tolerance

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_export_dir(self.output_dir, self.overwrite)

    def config_problems(self, trainer: L.Trainer, dense: object = None, model_config: object = None) -> list[str]:
        """An existing ``--export.output_dir`` without ``overwrite`` (checked at CLI startup too)."""
        try:
            check_export_dir(self.output_dir, self.overwrite)
        except ConfigError as error:
            return [str(error)]
        return []

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Under FSDP2 every rank takes part in gathering the full weights; rank 0 writes them.
        model = full_copy(pl_module.model) if is_sharded(pl_module.model) else pl_module.model
        if not trainer.is_global_zero:
            return
        pruning = next((c for c in trainer.callbacks if hasattr(c, "rows")), None)
        check_input_ids = next(iter(trainer.datamodule.val_dataloader()))["input_ids"][:2] if self.verify else None
        path = export_model(
            model,
            load_tokenizer(pl_module.hparams.model),
            self.output_dir,
            pl_module.plans,
            summary_rows=pruning.rows if pruning is not None else None,
            heldout=pruning.heldout_report() if pruning is not None else None,
            overwrite=self.overwrite,
            check_input_ids=check_input_ids,
            tolerance=self.tolerance,
        )
        pl_module.print(f"exported the pruned model to {path}")
