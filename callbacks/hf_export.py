"""HFExport: write the trained, pruned model as a stock Hugging Face directory at the end of ``fit``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from callbacks.pruning_report import PruningReport, find_report
from callbacks.startup_checks import StartupChecks
from datamodules.sources import load_documents
from transact_pl.distributed import full_copy, is_sharded
from transact_pl.errors import ConfigError
from transact_pl.infra.export import export_model, tolerance_problem
from transact_pl.infra.export_dir import export_dir_problem, run_dir_problem
from transact_pl.infra.gguf import GGUFExport, gguf_problem
from transact_pl.infra.loading import load_tokenizer


class HFExport(Callback, StartupChecks):
    def __init__(self, output_dir: str, overwrite: bool = False, verify: bool = True, tolerance: float = 1e-4,
                 gguf: str | None = None) -> None:
        """Export at the end of ``fit`` (rank 0 only), written whole or not at all.

        Args:
            output_dir: the Hugging Face directory to write; refused at startup if it exists, unless overwrite, and
                when it is or contains the run's own directories (default_root_dir, logs, checkpoints) or lies inside
                its log or checkpoint directories.
            overwrite: replace an existing ``output_dir`` that holds an earlier export of this project (files listed
                in its ``transact_export.json``) and nothing else; the old one is removed only once the new one is
                complete. A directory with any other file is refused at startup.
            verify: reload the export with stock transformers and compare logits with the in-memory model on the
                first validation batch; the export is not kept if they differ by more than ``tolerance``.
            tolerance: largest allowed |Δlogit| (fp32) for ``verify``.
            gguf: also write ``model-<gguf>.gguf`` into the export (f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0)
                with llama.cpp's own converter and quantizer, and put its llama.cpp perplexity on the
                ``--report.extra_eval`` texts in the model card (``transact_pl.infra.gguf``); needs ``make llama-cpp``.
        """
        self.output_dir = output_dir
        self.overwrite = overwrite
        self.verify = verify
        self.tolerance = tolerance
        self.gguf = gguf

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        problems = self.config_problems(trainer) if stage == "fit" else []
        if problems:
            raise ConfigError("; ".join(problems))

    def config_problems(self, trainer: L.Trainer, dense: object = None, model_config: object = None) -> list[str]:
        """Every export option that would fail only after training (checked at CLI startup, and again in setup)."""
        problems = [run_dir_problem(self.output_dir, [trainer.default_root_dir], written_directories(trainer)),
                    base_model_problem(self.output_dir, model_config),
                    export_dir_problem(self.output_dir, self.overwrite),
                    tolerance_problem(self.tolerance),
                    gguf_problem(self.gguf)]
        return [problem for problem in problems if problem]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Under FSDP2 every rank takes part in gathering the full weights; rank 0 writes them.
        model = full_copy(pl_module.model) if is_sharded(pl_module.model) else pl_module.model
        if not trainer.is_global_zero:
            return
        report = find_report(trainer)
        check_input_ids = next(iter(trainer.datamodule.val_dataloader()))["input_ids"][:2] if self.verify else None
        path = export_model(
            model,
            load_tokenizer(pl_module.hparams.model),
            self.output_dir,
            pl_module.plans,
            summary_rows=report.record.stages if report is not None else None,
            heldout=report.record.heldout_report() if report is not None else None,
            overwrite=self.overwrite,
            check_input_ids=check_input_ids,
            tolerance=self.tolerance,
            finish=gguf_step(self.gguf, report, self.output_dir),
        )
        pl_module.print(f"exported the pruned model to {path}")


def base_model_problem(output_dir: str, model_config: object) -> str | None:
    """An export that would replace the base model it is made from (its checkpoints replay plans on that model)."""
    source = getattr(model_config, "_name_or_path", None)
    if source and Path(source).is_dir() and Path(source).resolve() == Path(output_dir).resolve():
        return (f"`--export.output_dir={output_dir}` is the base model's own directory (--model.model); the run's "
                "checkpoints need it: export elsewhere")
    return None


def written_directories(trainer: L.Trainer) -> list[str]:
    """Directories the run writes its own files into: its loggers' directories and its checkpoint directories."""
    directories = []
    for logger in trainer.loggers:
        directories += [d for d in (getattr(logger, "save_dir", None), getattr(logger, "root_dir", None)) if d]
    directories += [c.dirpath for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
    return [str(d) for d in dict.fromkeys(directories) if "://" not in str(d)]


def gguf_step(gguf: str | None, report: PruningReport | None, output_dir: str) -> GGUFExport | None:
    """The ``--export.gguf`` step for ``export_model``: measured on the report's ``--report.extra_eval`` texts."""
    if gguf is None:
        return None
    names = report.extra_eval if report is not None else ()
    return GGUFExport(gguf, {name: load_documents(name, "--report.extra_eval") for name in names}, Path(output_dir).name)
