"""Least-squares reconstruction (transact_pl.reconstruction, transact_pl.sequential_reconstruction) on tiny random
models, by invariants: keeping everything refits to the identity, pruning silent channels is exact, the refit lowers
every layer's calibration error, the moments' diagonal is the acts statistic, and emulation matches surgery."""

import copy

import pytest
import torch

from tests.family_models import family_model
from tests.test_surgery import keep_plan
from tests.tiny_models import random_batches, tiny_llama
from transact_pl.arch import all_layer_parts, model_widths
from transact_pl.distributed import shard_model, shrink_sharded
from transact_pl.head_dim import add_head_dim, collect_head_dim_stats
from transact_pl.importance import collect_activation_stats
from transact_pl.plan import PruningPlan, make_plan
from transact_pl.reconstruction import (
    collect_second_moments,
    kept_input_channels,
    load_refit,
    refit_weights,
    solve_refit,
)
from transact_pl.scoring import acts_scores
from transact_pl.sequential_reconstruction import _expanded, _zeroed_query, capture_layer_inputs, sequential_refit
from transact_pl.surgery import apply_plan

BATCHES = random_batches(num_batches=3, batch_size=4, length=13)  # 156 tokens: G of width 37 is well determined


def logits(model, batches=BATCHES):
    with torch.no_grad():
        return torch.cat([model(input_ids=batch["input_ids"]).logits for batch in batches])


def pruned(model, plan, refits=None):
    copy_ = copy.deepcopy(model)
    apply_plan(copy_, plan)
    if refits is not None:
        load_refit(copy_, refits)
    return copy_


def output_error(model, plan, refits=None):
    """Mean squared logit difference between ``model`` and its pruned (and refitted) copy on the batches."""
    return (logits(pruned(model, plan, refits)) - logits(model)).pow(2).mean().item()


def silence(model, kv_group, mlp_channels):
    """Zero the v rows (and bias) of KV head ``kv_group`` and the up rows of ``mlp_channels`` in every layer, so
    the attention context of its query heads and those MLP activations are 0 on every token."""
    head_dim = model_widths(model).head_dim
    with torch.no_grad():
        for parts in all_layer_parts(model):
            rows = slice(kv_group * head_dim, (kv_group + 1) * head_dim)
            parts.v_proj.weight[rows] = 0
            if parts.v_proj.bias is not None:
                parts.v_proj.bias[rows] = 0
            parts.up_proj.weight[mlp_channels] = 0
    return model


def test_the_diagonal_of_the_moments_is_the_acts_statistic_and_selects_the_same_plan():
    model = tiny_llama()
    moments = collect_second_moments(model, BATCHES)
    stats = collect_activation_stats(model, BATCHES)
    assert moments.num_tokens == stats.num_tokens
    for exact, gram, sums in zip(moments.attention_sum_sq + moments.mlp_sum_sq, moments.attention + moments.mlp,
                                 stats.attention_sum_sq + stats.mlp_sum_sq):
        assert torch.equal(exact, sums)  # the same kernel: bit-identical
        assert torch.allclose(gram.diagonal(), sums, rtol=1e-6)
        assert torch.allclose(gram, gram.T)
    before = model_widths(model)
    after = type(before)(2, 1, 8, 20)
    assert make_plan(acts_scores(moments.activation_stats()), before, after, 1, "acts") == \
        make_plan(acts_scores(stats), before, after, 1, "acts")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_keeping_everything_refits_to_the_identity(family):
    model = tiny_llama() if family == "llama" else family_model("qwen2")
    plan = keep_plan(model, range(model_widths(model).num_kv_heads), range(37))
    moments = collect_second_moments(model, BATCHES)
    weights = dict(model.named_parameters())
    for name, refit in refit_weights(model, plan, moments, damping=0.0).items():
        assert torch.allclose(refit, weights[name], atol=1e-4), name
    grams = {f"model.layers.{i}.{name}.weight": gram for i in range(2)
             for name, gram in zip(("self_attn.o_proj", "mlp.down_proj"), moments.of_layer(i))}
    for name, refit in refit_weights(model, plan, moments, damping=1e-3).items():  # shrunk a little towards 0
        everything = torch.arange(refit.shape[1])
        relative = layer_error(weights[name], grams[name], everything, refit) / layer_error(weights[name], grams[name], everything, 0 * refit)
        assert 0 < relative < 1e-3, name


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pruning_silent_channels_refits_exactly(family):
    """Dropped heads/channels that never fire: the refit reproduces the dense model (Qwen2: with its q/k/v biases)."""
    model = silence(tiny_llama() if family == "llama" else family_model("qwen2"), kv_group=1, mlp_channels=[3, 5, 30])
    plan = keep_plan(model, [0], [c for c in range(37) if c not in (3, 5, 30)])
    refits = refit_weights(model, plan, collect_second_moments(model, BATCHES), damping=0.0)
    assert torch.allclose(logits(pruned(model, plan, refits)), logits(model), atol=1e-5)
    sequential = sequential_refit(model, plan, BATCHES, damping=0.0)
    assert torch.allclose(logits(pruned(model, plan, sequential)), logits(model), atol=1e-5)


