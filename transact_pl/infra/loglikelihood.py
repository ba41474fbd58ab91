"""log P(continuation | context) for multiple-choice scoring, computed as lm-eval's HFLM computes it.

Context and continuation are tokenized the way HFLM splits them; an input longer than the model's context loses
tokens on the left as HFLM's does; the continuation's log-probabilities come from an fp32 log-softmax. What differs
is only the cost: the choices of one question share their context, so with SDPA or eager attention the context is
run once and every choice follows it in the same sequence, each seeing the context and its own tokens only (a
block attention mask, positions restarting after the context). A one-token choice then costs no token at all (BoolQ's
" yes"/" no" are scored from the context's last position). The log-likelihoods equal HFLM's up to float rounding.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> Pair:
    """Token ids of context and continuation as HFLM splits them: trailing spaces of the context move to the
    continuation, the whole text is tokenized once and the continuation is what follows the context's tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def model_max_length(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> int:
    """Longest input fed to the model (longer ones lose tokens on the left), found the way HFLM finds it."""
    config = getattr(model, "config", None)
    for attribute in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, attribute, None) is not None:
            return int(getattr(config, attribute))
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    return int(tokenizer_limit) if tokenizer_limit is not None and tokenizer_limit < 10**30 else 2048


@dataclass
class _Row:
    """One sequence of a forward pass and the continuations it scores."""

    tokens: list[int]
    segments: list[int]  # 0: context (or a whole request); i > 0: choice i, which sees the context and itself only
    positions: list[int]
    scored: list[tuple[int, list[int], list[int]]]  # (pair index, positions whose logits predict it, its token ids)


def _request_row(index: int, pair: Pair, max_length: int) -> _Row:
    """One request alone, HFLM's way: (context + continuation) cut to max_length + 1 tokens, last one dropped."""
    context, continuation = pair
    tokens = (context + continuation)[-(max_length + 1):][:-1]
    start = len(tokens) - len(continuation)
    return _Row(tokens, [0] * len(tokens), list(range(len(tokens))),
                [(index, list(range(start, len(tokens))), continuation)])


def _shared_context_row(indices: list[int], context: list[int], continuations: list[list[int]]) -> _Row:
    """The context once, then each choice but its last token: choice i's first token is predicted from the
    context's last position, its later tokens from its own (an empty segment for a one-token choice)."""
    tokens, segments, positions, scored = list(context), [0] * len(context), list(range(len(context))), []
    for segment, (index, continuation) in enumerate(zip(indices, continuations), start=1):
        start = len(tokens)
        tokens += continuation[:-1]
        segments += [segment] * (len(continuation) - 1)
        positions += range(len(context), len(context) + len(continuation) - 1)
        scored.append((index, [len(context) - 1] + list(range(start, len(tokens))), continuation))
    return _Row(tokens, segments, positions, scored)


def _rows(pairs: list[Pair], groups: list[list[int]], max_length: int, share_context: bool) -> list[_Row]:
    """A shared-context row per group whose pairs have one context and fit untruncated; a row per request otherwise."""
    rows = []
    for group in groups:
        context = pairs[group[0]][0]
        fits = all(pairs[i][0] == context and len(context) + len(pairs[i][1]) <= max_length + 1 for i in group)
        if share_context and len(group) > 1 and fits:
            rows.append(_shared_context_row(group, context, [pairs[i][1] for i in group]))
        else:
            rows += [_request_row(i, pairs[i], max_length) for i in group]
    return rows


def _block_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[batch, 1, seq, seq] additive mask: causal, and a choice's tokens see the context and their own choice only.
    Padding (segment -1) sees the context and itself, so no softmax row is empty."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    keys, queries = segments[:, None, :], segments[:, :, None]
    allowed = causal & ((keys == 0) | (keys == queries))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def _forward(model: nn.Module, rows: list[_Row], masked: bool, keep_logits: bool) -> list[tuple[int, float]]:
    """(pair index, summed continuation log-prob) for every continuation of ``rows``, in one right-padded forward."""
    parameter = next(model.parameters())
    width = max(len(row.tokens) for row in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, :len(row.tokens)] = torch.tensor(row.tokens)
        segments[index, :len(row.tokens)] = torch.tensor(row.segments)
        positions[index, :len(row.tokens)] = torch.tensor(row.positions)
    first = min(min(predicting[0] for _, predicting, _ in row.scored) for row in rows)
    kwargs = {"logits_to_keep": torch.arange(first, width, device=parameter.device)} if keep_logits else {}
    if masked:  # without a mask HFLM's causal attention is exact: right padding only follows the real tokens
        kwargs["attention_mask"] = _block_mask(segments.to(parameter.device), parameter.dtype)
        kwargs["position_ids"] = positions.to(parameter.device)
    logits = model(input_ids=input_ids.to(parameter.device), **kwargs).logits  # [batch, kept positions, vocab]
    offset = first if keep_logits else 0
    scores = []
    for index, row in enumerate(rows):
        for pair_index, predicting, continuation in row.scored:
            picked = logits[index, torch.tensor(predicting, device=parameter.device) - offset]
            log_probs = F.log_softmax(picked.float(), dim=-1)
            targets = torch.tensor(continuation, device=parameter.device)[:, None]
            scores.append((pair_index, float(log_probs.gather(-1, targets).sum())))
    return scores


def continuation_loglikelihoods(model: nn.Module, pairs: list[Pair], max_length: int,
                                groups: list[list[int]] | None = None, batch_tokens: int = 4096) -> list[float]:
    """log P(continuation | context) per (context ids, continuation ids) pair, in the pairs' order.

    ``groups`` lists the pair indices of each question (default: every pair alone); a group sharing one context is
    run as one sequence when the model's attention takes a custom mask (``sdpa``, ``eager``). Longest rows first,
    batched up to ``batch_tokens`` padded tokens per forward; only positions that predict continuation tokens are
    projected to the vocabulary when the model's forward takes ``logits_to_keep``. Call under ``torch.no_grad``.
    """
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    masked = attention in ("sdpa", "eager")
    keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    rows = _rows(pairs, groups or [[index] for index in range(len(pairs))], max_length, masked)
    rows.sort(key=lambda row: -len(row.tokens))
    scores: list[float] = [0.0] * len(pairs)
    start = 0
    while start < len(rows):
        stop = start + max(1, batch_tokens // len(rows[start].tokens))
        for index, score in _forward(model, rows[start:stop], masked, keep_logits):
            scores[index] = score
        start = stop
    return scores
