"""Held-out evaluation of a causal LM: perplexity on several texts and greedy samples from fixed prompts.

Perplexity follows the one protocol of ``transact_pl.evaluation`` (independent blocks, no BOS, fp32,
token-weighted mean NLL). This module takes blocks that are already packed, so it stays free of the
data pipeline: ``TextDataModule.extra_eval_blocks`` (``datamodules/text.py``) packs the texts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, PreTrainedTokenizerBase

from transact_pl.arch import eval_mode
from transact_pl.evaluation import perplexity

# Fixed prompts for the run summaries: a fact, a continuation and an instruction-like line.
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colors are",
)


def block_batches(blocks: Tensor, batch_size: int) -> list[dict[str, Tensor]]:
    """Split blocks (N, T) into consecutive batches ``{"input_ids": (≤batch_size, T)}``, in order."""
    if blocks.ndim != 2:
        raise ValueError(f"blocks must be a 2-D LongTensor (num_blocks, block_size), got shape {tuple(blocks.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return [{"input_ids": blocks[start : start + batch_size]} for start in range(0, blocks.shape[0], batch_size)]


def perplexity_suite(
    model: nn.Module, blocks_by_name: Mapping[str, Tensor], batch_size: int = 8, on_batch: Callable[[], None] | None = None
) -> dict[str, dict]:
    """Perplexity on every named text: ``{name: {"ppl": float, "blocks": N, "tokens_scored": N·(T−1)}}``.

    ``blocks_by_name[name]`` is a LongTensor (N, T) of packed token blocks; every block is scored on
    its own (see ``transact_pl.evaluation.perplexity``). An empty tensor is refused with its name.
    ``on_batch`` is called after every batch (progress bars).
    """
    results: dict[str, dict] = {}
    for name, blocks in blocks_by_name.items():
        if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
            raise ValueError(f"text {name!r} has no block of at least 2 tokens (blocks shape {tuple(blocks.shape)})")
        results[name] = {
            "ppl": perplexity(model, block_batches(blocks, batch_size), on_batch),
            "blocks": int(blocks.shape[0]),
            "tokens_scored": int(blocks.shape[0] * (blocks.shape[1] - 1)),
        }
    return results


@torch.no_grad()
def generate_samples(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str] = DEFAULT_PROMPTS, max_new_tokens: int = 24,
    synced_gpus: bool = False,
) -> list[str]:
    """Greedy continuations (decoded new tokens only) of each prompt, one prompt at a time, no padding.

    Prompts are tokenized without special tokens, like the training text. Generation stops at the
    tokenizer's EOS token or after ``max_new_tokens``. The model's training mode is restored.
    ``synced_gpus`` (every process of a sharded model calls this with the same prompts): each process
    keeps running forwards until every process has stopped, so the sharded forwards' collectives match
    even if one process met EOS earlier.
    """
    device = next(model.parameters()).device
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    samples = []
    with eval_mode(model):
        for prompt in prompts:
            input_ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
            output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
                                    synced_gpus=synced_gpus)
            samples.append(tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True))
    return samples


def heldout_protocol(
    block_size: int, max_blocks: int | None, model_dtype: torch.dtype, prompts: Sequence[str], max_new_tokens: int
) -> dict:
    """How ``evaluate_heldout`` measures, as stored next to its numbers (summary.json, export metadata)."""
    return {
        "block_size": block_size,
        "max_blocks_per_text": max_blocks,
        "blocks": "independent: no context carried from one block to the next",
        "bos": False,
        "logits": "float32 log-softmax",
        "mean": "token-weighted mean NLL over every token but the first of each block; ppl = exp(mean NLL)",
        "model_dtype": str(model_dtype).removeprefix("torch."),
        "generation": {"decoding": "greedy", "max_new_tokens": max_new_tokens, "prompts": list(prompts)},
    }


def evaluate_heldout(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, blocks_by_name: Mapping[str, Tensor], batch_size: int,
    stage: str, prompts: Sequence[str] = DEFAULT_PROMPTS, max_new_tokens: int = 24, synced_gpus: bool = False,
    on_batch: Callable[[], None] | None = None,
) -> dict:
    """One stage's held-out record: ``{"stage", "perplexity": perplexity_suite(...), "samples": {prompt: text}}``.

    No samples when ``max_new_tokens`` is 0; no perplexities when ``blocks_by_name`` is empty.
    """
    samples = generate_samples(model, tokenizer, prompts, max_new_tokens, synced_gpus) if max_new_tokens > 0 else []
    return {
        "stage": stage,
        "perplexity": perplexity_suite(model, blocks_by_name, batch_size, on_batch),
        "samples": dict(zip(prompts, samples)),
    }
