import pytest

from transact_pl.arch import Widths
from transact_pl.schedule import (
    next_widths,
    resolve_attention_target,
    resolve_mlp_target,
    round_fraction,
    shot_widths,
    width_schedule,
)

SMOLLM2 = Widths(num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536)
LLAMA2_7B = Widths(num_heads=32, num_kv_heads=32, head_dim=128, intermediate_size=11008)


def test_reference_schedule_on_llama2_7b_reaches_the_paper_widths():
    widths = width_schedule(LLAMA2_7B, 6 * 128, 1536, num_shots=8)
    assert widths[-1] == Widths(6, 6, 128, 1536)
    # shot 1: 4096 - (4096 - 768) // 8 = 3680 → ceil(3680 / 128) = 29 heads; MLP 11008 - 9472 // 8 = 9824
    assert widths[1] == Widths(29, 29, 128, 9824)
    assert all(a.intermediate_size > b.intermediate_size for a, b in zip(widths, widths[1:]))


def test_gqa_rounds_heads_up_to_whole_groups():
    assert next_widths(SMOLLM2, 384, 768, shot=1, num_shots=2) == Widths(9, 3, 64, 1152)
    assert width_schedule(SMOLLM2, 384, 768, 2)[-1] == Widths(6, 2, 64, 768)


def test_one_shot_goes_straight_to_the_target():
    assert width_schedule(SMOLLM2, 192, 384, 1)[-1] == Widths(3, 1, 64, 384)


@pytest.mark.parametrize("value,width", [(0.67, 384), (0.5, 384), (0.2, 192), (1.0, 576), (384, 384)])
def test_attention_targets_resolve_to_whole_groups(value, width):
    assert resolve_attention_target(value, SMOLLM2, "--x") == (width, None)


@pytest.mark.parametrize(
    "value,message",
    [(0.0, "outside \\(0, 1\\]"), (1.5, "outside \\(0, 1\\]"), (0, "outside 1..576"), (-64, "outside"), (640, "outside 1..576"),
     (100, "not a whole number of KV groups.*192, 384, 576")],
)
def test_bad_attention_targets_name_the_option_and_the_valid_values(value, message):
    width, problem = resolve_attention_target(value, SMOLLM2, "--trainer.callbacks.target_attention")
    assert width is None and "--trainer.callbacks.target_attention" in problem
    assert __import__("re").search(message, problem)


@pytest.mark.parametrize("value,expected", [(0.5, (768, None)), (100, (100, None))])
def test_mlp_targets(value, expected):
    assert resolve_mlp_target(value, SMOLLM2, "--m") == expected


@pytest.mark.parametrize("value", [0, 2000, 0.0, 1.01])
def test_bad_mlp_targets(value):
    width, problem = resolve_mlp_target(value, SMOLLM2, "--trainer.callbacks.target_mlp")
    assert width is None and "--trainer.callbacks.target_mlp" in problem


FIVE_GROUPS = Widths(num_heads=10, num_kv_heads=5, head_dim=64, intermediate_size=37)


def test_a_half_of_five_kv_groups_rounds_up_to_three():
    """Round half up, not Python's round-half-to-even (which gives 2 groups)."""
    assert resolve_attention_target(0.5, FIVE_GROUPS, "--x") == (3 * 2 * 64, None)
    assert resolve_attention_target(0.3, FIVE_GROUPS, "--x") == (2 * 2 * 64, None)  # 1.5 groups → 2
    assert resolve_attention_target(0.1, FIVE_GROUPS, "--x") == (1 * 2 * 64, None)  # 0.5 group → 1, never 0


def test_fractional_mlp_targets_round_half_up_on_the_decimal_as_written():
    assert resolve_mlp_target(0.5, FIVE_GROUPS, "--m") == (19, None)  # 18.5 → 19
    assert round_fraction(0.29, 50) == 15  # 0.29 · 50 is 14.499… in binary floats
    assert round_fraction(0.01, 3) == 1  # at least one


def test_shot_widths_move_head_dim_with_whole_groups_counted_at_the_dense_head_dim():
    first = shot_widths(SMOLLM2, 64, 384, 768, 32, shot=1, num_shots=2)
    assert first == Widths(9, 3, 48, 1152)
    assert shot_widths(first, 64, 384, 768, 32, shot=2, num_shots=2) == Widths(6, 2, 32, 768)
    assert shot_widths(SMOLLM2, 64, 384, 768, None, shot=1, num_shots=1) == Widths(6, 2, 64, 768)
