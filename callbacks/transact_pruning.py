"""TransActPruning: calibrate → score → plan → shrink → rebuild the optimizer, at scheduled steps of one fit.

The targets are resolved once, at the start of the fit: the options' (head_dim on a serving size), or a budget's
choice (``callbacks.budget_choice``).

Measuring and reporting are not done here: callbacks that implement ``ShotEvents`` (``callbacks.pruning_report``)
hear about every shot, in order, and measure what they like.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import asdict, replace

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from callbacks.budget_choice import (budget_problems, budget_widths, has_budget, pruned_head_dims, serving_head_dim,
                                     warn_at_start)
from callbacks.progress import progress_task
from callbacks.run_files import run_dir
from callbacks.startup_checks import StartupChecks
from transact_pl.arch import Widths, model_widths
from transact_pl.budget import budget_targets
from transact_pl.distributed import is_sharded, rank_share, sum_over_processes
from transact_pl.errors import ConfigError
from transact_pl.lightning_modules.transact_lm import TransActLM
from transact_pl.head_dim import (HeadDimStats, add_head_dim, collect_head_dim_stats, head_dim_problems,
                                  serving_sizes_problems)
from transact_pl.plan import PruningPlan
from transact_pl.pruning import SCORERS, compute_scores, plan_shot, scorer_needs_data
from transact_pl.reconstruction import (DEFAULT_DAMPING, RECONSTRUCTIONS, SecondMoments, collect_second_moments,
                                        load_refit, refit_weights)
from transact_pl.scoring import ChannelScores, acts_scores
from transact_pl.sequential_reconstruction import sequential_refit
from transact_pl.schedule import (resolve_attention_target, resolve_mlp_target, serving_shot_widths, shot_steps,
                                  shot_steps_problems)



class ShotEvents:
    """What a callback hears from ``TransActPruning`` (every rank, in this order); each does nothing by default."""

    def before_shot(self, trainer: L.Trainer, pl_module: L.LightningModule, shot: int) -> None:
        """Shot ``shot`` (1-based) is about to calibrate; the model has its widths before the shot."""

    def after_shot(self, trainer: L.Trainer, pl_module: L.LightningModule, shot: int) -> None:
        """Shot ``shot`` has shrunk the model (``pl_module.plans[-1]`` is its plan) and rebuilt the optimizer."""

    def pruning_end(self, trainer: L.Trainer, pl_module: L.LightningModule, trained_after_last_shot: bool) -> None:
        """Every shot has run and training is over; ``trained_after_last_shot``: the model trained since the last shot."""


class TransActPruning(Callback, StartupChecks):
    def __init__(
        self,
        target_attention: int | float = 0.67,
        target_mlp: int | float = 0.5,
        num_shots: int = 2,
        first_shot_step: int = 0,
        steps_between_shots: int = 20,
        shot_steps: list[int] | None = None,
        scorer: str = "acts",
        seed: int = 0,
        head_dim_target: int | None = None,
        reconstruction: str | None = None,
        damping: float = DEFAULT_DAMPING,
        serving_head_dims: int | list[int] | None = None,
        budget_params: int | float | str | None = None,
        budget_non_embedding_params: int | float | str | None = None,
        budget_kv_bytes: int | float | str | None = None,
    ) -> None:
        """Iterative TransAct pruning inside one ``fit``.

        Shot i (1-based) runs before training step ``first_shot_step + (i-1) · steps_between_shots``
        (a shot at ``trainer.max_steps`` runs after the last step). Each shot runs the calibration
        set (``datamodule.calibration_dataloader()``) through the current model, scores, keeps the
        best KV groups and MLP channels of every layer, shrinks the model and rebuilds the optimizer
        and LR scheduler (state of the kept parameters carried over).

        Args:
            target_attention: final attention width per layer (heads · head_dim): an int width that is a whole
                number of KV groups, or a float fraction in (0, 1] of the dense width, rounded to whole groups half
                up (0.5 of 5 groups is 3).
            target_mlp: final MLP intermediate width per layer: an int width, or a float fraction in (0, 1] (rounded
                half up).
            num_shots: k, the number of prune → recover shots (1 = one-shot).
            first_shot_step: global step of the first shot.
            steps_between_shots: training steps between two shots.
            shot_steps: the global step of every shot, one per shot, instead of the two options above (e.g.
                ``[0, 8, 20]`` gives later recoveries more tokens, as the reference does).
            scorer: acts (TransAct: transitional activations), taylor (|Σgrad ⊙ W|), taylor_abs (Σ|grad ⊙ W|, the
                reference's), magnitude (|W|) or random; the registry is ``transact_pl.pruning.SCORERS``.
            seed: seed of the random scorer.
            head_dim_target: also shrink every head to this many channels (even; None keeps head_dim), moving
                linearly over the shots: q/k keep one progression of rotary pairs so RoPE stays exact, v/o the
                value channels with the largest activations (see transact_pl/head_dim.py; default, linear and
                llama3 RoPE; not Qwen3). ``target_attention`` then counts heads at the dense head_dim.
            reconstruction: after each selection, refit o_proj and down_proj by least squares on the calibration
                set so every layer's output moves as little as possible (stock shapes; see
                transact_pl/reconstruction.py): ``dense`` fits each layer to the unpruned model's inputs (one pass,
                shared with the ``acts`` statistics), ``sequential`` layer by layer on the pruned model's own inputs
                (about two more passes); None only slices. Recorded in each plan.
            damping: the refit's ridge λ as a fraction of the mean kept diagonal of the second moments (>= 0).
            serving_head_dims: with ``head_dim_target``, keep every head_dim on sizes GPU servers' fast attention
                kernels take: an even step (16, 32: its multiples) or a list of sizes ([64, 128]); head_dim_target is
                rounded to the nearest (halfway: the larger) and each shot's head_dim to the nearest between the
                target and the current one (see transact_pl.head_dim.SERVING_KERNELS; a budget explores these sizes).
            budget_params: choose the widths by a budget of total parameters instead of ``target_attention`` and
                ``target_mlp``: a count (60000000, "60M", "1.2B") or a fraction in (0, 1] of the dense model. At the
                start of the fit every number of KV groups (× head_dim from ``head_dim_target`` up to the dense one, on
                ``serving_head_dims`` sizes) with the widest MLP that fits is scored by one-shot ``acts`` selection on
                the calibration set (calibration loss); the best becomes the targets (see transact_pl/budget.py).
            budget_non_embedding_params: the same for non-embedding parameters.
            budget_kv_bytes: the same for KV-cache bytes per token (16-bit); it chooses KV groups (and head_dim), the
                MLP keeps ``target_mlp`` unless a parameter budget is also given. Budgets combine: all must be met.
        """
        self.target_attention_option = target_attention
        self.target_mlp_option = target_mlp
        self.num_shots = num_shots
        self.first_shot_step = first_shot_step
        self.steps_between_shots = steps_between_shots
        self.shot_steps = shot_steps
        self.scorer = scorer
        self.seed = seed
        self.head_dim_target = head_dim_target
        self.reconstruction = reconstruction
        self.damping = damping
        self.serving_head_dims = serving_head_dims
        self.budgets = {"params": budget_params, "non_embedding_params": budget_non_embedding_params,
                        "kv_bytes": budget_kv_bytes}
        self.dense_head_dim = 0
        self.target_attention = 0
        self.target_mlp = 0
        self.target_head_dim = head_dim_target  # head_dim_target rounded to a serving size, or a budget's choice
        self.allowed_head_dims: list[int] | None = None
        self.budget_widths: Widths | None = None  # a budget's choice, kept in checkpoints for resumes

    # ----- validation ----------------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """The global step before which each shot runs."""
        return shot_steps(self.num_shots, self.first_shot_step, self.steps_between_shots, self.shot_steps)

    def shot_step(self, shot: int) -> int:
        """Global step before which shot ``shot`` (1-based) runs."""
        return self.steps()[shot - 1]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(pl_module, TransActLM) and not self._schedule_problems(trainer):
            pl_module.shot_steps = self.steps()  # where a per-shot learning-rate schedule restarts

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dense = pl_module.plans[0].before if pl_module.plans else model_widths(pl_module.model)
        problems = self.config_problems(trainer, dense, pl_module.model.config)
        self.dense_head_dim = dense.head_dim
        if not problems:
            self._resolve_targets(trainer, pl_module, dense)
            problems = self._resume_problems(pl_module.plans, dense)
        if problems:
            raise ConfigError("; ".join(problems))
        warn_at_start(self.budgets, self._targets_given(), self.head_dim_target, self.serving_head_dims,
                      pruned_head_dims(dense.head_dim, self.target_head_dim, self.num_shots, self.allowed_head_dims))

    def _resolve_targets(self, trainer: L.Trainer, pl_module: L.LightningModule, dense: Widths) -> None:
        """The widths the shots move towards: the target options (head_dim on a serving size), or a budget's choice."""
        self.target_attention = resolve_attention_target(self.target_attention_option, dense, "")[0]
        self.target_mlp = resolve_mlp_target(self.target_mlp_option, dense, "")[0]
        self.target_head_dim, self.allowed_head_dims = serving_head_dim(self.head_dim_target, self.serving_head_dims,
                                                                        dense.head_dim)
        if has_budget(self.budgets):
            self.budget_widths = budget_widths(trainer, pl_module, dense, self.budgets, self.budget_widths,
                                               self.target_mlp, self.target_head_dim, self.allowed_head_dims)
            targets = budget_targets(self.budget_widths, dense)
            self.target_attention, self.target_mlp = targets["target_attention"], targets["target_mlp"]
            self.target_head_dim = targets["head_dim_target"]

    def _targets_given(self) -> list[str]:
        """The target options given a value other than their default (a budget replaces them: a warning)."""
        defaults = inspect.signature(TransActPruning.__init__).parameters
        return [name for name in ("target_attention", "target_mlp")
                if getattr(self, f"{name}_option") != defaults[name].default]

    def config_problems(self, trainer: L.Trainer, dense: Widths | None, model_config=None) -> list[str]:
        """Problems of the schedule and, given the dense widths, of the targets (also checked at CLI startup)."""
        problems = self._schedule_problems(trainer)
        if dense is not None and self.head_dim_target is not None:
            problems += head_dim_problems(self.head_dim_target, dense.head_dim, model_config)
        if dense is not None and self.serving_head_dims is not None:
            problems += serving_sizes_problems(self.serving_head_dims, dense.head_dim)
        problems += budget_problems(self.budgets)
        if dense is not None:
            for resolve, value, option in ((resolve_attention_target, self.target_attention_option, "--pruning.target_attention"),
                                           (resolve_mlp_target, self.target_mlp_option, "--pruning.target_mlp")):
                problem = resolve(value, dense, option)[1]
                problems += [problem] if problem else []
        return problems

    def _resume_problems(self, plans: list, dense: Widths) -> list[str]:
        """Plans replayed from a checkpoint that this configuration would not have made."""
        if len(plans) > self.num_shots:
            return [f"the checkpoint holds {len(plans)} pruning shots but `--pruning.num_shots={self.num_shots}`; "
                    "resume with the pruning options the checkpoint was written with (config.yaml of its run)"]
        widths = dense
        for plan in plans:
            expected = self._widths_after(widths, plan.shot)
            if (plan.after, plan.scorer, plan.reconstruction) != (expected, self.scorer, self.reconstruction):
                return [f"the checkpoint's shot {plan.shot} ({plan.scorer}, reconstruction {plan.reconstruction}) pruned "
                        f"to {describe(plan.after)} but this config's shot {plan.shot} ({self.scorer}, reconstruction "
                        f"{self.reconstruction}) prunes to {describe(expected)}; resume with the pruning options the "
                        "checkpoint was written with (config.yaml of its run)"]
            widths = plan.after
        return []

    def _widths_after(self, current: Widths, shot: int) -> Widths:
        """Whole KV groups and MLP channels by the schedule (in dense head_dim units); head_dim towards its target."""
        return serving_shot_widths(current, self.dense_head_dim, self.target_attention, self.target_mlp,
                                   self.target_head_dim, shot, self.num_shots, self.allowed_head_dims)

    def _schedule_problems(self, trainer: L.Trainer) -> list[str]:
        problems = []
        if self.scorer not in SCORERS:
            problems.append(f"`--pruning.scorer={self.scorer}` is unknown; choose one of {', '.join(SCORERS)}")
        if self.reconstruction is not None and self.reconstruction not in RECONSTRUCTIONS:
            problems.append(f"`--pruning.reconstruction={self.reconstruction}` is unknown; choose one of "
                            f"{', '.join(RECONSTRUCTIONS)} or null")
        if not self.damping >= 0:
            problems.append(f"`--pruning.damping={self.damping}` must be >= 0")
        if self.reconstruction == "sequential" and self.head_dim_target is not None:
            problems.append("`--pruning.reconstruction=sequential` cannot follow `--pruning.head_dim_target` (its rotary "
                            "frequencies are refitted, which the layer-by-layer pass cannot emulate); use reconstruction=dense")
        if self.num_shots < 1:
            problems.append(f"`--pruning.num_shots={self.num_shots}` must be at least 1")
        if trainer.max_steps < 0:
            return problems + ["set `--trainer.max_steps` (training is counted in steps; the shots are scheduled by step)"]
        if self.shot_steps is not None:
            return problems + shot_steps_problems(self.shot_steps, self.num_shots, trainer.max_steps, "--pruning.shot_steps")
        if self.first_shot_step < 0 or self.steps_between_shots < 0:
            problems.append("`--pruning.first_shot_step` and `steps_between_shots` must be >= 0")
        last = self.first_shot_step + (self.num_shots - 1) * self.steps_between_shots
        if self.num_shots >= 1 and last > trainer.max_steps:
            problems.append(
                f"the schedule's last shot is at step {last} but `--trainer.max_steps={trainer.max_steps}`; raise max_steps "
                f"or lower `--pruning.num_shots`/`steps_between_shots`"
            )
        return problems

    # ----- a budget's choice, kept in checkpoints for resumes ---------------------------------------------------------
    def state_dict(self) -> dict:
        return {"budget_widths": asdict(self.budget_widths)} if self.budget_widths is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if "budget_widths" in state_dict:
            self.budget_widths = Widths(**state_dict["budget_widths"])

    # ----- the schedule ----------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self._run_due_shots(trainer, pl_module, rebuild_optimizer=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run_due_shots(trainer, pl_module, rebuild_optimizer=False)
        self._finish(trainer, pl_module, trained_after_last_shot=trainer.global_step > self.shot_step(self.num_shots))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # With max_steps reached before training starts (e.g. a prune-only run, max_steps=0) no train hook fires.
        if len(pl_module.plans) < self.num_shots:
            self._run_due_shots(trainer, pl_module, rebuild_optimizer=False)
            self._finish(trainer, pl_module, trained_after_last_shot=False)

    def _run_due_shots(self, trainer: L.Trainer, pl_module: L.LightningModule, rebuild_optimizer: bool) -> None:
        while len(pl_module.plans) < self.num_shots and self.shot_step(len(pl_module.plans) + 1) <= trainer.global_step:
            self._shot(trainer, pl_module, len(pl_module.plans) + 1, rebuild_optimizer)

    def _shot(self, trainer: L.Trainer, pl_module: L.LightningModule, shot: int, rebuild_optimizer: bool) -> None:
        for listener in shot_listeners(trainer):
            listener.before_shot(trainer, pl_module, shot)
        model = pl_module.model
        after = self._widths_after(model_widths(model), shot)
        scores, moments = self._scores(trainer, pl_module, shot)
        plan = plan_shot(model, scores, after, shot, self.scorer)
        if after.head_dim != plan.before.head_dim:
            plan = add_head_dim(plan, self._head_dim_stats(trainer, pl_module, shot), model.config.rope_parameters)
        if self.reconstruction is not None:
            plan = replace(plan, reconstruction=self.reconstruction, damping=self.damping)
        refits = self._refits(trainer, pl_module, plan, moments)
        pl_module.shrink(plan, rebuild_optimizer)
        if refits:
            load_refit(pl_module.model, refits)
        self._write_shot(trainer, plan, scores)
        for listener in shot_listeners(trainer):
            listener.after_shot(trainer, pl_module, shot)

    def _scores(self, trainer: L.Trainer, pl_module: L.LightningModule, shot: int) -> tuple[ChannelScores, SecondMoments | None]:
        """The channel scores, and the second moments that ``dense`` reconstruction needs (one pass for both with acts)."""
        moments = None
        if self.reconstruction == "dense":
            share, total = calibration_share(trainer, pl_module)
            with progress_task(trainer, f"shot {shot}: calibrating (second moments)", total) as advance:
                moments = collect_second_moments(pl_module.model, share, storage_device="cpu", on_batch=advance)
            moments.all_reduce(sum_over_processes)
            if self.scorer == "acts":  # diag G is the acts statistic, bit for bit
                return acts_scores(moments.activation_stats()), moments
        if not scorer_needs_data(self.scorer):
            return compute_scores(pl_module.model, self.scorer, [], self.seed + shot), moments
        share, total = calibration_share(trainer, pl_module)
        with progress_task(trainer, f"shot {shot}: calibrating ({self.scorer})", total) as advance:
            return compute_scores(pl_module.model, self.scorer, share, self.seed + shot, advance, sum_over_processes), moments

    def _refits(self, trainer: L.Trainer, pl_module: L.LightningModule, plan: PruningPlan,
                moments: SecondMoments | None) -> dict[str, torch.Tensor]:
        """{parameter name: least-squares refitted post-shot weight} of o_proj/down_proj (empty without reconstruction)."""
        if self.reconstruction == "dense":
            return refit_weights(pl_module.model, plan, moments, self.damping)
        if self.reconstruction == "sequential":
            share, total = calibration_share(trainer, pl_module)
            layers = len(plan.layers)
            with progress_task(trainer, f"shot {plan.shot}: reconstructing layer by layer", 3 * layers * total) as advance:
                return sequential_refit(pl_module.model, plan, share, self.damping, sum_over_processes, on_batch=advance)
        return {}

    def _head_dim_stats(self, trainer: L.Trainer, pl_module: L.LightningModule, shot: int) -> HeadDimStats:
        """q/k outputs and o_proj inputs over this process's share of the calibration set, summed over processes."""
        share, total = calibration_share(trainer, pl_module)
        with progress_task(trainer, f"shot {shot}: calibrating (head_dim)", total) as advance:
            stats = collect_head_dim_stats(pl_module.model, share, advance)
        stats.all_reduce(sum_over_processes)
        return stats

    def _write_shot(self, trainer: L.Trainer, plan, scores) -> None:
        """plans/shot_<i>.json (kept indices) and scores/shot_<i>.pt (channel scores per layer) in the run dir."""
        if trainer.is_global_zero:
            directory = run_dir(trainer)
            (directory / "plans").mkdir(parents=True, exist_ok=True)
            (directory / "plans" / f"shot_{plan.shot}.json").write_text(plan.to_json())
            (directory / "scores").mkdir(parents=True, exist_ok=True)
            torch.save(
                {"scorer": plan.scorer, "attention": [s.cpu() for s in scores.attention], "mlp": [s.cpu() for s in scores.mlp]},
                directory / "scores" / f"shot_{plan.shot}.pt",
            )

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, trained_after_last_shot: bool) -> None:
        for listener in shot_listeners(trainer):
            listener.pruning_end(trainer, pl_module, trained_after_last_shot)


def shot_listeners(trainer: L.Trainer) -> list[ShotEvents]:
    return [callback for callback in trainer.callbacks if isinstance(callback, ShotEvents)]


def describe(widths: Widths) -> str:
    """'6 heads (2 KV) × 64, MLP 768'."""
    return f"{widths.num_heads} heads ({widths.num_kv_heads} KV) × {widths.head_dim}, MLP {widths.intermediate_size}"


def calibration_share(trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Iterator, int]:
    """This process's calibration batches (rank r runs batches r, r + W, ...) and how many there are.

    The statistics are then summed over processes, so every rank computes the plan one process would.
    """
    loader = trainer.datamodule.calibration_dataloader()
    if is_sharded(pl_module.model) and len(loader) % trainer.world_size:
        # Every FSDP2 forward is a collective: ranks must run the same number of batches.
        raise ConfigError(f"under FSDP2 the {len(loader)} calibration batches must be a multiple of the "
                          f"{trainer.world_size} processes; change --data.num_calibration_samples or --data.eval_batch_size")
    share = rank_share(loader, trainer.global_rank, trainer.world_size)
    return share, len(range(trainer.global_rank, len(loader), trainer.world_size))
