"""Budget targets: parameter and KV-cache budgets resolve to the widths with the best one-shot calibration loss.

Invariants: candidate costs equal those of the model really pruned to them; each candidate's MLP is the widest that
keeps the budget; the masked calibration loss equals the loss of the sliced model; an unreachable budget states the
closest reachable value; a real run meets its budget, writes the table, and a resume keeps the choice."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.transact_pruning import TransActPruning
from datamodules.text import TextDataModule
from tests.family_models import family_config, family_model, save_family_dir, write_corpus
from tests.tiny_models import random_batches
from transact_pl import budget
from transact_pl.arch import Widths, config_widths, model_widths
from transact_pl.budget import (Budget, budget_limit, budget_problem, calibration_loss, candidates_to_score, choose,
                                head_dim_choices, make_candidates, masked, meta_costs, one_shot_plan, parse_budgets,
                                score, statement)
from transact_pl.evaluation import kv_cache_bytes_per_token, parameter_counts
from transact_pl.head_dim import collect_head_dim_stats
from transact_pl.importance import collect_activation_stats
from transact_pl.lightning_modules.transact_lm import TransActLM
from transact_pl.scoring import acts_scores
from transact_pl.surgery import apply_plan


@pytest.mark.parametrize("value,dense,limit", [("60M", 0, 60_000_000), ("1.2B", 0, 1_200_000_000), ("7.5k", 0, 7500),
                                               (60_000_000, 0, 60_000_000), (0.5, 101, 50), ("0.25", 1000, 250),
                                               (1.0, 77, 77)])
def test_counts_units_and_fractions(value, dense: int, limit: int):
    assert budget_problem(value, "--pruning.budget_params") is None and budget_limit(value, dense) == limit


@pytest.mark.parametrize("value", ["60Q", "M", 0, -5, 1.5, "1.5", 0.0, True, "60 MB"])
def test_a_bad_budget_is_one_line_naming_the_option_and_the_fix(value):
    problem = budget_problem(value, "--pruning.budget_kv_bytes")
    assert problem.startswith(f"`--pruning.budget_kv_bytes={value}` is not a budget") and "60M" in problem
    callback = TransActPruning(num_shots=1, budget_kv_bytes=value)
    config = family_config("llama3")
    assert callback.config_problems(SimpleNamespace(max_steps=2), config_widths(config), config) == [problem]


def test_costs_equal_those_of_really_pruned_models_and_the_mlp_is_the_widest_that_fits():
    model = family_model("qwen2")  # q/k/v biases, tied embeddings
    dense = model_widths(model)
    cost_of = meta_costs(model.config)
    budgets = parse_budgets({"params": 0.8, "non_embedding_params": None, "kv_bytes": None}, cost_of(dense))
    candidates = make_candidates(dense, budgets, [dense.head_dim], dense.intermediate_size, cost_of)
    assert [c.widths.num_kv_heads for c in candidates] == [1, 2]
    scores = acts_scores(collect_activation_stats(model, random_batches()))
    for candidate in candidates:
        pruned = copy.deepcopy(model)
        apply_plan(pruned, one_shot_plan(scores, dense, candidate.widths, None, None))
        total, non_embedding = parameter_counts(pruned)
        assert (candidate.costs.params, candidate.costs.non_embedding_params, candidate.costs.kv_bytes) == (
            total, non_embedding, kv_cache_bytes_per_token(pruned))
        assert candidate.meets and candidate.costs.params <= budgets[0].limit
        wider = cost_of(replace(candidate.widths, intermediate_size=candidate.widths.intermediate_size + 1))
        assert candidate.widths.intermediate_size == dense.intermediate_size or wider.params > budgets[0].limit


@pytest.mark.parametrize("family,head_dims", [("llama3", [8]), ("llama3", [4, 6, 8]), ("qwen2", [8]), ("llama2", [4, 8])])
def test_the_masked_loss_is_the_loss_of_the_sliced_model(family: str, head_dims: list[int]):
    model = family_model(family)
    dense = model_widths(model)
    batches = random_batches()
    cost_of = meta_costs(model.config)
    budgets = [Budget("params", cost_of(dense).params * 3 // 4)]
    candidates = make_candidates(dense, budgets, head_dims, dense.intermediate_size, cost_of)
    scores = acts_scores(collect_activation_stats(model, batches))
    head_stats = collect_head_dim_stats(model, batches)
    dense_loss = calibration_loss(model, batches)
    for candidate in candidates:
        plan = one_shot_plan(scores, dense, candidate.widths, head_stats, model.config.rope_parameters)
        with masked(model, plan):
            masked_loss = calibration_loss(model, batches)
        sliced = copy.deepcopy(model)
        apply_plan(sliced, plan)
        assert masked_loss == pytest.approx(calibration_loss(sliced, batches), abs=2e-6), candidate.widths
        assert masked_loss != dense_loss  # the masks did something
    assert calibration_loss(model, batches) == dense_loss  # and left nothing behind


def test_score_fills_the_losses_of_the_candidates_asked_for_and_choose_takes_the_lowest():
    model = family_model("llama3")
    dense = model_widths(model)
    cost_of = meta_costs(model.config)
    budgets = [Budget("kv_bytes", cost_of(dense).kv_bytes)]
    candidates = make_candidates(dense, budgets, head_dim_choices(8, 4, [4, 6, 8]), 30, cost_of)
    indices = candidates_to_score(candidates, budgets)
    assert indices == list(range(len(candidates))) and {c.widths.intermediate_size for c in candidates} == {30}
    score(model, candidates, indices[:3], random_batches())
    losses = [c.calibration_loss for c in candidates]
    assert all(loss is not None for loss in losses[:3]) and all(loss is None for loss in losses[3:])
    assert choose(candidates, indices[:3]) == min(range(3), key=lambda index: losses[index])


def test_a_budget_no_candidate_meets_states_the_closest_reachable_value():
    model = family_model("llama3")  # 2 layers, 2 KV groups × 8: 128 KV bytes per token
    dense = model_widths(model)
    cost_of = meta_costs(model.config)
    budgets = parse_budgets({"params": None, "non_embedding_params": None, "kv_bytes": "10"}, cost_of(dense))
    candidates = make_candidates(dense, budgets, head_dim_choices(8, 4, None), 37, cost_of)
    assert not any(c.meets for c in candidates)
    closest = candidates_to_score(candidates, budgets)
    assert [candidates[i].widths for i in closest] == [Widths(2, 1, 4, 37)] and candidates[closest[0]].costs.kv_bytes == 32
    score(model, candidates, closest, random_batches())
    line = statement(candidates, choose(candidates, closest), budgets)
    assert line.startswith("no candidate meets the budget; the closest reachable is 2/1 heads × 4, MLP 37")
    assert "KV-cache bytes per token (16-bit) 32 > 10 (`--pruning.budget_kv_bytes`)" in line


def budget_run(tmp_path: Path, root: Path, ckpt_path: str | None = None, **budgets) -> tuple[TransActLM, TransActPruning]:
    """Tiny Llama 3, 2 shots at steps 0 and 2 of 4, a checkpoint after every step."""
    model_dir, corpus = tmp_path / "base", tmp_path / "corpus.jsonl"
    if not model_dir.exists():
        save_family_dir("llama3", model_dir)
        write_corpus(corpus)
    module = TransActLM(model=str(model_dir), learning_rate=1e-3, warmup_steps=0)
    data = TextDataModule(tokenizer=str(model_dir), dataset=str(corpus), block_size=16, batch_size=2, eval_batch_size=4,
                          num_calibration_samples=4, max_val_blocks=2, max_test_blocks=2, calibration="first")
    pruning = TransActPruning(num_shots=2, steps_between_shots=2, **budgets)
    trainer = L.Trainer(max_steps=4, callbacks=[pruning, ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1,
                                                                          save_top_k=-1)],
                        logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=root)
    L.seed_everything(0)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, pruning


def test_a_run_meets_its_budget_writes_the_table_and_a_resume_keeps_the_choice(tmp_path: Path, capsys, monkeypatch):
    with pytest.warns(UserWarning, match="`--pruning.target_mlp` have no effect with a budget"):
        module, pruning = budget_run(tmp_path, tmp_path / "run", budget_params=0.85, budget_kv_bytes="96", target_mlp=30)
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "run" / "budget.json").read_text())
    chosen = record["candidates"][record["chosen"]]
    final = module.plans[-1].after
    assert record["meets"] and Widths(**chosen["widths"]) == final == pruning.budget_widths
    total, _ = parameter_counts(module.model)
    assert total == chosen["costs"]["params"] <= record["budgets"][0]["value"] == int(0.85 * record["dense"]["costs"]["params"])
    assert kv_cache_bytes_per_token(module.model) <= 96 and final.num_kv_heads == 1
    assert "budget candidates" in printed and "◀" in printed and f"chosen {budget.describe(final)}: " in printed
    assert record["targets"] == {"target_attention": pruning.target_attention, "target_mlp": pruning.target_mlp,
                                 "head_dim_target": None}
    assert f"the run prunes towards --pruning.target_attention={pruning.target_attention} " in printed
    scored = [c for c in record["candidates"] if c["calibration_loss"] is not None]
    assert min(c["calibration_loss"] for c in scored) == chosen["calibration_loss"]

    monkeypatch.setattr("callbacks.budget_choice.score", lambda *args, **kwargs: pytest.fail("a resume scored again"))
    resumed, _ = budget_run(tmp_path, tmp_path / "resumed", str(tmp_path / "run" / "ckpt" / "epoch=0-step=1.ckpt"),
                            budget_params=0.85, budget_kv_bytes="96", target_mlp=30)
    assert [plan.after for plan in resumed.plans] == [plan.after for plan in module.plans]
    assert not (tmp_path / "resumed" / "budget.json").exists()
    for name, tensor in module.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor)


def test_bad_budget_and_serving_options_end_train_py_at_startup_in_one_line(tiny_cli_dir: Path, tmp_path: Path):
    from tests.family_models import run_cli

    result = run_cli(tmp_path, tiny_cli_dir / "tiny.yaml", f"--trainer.default_root_dir={tmp_path}/run",
                     "--pruning.budget_params=60Q", "--pruning.budget_kv_bytes=1.5", "--pruning.head_dim_target=4",
                     "--pruning.serving_head_dims=[4, 7]")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith("error: ")
    assert "`--pruning.budget_params=60Q` is not a budget" in lines[-1]
    assert "`--pruning.budget_kv_bytes=1.5` is not a budget" in lines[-1]
    assert "`--pruning.serving_head_dims=[4, 7]` must list even head sizes in 2..8" in lines[-1]
    assert not (tmp_path / "run").exists()  # found before any weights load or run directory is made
