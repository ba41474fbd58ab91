import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback

from callbacks.transact_pruning import TransActPruning
from datamodules.text import TextDataModule
from tests.family_models import save_family_dir, write_corpus
from transact_pl.arch import Widths
from transact_pl.lightning_modules.transact_lm import TransActLM
from transact_pl.schedule import (
    per_shot_lr,
    shot_steps,
    shot_steps_problems,
    warmup_cosine,
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


# ----- shot steps and the recovery learning rate ------------------------------------------------------------------------
def test_explicit_shot_steps_replace_the_even_spacing_and_are_checked():
    assert shot_steps(3, 0, 10) == [0, 10, 20]
    assert shot_steps(3, 0, 10, [0, 6, 20]) == [0, 6, 20]
    assert shot_steps_problems([0, 6, 20], 3, 40, "--pruning.shot_steps") == []
    assert "one step per shot" in shot_steps_problems([0, 6], 3, 40, "--pruning.shot_steps")[0]
    assert "non-decreasing" in shot_steps_problems([0, 20, 6], 3, 40, "--pruning.shot_steps")[0]
    assert "raise max_steps" in shot_steps_problems([0, 6, 50], 3, 40, "--pruning.shot_steps")[0]


def test_per_shot_lr_restarts_a_warmup_and_cosine_in_every_recovery_with_a_growing_peak():
    starts, total = [0, 10, 30], 40
    lrs = [per_shot_lr(step, starts, total, warmup_steps=2, min_ratio=0.1, peak_growth=1.5) for step in range(total)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)      # warm-up to the first peak
    assert lrs[9] < 0.2                                                       # decayed before shot 2
    assert lrs[10] == pytest.approx(0.75) and lrs[11] == pytest.approx(1.5)   # restart, peak × 1.5
    assert lrs[31] == pytest.approx(2.25) and lrs[39] < 0.25 * 2.25           # third recovery, 10 steps to max_steps
    assert max(lrs[12:30]) <= 1.5 and lrs[12:30] == sorted(lrs[12:30], reverse=True)


def test_per_shot_lr_with_one_segment_is_the_global_warmup_cosine():
    for step in range(25):
        assert per_shot_lr(step, [0], 25, 5, 0.1, 2.0) == pytest.approx(warmup_cosine(step, 5, 25, 0.1))


class RecordLR(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])


def test_a_real_run_with_the_per_shot_schedule_restarts_the_lr_at_each_shot_and_rebuilt_optimizer(tmp_path):
    model_dir, corpus = save_family_dir("llama3", tmp_path / "model"), write_corpus(tmp_path / "corpus.jsonl")
    module = TransActLM(model=str(model_dir), learning_rate=1e-3, warmup_steps=1, min_lr_ratio=0.1,
                        lr_schedule="per_shot", lr_peak_growth=2.0)
    data = TextDataModule(tokenizer=str(model_dir), dataset=str(corpus), block_size=16, batch_size=2, eval_batch_size=4,
                          num_calibration_samples=4, max_val_blocks=2, max_test_blocks=2, calibration="first")
    record = RecordLR()
    trainer = L.Trainer(max_steps=9, callbacks=[TransActPruning(target_attention=16, target_mlp=19, num_shots=2,
                                                                shot_steps=[0, 3]), record],
                        logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert len(module.plans) == 2 and module.shot_steps == [0, 3]
    expected = [1e-3 * per_shot_lr(step, [0, 3], 9, 1, 0.1, 2.0) for step in range(9)]
    assert record.lrs == pytest.approx(expected)
    assert record.lrs[3] == pytest.approx(2e-3) and record.lrs[2] < 1e-3  # shot 2 restarts at twice the peak
