"""Serving-friendly head sizes: --pruning.serving_head_dims rounds head_dim_target and every shot's head_dim, keeps
rotary pairs whole (one progression, exact RoPE), and a size off the servers' fast attention kernels is one warning."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest

from callbacks.transact_pruning import TransActPruning
from datamodules.text import TextDataModule
from tests.family_models import family_config, save_family_dir, write_corpus
from transact_pl.arch import Widths, config_widths
from transact_pl.head_dim import (SERVING_KERNELS, allowed_head_dims, off_kernel_warning, round_head_dim,
                                  rounded_next_head_dim, serving_sizes_problems)
from transact_pl.lightning_modules.transact_lm import TransActLM
from transact_pl.schedule import head_dim_schedule, serving_shot_widths, shot_widths


def test_a_step_or_a_list_gives_the_allowed_sizes_and_the_target_rounds_to_the_nearest():
    assert allowed_head_dims(16, 64) == [16, 32, 48, 64] and allowed_head_dims(32, 80) == [32, 64]
    assert allowed_head_dims([128, 64, 32], 64) == [32, 64]  # sizes above the dense head_dim cannot be reached
    assert round_head_dim(42, [16, 32, 48, 64]) == 48 and round_head_dim(20, [16, 32, 48, 64]) == 16
    assert round_head_dim(40, [32, 48]) == 48  # halfway: the larger, more channels kept


def test_every_shot_lands_on_an_allowed_size_between_the_target_and_the_current_head_dim():
    """SmolLM2's head_dim 64 → 20 moves 64 → 42 → 20 unrounded; with a step of 16 the target is 16 and shot 1 takes
    48 (42 would be 32 or 48, halfway: the larger)."""
    assert head_dim_schedule(64, 20, 2, None) == [42, 20]
    allowed = allowed_head_dims(16, 64)
    target = round_head_dim(20, allowed)
    assert head_dim_schedule(64, target, 2, allowed) == [48, 16]
    assert head_dim_schedule(64, round_head_dim(42, allowed), 3, allowed) == [64, 64, 48]  # 60, 56: nearer/halfway 64
    for shots in range(1, 6):
        dims = head_dim_schedule(128, 24, shots, allowed_head_dims(32, 128))
        assert dims[-1] == 32 and all(d in (32, 64, 96, 128) for d in dims) and dims == sorted(dims, reverse=True)
    # a dense head_dim that is no allowed size (80, step 32) leaves it at the first shot, the last reaches the target
    assert rounded_next_head_dim(80, 32, 1, 2, [32, 64]) == 64 and rounded_next_head_dim(64, 32, 2, 2, [32, 64]) == 32


def test_without_sizes_the_schedule_is_unchanged():
    current = Widths(9, 3, 64, 1536)
    for shot in (1, 2):
        assert (serving_shot_widths(current, 64, 384, 768, 20, shot, 2, None)
                == shot_widths(current, 64, 384, 768, 20, shot, 2))
    rounded = serving_shot_widths(current, 64, 384, 768, 16, 1, 2, [16, 32, 48, 64])
    assert rounded == Widths(9, 3, 48, 1152)  # the KV groups and the MLP follow the plain schedule


@pytest.mark.parametrize("size,servers", [(42, 3), (20, 3), (40, 1), (96, 1), (48, 2), (64, 0), (128, 0), (256, 0)])
def test_a_size_off_the_kernels_names_each_server_that_misses_it(size: int, servers: int):
    warning = off_kernel_warning([size])
    assert sum(not kernel.accepts(size) for kernel in SERVING_KERNELS) == servers
    if servers == 0:
        assert warning is None
    else:
        assert "\n" not in warning and f"head_dim {size}" in warning and "`--pruning.serving_head_dims` keeps" in warning
        assert "sizes all of them take: 64, 128, 256" in warning
        assert sum(kernel.name in warning for kernel in SERVING_KERNELS) == servers
        assert ("llama.cpp" in warning) == (size not in (40, 64, 72, 80, 96, 112, 128, 256))


@pytest.mark.parametrize("sizes,message", [
    (5, "`--pruning.serving_head_dims=5` must be an even step in 2..8"),
    (16, "`--pruning.serving_head_dims=16` must be an even step in 2..8"),
    ([4, 7], "`--pruning.serving_head_dims=[4, 7]` must list even head sizes in 2..8 (rotary pairs are kept whole); [7] are not"),
    ([], "it is empty"),
])
def test_bad_sizes_are_one_line_naming_the_option(sizes, message: str):
    problems = serving_sizes_problems(sizes, 8)
    assert len(problems) == 1 and message in problems[0] and "\n" not in problems[0]
    callback = TransActPruning(num_shots=1, head_dim_target=4, serving_head_dims=sizes)
    found = callback.config_problems(SimpleNamespace(max_steps=2), config_widths(family_config("llama3")),
                                     family_config("llama3"))
    assert found == problems  # found at CLI startup, with the other pruning options


def test_a_run_rounds_the_target_keeps_one_rotary_progression_and_warns_once(tmp_path: Path):
    """Tiny Llama 3 (head_dim 8): head_dim_target 2 with a step of 4 is 4 (no kernel takes 4: one warning line)."""
    model_dir = save_family_dir("llama3", tmp_path / "base")
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    module = TransActLM(model=str(model_dir), learning_rate=1e-3, warmup_steps=0)
    data = TextDataModule(tokenizer=str(model_dir), dataset=str(corpus), block_size=16, batch_size=2, eval_batch_size=4,
                          num_calibration_samples=4, max_val_blocks=2, max_test_blocks=2, calibration="first")
    pruning = TransActPruning(target_attention=32, target_mlp=37, num_shots=2, steps_between_shots=1,
                              head_dim_target=2, serving_head_dims=4)
    trainer = L.Trainer(max_steps=2, callbacks=[pruning], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="head_dim 4 is not taken by") as caught:
        trainer.fit(module, datamodule=data)
    assert len([w for w in caught if "not taken by" in str(w.message)]) == 1
    assert [plan.after.head_dim for plan in module.plans] == [8, 4]  # shot 1: 8 → 6, halfway between 4 and 8: 8
    assert module.model.config.head_dim == 4 and module.model.model.layers[0].self_attn.k_proj.out_features == 2 * 4
    pairs = module.plans[-1].layers[0].kept_qk_pairs[0]
    assert len(pairs) == 2 and len({b - a for a, b in zip(pairs, pairs[1:])}) <= 1  # one progression: exact RoPE
    assert all(layer.kept_qk_pairs == module.plans[-1].layers[0].kept_qk_pairs for layer in module.plans[-1].layers)


# ----- GGUF from any checkpoint (llama.cpp serving) --------------------------------------------------------------------
@pytest.mark.parametrize("gguf_type,message", [
    ("q4_k_m", "`--gguf=q4_k_m` needs llama.cpp's converter and tools, not found in"),
    ("q3_xyz", "`--gguf=q3_xyz` is not a GGUF type this export writes; choose one of"),
])
def test_export_checkpoint_refuses_a_gguf_it_cannot_make_in_one_line_before_reading(tmp_path: Path, capsys, monkeypatch,
                                                                                   gguf_type: str, message: str):
    from transact_pl.infra.export_checkpoint import main

    monkeypatch.setenv("TRANSACT_LLAMA_CPP", str(tmp_path / "no_build"))
    code = main([str(tmp_path / "missing.ckpt"), str(tmp_path / "out"), "--gguf", gguf_type])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and error.startswith(f"error: {message}")
    assert ("`make llama-cpp`" in error) == (gguf_type == "q4_k_m") and not (tmp_path / "out").exists()
