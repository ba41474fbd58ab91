import pytest

from transact_pl.arch import Widths
from transact_pl.schedule import next_widths, resolve_attention_target, resolve_mlp_target, width_schedule

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
