"""PruningReport: what a pruning run measured, stage by stage, for the summary table, summary.json and the export.

The pruning callback announces its shots through ``ShotEvents`` (``callbacks.transact_pruning``); this
callback answers them by measuring the model (validation and test perplexity, sizes), by comparing the
dense and the final model on held-out texts and greedy samples, and, when pruning ends, by writing
``summary.json`` and printing the table. ``HFExport`` and the pictures read its ``record``.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from callbacks.progress import progress_task
from callbacks.run_files import run_dir
from callbacks.startup_checks import StartupChecks
from callbacks.transact_pruning import ShotEvents
from datamodules.sources import load_documents
from transact_pl.arch import Widths, model_widths
from transact_pl.distributed import is_sharded
from transact_pl.errors import ConfigError
from transact_pl.eval_suite import DEFAULT_PROMPTS, evaluate_heldout, heldout_protocol
from transact_pl.evaluation import kv_cache_bytes_per_token, parameter_counts, perplexity
from transact_pl.infra.common_tasks import COMMON_TASKS, evaluate_common_tasks
from transact_pl.infra.report import print_summary

SETTINGS = ("zeroshot", "reference")


@dataclass
class RunRecord:
    """Everything the report measured.

    stages: one row per measured stage (``stage``, widths, parameter counts, KV bytes, ``val_ppl``, ``test_ppl``).
    heldout: ``{"protocol": ..., "dense": evaluate_heldout(...), "final": ...}`` (see ``transact_pl.eval_suite``).
    """

    stages: list[dict] = field(default_factory=list)
    heldout: dict[str, dict] = field(default_factory=dict)

    def heldout_report(self) -> dict | None:
        """The dense-vs-final record once a stage of it is measured, else None."""
        return self.heldout if {"dense", "final"} & self.heldout.keys() else None


class PruningReport(Callback, ShotEvents, StartupChecks):
    def __init__(
        self,
        evaluate: bool = True,
        extra_eval: tuple[str, ...] = (),
        extra_eval_blocks: int | None = None,
        sample_new_tokens: int = 0,
        common_tasks: tuple[str, ...] = (),
        common_tasks_limit: int | None = 20,
        common_tasks_setting: str = "zeroshot",
    ) -> None:
        """Measure the model around every pruning shot and summarise the run.

        Args:
            evaluate: measure validation and test perplexity before the first shot, after every shot and at
                the end, for the summary table (costs forward passes over those splits).
            extra_eval: held-out texts on which the dense model (before shot 1) and the final model are compared,
                besides the data's test split: ``news``, ``shakespeare`` (embedded, not trained on) or any source
                ``--data.dataset`` accepts, every document of it packed like the test split. Perplexity follows the
                test protocol (independent blocks of ``--data.block_size`` tokens, no BOS, fp32 log-softmax,
                token-weighted mean NLL). Needs ``evaluate``.
            extra_eval_blocks: blocks scored per ``extra_eval`` text, chosen like the test blocks (``--data.eval_blocks``:
                spread over the text by default; None: ``--data.max_test_blocks``, all blocks when that is None too).
            sample_new_tokens: greedy tokens the dense and the final model generate for each of the fixed prompts
                (``transact_pl.eval_suite.DEFAULT_PROMPTS``); 0 generates none. Needs ``evaluate``.
            common_tasks: the paper's common tasks on which the dense and the final model are compared (accuracy
                with lm-eval's prompts; ``boolq``, ``piqa``, ``hellaswag``, ``winogrande``, ``arc_easy``,
                ``arc_challenge``, ``openbookqa``; see transact_pl/infra/common_tasks.py). Needs ``evaluate``.
            common_tasks_limit: examples per task, a seeded sample spread over its validation split (None: all).
            common_tasks_setting: ``zeroshot`` (every task zero-shot) or ``reference`` (the TransAct reference's
                shots: ARC-c 25, HellaSwag 10, WinoGrande 5, the rest 0).
        """
        self.evaluate = evaluate
        self.extra_eval = tuple(extra_eval)
        self.extra_eval_blocks = extra_eval_blocks
        self.sample_new_tokens = sample_new_tokens
        self.common_tasks = tuple(common_tasks)
        self.common_tasks_limit = common_tasks_limit
        self.common_tasks_setting = common_tasks_setting
        if not evaluate and (self.extra_eval or sample_new_tokens or self.common_tasks):
            warnings.warn("`--report.extra_eval`, `--report.sample_new_tokens` and `--report.common_tasks` have no "
                          "effect with `--report.evaluate=false`", stacklevel=2)
        self.record = RunRecord()
        self._heldout_blocks: dict[str, torch.Tensor] = {}

    # ----- configuration ---------------------------------------------------------------------------------------
    def config_problems(self, trainer: L.Trainer, dense: Widths | None, model_config=None) -> list[str]:
        """Unreadable ``extra_eval`` texts and out-of-range counts (checked at CLI startup)."""
        problems = []
        for name in self.extra_eval:
            try:
                load_documents(name, "--report.extra_eval")
            except ConfigError as error:
                problems.append(str(error))
        if self.extra_eval_blocks is not None and self.extra_eval_blocks < 1:
            problems.append(f"`--report.extra_eval_blocks={self.extra_eval_blocks}` must be at least 1 (or null)")
        if self.sample_new_tokens < 0:
            problems.append(f"`--report.sample_new_tokens={self.sample_new_tokens}` must be at least 0")
        unknown = [task for task in self.common_tasks if task not in COMMON_TASKS]
        if unknown:
            problems.append(f"`--report.common_tasks` names unknown tasks {', '.join(unknown)}; choose from "
                            f"{', '.join(COMMON_TASKS)}")
        if self.common_tasks_limit is not None and self.common_tasks_limit < 1:
            problems.append(f"`--report.common_tasks_limit={self.common_tasks_limit}` must be at least 1 (or null: all)")
        if self.common_tasks_setting not in SETTINGS:
            problems.append(f"`--report.common_tasks_setting={self.common_tasks_setting}` is unknown; choose one of "
                            f"{', '.join(SETTINGS)}")
        return problems

    def measures_heldout(self) -> bool:
        """Whether the dense and final models are compared on ``extra_eval`` texts or samples."""
        return self.evaluate and (bool(self.extra_eval) or self.sample_new_tokens > 0 or bool(self.common_tasks))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Pack the ``extra_eval`` texts once (every rank) and note the protocol."""
        if not self.measures_heldout():
            return
        datamodule = trainer.datamodule
        self._heldout_blocks = datamodule.extra_eval_blocks(list(self.extra_eval), "--report.extra_eval",
                                                            self.extra_eval_blocks)
        cap = self.extra_eval_blocks if self.extra_eval_blocks is not None else datamodule.max_test_blocks
        dtype = next(pl_module.model.parameters()).dtype
        self.record.heldout["protocol"] = heldout_protocol(datamodule.block_size, cap, dtype, DEFAULT_PROMPTS,
                                                           self.sample_new_tokens)

    # ----- the pruning callback's events -----------------------------------------------------------------------
    def before_shot(self, trainer: L.Trainer, pl_module: L.LightningModule, shot: int) -> None:
        if not self.evaluate:
            return
        label = "dense" if shot == 1 and trainer.global_step == 0 else f"shot {shot - 1} recovered"
        self._measure(trainer, pl_module, f"{label} (step {trainer.global_step})")
        if shot == 1:
            self._measure_heldout(trainer, pl_module, "dense", self.record.stages[-1]["stage"])

    def after_shot(self, trainer: L.Trainer, pl_module: L.LightningModule, shot: int) -> None:
        if self.evaluate:
            self._measure(trainer, pl_module, f"shot {shot} pruned (step {trainer.global_step})")

    def pruning_end(self, trainer: L.Trainer, pl_module: L.LightningModule, trained_after_last_shot: bool) -> None:
        """Measure the final model (when it trained after the last shot) and the held-out texts, then (rank 0)
        write summary.json and print the tables."""
        if self.evaluate and trained_after_last_shot:
            self._measure(trainer, pl_module, f"final (step {trainer.global_step})")
        stages = self.record.stages
        stage = stages[-1]["stage"] if stages else f"end (step {trainer.global_step})"
        self._measure_heldout(trainer, pl_module, "final", stage)
        if trainer.is_global_zero and stages:
            heldout = self.record.heldout_report()
            (run_dir(trainer) / "summary.json").write_text(json.dumps({"stages": stages, "heldout": heldout}, indent=1))
            print_summary(stages, heldout=heldout, vocab_size=pl_module.model.config.vocab_size)

    # ----- measuring -------------------------------------------------------------------------------------------
    def _measure(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        model = pl_module.model
        widths = model_widths(model)
        total, non_embedding = parameter_counts(model)
        row = {
            "stage": stage,
            "heads": widths.num_heads,
            "kv_heads": widths.num_kv_heads,
            "mlp": widths.intermediate_size,
            "params": total,
            "non_embedding_params": non_embedding,
            "kv_bytes_per_token": kv_cache_bytes_per_token(model),
        }
        datamodule = trainer.datamodule
        for split, loader in (("val", datamodule.val_dataloader()), ("test", datamodule.test_dataloader())):
            with progress_task(trainer, f"{stage}: {split} perplexity", len(loader)) as advance:
                row[f"{split}_ppl"] = perplexity(model, loader, advance)
        self.record.stages.append(row)

    def _measure_heldout(self, trainer: L.Trainer, pl_module: L.LightningModule, key: str, stage: str) -> None:
        """Held-out perplexities and greedy samples of the current model as ``record.heldout[key]``.

        Every rank does the same work (a sharded model's forwards are collectives); rank 0 reports it.
        """
        if not self.measures_heldout():
            return
        model = pl_module.model
        batch_size = trainer.datamodule.eval_batch_size
        total = sum(math.ceil(blocks.shape[0] / batch_size) for blocks in self._heldout_blocks.values())
        with progress_task(trainer, f"{stage}: held-out texts and samples", total) as advance:
            measured = evaluate_heldout(
                model, trainer.datamodule.tokenizer, self._heldout_blocks, batch_size, stage, DEFAULT_PROMPTS,
                self.sample_new_tokens, synced_gpus=is_sharded(model) and trainer.world_size > 1, on_batch=advance)
        if self.common_tasks:
            measured["common_tasks"] = self._common_tasks(trainer, model, stage)
        self.record.heldout[key] = measured

    def _common_tasks(self, trainer: L.Trainer, model: torch.nn.Module, stage: str) -> dict:
        """``evaluate_common_tasks``' record for every task of ``common_tasks``, one task at a time (progress)."""
        merged: dict = {"setting": self.common_tasks_setting, "tasks": {}, "protocol": {}}
        with progress_task(trainer, f"{stage}: common tasks", len(self.common_tasks)) as advance:
            for task in self.common_tasks:
                result = evaluate_common_tasks(model, trainer.datamodule.tokenizer, [task], self.common_tasks_limit,
                                               self.common_tasks_setting)
                merged["tasks"].update(result["tasks"])
                merged["protocol"].update(result["protocol"])
                advance()
        accuracies = [entry["acc"] for entry in merged["tasks"].values()]
        merged["average"] = {"acc": sum(accuracies) / len(accuracies), "tasks": list(merged["tasks"])}
        return merged

    # ----- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"rows": self.record.stages, "heldout": self.record.heldout}

    def load_state_dict(self, state_dict: dict) -> None:
        self.record = RunRecord(list(state_dict["rows"]), dict(state_dict.get("heldout", {})))


def find_report(trainer: L.Trainer) -> PruningReport | None:
    """The run's report callback, if it has one."""
    return next((callback for callback in trainer.callbacks if isinstance(callback, PruningReport)), None)
