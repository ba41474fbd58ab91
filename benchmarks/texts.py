"""Calibration and held-out blocks of the embedded texts, packed exactly as ``datamodules.text`` packs them.

- ``wikipedia_test``: the test split of the embedded Wikipedia excerpt (documents i with i % 10 == 9),
  the same blocks as ``TextDataModule(dataset="wikipedia").test_dataloader()`` with ``max_test_blocks``.
- ``news`` and ``shakespeare``: every document of those corpora (out of domain for Wikipedia
  training), the same blocks as ``TextDataModule.extra_eval_dataloaders``.
- calibration: the first blocks of the Wikipedia train split, as ``TextDataModule.calibration_blocks``.
Blocks are prefixes of the packed stream, so only as many documents as needed are tokenized.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from datamodules.sources import load_documents, split_documents
from datamodules.text import pack_blocks, tokenize_documents
from transact_pl.eval_suite import perplexity_suite

HELDOUT_TEXTS = ("wikipedia_test", "news", "shakespeare")
_CHARS_PER_TOKEN_BOUND = 8  # generous: English text runs ~4 characters per SmolLM2 token


def first_blocks(documents: list[str], tokenizer: PreTrainedTokenizerBase, block_size: int, max_blocks: int) -> Tensor:
    """The first ``max_blocks`` blocks (N, block_size) of ``documents`` packed with EOS between them.

    Equal to ``pack_blocks(tokenize_documents(documents))[:max_blocks]``; tokenizes a prefix of the
    documents that is long enough, doubling it when it is not.
    """
    budget = max_blocks * block_size * _CHARS_PER_TOKEN_BOUND
    while True:
        count, chars = 0, 0
        while count < len(documents) and chars < budget:
            chars += len(documents[count])
            count += 1
        blocks = pack_blocks(tokenize_documents(documents[:count], tokenizer), tokenizer.eos_token_id, block_size)
        if blocks.shape[0] >= max_blocks or count == len(documents):
            return blocks[:max_blocks]
        budget *= 2


def heldout_documents(name: str) -> list[str]:
    """Documents of one held-out text (see the module docstring)."""
    if name == "wikipedia_test":
        return split_documents(load_documents("wikipedia"))["test"]
    if name in ("news", "shakespeare"):
        return load_documents(name)
    raise ValueError(f"unknown held-out text {name!r}; choose from {', '.join(HELDOUT_TEXTS)}")


def heldout_blocks(
    tokenizer: PreTrainedTokenizerBase, block_size: int, max_blocks: int, names: tuple[str, ...] = HELDOUT_TEXTS
) -> dict[str, Tensor]:
    """{text name: LongTensor (≤max_blocks, block_size)} for every held-out text in ``names``."""
    return {name: first_blocks(heldout_documents(name), tokenizer, block_size, max_blocks) for name in names}


def calibration_blocks(tokenizer: PreTrainedTokenizerBase, block_size: int, num_blocks: int) -> Tensor:
    """The first ``num_blocks`` blocks (num_blocks, block_size) of the Wikipedia train split."""
    blocks = first_blocks(split_documents(load_documents("wikipedia"))["train"], tokenizer, block_size, num_blocks)
    if blocks.shape[0] < num_blocks:
        raise ValueError(f"the Wikipedia train split has only {blocks.shape[0]} blocks of {block_size} tokens")
    return blocks


def evaluate_suite(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, block_size: int, max_blocks: int, batch_size: int = 8,
    names: tuple[str, ...] = HELDOUT_TEXTS,
) -> dict[str, dict]:
    """Perplexity of ``model`` on each held-out text: {name: {"ppl", "blocks", "tokens_scored"}}."""
    return perplexity_suite(model, heldout_blocks(tokenizer, block_size, max_blocks, names), batch_size)
