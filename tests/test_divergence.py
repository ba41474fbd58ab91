"""A diverged run stops and keeps its last finite checkpoint; a final model no better than uniform is flagged.

NaN/Inf weights or a NaN/Inf validation loss end the run with one line naming the step (exit 1), and no
checkpoint with non-finite weights is ever written over the last finite one. A model whose validation
perplexity is the vocabulary size (a uniform guess) is still exported, with a warning in the summary and
at the top of its model card.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from callbacks.atomic_checkpoint import AtomicCheckpointIO
from callbacks.run_guard import RunGuard
from datamodules.text import TextDataModule
from tests.family_models import save_family_dir, tiny_cli_config, write_corpus
from tests.test_bad_input import error_line, run_cli
from tests.test_signals import fit_tiny
from tests.tiny_models import tiny_llama
from transact_pl.infra.export import model_card
from transact_pl.lightning_modules.transact_lm import TransActLM
from transact_pl.infra.report import print_summary, uniform_warning

REPO = Path(__file__).resolve().parents[1]


def all_finite(checkpoint_path: Path) -> bool:
    state = torch.load(checkpoint_path, weights_only=True)["state_dict"]
    return all(torch.isfinite(tensor).all() for tensor in state.values())


@pytest.fixture
def tiny_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.setenv("TRANSACT_PL_CACHE", str(tmp_path / "cache"))
    return save_family_dir("llama3", tmp_path / "base"), write_corpus(tmp_path / "corpus.jsonl")


def test_a_huge_learning_rate_stops_at_the_step_and_keeps_the_last_finite_checkpoint(tmp_path: Path) -> None:
    """learning_rate 1e3 makes the tiny model's weights NaN after its second step."""
    save_family_dir("llama3", tmp_path / "base")
    write_corpus(tmp_path / "corpus.jsonl")
    config = tiny_cli_config(tmp_path / "tiny.yaml", tmp_path / "base", tmp_path / "corpus.jsonl", tmp_path / "run")
    result = run_cli(tmp_path, config, f"--export.output_dir={tmp_path}/export", "--model.init_args.learning_rate=1e3")
    line = error_line(result, exit_code=1)
    assert line.startswith("error: the weights hold NaN/Inf (`model.") and " at step 2; not saving this checkpoint" in line
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert f"the last finite checkpoint is {last}" in line
    assert torch.load(last, weights_only=True)["global_step"] == 1 and all_finite(last)
    assert not (tmp_path / "export").exists()


class PoisonWeightAtStep(Callback):
    """Writes a NaN into one weight at the end of training step ``step`` (before that step's checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")


def test_non_finite_weights_are_never_checkpointed(tiny_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(FloatingPointError) as caught:
        fit_tiny(*tiny_inputs, tmp_path / "run", PoisonWeightAtStep(step=3))
    assert "(`model.layers.1.mlp.down_proj.weight`) at step 3; not saving this checkpoint" in str(caught.value)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 2
    assert all(all_finite(path) for path in checkpoints.glob("*.ckpt"))
    assert not (tmp_path / "run_export").exists()


class NaNLogitsInEvaluation(Callback):
    """Makes the logits of the first block of every evaluation batch NaN: the weights stay finite, and the
    validation loss must not quietly become the mean over the other blocks."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.model.get_output_embeddings().register_forward_hook(self.poison)

    @staticmethod
    def poison(module: torch.nn.Module, inputs: tuple, logits: torch.Tensor) -> torch.Tensor:
        if module.training:
            return logits
        poisoned = logits.clone()
        poisoned[0] = float("nan")
        return poisoned


def test_a_non_finite_validation_loss_stops_the_run_naming_the_step(tiny_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, corpus = tiny_inputs
    trainer = L.Trainer(max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                        callbacks=[NaNLogitsInEvaluation(), RunGuard(),
                                   ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=1, save_last=True)],
                        plugins=[AtomicCheckpointIO()], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    data = TextDataModule(tokenizer=str(model_dir), dataset=str(corpus), block_size=16, batch_size=2, eval_batch_size=4,
                          num_calibration_samples=4, max_val_blocks=2, max_test_blocks=2)
    with pytest.raises(FloatingPointError, match=r"^validation loss is nan at step 2; lower --model.learning_rate"):
        trainer.fit(TransActLM(model=str(model_dir), learning_rate=1e-3, warmup_steps=0), datamodule=data)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


# ----- no better than uniform --------------------------------------------------------------------------------------
ROWS = [{"stage": "dense (step 0)", "heads": 4, "kv_heads": 2, "mlp": 37, "val_ppl": 40.0},
        {"stage": "final (step 6)", "heads": 2, "kv_heads": 1, "mlp": 19, "val_ppl": 98.99}]


@pytest.mark.parametrize("final_ppl, warned", [(40.0, False), (97.0, False), (98.99, True), (5e4, True),
                                               (math.inf, True), (math.nan, True)])
def test_uniform_warning_when_the_final_perplexity_reaches_the_vocabulary_size(final_ppl: float, warned: bool) -> None:
    rows = [ROWS[0], {**ROWS[1], "val_ppl": final_ppl}]
    warning = uniform_warning(rows, vocab_size=99)
    assert (warning is not None) == warned
    if warned:
        assert "reaches its vocabulary size 99 (what a uniform guess scores)" in warning and "--model.learning_rate" in warning
    assert uniform_warning(rows[:1], vocab_size=99) is None  # the dense row is not the final model
    assert uniform_warning([], vocab_size=99) is None


def test_summary_and_model_card_carry_the_warning(capsys: pytest.CaptureFixture) -> None:
    print_summary(ROWS, vocab_size=99)
    assert "warning: the final model's validation perplexity 98.99 reaches its vocabulary size 99" in capsys.readouterr().out

    card = model_card(tiny_llama(), [], ROWS)
    title = card.splitlines().index("# TransAct-pruned model")
    assert card.splitlines()[title + 2].startswith("> **Warning:** the final model's validation perplexity 98.99")

    healthy = [ROWS[0], {**ROWS[1], "val_ppl": 50.0}]
    assert "Warning" not in model_card(tiny_llama(), [], healthy)
    print_summary(healthy, vocab_size=99)
    assert "warning" not in capsys.readouterr().out


@pytest.mark.slow
def test_debug_config_with_a_huge_learning_rate_is_exported_with_the_uniform_warning(tmp_path: Path) -> None:
    """On the 2-layer SmolLM2 cut, learning_rate 1e3 leaves finite weights that predict uniformly (ppl 49152)."""
    command = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(REPO / "configs" / "debug_tiny.yaml"),
               "--model.init_args.learning_rate=1e3", "--trainer.callbacks=[]", "--trainer.enable_progress_bar=false"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: the final model's validation perplexity 4.915e+04 reaches its vocabulary size 49152" in result.stdout
    card = (tmp_path / "exports" / "debug_tiny" / "README.md").read_text()
    assert "> **Warning:** the final model's validation perplexity 4.915e+04 reaches its vocabulary size 49152" in card
