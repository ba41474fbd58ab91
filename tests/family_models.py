"""Tiny random models of every supported family, saved as local Hugging Face directories with a tokenizer
and a matching word-level text corpus, so the whole pipeline (CLI included) runs on them in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config, Qwen3Config

from callbacks.atomic_checkpoint import AtomicCheckpointIO
from callbacks.hf_export import HFExport
from callbacks.transact_pruning import TransActPruning
from datamodules.text import TextDataModule
from tests.tiny_models import tiny_tokenizer
from transact_pl.lightning_modules.transact_lm import TransActLM

COMMON = dict(hidden_size=32, head_dim=8, intermediate_size=37, num_hidden_layers=2, vocab_size=99,
              max_position_embeddings=512, tie_word_embeddings=True)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)


def family_config(family: str) -> PretrainedConfig:
    """Llama 2 (MHA), Llama 3 (GQA, llama3 rope scaling), Mistral (sliding window), Qwen2 (q/k/v biases,
    a sliding-window layer), Qwen3 (per-head q_norm/k_norm); windows shorter than the test sequences."""
    if family == "llama2":
        return LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0)
    if family == "llama3":
        return LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, rope_parameters=dict(LLAMA3_ROPE))
    if family == "mistral":
        return MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, sliding_window=5)
    if family == "qwen2":
        return Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                           sliding_window=5, max_window_layers=1)
    if family == "qwen3":
        return Qwen3Config(**COMMON, num_attention_heads=4, num_key_value_heads=2)
    raise ValueError(f"unknown family {family!r}")


FAMILIES = ("llama2", "llama3", "mistral", "qwen2", "qwen3")


def family_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(family_config(family)).eval()


def save_model_dir(model, path: Path, tokenizer_vocab: int = 99) -> Path:
    """``model`` and a word-level tokenizer of ``tokenizer_vocab`` tokens (t0 = EOS) in ``path``."""
    model.save_pretrained(path)
    tiny_tokenizer(tokenizer_vocab).save_pretrained(path)
    return path


def save_family_dir(family: str, path: Path, seed: int = 0) -> Path:
    return save_model_dir(family_model(family, seed), path)


def save_gpt2_dir(path: Path) -> Path:
    """An architecture TransAct does not support (fused c_attn, no SwiGLU)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64))
    return save_model_dir(model, path)


def write_corpus(path: Path, num_documents: int = 30, words: int = 120, vocab_size: int = 99, seed: int = 0) -> Path:
    """A .jsonl of documents made of tokens t2..t{vocab-1} (t0 is EOS, t1 UNK), one word per token."""
    generator = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(num_documents):
        ids = torch.randint(2, vocab_size, (words,), generator=generator).tolist()
        lines.append(json.dumps({"text": " ".join(f"t{i}" for i in ids)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_cli_config(path: Path, model_dir: Path, corpus: Path, root: Path, max_steps: int = 6) -> Path:
    """A YAML for train.py: 2 shots (2 → 1 KV group, MLP 37 → 19) at steps 0 and 3, a checkpoint every
    step in ``root/checkpoints`` (atomic), export to ``root/export``."""
    path.write_text(f"""\
# python train.py fit --config {path}   (written by the tests: the whole cycle on a tiny random model)
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: {max_steps}
  val_check_interval: 3
  check_val_every_n_epoch: null
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  deterministic: true
  default_root_dir: {root}
  logger: false
  plugins:
    - class_path: callbacks.atomic_checkpoint.AtomicCheckpointIO
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        dirpath: {root}/checkpoints
        every_n_train_steps: 1
        save_top_k: -1
        save_last: true
pruning:
  target_attention: 16
  target_mlp: 19
  num_shots: 2
  first_shot_step: 0
  steps_between_shots: 3
  scorer: acts
report:
  evaluate: false
export:
  output_dir: {root}/export
  overwrite: false
model:
  class_path: transact_pl.lightning_modules.transact_lm.TransActLM
  init_args:
    model: {model_dir}
    learning_rate: 1.0e-3
    warmup_steps: 1
data:
  dataset: {corpus}
  block_size: 16
  batch_size: 2
  eval_batch_size: 4
  num_calibration_samples: 4
  max_val_blocks: 2
  max_test_blocks: 2
""")
    return path


def fit(model: str, dataset: str, root: Path, targets: tuple[int, int], num_layers: int | None = None,
        ckpt_path: str | None = None, head_dim_target: int | None = None) -> TransActLM:
    """2 shots (steps 0 and 2) → 4 steps of training, a checkpoint after every step, export to root/export."""
    module = TransActLM(model=model, num_layers=num_layers, learning_rate=1e-3, warmup_steps=0)
    # The tiny corpus's documents are shorter than a block for some families' tokenizers, so the calibration set is
    # the first train blocks (a held-out share cuts every document on its own).
    data = TextDataModule(tokenizer=model, dataset=dataset, block_size=16, batch_size=2, eval_batch_size=4,
                          num_calibration_samples=4, max_val_blocks=2, max_test_blocks=2, calibration="first")
    callbacks = [
        TransActPruning(target_attention=targets[0], target_mlp=targets[1], num_shots=2, steps_between_shots=2,
                       head_dim_target=head_dim_target),
        ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=1, save_top_k=-1),
        HFExport(str(root / "export")),
    ]
    trainer = L.Trainer(max_steps=4, callbacks=callbacks, plugins=[AtomicCheckpointIO()], logger=False, deterministic=True,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=root)
    L.seed_everything(0)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


REPO = Path(__file__).resolve().parents[1]


def run_cli(cwd: Path, config: Path, *args: str, own_cache: bool = True) -> subprocess.CompletedProcess:
    """``train.py fit --config <config> <args>`` in a subprocess run in ``cwd``; with ``own_cache`` the asset cache
    is ``cwd/cache`` (nothing of the user's cache is read or written), else the user's."""
    command = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(config), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if own_cache:
        env["TRANSACT_PL_CACHE"] = str(cwd / "cache")
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
