"""Pictures of a run: every plot writes a real PNG of plausible size, and the kept/removed maps are right."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks.pruning_report import PruningReport
from callbacks.run_pictures import PICTURES_DIR, RunPictures, draw_run_pictures, read_metrics_csv
from callbacks.transact_pruning import TransActPruning
from datamodules.text import TextDataModule
from tests.tiny_models import tiny_llama, tiny_tokenizer
from transact_pl.arch import Widths
from transact_pl.plan import PruningPlan, make_plan
from transact_pl.infra.plots import (
    KEPT,
    REMOVED_BEFORE,
    REMOVED_NOW,
    kept_state_maps,
    original_indices_after_shots,
    plot_kept_maps,
    plot_score_distributions,
    plot_series,
    plot_stage_perplexity,
    plot_training_curves,
    plot_width_schedule,
)
from transact_pl.scoring import ChannelScores

DENSE = Widths(num_heads=6, num_kv_heads=3, head_dim=4, intermediate_size=37)
SHOT_WIDTHS = [DENSE, Widths(6, 3, 4, 25), Widths(4, 2, 4, 13)]
NUM_LAYERS = 3


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails if the file is not a PNG."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def assert_plausible_png(path: Path, min_bytes: int = 5_000) -> None:
    width, height = png_size(path)
    assert 300 <= width <= 4000 and 200 <= height <= 4000, (width, height)
    assert path.stat().st_size >= min_bytes


def random_scores(widths: Widths, seed: int) -> ChannelScores:
    generator = torch.Generator().manual_seed(seed)
    return ChannelScores(
        attention=[torch.rand(widths.attention_width, generator=generator) + 0.01 for _ in range(NUM_LAYERS)],
        mlp=[torch.rand(widths.intermediate_size, generator=generator) + 0.01 for _ in range(NUM_LAYERS)],
    )


def two_shot_plans() -> list[PruningPlan]:
    return [make_plan(random_scores(before, shot), before, after, shot, "acts")
            for shot, (before, after) in enumerate(zip(SHOT_WIDTHS, SHOT_WIDTHS[1:]), start=1)]


def test_kept_maps_count_kept_and_removed_channels_per_shot():
    plans = two_shot_plans()
    maps = kept_state_maps(plans)
    for plan, (head_map, channel_map) in zip(plans, maps):
        assert head_map.shape == (NUM_LAYERS, DENSE.num_heads) and channel_map.shape == (NUM_LAYERS, DENSE.intermediate_size)
        assert ((channel_map == KEPT).sum(axis=1) == plan.after.intermediate_size).all()
        assert ((channel_map == REMOVED_NOW).sum(axis=1) == plan.before.intermediate_size - plan.after.intermediate_size).all()
        assert ((head_map == KEPT).sum(axis=1) == plan.after.num_heads).all()
    # Shot 2's survivors are dense indices that shot 1 kept; what shot 1 removed is "removed earlier" at shot 2.
    (heads_1, channels_1), (heads_2, channels_2) = original_indices_after_shots(plans)
    assert all(set(after) <= set(before) for before, after in zip(channels_1, channels_2))
    assert ((maps[0][1] != KEPT) == (maps[1][1] == REMOVED_BEFORE)).all()
    assert all(len(h) == 4 and h == sorted(h) for h in heads_2)


def test_every_plot_writes_a_readable_png(tmp_path):
    scores = random_scores(DENSE, 0)
    assert_plausible_png(plot_score_distributions(scores.attention, scores.mlp, DENSE.head_dim, tmp_path / "s.png", group_size=2))
    assert_plausible_png(plot_kept_maps(two_shot_plans(), tmp_path / "k.png"))
    assert_plausible_png(plot_width_schedule(SHOT_WIDTHS, tmp_path / "w.png"))
    metrics = {"train_loss": [(s, 5.0 - 0.1 * s) for s in range(12)], "val_ppl": [(3, 90.0), (7, 60.0), (11, 40.0)]}
    assert_plausible_png(plot_training_curves(metrics, tmp_path / "t.png", shot_steps=[0, 4]))
    assert_plausible_png(plot_training_curves({}, tmp_path / "empty.png"))  # panels say what is missing
    rows = [{"stage": "dense", "val_ppl": 20.0, "test_ppl": 22.0, "non_embedding_params": 5e6},
            {"stage": "shot 1 pruned", "val_ppl": 80.0, "non_embedding_params": 3e6}]
    assert_plausible_png(plot_stage_perplexity(rows, tmp_path / "p.png"))
    series = {"acts": ([1.0, 2.0, 3.0], [40.0, 30.0, 25.0]), "random": ([1.0, 2.0, 3.0], [400.0, 90.0, 25.0])}
    assert_plausible_png(plot_series(series, tmp_path / "q.png", "params", "ppl", "title", log_y=True, reference=21.0))


def test_plots_refuse_empty_inputs(tmp_path):
    with pytest.raises(ValueError, match="at least one plan"):
        plot_kept_maps([], tmp_path / "k.png")
    with pytest.raises(ValueError, match="dense widths"):
        plot_width_schedule([], tmp_path / "w.png")


def write_run_dir(directory: Path) -> None:
    """A run directory as TransActPruning and CSVLogger leave it."""
    plans = two_shot_plans()
    (directory / "plans").mkdir(parents=True)
    (directory / "scores").mkdir()
    for plan, before in zip(plans, SHOT_WIDTHS):
        (directory / "plans" / f"shot_{plan.shot}.json").write_text(plan.to_json())
        scores = random_scores(before, plan.shot)
        torch.save({"scorer": "acts", "attention": scores.attention, "mlp": scores.mlp}, directory / "scores" / f"shot_{plan.shot}.pt")
    rows = [{"stage": "dense (step 0)", "val_ppl": 30.0, "test_ppl": 31.0, "non_embedding_params": 9e6},
            {"stage": "final (step 8)", "val_ppl": 50.0, "test_ppl": 52.0, "non_embedding_params": 6e6}]
    (directory / "summary.json").write_text(json.dumps({"stages": rows, "heldout": None}))
    (directory / "metrics.csv").write_text("epoch,step,train_loss,val_loss,val_ppl\n0,0,4.5,,\n0,1,4.2,,\n0,1,,4.0,54.6\n0,2,3.9,,\n")


def test_metrics_csv_is_read_per_metric_skipping_empty_cells(tmp_path):
    write_run_dir(tmp_path)
    metrics = read_metrics_csv(tmp_path / "metrics.csv")
    assert metrics["train_loss"] == [(0.0, 4.5), (1.0, 4.2), (2.0, 3.9)]
    assert metrics["val_ppl"] == [(1.0, 54.6)] and "epoch" not in metrics


def test_draw_run_pictures_writes_one_png_per_kind_of_data(tmp_path):
    write_run_dir(tmp_path)
    written = draw_run_pictures(tmp_path, shot_steps=[0, 4])
    names = sorted(p.name for p in written)
    assert names == ["kept_maps.png", "scores_shot_1.png", "scores_shot_2.png", "stage_perplexity.png",
                     "training_curves.png", "width_schedule.png"]
    for path in written:
        assert path.parent == tmp_path / PICTURES_DIR
        assert_plausible_png(path)


def test_run_pictures_callback_draws_a_real_fit(tmp_path, monkeypatch):
    """A real Trainer on a tiny model: after fit the logger's directory holds the pictures."""
    monkeypatch.setenv("TRANSACT_PL_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "tiny"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    corpus = tmp_path / "corpus.jsonl"
    generator = torch.Generator().manual_seed(0)
    documents = [" ".join(f"t{int(i)}" for i in torch.randint(2, 99, (60,), generator=generator)) for _ in range(20)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    from transact_pl.lightning_modules.transact_lm import TransActLM

    module = TransActLM(model=str(model_dir), learning_rate=1e-3, warmup_steps=1)
    data = TextDataModule(tokenizer=str(model_dir), dataset=str(corpus), block_size=16, batch_size=2,
                          eval_batch_size=2, num_calibration_samples=2)
    pruning = TransActPruning(target_attention=16, target_mlp=19, num_shots=2, steps_between_shots=2)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=L.pytorch.loggers.CSVLogger(tmp_path, name="logs"),
                        callbacks=[RunPictures(), pruning, PruningReport()], enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=2, val_check_interval=2, num_sanity_val_steps=0, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    pictures = Path(trainer.log_dir) / PICTURES_DIR
    assert sorted(p.name for p in pictures.iterdir()) == ["kept_maps.png", "scores_shot_1.png", "scores_shot_2.png",
                                                          "stage_perplexity.png", "training_curves.png", "width_schedule.png"]
    assert all(png_size(p)[0] >= 300 for p in pictures.iterdir())
