import math

import pytest
import torch

from tests.tiny_models import random_batches, tiny_llama
from transact_pl.arch import all_layer_parts, model_widths
from transact_pl.importance import ActivationStats, collect_activation_stats, collect_gradient_stats
from transact_pl.plan import make_plan, top_indices
from transact_pl.pruning import compute_scores
from transact_pl.pruning import SCORERS
from transact_pl.scoring import acts_scores, group_scores, head_scores, taylor_scores


def test_head_score_matches_hand_computation():
    channels = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.5, 0.5, 4.0, 1.0])  # 2 heads of head_dim 4
    expected = torch.tensor([(1 + 3 + 2 + 2) / 4 + 10 / 4 * 3, (0.5 + 0.5 + 4 + 1) / 4 + 10 / 4 * 4])
    assert torch.allclose(head_scores(channels, head_dim=4), expected)


def test_group_score_sums_its_query_heads():
    assert group_scores(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), group_size=3).tolist() == [6.0, 15.0]


def test_acts_score_is_l2_norm_of_activations():
    stats = ActivationStats([torch.tensor([9.0, 16.0])], [torch.tensor([4.0, 0.0, 1.0])], num_tokens=3)
    scores = acts_scores(stats)
    assert scores.attention[0].tolist() == [3.0, 4.0]
    assert scores.mlp[0].tolist() == [2.0, 0.0, 1.0]


def test_collected_sums_equal_manual_forward_capture():
    model = tiny_llama()
    batches = random_batches()
    captured = {"o": torch.zeros(32), "down": torch.zeros(37)}
    parts = all_layer_parts(model)[1]
    hooks = [
        parts.o_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("o", captured["o"] + a[0].reshape(-1, 32).pow(2).sum(0))),
        parts.down_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("down", captured["down"] + a[0].reshape(-1, 37).pow(2).sum(0))),
    ]
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"])
    for hook in hooks:
        hook.remove()
    stats = collect_activation_stats(model, batches)
    assert stats.num_tokens == 2 * 3 * 11
    assert torch.allclose(stats.attention_sum_sq[1].float(), captured["o"], rtol=1e-5)
    assert torch.allclose(stats.mlp_sum_sq[1].float(), captured["down"], rtol=1e-5)


def test_mlp_activation_is_act_gate_times_up():
    model = tiny_llama()
    batch = random_batches(num_batches=1)
    stats = collect_activation_stats(model, batch)
    parts = all_layer_parts(model)[0]
    layer = model.model.layers[0]
    with torch.no_grad():
        captured = {}
        handle = layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: captured.setdefault("x", out))
        model(input_ids=batch[0]["input_ids"])
        handle.remove()
        x = captured["x"]
        transitional = torch.nn.functional.silu(parts.gate_proj(x)) * parts.up_proj(x)
    assert torch.allclose(stats.mlp_sum_sq[0].float(), transitional.pow(2).sum(dim=(0, 1)), rtol=1e-5)


def test_plan_keeps_top_groups_and_channels_ascending():
    model = tiny_llama()
    scores = compute_scores(model, "acts", random_batches(), seed=0)
    before = model_widths(model)
    after = type(before)(num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=20)
    plan = make_plan(scores, before, after, shot=1, scorer="acts")
    for layer, attention, mlp in zip(plan.layers, scores.attention, scores.mlp):
        groups = group_scores(head_scores(attention, 8), 2)
        assert layer.kept_kv_heads == [int(groups.argmax())]
        assert layer.kept_heads == [2 * layer.kept_kv_heads[0], 2 * layer.kept_kv_heads[0] + 1]
        assert layer.kept_mlp_channels == sorted(layer.kept_mlp_channels)
        assert set(layer.kept_mlp_channels) == set(torch.topk(mlp, 20).indices.tolist())


def test_top_indices_breaks_ties_towards_lower_index():
    assert top_indices(torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0]), 2) == [1, 2]


@pytest.mark.parametrize("scorer", SCORERS)
def test_every_scorer_gives_finite_scores_of_the_right_shape_and_leaves_model_unchanged(scorer):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = compute_scores(model, scorer, random_batches(), seed=3)
    assert [s.shape for s in scores.attention] == [torch.Size([32])] * 2
    assert [s.shape for s in scores.mlp] == [torch.Size([37])] * 2
    assert all(torch.isfinite(s).all() for s in scores.attention + scores.mlp)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_taylor_score_is_abs_of_summed_gradient_times_weight():
    model = tiny_llama()
    batches = random_batches()
    grads = collect_gradient_stats(model, batches)
    manual = torch.zeros_like(model.model.layers[0].mlp.down_proj.weight)
    for batch in batches:
        model.zero_grad()
        model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
        manual += model.model.layers[0].mlp.down_proj.weight.grad
    model.zero_grad(set_to_none=True)
    assert torch.allclose(grads.grad_sums[0]["down_proj"], manual, atol=1e-6)
    scores = taylor_scores(model, grads)
    parts = all_layer_parts(model)[0]
    expected_channel_3 = sum(
        (grads.grad_sums[0][n] * getattr(parts, n).weight).abs()[3].sum() for n in ("gate_proj", "up_proj")
    ) + (grads.grad_sums[0]["down_proj"] * parts.down_proj.weight).abs()[:, 3].sum()
    assert math.isclose(scores.mlp[0][3].item(), expected_channel_3.item(), rel_tol=1e-5)
