"""Tiny random LLaMA-family models with distinct odd sizes, built in milliseconds."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(num_heads: int = 4, num_kv_heads: int = 2, vocab_size: int = 99, **overrides) -> LlamaConfig:
    """hidden 32, head_dim 8, intermediate 37, 2 layers; GQA by default (4 heads in 2 KV groups)."""
    values = dict(
        hidden_size=32,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=8,
        intermediate_size=37,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(seed: int = 0, **config_overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_overrides))
    return model.eval()


def random_batches(vocab_size: int = 99, num_batches: int = 2, batch_size: int = 3, length: int = 11, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab_size, (batch_size, length), generator=generator)} for _ in range(num_batches)]


def tiny_tokenizer(vocab_size: int = 99):
    """A word-level fast tokenizer over tokens t0..t{n-1} (t0 doubles as EOS), saved with any export."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t1"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="t0", unk_token="t1")
