"""DistillationLM: recovery of the pruned student from its own dense original (the teacher).

The student is ``self.model`` (shrunk by the pruning callback); the teacher is the same source
(``--model.model``, ``--model.num_layers``) loaded dense at ``teacher_precision``, frozen, in eval
mode, run under ``torch.no_grad``. It is kept outside the nn.Module registry, so it is not in
``state_dict()`` (never in checkpoints), not in ``parameters()`` (never in the optimizer) and not
moved by Lightning: it is loaded onto the student's device at fit start (or on first use) and
reloaded from its source on resume. Checkpoints record its source and precision, and a resume
with a different teacher is refused.

Objective: ``alpha · KD + (1 − alpha) · CE + hidden_weight · hidden``, see ``kd_losses``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import Tensor
from torchmetrics.aggregation import MeanMetric
from transformers import PreTrainedModel

from transact_pl.arch import eval_mode
from transact_pl.infra.assets import EMBEDDED_MODEL
from transact_pl.errors import ConfigError
from transact_pl.kd_losses import (DIVERGENCES, HIDDEN_LOSSES, LogitLossSums, final_hidden_states, fused_logit_loss,
                                   hidden_state_loss, recorded_layer_outputs)
from transact_pl.lightning_modules.transact_lm import CHECKPOINT_KEY, TransActLM
from transact_pl.infra.teacher import PRECISIONS, QUANTIZED, load_teacher, module_memory_bytes, teacher_precision_problems


class DistillationLM(TransActLM):
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
        teacher_precision: str = "full",
        alpha: float = 1.0,
        temperature: float = 1.0,
        divergence: str = "forward",
        hidden_weight: float = 0.0,
        hidden_loss: str = "mse",
        hidden_layers: list[int] | None = None,
        chunk_size: int = 128,
    ) -> None:
        """A causal LM pruned and recovered by distillation from its dense original.

        Args:
            model: the base model (student and teacher): see ``TransActLM``.
            num_layers: keep only the first N decoder layers, in student and teacher.
            dtype: student weights dtype: float32, bfloat16 or float16.
            learning_rate: peak AdamW learning rate.
            min_lr_ratio: cosine decay floor, as a fraction of learning_rate.
            warmup_steps: linear warm-up steps.
            weight_decay: AdamW weight decay.
            lr_schedule: cosine (one over the run) or per_shot (a warm-up + cosine in every recovery): see ``TransActLM``.
            lr_peak_growth: per_shot only: each recovery's peak LR is this times the previous one's.
            teacher_precision: full (the student's dtype), bf16, int8 or nf4 (int8/nf4: bitsandbytes, CPU or CUDA).
            alpha: weight of the KD loss; CE on the data gets 1 − alpha (1: KD only, 0: CE only, between: mixed).
            temperature: softmax temperature T of the KD loss (the loss is scaled by T²).
            divergence: forward = KL(teacher ‖ student), reverse = KL(student ‖ teacher).
            hidden_weight: weight of the hidden-state loss between residual streams (0 turns it off).
            hidden_loss: mse (divided by the teacher states' mean square) or cosine (1 − cosine similarity).
            hidden_layers: decoder layers (0-based) whose outputs are matched; null = every layer.
            chunk_size: sequence positions per chunk of the logit losses (fp32 logits exist for one chunk at a time).
        """
        super().__init__(model, num_layers, dtype, learning_rate, min_lr_ratio, warmup_steps, weight_decay, lr_schedule,
                         lr_peak_growth)
        self._warn_ineffective_options()
        object.__setattr__(self, "_teacher", None)  # a plain attribute: out of the module registry on purpose
        self.teacher_memory_bytes: int | None = None
        self.val_kl = MeanMetric()

    # ----- configuration ---------------------------------------------------------------------------------------
    def hparam_problems(self) -> list[str]:
        """Every invalid option, TransActLM's and the distillation ones (reported at CLI startup, refused in setup)."""
        hp = self.hparams
        problems = super().hparam_problems()
        if hp.teacher_precision not in PRECISIONS:
            problems.append(f"`--model.teacher_precision={hp.teacher_precision}` is not one of {', '.join(PRECISIONS)}")
        if not 0.0 <= hp.alpha <= 1.0:
            problems.append(f"`--model.alpha={hp.alpha}` must lie in [0, 1] (1: KD only, 0: CE only)")
        if not hp.temperature > 0:  # also catches NaN
            problems.append(f"`--model.temperature={hp.temperature}` must be > 0 (1: the plain softmax)")
        if hp.divergence not in DIVERGENCES:
            problems.append(f"`--model.divergence={hp.divergence}` is not one of {', '.join(DIVERGENCES)}")
        if hp.hidden_weight < 0:
            problems.append(f"`--model.hidden_weight={hp.hidden_weight}` must be >= 0 (0 turns the hidden loss off)")
        if hp.hidden_loss not in HIDDEN_LOSSES:
            problems.append(f"`--model.hidden_loss={hp.hidden_loss}` is not one of {', '.join(HIDDEN_LOSSES)}")
        if hp.chunk_size < 1:
            problems.append(f"`--model.chunk_size={hp.chunk_size}` must be >= 1")
        return problems

    def _warn_ineffective_options(self) -> None:
        """Options that change nothing with the loss weights given (not errors: a sweep may set them all)."""
        hp = self.hparams
        if hp.alpha == 0 and (hp.temperature != 1.0 or hp.divergence != "forward"):
            warnings.warn("`--model.temperature`/`--model.divergence` have no effect with `--model.alpha=0` (CE only)")
        if hp.hidden_weight == 0 and (hp.hidden_layers is not None or hp.hidden_loss != "mse"):
            warnings.warn("`--model.hidden_layers`/`--model.hidden_loss` have no effect with `--model.hidden_weight=0`")

    def _hidden_layer_indices(self) -> list[int]:
        num_layers = self.model.config.num_hidden_layers
        indices = list(range(num_layers)) if self.hparams.hidden_layers is None else list(self.hparams.hidden_layers)
        bad = [index for index in indices if not 0 <= index < num_layers]
        if bad or not indices:
            raise ConfigError(f"`--model.hidden_layers={indices}` must be non-empty indices in 0..{num_layers - 1}")
        return indices

    @property
    def uses_teacher_in_training(self) -> bool:
        return self.hparams.alpha > 0 or self.hparams.hidden_weight > 0

    def setup(self, stage: str) -> None:
        super().setup(stage)  # the options themselves first
        device = self.trainer.strategy.root_device
        problems = teacher_precision_problems(self.hparams.teacher_precision, device)
        if self.uses_fsdp2 and self.hparams.teacher_precision in QUANTIZED:
            problems.append(f"`--model.teacher_precision={self.hparams.teacher_precision}` cannot be sharded under FSDP2 "
                            "(bitsandbytes weights are not DTensors); use bf16, which FSDP2 shards across the processes")
        if problems:
            raise ConfigError("; ".join(problems))
        if not self.uses_teacher_in_training:
            warnings.warn("`--model.alpha=0` and `--model.hidden_weight=0`: training is CE only and the teacher only "
                          "serves the val_kl metric; use transact_pl.lightning_modules.transact_lm.TransActLM to skip loading it")

    # ----- the teacher ----------------------------------------------------------------------------------------
    def dense_teacher(self) -> PreTrainedModel:
        """The frozen dense teacher on the student's device, loaded on first use.

        Under FSDP2 it is sharded like the student (every decoder layer and the root over the data-parallel
        mesh), so each process holds 1/W of its decoder weights; it has no optimizer state in any case.
        A method, not a property: nn.Module turns an AttributeError inside a property into a misleading one.
        """
        if self._teacher is None:
            hp = self.hparams
            teacher = load_teacher(hp.model, hp.num_layers, hp.dtype, hp.teacher_precision, self.device)
            if self.uses_fsdp2:
                teacher = self.shard(teacher)
            object.__setattr__(self, "_teacher", teacher)
            self.teacher_memory_bytes = module_memory_bytes(teacher)
        return self._teacher

    def on_fit_start(self) -> None:
        if self.hparams.hidden_weight > 0:
            self._hidden_layer_indices()  # fail before any work on a bad --model.hidden_layers
        self.dense_teacher()  # load now, so its memory is known and reported before the first step
        for logger in self.loggers:
            logger.log_metrics({"teacher_memory_bytes": float(self.teacher_memory_bytes)}, step=self.global_step)

    def teacher_record(self) -> dict:
        """What identifies the teacher; stored in checkpoints and compared on resume."""
        hp = self.hparams
        return {"source": hp.model, "num_layers": hp.num_layers, "precision": hp.teacher_precision,
                "dtype": "bfloat16" if hp.teacher_precision == "bf16" else hp.dtype}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY]["teacher"] = self.teacher_record()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint[CHECKPOINT_KEY].get("teacher")
        if saved is not None and saved != self.teacher_record():
            raise ConfigError(f"the checkpoint was distilled from teacher {saved}, but this run's teacher is "
                              f"{self.teacher_record()}; set `--model.teacher_precision={saved['precision']}` (and the same "
                              f"--model.model/num_layers/dtype) to resume it")

    # ----- losses ---------------------------------------------------------------------------------------------
    def _teacher_states(self, input_ids: Tensor, layers: list[int]) -> tuple[Tensor, list[Tensor]]:
        """Teacher final hidden states (B, T, H) and the outputs of ``layers``, without autograd.

        no_grad rather than inference_mode: inference tensors may not be saved for backward, and the
        hidden-state loss and the checkpointed logit chunks keep teacher states as constants.
        """
        teacher = self.dense_teacher()
        with torch.no_grad(), recorded_layer_outputs(teacher, layers) as outputs:
            final = final_hidden_states(teacher, input_ids)
        return final, [outputs[index] for index in layers]

    def _student_states(self, input_ids: Tensor, layers: list[int]) -> tuple[Tensor, list[Tensor]]:
        """Student final hidden states (B, T, H) and the outputs of ``layers``, with autograd."""
        with recorded_layer_outputs(self.model, layers) as outputs:
            final = final_hidden_states(self.model, input_ids)
        return final, [outputs[index] for index in layers]

    def _logit_losses(self, student_final: Tensor, teacher_final: Tensor | None, input_ids: Tensor,
                      temperature: float, divergence: str, alpha: float) -> tuple[Tensor, LogitLossSums]:
        """alpha · KD + (1 − alpha) · CE (KD only with a teacher) and the sums it is made of."""
        teacher_head = None if teacher_final is None else self.dense_teacher().get_output_embeddings()
        return fused_logit_loss(student_final, teacher_final, self.model.get_output_embeddings(), teacher_head, input_ids,
                                alpha, 1.0 - alpha, temperature, divergence, self.hparams.chunk_size)

    def compute_loss(self, input_ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """alpha · KD + (1 − alpha) · CE + hidden_weight · hidden for a batch (B, T)."""
        hp = self.hparams
        layers = self._hidden_layer_indices() if hp.hidden_weight > 0 else []
        student_final, student_layers = self._student_states(input_ids, layers)
        teacher_final, teacher_layers = (None, [])
        if self.uses_teacher_in_training:
            teacher_final, teacher_layers = self._teacher_states(input_ids, layers)
        loss, sums = self._logit_losses(student_final, teacher_final, input_ids, hp.temperature, hp.divergence, hp.alpha)
        metrics = {"ce_loss": sums.ce_mean}
        if teacher_final is not None:
            metrics["kd_loss"] = sums.kl_mean
        if layers:
            hidden = hidden_state_loss(student_layers, teacher_layers, hp.hidden_loss)
            loss = loss + hp.hidden_weight * hidden
            metrics["hidden_loss"] = hidden.detach()
        del teacher_final, teacher_layers  # only the constants autograd saved outlive this call
        return loss, metrics

    # ----- evaluation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _eval_sums(self, input_ids: Tensor) -> LogitLossSums:
        """CE and KL(teacher ‖ student) at T = 1 for one batch, student in its current mode."""
        student_final, _ = self._student_states(input_ids, [])
        teacher_final, _ = self._teacher_states(input_ids, [])
        return self._logit_losses(student_final, teacher_final, input_ids, 1.0, "forward", 1.0)[1]

    def validation_kl(self, batches: Iterable[dict[str, Tensor]]) -> float:
        """The student's token-weighted mean KL(teacher ‖ student) at T = 1 over ``batches`` (nats/token)."""
        kl, tokens = 0.0, 0
        with eval_mode(self.model):
            for batch in batches:
                sums = self._eval_sums(batch["input_ids"].to(self.device))
                kl, tokens = kl + sums.kl.item(), tokens + sums.kl_tokens
        return kl / max(1, tokens)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        sums = self._eval_sums(batch["input_ids"])
        self.val_nll.update(sums.ce_mean, weight=sums.ce_tokens)
        self.val_kl.update(sums.kl_mean, weight=sums.kl_tokens)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log("val_kl", self.val_kl.compute(), prog_bar=True, sync_dist=True)  # already synced by MeanMetric
        self.val_kl.reset()
