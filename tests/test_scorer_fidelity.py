"""Weight-based scorers under grouped-query attention count every K/V weight once per KV group, and the
reference's Taylor accumulation (Σ over batches of |g ⊙ W|) is available as ``taylor_abs``."""

import pytest
import torch

from tests.tiny_models import random_batches, tiny_llama
from transact_pl.arch import all_layer_parts, model_widths
from transact_pl.importance import collect_gradient_stats
from transact_pl.pruning import compute_scores
from transact_pl.scoring import magnitude_scores, taylor_scores


def per_group_weight_mass(model, per_weight_of):
    """Per layer (num_kv_heads,): Σ of the per-weight scores of a group's q rows, o columns, k rows and v rows,
    every weight once."""
    widths = model_widths(model)
    rows_per_group = widths.group_size * widths.head_dim
    masses = []
    for index, parts in enumerate(all_layer_parts(model)):
        per_weight = per_weight_of(index, parts)
        q = per_weight["q_proj"].sum(dim=1).view(widths.num_kv_heads, rows_per_group).sum(dim=1)
        o = per_weight["o_proj"].sum(dim=0).view(widths.num_kv_heads, rows_per_group).sum(dim=1)
        kv = (per_weight["k_proj"] + per_weight["v_proj"]).sum(dim=1).view(widths.num_kv_heads, widths.head_dim).sum(dim=1)
        masses.append(q + o + kv)
    return masses


def weight_of(parts, name):
    return getattr(parts, name).weight.detach()


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (8, 2), (4, 4)])
def test_a_groups_channel_scores_add_up_to_its_weights_counted_once(num_heads, num_kv_heads):
    model = tiny_llama(num_heads=num_heads, num_kv_heads=num_kv_heads)
    widths = model_widths(model)
    batches = random_batches()
    grads = collect_gradient_stats(model, batches)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    expected = {
        "magnitude": per_group_weight_mass(model, lambda i, parts: {n: weight_of(parts, n).abs() for n in names}),
        "taylor": per_group_weight_mass(
            model, lambda i, parts: {n: (grads.grad_sums[i][n] * weight_of(parts, n)).abs() for n in names}),
    }
    for scorer, scores in (("magnitude", magnitude_scores(model)), ("taylor", taylor_scores(model, grads))):
        for attention, mass in zip(scores.attention, expected[scorer]):
            assert torch.allclose(attention.view(widths.num_kv_heads, -1).sum(dim=1), mass, rtol=1e-5), scorer


def test_taylor_abs_sums_the_absolute_gradient_of_every_batch():
    model = tiny_llama()
    batches = random_batches(num_batches=3)
    manual = torch.zeros_like(model.model.layers[1].self_attn.k_proj.weight)
    for batch in batches:
        model.zero_grad()
        model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
        manual += model.model.layers[1].self_attn.k_proj.weight.grad.abs()
    model.zero_grad(set_to_none=True)
    grads = collect_gradient_stats(model, batches, absolute=True)
    assert torch.allclose(grads.grad_sums[1]["k_proj"], manual, atol=1e-6)


def test_taylor_abs_equals_taylor_on_one_batch_and_bounds_it_on_several():
    """|g ⊙ W| summed over one batch is |Σ g ⊙ W|; over several, Σ|g|·|W| ≥ |Σg ⊙ W| weight by weight."""
    model = tiny_llama()
    one, several = random_batches(num_batches=1), random_batches(num_batches=3)
    for plain, absolute in zip(compute_scores(model, "taylor", one, 0).mlp, compute_scores(model, "taylor_abs", one, 0).mlp):
        assert torch.allclose(plain, absolute, rtol=1e-5)
    plain, absolute = compute_scores(model, "taylor", several, 0), compute_scores(model, "taylor_abs", several, 0)
    for low, high in zip(plain.attention + plain.mlp, absolute.attention + absolute.mlp):
        assert (high >= low * (1 - 1e-5)).all() and not torch.allclose(high, low)