def layer_error(weight, gram, kept, new_weight):
    """Σ over calibration tokens of ‖W x − W' x_K‖², from G: tr(D G Dᵀ) with D = W − W' expanded."""
    difference = weight.double() - _expanded(new_weight.double(), kept, weight.shape[1])
    return torch.trace(difference @ gram @ difference.T).item()


def test_the_refit_lowers_every_layers_calibration_error_below_plain_slicing():
    model = tiny_llama()
    moments = collect_second_moments(model, BATCHES)
    plan = make_plan(acts_scores(moments.activation_stats()), model_widths(model), type(model_widths(model))(2, 1, 8, 19), 1, "acts")
    refits = refit_weights(model, plan, moments, damping=1e-2)
    for index, parts in enumerate(all_layer_parts(model)):
        for linear, gram, kept, name in zip((parts.o_proj, parts.down_proj), moments.of_layer(index),
                                            kept_input_channels(plan, index), ("self_attn.o_proj", "mlp.down_proj")):
            sliced = linear.weight[:, kept]
            refit = refits[f"model.layers.{index}.{name}.weight"]
            assert refit.shape == sliced.shape
            assert layer_error(linear.weight, gram, kept, refit) < layer_error(linear.weight, gram, kept, sliced)
    assert output_error(model, plan, refits) < output_error(model, plan)


def test_the_refit_is_invariant_to_scaling_the_moments_and_summing_them_over_processes_doubles_them():
    """λ is relative to diag G, so a sum over 2 identical processes refits the same weights as one."""
    model = tiny_llama()
    moments = collect_second_moments(model, BATCHES)
    plan = keep_plan(model, [1], list(range(0, 37, 2)))
    once = refit_weights(model, plan, moments, damping=1e-2)
    diagonal = moments.mlp[0].diagonal().clone()
    moments.all_reduce(lambda tensor: tensor.mul_(2))
    assert torch.equal(moments.mlp[0].diagonal(), 2 * diagonal) and moments.num_tokens == 2 * 3 * 4 * 13
    twice = refit_weights(model, plan, moments, damping=1e-2)
    assert all(torch.allclose(once[name], twice[name], atol=1e-6) for name in once)


def test_a_layer_subset_kept_on_the_cpu_refits_those_layers_only():
    model = tiny_llama()
    every = collect_second_moments(model, BATCHES)
    subset = collect_second_moments(model, BATCHES, layers=[1], storage_device="cpu")
    assert subset.layers == [1] and subset.attention[0].device.type == "cpu"
    assert torch.equal(subset.mlp[0], every.mlp[1])
    plan = keep_plan(model, [0], list(range(20)))
    refits = refit_weights(model, plan, subset, output_device="cpu")
    assert sorted(refits) == ["model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.o_proj.weight"]
    with pytest.raises(ValueError, match="cover layers"):
        subset.activation_stats()


def test_a_singular_system_falls_back_to_the_pseudo_inverse():
    weight = torch.randn(3, 4)
    gram = torch.zeros(4, 4)
    gram[:2, :2] = torch.tensor([[2.0, 1.0], [1.0, 1.0]])  # channels 2 and 3 never fired
    with pytest.warns(UserWarning, match="pseudo-inverse"):
        refit = solve_refit(weight, gram[:, [0, 2]], torch.tensor([0, 2]), damping=0.0)
    assert torch.isfinite(refit).all()


def test_load_refit_refuses_shapes_of_another_plan():
    model = tiny_llama()
    plan = keep_plan(model, [0], list(range(20)))
    refits = refit_weights(model, plan, collect_second_moments(model, BATCHES))
    with pytest.raises(ValueError, match="apply the plan first"):
        load_refit(copy.deepcopy(model), refits)


def test_plans_record_the_reconstruction_and_old_plans_still_load():
    model = tiny_llama()
    plan = PruningPlan(**{**keep_plan(model, [0], list(range(20))).__dict__, "reconstruction": "sequential", "damping": 0.01})
    assert PruningPlan.from_json(plan.to_json()) == plan
    old = plan.to_dict()
    del old["reconstruction"], old["damping"]
    assert PruningPlan.from_dict(old).reconstruction is None and PruningPlan.from_dict(old).damping is None


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_layers_run_on_the_captured_inputs_reproduce_the_model(family):
    """Each layer's own mask (Qwen2: a sliding-window layer) and rotary arguments are captured."""
    model = tiny_llama() if family == "llama" else family_model("qwen2")
    inputs = capture_layer_inputs(model, BATCHES, torch.device("cpu"))
    with torch.no_grad():
        for batch, (hidden, arguments) in enumerate(zip(inputs.hidden, inputs.arguments)):
            for layer, (args, kwargs) in zip(model.model.layers, arguments):
                hidden = layer(hidden, *args, **kwargs)
            assert torch.allclose(model.lm_head(model.model.norm(hidden)), logits(model, [BATCHES[batch]]), atol=1e-5)
    assert all("forward" not in vars(layer) for layer in model.model.layers)


