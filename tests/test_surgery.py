import pytest
import torch

from tests.tiny_models import random_batches, tiny_llama
from transact_pl.arch import Widths, all_layer_parts, model_widths
from transact_pl.optim_state import carry_over_state
from transact_pl.plan import LayerPlan, PruningPlan, make_plan
from transact_pl.pruning import compute_scores
from transact_pl.surgery import apply_plan, check_indices


def keep_plan(model, kept_groups, kept_mlp, shot=1):
    before = model_widths(model)
    group = before.group_size
    heads = [g * group + o for g in kept_groups for o in range(group)]
    after = Widths(len(heads), len(kept_groups), before.head_dim, len(kept_mlp))
    layers = [LayerPlan(heads, list(kept_groups), list(kept_mlp)) for _ in all_layer_parts(model)]
    return PruningPlan(shot, "acts", before, after, layers)


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (6, 3)])
def test_keeping_everything_changes_nothing(num_heads, num_kv_heads):
    model = tiny_llama(num_heads=num_heads, num_kv_heads=num_kv_heads, hidden_size=8 * num_heads)
    batch = random_batches(num_batches=1)[0]
    reference = logits(model, batch)
    apply_plan(model, keep_plan(model, range(num_kv_heads), range(37)))
    assert torch.equal(logits(model, batch), reference)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 3)])
def test_pruning_channels_zeroed_beforehand_leaves_outputs_unchanged(num_heads, num_kv_heads):
    model = tiny_llama(num_heads=num_heads, num_kv_heads=num_kv_heads, hidden_size=8 * num_heads)
    widths = model_widths(model)
    dropped_group, dropped_mlp = 1, [0, 5, 36]
    with torch.no_grad():
        for parts in all_layer_parts(model):
            heads = range(dropped_group * widths.group_size, (dropped_group + 1) * widths.group_size)
            for head in heads:
                parts.o_proj.weight[:, head * 8 : (head + 1) * 8] = 0
            parts.down_proj.weight[:, dropped_mlp] = 0
    batch = random_batches(num_batches=1)[0]
    reference = logits(model, batch)
    kept_groups = [g for g in range(widths.num_kv_heads) if g != dropped_group]
    apply_plan(model, keep_plan(model, kept_groups, [c for c in range(37) if c not in dropped_mlp]))
    assert torch.allclose(logits(model, batch), reference, atol=1e-6)


def test_shapes_and_config_match_the_plan():
    model = tiny_llama(num_heads=6, num_kv_heads=3, hidden_size=48)
    plan = make_plan(compute_scores(model, "acts", random_batches(), 0), model_widths(model), Widths(4, 2, 8, 17), 1, "acts")
    apply_plan(model, plan)
    for parts in all_layer_parts(model):
        assert parts.q_proj.weight.shape == (32, 48) and parts.o_proj.weight.shape == (48, 32)
        assert parts.k_proj.weight.shape == (16, 48) and parts.v_proj.weight.shape == (16, 48)
        assert parts.gate_proj.weight.shape == (17, 48) and parts.up_proj.weight.shape == (17, 48)
        assert parts.down_proj.weight.shape == (48, 17)
    assert model_widths(model) == plan.after
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.intermediate_size) == (4, 2, 17)
    assert model.model.embed_tokens.weight is model.lm_head.weight  # tied embeddings stay tied


def test_sliced_weights_are_the_kept_rows_and_columns():
    model = tiny_llama(num_heads=4, num_kv_heads=2)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    apply_plan(model, keep_plan(model, [1], [2, 3, 30]))
    prefix = "model.layers.0."
    assert torch.equal(model.state_dict()[prefix + "self_attn.q_proj.weight"], original[prefix + "self_attn.q_proj.weight"][16:32])
    assert torch.equal(model.state_dict()[prefix + "self_attn.k_proj.weight"], original[prefix + "self_attn.k_proj.weight"][8:16])
    assert torch.equal(model.state_dict()[prefix + "self_attn.o_proj.weight"], original[prefix + "self_attn.o_proj.weight"][:, 16:32])
    assert torch.equal(model.state_dict()[prefix + "mlp.down_proj.weight"], original[prefix + "mlp.down_proj.weight"][:, [2, 3, 30]])


def test_biases_follow_their_rows():
    model = tiny_llama(num_heads=4, num_kv_heads=2, attention_bias=True, mlp_bias=True)
    q_bias = model.model.layers[0].self_attn.q_proj.bias.detach().clone()
    o_bias = model.model.layers[0].self_attn.o_proj.bias.detach().clone()
    apply_plan(model, keep_plan(model, [0], list(range(10))))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.bias, q_bias[:16])
    assert torch.equal(model.model.layers[0].self_attn.o_proj.bias, o_bias)


def test_plan_json_round_trips_and_replays_identically():
    model = tiny_llama()
    plan = make_plan(compute_scores(model, "acts", random_batches(), 0), model_widths(model), Widths(2, 1, 8, 11), 1, "acts")
    again = PruningPlan.from_json(plan.to_json())
    assert again == plan
    replayed = tiny_llama()
    apply_plan(model, plan)
    apply_plan(replayed, again)
    batch = random_batches(num_batches=1)[0]
    assert torch.equal(logits(model, batch), logits(replayed, batch))


@pytest.mark.parametrize(
    "kept,message", [([], "nothing kept"), ([2, 1], "ascending"), ([1, 1], "ascending"), ([0, 9], r"0\.\.3")]
)
def test_bad_indices_are_refused_with_the_valid_range(kept, message):
    with pytest.raises(ValueError, match=message):
        check_indices(kept, 4, "kept_heads")


def test_plan_for_other_widths_is_refused():
    model = tiny_llama()
    plan = keep_plan(model, [0], range(10))
    apply_plan(model, plan)
    with pytest.raises(ValueError, match="expects widths"):
        apply_plan(model, plan)


def test_kept_parameters_keep_training_after_a_shrink_with_carried_optimizer_state():
    model = tiny_llama().train()
    batch = random_batches(num_batches=1)[0]["input_ids"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    q_proj = model.model.layers[0].self_attn.q_proj
    old_moment = optimizer.state[q_proj.weight]["exp_avg"].clone()
    slices = apply_plan(model, keep_plan(model, [1], list(range(0, 37, 2))))
    new_optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    carry_over_state(optimizer, new_optimizer, slices)
    assert new_optimizer.param_groups[0]["lr"] == 1e-2
    assert torch.equal(new_optimizer.state[q_proj.weight]["exp_avg"], old_moment[16:32])
    assert all(id(p) not in {id(s.old) for s in slices.values()} for p in new_optimizer.state)
    before = q_proj.weight.detach().clone()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    new_optimizer.step()
    assert not torch.equal(q_proj.weight, before)
    assert torch.isfinite(loss)
