"""TransActPruning: calibrate → score → plan → shrink → rebuild the optimizer, at scheduled steps of one fit."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.nn.parallel import DistributedDataParallel

from callbacks.progress import progress_task
from datamodules.text import load_documents
from transact_pl.arch import Widths, model_widths
from transact_pl.distributed import carry_over_sharded_state, is_sharded, rank_share, sum_over_processes
from transact_pl.errors import ConfigError
from transact_pl.eval_suite import DEFAULT_PROMPTS, evaluate_heldout, heldout_protocol
from transact_pl.evaluation import kv_cache_bytes_per_token, parameter_counts, perplexity
from transact_pl.head_dim import HeadDimStats, add_head_dim, collect_head_dim_stats, head_dim_problems
from transact_pl.optim_state import carry_over_state
from transact_pl.pruning import compute_scores, plan_shot, scorer_needs_data
from transact_pl.infra.report import print_summary
from transact_pl.schedule import resolve_attention_target, resolve_mlp_target, shot_widths
from transact_pl.scoring import SCORERS


class TransActPruning(Callback):
    def __init__(
        self,
        target_attention: int | float = 0.67,
        target_mlp: int | float = 0.5,
        num_shots: int = 2,
        first_shot_step: int = 0,
        steps_between_shots: int = 20,
        scorer: str = "acts",
        seed: int = 0,
        evaluate: bool = True,
        head_dim_target: int | None = None,
        extra_eval: tuple[str, ...] = (),
        extra_eval_blocks: int | None = None,
        sample_new_tokens: int = 0,
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
            scorer: acts (TransAct: transitional activations), taylor (|Σgrad ⊙ W|), magnitude (|W|) or random.
            seed: seed of the random scorer.
            evaluate: measure validation and test perplexity before the first shot, after every shot and at
                the end, for the summary table (costs forward passes over those splits).
            head_dim_target: also shrink every head to this many channels (even; None keeps head_dim), moving
                linearly over the shots: q/k keep one progression of rotary pairs so RoPE stays exact, v/o the
                value channels with the largest activations (see transact_pl/head_dim.py; default, linear and
                llama3 RoPE; not Qwen3). ``target_attention`` then counts heads at the dense head_dim.
            extra_eval: held-out texts on which the dense model (before shot 1) and the final model are compared,
                besides the data's test split: ``news``, ``shakespeare`` (embedded, not trained on) or any source
                ``--data.dataset`` accepts, every document of it packed like the test split. Perplexity follows the
                test protocol (independent blocks of ``--data.block_size`` tokens, no BOS, fp32 log-softmax,
                token-weighted mean NLL). Needs ``evaluate``.
            extra_eval_blocks: blocks scored per ``extra_eval`` text, its first ones (None: ``--data.max_test_blocks``,
                all blocks when that is None too).
            sample_new_tokens: greedy tokens the dense and the final model generate for each of the fixed prompts
                (``transact_pl.eval_suite.DEFAULT_PROMPTS``); 0 generates none. Needs ``evaluate``.
        """
        self.target_attention_option = target_attention
        self.target_mlp_option = target_mlp
        self.num_shots = num_shots
        self.first_shot_step = first_shot_step
        self.steps_between_shots = steps_between_shots
        self.scorer = scorer
        self.seed = seed
        self.evaluate = evaluate
        self.head_dim_target = head_dim_target
        self.extra_eval = tuple(extra_eval)
        self.extra_eval_blocks = extra_eval_blocks
        self.sample_new_tokens = sample_new_tokens
        if not evaluate and (self.extra_eval or sample_new_tokens):
            warnings.warn("`--pruning.extra_eval` and `--pruning.sample_new_tokens` have no effect with "
                          "`--pruning.evaluate=false`", stacklevel=2)
        self.dense_head_dim = 0
        self.rows: list[dict] = []
        # {"protocol": ..., "dense": evaluate_heldout(...), "final": evaluate_heldout(...)}, see eval_suite
        self.heldout: dict[str, dict] = {}
        self._heldout_blocks: dict[str, torch.Tensor] = {}
        self.target_attention = 0
        self.target_mlp = 0

    # ----- validation ----------------------------------------------------------------------------------------
    def shot_step(self, shot: int) -> int:
        """Global step before which shot ``shot`` (1-based) runs."""
        return self.first_shot_step + (shot - 1) * self.steps_between_shots

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dense = pl_module.plans[0].before if pl_module.plans else model_widths(pl_module.model)
        problems = self.config_problems(trainer, dense, pl_module.model.config)
        self.dense_head_dim = dense.head_dim
        if not problems:
            self.target_attention = resolve_attention_target(self.target_attention_option, dense, "")[0]
            self.target_mlp = resolve_mlp_target(self.target_mlp_option, dense, "")[0]
            problems = self._resume_problems(pl_module.plans, dense)
        if problems:
            raise ConfigError("; ".join(problems))
        if self.measures_heldout():
            self._prepare_heldout(trainer, pl_module)

    def config_problems(self, trainer: L.Trainer, dense: Widths | None, model_config=None) -> list[str]:
        """Problems of the schedule and, given the dense widths, of the targets (also checked at CLI startup)."""
        problems = self._schedule_problems(trainer) + self._heldout_problems()
        if dense is not None and self.head_dim_target is not None:
            problems += head_dim_problems(self.head_dim_target, dense.head_dim, model_config)
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
            if (plan.after, plan.scorer) != (expected, self.scorer):
                return [f"the checkpoint's shot {plan.shot} ({plan.scorer}) pruned to {describe(plan.after)} but this "
                        f"config's shot {plan.shot} ({self.scorer}) prunes to {describe(expected)}; resume with the "
                        "pruning options the checkpoint was written with (config.yaml of its run)"]
            widths = plan.after
        return []

    def _widths_after(self, current: Widths, shot: int) -> Widths:
        """Whole KV groups and MLP channels by the schedule (in dense head_dim units); head_dim towards its target."""
        return shot_widths(current, self.dense_head_dim, self.target_attention, self.target_mlp, self.head_dim_target,
                           shot, self.num_shots)

    def _schedule_problems(self, trainer: L.Trainer) -> list[str]:
        problems = []
        if self.scorer not in SCORERS:
            problems.append(f"`--pruning.scorer={self.scorer}` is unknown; choose one of {', '.join(SCORERS)}")
        if self.num_shots < 1:
            problems.append(f"`--pruning.num_shots={self.num_shots}` must be at least 1")
        if self.first_shot_step < 0 or self.steps_between_shots < 0:
            problems.append("`--pruning.first_shot_step` and `steps_between_shots` must be >= 0")
        last = self.shot_step(self.num_shots)
        if trainer.max_steps < 0:
            problems.append("set `--trainer.max_steps` (training is counted in steps; the shots are scheduled by step)")
        elif self.num_shots >= 1 and last > trainer.max_steps:
            problems.append(
                f"the schedule's last shot is at step {last} but `--trainer.max_steps={trainer.max_steps}`; raise max_steps "
                f"or lower `--pruning.num_shots`/`steps_between_shots`"
            )
        return problems

    def _heldout_problems(self) -> list[str]:
        """Unreadable ``extra_eval`` texts and out-of-range counts."""
        problems = []
        for name in self.extra_eval:
            try:
                load_documents(name, "--pruning.extra_eval")
            except ConfigError as error:
                problems.append(str(error))
        if self.extra_eval_blocks is not None and self.extra_eval_blocks < 1:
            problems.append(f"`--pruning.extra_eval_blocks={self.extra_eval_blocks}` must be at least 1 (or null)")
        if self.sample_new_tokens < 0:
            problems.append(f"`--pruning.sample_new_tokens={self.sample_new_tokens}` must be at least 0")
        return problems

    # ----- the schedule ----------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self._run_due_shots(trainer, pl_module, rebuild_optimizer=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run_due_shots(trainer, pl_module, rebuild_optimizer=False)
        if self.evaluate and trainer.global_step > self.shot_step(self.num_shots):
            self._record(trainer, pl_module, f"final (step {trainer.global_step})")
        self._finish(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # With max_steps reached before training starts (e.g. a prune-only run, max_steps=0) no train hook fires.
        if len(pl_module.plans) < self.num_shots:
            self._run_due_shots(trainer, pl_module, rebuild_optimizer=False)
            self._finish(trainer, pl_module)

    def _run_due_shots(self, trainer: L.Trainer, pl_module: L.LightningModule, rebuild_optimizer: bool) -> None:
        while len(pl_module.plans) < self.num_shots and self.shot_step(len(pl_module.plans) + 1) <= trainer.global_step:
            self._shot(trainer, pl_module, len(pl_module.plans) + 1, rebuild_optimizer)

    def _shot(self, trainer: L.Trainer, pl_module: L.LightningModule, shot: int, rebuild_optimizer: bool) -> None:
        if self.evaluate:
            label = "dense" if shot == 1 and trainer.global_step == 0 else f"shot {shot - 1} recovered"
            self._record(trainer, pl_module, f"{label} (step {trainer.global_step})")
            if shot == 1:
                self._record_heldout(trainer, pl_module, "dense", self.rows[-1]["stage"])
        model = pl_module.model
        after = self._widths_after(model_widths(model), shot)
        scores = self._scores(trainer, pl_module, shot)
        plan = plan_shot(model, scores, after, shot, self.scorer)
        if after.head_dim != plan.before.head_dim:
            plan = add_head_dim(plan, self._head_dim_stats(trainer, pl_module, shot), model.config.rope_parameters)
        old_optimizers = list(trainer.optimizers)
        old_schedulers = [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs]
        slices = pl_module.apply_plan(plan)
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            # DDP registered the old Parameters in its buckets: wrap the shrunk module anew.
            trainer.strategy.model = trainer.strategy._setup_model(trainer.strategy.model.module)
        if rebuild_optimizer:
            # Surgery made new Parameters: build optimizers/schedulers anew so none holds a dead one.
            trainer.strategy.setup_optimizers(trainer)
            for old, new in zip(old_optimizers, trainer.optimizers):
                if isinstance(slices, dict):  # FSDP2: state moves through full, name-keyed state dicts
                    carry_over_sharded_state(model, old, pl_module.model, new, slices)
                else:
                    carry_over_state(old, new, slices)
            for config, state in zip(trainer.lr_scheduler_configs, old_schedulers):
                config.scheduler.load_state_dict(state)
        self._write_shot(trainer, plan, scores)
        if self.evaluate:
            self._record(trainer, pl_module, f"shot {shot} pruned (step {trainer.global_step})")

    def _scores(self, trainer: L.Trainer, pl_module: L.LightningModule, shot: int):
        if not scorer_needs_data(self.scorer):
            return compute_scores(pl_module.model, self.scorer, [], self.seed + shot)
        share, total = calibration_share(trainer, pl_module)
        with progress_task(trainer, f"shot {shot}: calibrating ({self.scorer})", total) as advance:
            return compute_scores(pl_module.model, self.scorer, share, self.seed + shot, advance, sum_over_processes)

    def _head_dim_stats(self, trainer: L.Trainer, pl_module: L.LightningModule, shot: int) -> HeadDimStats:
        """q/k outputs and o_proj inputs over this process's share of the calibration set, summed over processes."""
        share, total = calibration_share(trainer, pl_module)
        with progress_task(trainer, f"shot {shot}: calibrating (head_dim)", total) as advance:
            stats = collect_head_dim_stats(pl_module.model, share, advance)
        stats.all_reduce(sum_over_processes)
        return stats

    # ----- reporting -------------------------------------------------------------------------------------------
    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        model = pl_module.model
        widths: Widths = model_widths(model)
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
        self.rows.append(row)

    def measures_heldout(self) -> bool:
        """Whether the dense and final models are compared on ``extra_eval`` texts or samples."""
        return self.evaluate and (bool(self.extra_eval) or self.sample_new_tokens > 0)

    def heldout_report(self) -> dict | None:
        """The dense-vs-final record (see ``__init__``) once a stage is measured, else None."""
        return self.heldout if {"dense", "final"} & self.heldout.keys() else None

    def _prepare_heldout(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Pack the ``extra_eval`` texts once (every rank) and note the protocol."""
        datamodule = trainer.datamodule
        self._heldout_blocks = datamodule.extra_eval_blocks(list(self.extra_eval), "--pruning.extra_eval",
                                                            self.extra_eval_blocks)
        cap = self.extra_eval_blocks if self.extra_eval_blocks is not None else datamodule.max_test_blocks
        dtype = next(pl_module.model.parameters()).dtype
        self.heldout["protocol"] = heldout_protocol(datamodule.block_size, cap, dtype, DEFAULT_PROMPTS,
                                                    self.sample_new_tokens)

    def _record_heldout(self, trainer: L.Trainer, pl_module: L.LightningModule, key: str, stage: str) -> None:
        """Held-out perplexities and greedy samples of the current model as ``self.heldout[key]``.

        Every rank does the same work (a sharded model's forwards are collectives); rank 0 reports it.
        """
        if not self.measures_heldout():
            return
        model = pl_module.model
        batch_size = trainer.datamodule.eval_batch_size
        total = sum(math.ceil(blocks.shape[0] / batch_size) for blocks in self._heldout_blocks.values())
        with progress_task(trainer, f"{stage}: held-out texts and samples", total) as advance:
            self.heldout[key] = evaluate_heldout(
                model, trainer.datamodule.tokenizer, self._heldout_blocks, batch_size, stage, DEFAULT_PROMPTS,
                self.sample_new_tokens, synced_gpus=is_sharded(model) and trainer.world_size > 1, on_batch=advance)

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

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Measure the final model on the held-out texts, then (rank 0) write summary.json and print the tables."""
        stage = self.rows[-1]["stage"] if self.rows else f"end (step {trainer.global_step})"
        self._record_heldout(trainer, pl_module, "final", stage)
        if trainer.is_global_zero and self.rows:
            summary = {"stages": self.rows, "heldout": self.heldout_report()}
            (run_dir(trainer) / "summary.json").write_text(json.dumps(summary, indent=1))
            print_summary(self.rows, heldout=self.heldout_report(), vocab_size=pl_module.model.config.vocab_size)

    def state_dict(self) -> dict:
        return {"rows": self.rows, "heldout": self.heldout}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = list(state_dict["rows"])
        self.heldout = dict(state_dict.get("heldout", {}))  # absent in checkpoints written before held-out texts


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


def run_dir(trainer: L.Trainer) -> Path:
    """Where a run writes its plans and summary: the logger's directory, else default_root_dir."""
    # Not trainer.log_dir: that broadcasts (a collective), and this is called on rank 0 alone.
    log_dir = trainer.loggers[0].log_dir if trainer.loggers else None
    path = Path(log_dir or trainer.default_root_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path
