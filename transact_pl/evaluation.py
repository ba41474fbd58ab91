"""Perplexity of a causal LM over packed blocks, and the size figures of the summary table.

Protocol: each block of ``block_size`` tokens is scored independently (no carried context, no
BOS added, every token but the first of each block predicted), fp32 log-softmax, token-weighted
mean negative log-likelihood, perplexity = exp(mean NLL).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric

from transact_pl.arch import eval_mode, model_widths


def token_nll(logits: Tensor, input_ids: Tensor, chunk_size: int = 1024) -> Tensor:
    """Per-token next-token NLL, (B, T) logits (B, T, V) → (B · (T−1),), computed in fp32 chunks."""
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    targets = input_ids[:, 1:].reshape(-1)
    pieces = [
        F.cross_entropy(shifted_logits[start : start + chunk_size].float(), targets[start : start + chunk_size], reduction="none")
        for start in range(0, targets.numel(), chunk_size)
    ]
    return torch.cat(pieces)


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[dict[str, Tensor]], on_batch: Callable[[], None] | None = None) -> float:
    """exp of the token-weighted mean NLL over every batch (eval mode; training mode restored)."""
    device = next(model.parameters()).device
    mean_nll = MeanMetric().to(device)
    with eval_mode(model):
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            nll = token_nll(model(input_ids=input_ids, use_cache=False).logits, input_ids)
            mean_nll.update(nll)
            if on_batch is not None:
                on_batch()
    return math.exp(mean_nll.compute().item())


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total parameters, non-embedding parameters); tied embeddings count once."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    output = model.get_output_embeddings()
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        embedding += output.weight.numel()
    return total, total - embedding


def kv_cache_bytes_per_token(model: nn.Module, bytes_per_value: int = 2) -> int:
    """K and V of every layer for one token, at 16-bit precision by default."""
    widths = model_widths(model)
    return 2 * model.config.num_hidden_layers * widths.num_kv_heads * widths.head_dim * bytes_per_value