def head_dim_plan(model, exact):
    base = keep_plan(model, [0, 1], list(range(0, 37, 2)))
    after = type(base.after)(base.after.num_heads, base.after.num_kv_heads, 4, base.after.intermediate_size)
    plan = PruningPlan(**{**base.__dict__, "after": after})
    return add_head_dim(plan, collect_head_dim_stats(model, BATCHES), model.config.rope_parameters, exact=exact)


@pytest.mark.parametrize("head_dim", [False, True])
def test_the_emulated_layer_computes_what_surgery_computes(head_dim):
    """Refitted weights with zero columns at pruned inputs (and, for exact head-dim plans, zero q rows of dropped
    rotary pairs) on the unpruned model give the sliced model's logits: what sequential reconstruction relies on."""
    model = tiny_llama(attention_bias=True)
    plan = head_dim_plan(model, exact=True) if head_dim else keep_plan(model, [1], list(range(0, 37, 3)))
    refits = refit_weights(model, plan, collect_second_moments(model, BATCHES))
    emulated = copy.deepcopy(model)
    with torch.no_grad():
        for index, parts in enumerate(all_layer_parts(emulated)):
            for parameter, value in _zeroed_query(parts, plan, index).items():
                parameter.copy_(value)
            for linear, kept, name in zip((parts.o_proj, parts.down_proj), kept_input_channels(plan, index),
                                          ("self_attn.o_proj", "mlp.down_proj")):
                linear.weight.copy_(_expanded(refits[f"model.layers.{index}.{name}.weight"], kept, linear.in_features))
    assert torch.allclose(logits(emulated), logits(pruned(model, plan, refits)), atol=1e-5)


def test_sequential_refit_beats_slicing_leaves_the_model_as_it_was_and_starts_like_the_dense_variant():
    model = tiny_llama(num_hidden_layers=3).train()
    state = {name: value.clone() for name, value in model.state_dict().items()}
    moments = collect_second_moments(model, BATCHES)
    plan = make_plan(acts_scores(moments.activation_stats()), model_widths(model), type(model_widths(model))(2, 1, 8, 19), 1, "acts")
    sequential = sequential_refit(model, plan, BATCHES, damping=1e-2)
    assert model.training and all(torch.equal(state[name], value) for name, value in model.state_dict().items())
    dense = refit_weights(model, plan, moments, damping=1e-2)
    assert sorted(sequential) == sorted(dense)
    name = "model.layers.0.self_attn.o_proj.weight"  # layer 0's attention sees the same inputs in both variants
    assert torch.allclose(sequential[name], dense[name], atol=1e-5)
    assert output_error(model, plan, sequential) < output_error(model, plan)


def test_sequential_refit_refuses_head_dim_plans_with_fitted_rope_and_runs_exact_ones():
    model = tiny_llama()
    with pytest.raises(ValueError, match="fitted RoPE"):
        sequential_refit(model, head_dim_plan(model, exact=False), BATCHES)
    plan = head_dim_plan(model, exact=True)
    refits = sequential_refit(model, plan, BATCHES)
    assert output_error(model, plan, refits) < output_error(model, plan)


def test_under_fsdp2_the_refit_gathers_sharded_weights_and_loads_into_shards(mesh):
    model = tiny_llama()
    plan = keep_plan(model, [0], list(range(0, 37, 2)))
    moments = collect_second_moments(model, BATCHES)
    expected_dense = refit_weights(model, plan, moments)
    expected_sequential = sequential_refit(model, plan, BATCHES)
    sharded = shard_model(copy.deepcopy(model), mesh=mesh)
    sharded_moments = collect_second_moments(sharded, BATCHES)
    sharded_moments.all_reduce(torch.distributed.all_reduce)
    dense = refit_weights(sharded, plan, sharded_moments)
    sequential = sequential_refit(sharded, plan, BATCHES, reduce_fn=torch.distributed.all_reduce)
    for name in expected_dense:
        assert torch.allclose(dense[name], expected_dense[name], atol=1e-6)
        assert torch.allclose(sequential[name], expected_sequential[name], atol=1e-6)
    shrunk, _ = shrink_sharded(sharded, plan, lambda m: shard_model(m, mesh=mesh))
    load_refit(shrunk, dense)
    assert torch.allclose(logits(shrunk), logits(pruned(model, plan, expected_dense)), atol=1e-5)


def test_too_few_calibration_tokens_for_the_kept_width_warn():
    model = tiny_llama()
    few = random_batches(num_batches=1, batch_size=2, length=11)  # 22 tokens for 37 kept MLP channels
    plan = keep_plan(model, [0, 1], range(37))
    with pytest.warns(UserWarning, match="overfits"):
        refit_weights(model, plan, collect_second_moments(model, few))
    with pytest.warns(UserWarning, match="overfits"):
        sequential_refit(model, plan, few)
