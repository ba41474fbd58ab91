"""Head-dim pruning: exact RoPE for progressions of rotary pairs, approximate for arbitrary pairs (measured),
surgery invariants, plans that replay, and the whole pipeline with ``head_dim_target``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tests.family_models import family_model, fit, save_family_dir, write_corpus
from tests.tiny_models import random_batches
from transact_pl.arch import Widths, all_layer_parts, model_widths
from transact_pl.head_dim import (
    add_head_dim,
    best_progression,
    collect_head_dim_stats,
    exact_rope_parameters,
    fitted_rope_parameters,
    head_dim_problems,
    next_head_dim,
    progressions,
    rotary_channels,
)
from transact_pl.plan import LayerPlan, PruningPlan
from transact_pl.surgery import apply_plan

INPUT_IDS = torch.randint(0, 99, (2, 48), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def head_dim_plan(model, pairs: list[int], values: list[int], rope: dict) -> PruningPlan:
    """Keep every head and MLP channel; inside heads keep ``pairs`` (q/k) and ``values`` (v/o) everywhere."""
    widths = model_widths(model)
    after = Widths(widths.num_heads, widths.num_kv_heads, 2 * len(pairs), widths.intermediate_size)
    layers = [LayerPlan(list(range(widths.num_heads)), list(range(widths.num_kv_heads)), list(range(widths.intermediate_size)),
                        [pairs] * widths.num_kv_heads, [values] * widths.num_kv_heads) for _ in all_layer_parts(model)]
    return PruningPlan(1, "acts", widths, after, layers, rope)


def zeroed_copy(model, pairs: list[int], values: list[int]):
    """The reference: dropped q channels (rows and bias) and the o columns of dropped value channels set to 0,
    the original RoPE untouched — what keeping exactly those channels computes."""
    reference = copy.deepcopy(model)
    widths = model_widths(model)
    d = widths.head_dim
    dropped_qk = torch.tensor([c for c in range(d) if c not in set(rotary_channels(pairs, d).tolist())])
    dropped_v = torch.tensor([c for c in range(d) if c not in values])
    with torch.no_grad():
        for parts in all_layer_parts(reference):
            for head in range(widths.num_heads):
                parts.q_proj.weight[head * d + dropped_qk] = 0
                if parts.q_proj.bias is not None:
                    parts.q_proj.bias[head * d + dropped_qk] = 0
                parts.o_proj.weight[:, head * d + dropped_v] = 0
    return reference


PROGRESSIONS = [(0, 1, 2), (0, 2, 2), (1, 2, 2), (1, 1, 3)]  # (offset, stride, pairs) of the 4 pairs of head_dim 8


@pytest.mark.parametrize("family,offset,stride,num_pairs", [
    (family, *progression) for family in ("llama2", "llama3", "mistral", "qwen2") for progression in PROGRESSIONS
    if family != "llama3" or progression[0] == 0  # llama3 RoPE has no factor to shift frequencies: offset 0 only
])
def test_progression_of_pairs_keeps_rope_exact(family: str, offset: int, stride: int, num_pairs: int) -> None:
    model = family_model(family)
    rope = model.config.rope_parameters
    pairs = list(range(offset, offset + stride * num_pairs, stride))
    values = [0, 2, 3, 5, 6, 7][: 2 * num_pairs]
    reference = logits(zeroed_copy(model, pairs, values))
    apply_plan(model, head_dim_plan(model, pairs, values, exact_rope_parameters(rope, 8, 2 * num_pairs, offset, stride)))
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (2 * num_pairs * model.config.num_key_value_heads, 32)
    assert (logits(model) - reference).abs().max() <= 2e-6


def test_exact_rope_reproduces_the_kept_frequencies_at_every_position() -> None:
    for rope in ({"rope_type": "default", "rope_theta": 10000.0}, {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0},
                 {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}):
        dense = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=128, num_attention_heads=2, head_dim=64,
                                                             num_hidden_layers=1, vocab_size=11, rope_parameters=rope))
        for offset, stride in progressions(32, 8, rope["rope_type"] != "llama3"):
            pairs = torch.arange(offset, offset + 8 * stride, stride)
            config = copy.deepcopy(dense.config)
            config.head_dim, config.rope_parameters = 16, exact_rope_parameters(rope, 64, 16, offset, stride)
            pruned = type(dense.model.rotary_emb)(config=config)
            assert torch.allclose(pruned.inv_freq, dense.model.rotary_emb.inv_freq[pairs], rtol=2e-6, atol=0), (rope, offset, stride)


def test_arbitrary_pairs_are_only_approximated_and_the_error_is_measured() -> None:
    """Pairs (0, 1, 3) are no progression: the fitted RoPE turns them at other frequencies than the original."""
    model = family_model("llama2")
    with torch.no_grad():  # sharper attention, as in trained models, makes frequency errors visible
        for parts in all_layer_parts(model):
            parts.q_proj.weight.mul_(8)
    pairs, values = [0, 1, 3], [0, 1, 2, 4, 5, 7]
    reference = logits(zeroed_copy(model, pairs, values))
    rope = fitted_rope_parameters([pairs], model.config.rope_parameters, 8, 6)
    approximate = copy.deepcopy(model)
    apply_plan(approximate, head_dim_plan(approximate, pairs, values, rope))
    exact_pairs = [0, 1, 2]  # the same number of pairs as a progression
    exact_reference = logits(zeroed_copy(model, exact_pairs, values))
    apply_plan(model, head_dim_plan(model, exact_pairs, values, exact_rope_parameters(model.config.rope_parameters, 8, 6, 0, 1)))
    approximation_error = (logits(approximate) - reference).abs().max().item()
    exact_error = (logits(model) - exact_reference).abs().max().item()
    assert exact_error <= 2e-6 and approximation_error >= 1e-3, (exact_error, approximation_error)


def test_fitted_rope_is_exact_for_a_progression() -> None:
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    assert fitted_rope_parameters([[2, 4, 6]], rope, 16, 6) == pytest.approx(exact_rope_parameters(rope, 16, 6, 2, 2))


def test_best_progression_follows_the_pair_scores() -> None:
    scores = [torch.tensor([[0.0, 5.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0]])] * 2  # pairs 1 and 3 matter
    assert best_progression(scores, 2, offsets=True) == (1, 2)
    assert best_progression(scores, 2, offsets=False) == (0, 1)  # ties with (0, 3) go to the smaller stride
    assert progressions(4, 2, offsets=False) == [(0, 1), (0, 2), (0, 3)]


def test_head_dim_plan_replays_from_json_on_a_fresh_model() -> None:
    model = family_model("qwen2")
    widths = model_widths(model)
    stats = collect_head_dim_stats(model, random_batches())
    plan = PruningPlan(1, "acts", widths, Widths(2, 1, 4, 37), [
        LayerPlan([2, 3], [1], list(range(37))) for _ in all_layer_parts(model)])
    plan = add_head_dim(plan, stats, model.config.rope_parameters)
    assert all(len(layer.kept_qk_pairs[0]) == 2 and len(layer.kept_v_channels[0]) == 4 for layer in plan.layers)
    apply_plan(model, plan)
    replayed = family_model("qwen2")
    apply_plan(replayed, PruningPlan.from_json(plan.to_json()))
    assert torch.equal(logits(model), logits(replayed))
    assert replayed.config.head_dim == 4 and replayed.config.rope_parameters == plan.rope_parameters


def test_problems_name_the_option() -> None:
    llama = family_model("llama3").config
    assert head_dim_problems(8, 8, llama) == []
    assert "`--pruning.head_dim_target=5` must be an even number in 2..8" in head_dim_problems(5, 8, llama)[0]
    assert "not supported for qwen3" in head_dim_problems(4, 8, family_model("qwen3").config)[0]
    yarn = copy.deepcopy(llama)
    yarn.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    assert "rope_type 'yarn'" in head_dim_problems(4, 8, yarn)[0]
    assert [next_head_dim(64, 32, shot, 2) for shot in (1, 2)] == [48, 32] and next_head_dim(64, 33, 1, 1) == 34


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_pipeline_with_head_dim_target_trains_resumes_and_exports_exactly(family: str, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSACT_PL_CACHE", str(tmp_path / "cache"))
    model_dir = save_family_dir(family, tmp_path / "base")
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    module = fit(str(model_dir), str(corpus), tmp_path / "run", (16, 19), head_dim_target=4)
    assert [plan.after.head_dim for plan in module.plans] == [6, 4]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export").eval()
    config = json.loads((tmp_path / "run" / "export" / "config.json").read_text())
    assert config["head_dim"] == 4 and reloaded.model.layers[0].self_attn.q_proj.weight.shape == (8, 32)
    module.model.eval()
    assert (logits(reloaded) - logits(module.model)).abs().max() <= 1e-5
    resumed = fit(str(model_dir), str(corpus), tmp_path / "resumed", (16, 19), head_dim_target=4,
                  ckpt_path=str(tmp_path / "run" / "checkpoints" / "epoch=0-step=1.ckpt"))
    assert torch.equal(logits(resumed.model.eval()), logits(module.model))
