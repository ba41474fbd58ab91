"""Causal-LM text data: documents (``datamodules.sources``) → tokens → fixed-size blocks, split by document.

Batches are ``{"input_ids": LongTensor (B, block_size)}``; the model derives next-token labels.
Training reads an endless, resumable stream of shuffled train blocks; evaluation reads blocks in
order; calibration reads the first blocks of a source in order, or a seeded sample of a held-out share.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from datamodules.sources import (CALIBRATION_POSITION, SPLIT_MODULUS, TEST_POSITION, VAL_POSITION, load_documents,
                                 split_documents, stratified_sample)
from transact_pl.infra.assets import CORPORA, cache_dir, corpus_documents, resolve_model_source
from transact_pl.errors import ConfigError
from transact_pl.infra.loading import load_tokenizer

SEED_RANGE = (0, 2**32 - 1)  # what Lightning's seed_everything accepts; seed + pass stays within torch's 64 bits
CALIBRATION_MODES = ("first", "heldout")
EVAL_BLOCK_MODES = ("first", "spread")


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    identity = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    return hashlib.sha256(identity.encode()).hexdigest()


def tokenize_documents(documents: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of each document (no special tokens), cached in ``<cache>/datasets/`` by content hash."""
    key = hashlib.sha256(_tokenizer_fingerprint(tokenizer).encode())
    for document in documents:
        key.update(hashlib.sha256(document.encode()).digest())
    cache_file = cache_dir() / "datasets" / f"tokens-{key.hexdigest()[:32]}.arrow"
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tokenized = datasets.Dataset.from_list([{"text": document} for document in documents]).map(
        lambda batch: {"input_ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
        batched=True, remove_columns=["text"], cache_file_name=str(cache_file), desc="Tokenizing",
    )
    return tokenized["input_ids"]


def pack_blocks(token_lists: list[list[int]], eos_token_id: int, block_size: int) -> torch.Tensor:
    """Join documents with ``eos_token_id`` between them and cut the stream into blocks.

    Returns a LongTensor (num_blocks, block_size) of contiguous tokens; no padding, the remainder
    shorter than one block is dropped.
    """
    stream: list[int] = []
    for index, token_ids in enumerate(token_lists):
        if index:
            stream.append(eos_token_id)
        stream.extend(token_ids)
    num_blocks = len(stream) // block_size
    return torch.tensor(stream[: num_blocks * block_size], dtype=torch.long).view(num_blocks, block_size)


def pack_each_document(token_lists: list[list[int]], block_size: int) -> torch.Tensor:
    """Cut every document into blocks on its own, so no block straddles two documents.

    Returns a LongTensor (num_blocks, block_size), documents in order; each document's remainder
    shorter than one block is dropped (a document shorter than ``block_size`` gives no block).
    """
    blocks = [torch.tensor(ids[: len(ids) // block_size * block_size], dtype=torch.long).view(-1, block_size)
              for ids in token_lists]
    return torch.cat(blocks) if blocks else torch.empty(0, block_size, dtype=torch.long)


def evenly_spaced(num_blocks: int, count: int) -> torch.Tensor:
    """``count`` distinct indices evenly spaced from 0 to ``num_blocks - 1`` inclusive (0 alone for one;
    all of them when ``count >= num_blocks``): index j is ``j * (num_blocks - 1) // (count - 1)``."""
    if count >= num_blocks:
        return torch.arange(num_blocks)
    if count == 1:
        return torch.zeros(1, dtype=torch.long)
    return torch.arange(count) * (num_blocks - 1) // (count - 1)


def eval_subset(blocks: torch.Tensor, limit: int | None, mode: str) -> torch.Tensor:
    """At most ``limit`` of ``blocks`` (N, T), in order: the first ones (``first``) or evenly spaced over all N
    (``spread``); all of them when ``limit`` is None."""
    if limit is None:
        return blocks
    return blocks[:limit] if mode == "first" else blocks[evenly_spaced(blocks.shape[0], limit)]


class BlockDataset(Dataset):
    """Map-style view of blocks (N, T) yielding ``{"input_ids": LongTensor (T,)}``."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index]}


class TrainBlockStream(IterableDataset):
    """Endless stream of shuffled blocks (N, T) starting at global sample position ``start``.

    Sample position n belongs to pass p = n // N and is block ``perm_p[n % N]``, where ``perm_p``
    is ``torch.randperm(N)`` drawn from ``torch.Generator().manual_seed(seed + p)``. Batches of
    ``batch_size`` consecutive positions are dealt round-robin to ranks, then to each rank's
    loader workers, so the global sample order is independent of the number of workers.
    """

    def __init__(self, blocks: torch.Tensor, seed: int, start: int, batch_size: int, rank: int, world_size: int) -> None:
        self.blocks, self.seed, self.start, self.batch_size = blocks, seed, start, batch_size
        self.rank, self.world_size = rank, world_size

    def _permutation(self, pass_index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + pass_index)
        return torch.randperm(self.blocks.shape[0], generator=generator)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        num_blocks = self.blocks.shape[0]
        cached_pass, permutation = -1, torch.empty(0, dtype=torch.long)
        local_batch = worker_id
        while True:
            global_batch = local_batch * self.world_size + self.rank
            first = self.start + global_batch * self.batch_size
            for position in range(first, first + self.batch_size):
                pass_index = position // num_blocks
                if pass_index != cached_pass:
                    cached_pass, permutation = pass_index, self._permutation(pass_index)
                yield {"input_ids": self.blocks[permutation[position % num_blocks]]}
            local_batch += num_workers


class TextDataModule(L.LightningDataModule):
    """Packed causal-LM blocks from an embedded corpus, local files or a ``datasets`` hub source."""

    def __init__(
        self,
        tokenizer: str,
        dataset: str = "wikipedia",
        block_size: int = 256,
        batch_size: int = 4,
        eval_batch_size: int = 8,
        num_calibration_samples: int = 16,
        calibration: str = "heldout",
        calibration_file: str | None = None,
        max_val_blocks: int | None = None,
        max_test_blocks: int | None = None,
        eval_blocks: str = "spread",
        seed: int = 1234,
        num_workers: int = 0,
    ) -> None:
        """Configure the data; nothing is read until ``prepare_data``/``setup``.

        Documents are tokenized without special tokens, joined with the tokenizer's EOS token id
        between consecutive documents, and packed into contiguous blocks of ``block_size`` tokens
        (no padding; the remainder is dropped). Splits are by document: document i (0-based,
        source order, empty documents skipped) goes to test if i % 10 == 9, to val if
        i % 10 == 8, to the calibration share if i % 10 == 7 and ``calibration`` is ``heldout``,
        else to train. Each split is packed separately.

        Args:
            tokenizer: Model source whose tokenizer to use: ``smollm2-135m-instruct`` (embedded,
                converted on first use), a local model directory or a hub name.
            dataset: ``wikipedia``, ``news`` or ``shakespeare`` (embedded corpora); a local
                ``.txt`` file (the whole file is one document), ``.jsonl``/``.json`` file (one
                document per record, field ``text``) or a directory of such files (sorted by
                name); or ``hf:<name>[:<config>]`` (field ``text`` of the train split, which is
                then split here).
            block_size: Tokens per block (sequence length), at least 2.
            batch_size: Training blocks per batch (per device).
            eval_batch_size: Blocks per batch for validation, test and calibration.
            num_calibration_samples: Size of the calibration set, in blocks of `block_size` tokens
                (chosen as `calibration` says).
            calibration: How the calibration set is chosen from `dataset` (a `calibration_file`, when
                given, always gives its first blocks in order). ``first``: the first
                `num_calibration_samples` blocks, in order, of the packed train split (so they are
                also trained on). ``heldout`` (default): the documents i % 10 == 7 of
                `dataset` become a calibration share that training never sees (train keeps
                i % 10 < 7); each of its documents is cut into blocks on its own (no block
                straddles two documents; a document's last partial block is dropped), the blocks
                of all its documents are put in source order, that sequence is cut into
                `num_calibration_samples` equal consecutive strata and one block is drawn at random
                from each (seeded by `seed`): a random sample that covers every document of the share
                in proportion to its length.
            calibration_file: Source of the calibration documents instead of `dataset`: its first
                `num_calibration_samples` blocks, packed like the splits, in order (this reproduces a
                selection exactly; no share of `dataset` is then held out); accepts every form
                ``dataset`` accepts.
            max_val_blocks: Keep only N validation blocks, chosen as `eval_blocks` says (None: all).
            max_test_blocks: Keep only N test blocks, chosen as `eval_blocks` says, also for
                extra evaluation texts (None: all).
            eval_blocks: Which blocks `max_val_blocks`/`max_test_blocks` (and the extra evaluation
                cap) keep. ``first``: the first N blocks of the packed split. ``spread`` (default): N blocks
                evenly spaced over the whole packed split, from its first block to its last (block
                j * (num_blocks - 1) // (N - 1) for j = 0..N-1), so every part of the split counts.
            seed: Shuffling seed: pass p over the train blocks uses the permutation drawn from
                ``torch.Generator().manual_seed(seed + p)``. Training is an endless stream
                (stop it with ``--trainer.max_steps``) that resumes exactly from a checkpoint.
                Also draws the ``heldout`` calibration sample.
            num_workers: DataLoader worker processes; the training stream is sharded by batch so
                workers never duplicate samples.
        """
        super().__init__()
        self.tokenizer_source = tokenizer
        self.dataset = dataset
        self.block_size = block_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_calibration_samples = num_calibration_samples
        self.calibration = calibration
        self.calibration_file = calibration_file
        self.max_val_blocks = max_val_blocks
        self.max_test_blocks = max_test_blocks
        self.eval_blocks = eval_blocks
        self.seed = seed
        self.num_workers = num_workers
        self.consumed_samples = 0
        self._validate_options()
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._splits: dict[str, torch.Tensor] | None = None

    @property
    def reserves_calibration_share(self) -> bool:
        """Whether documents i % 10 == 7 are kept out of training as the calibration share."""
        return self.calibration == "heldout" and self.calibration_file is None

    def _validate_options(self) -> None:
        """Raise one ConfigError listing every out-of-range number and unknown or conflicting choice."""
        minimums = {"block_size": 2, "batch_size": 1, "eval_batch_size": 1, "num_calibration_samples": 1,
                    "max_val_blocks": 1, "max_test_blocks": 1, "num_workers": 0}
        problems = [f"`--data.{name}={getattr(self, name)}` must be at least {minimum}"
                    for name, minimum in minimums.items()
                    if getattr(self, name) is not None and getattr(self, name) < minimum]
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            problems.append(f"`--data.seed={self.seed}` must lie in {SEED_RANGE[0]}..{SEED_RANGE[1]}")
        for name, choices in (("calibration", CALIBRATION_MODES), ("eval_blocks", EVAL_BLOCK_MODES)):
            if getattr(self, name) not in choices:
                problems.append(f"`--data.{name}={getattr(self, name)}` is not a valid choice; use one of "
                                f"{', '.join(choices)}")
        if problems:
            raise ConfigError("; ".join(problems))

    def prepare_data(self) -> None:
        """Download/convert embedded assets once (rank 0) so ``setup`` only reads caches."""
        resolve_model_source(self.tokenizer_source)
        for source in (self.dataset, self.calibration_file):
            if source in CORPORA:
                corpus_documents(source)

    def setup(self, stage: str | None = None) -> None:
        """Tokenize and pack the splits (idempotent)."""
        if self._splits is not None:
            return
        documents = split_documents(load_documents(self.dataset), self.reserves_calibration_share)
        calibration_share = documents.pop("calibration", None)
        self._splits = {name: self._pack(docs) for name, docs in documents.items()}
        for name, limit in (("val", self.max_val_blocks), ("test", self.max_test_blocks)):
            self._splits[name] = eval_subset(self._splits[name], limit, self.eval_blocks)
        if calibration_share is not None:
            token_lists = tokenize_documents(calibration_share, self.tokenizer) if calibration_share else []
            self._splits["calibration"] = pack_each_document(token_lists, self.block_size)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer of ``--data.tokenizer`` (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_source)
            if self._tokenizer.eos_token_id is None:
                raise ConfigError(f"`--data.tokenizer={self.tokenizer_source}` has no EOS token to join documents "
                                  "with; use a tokenizer that defines eos_token")
        return self._tokenizer

    def _pack(self, documents: list[str]) -> torch.Tensor:
        token_lists = tokenize_documents(documents, self.tokenizer) if documents else []
        return pack_blocks(token_lists, self.tokenizer.eos_token_id, self.block_size)

    def split_blocks(self, split: str) -> torch.Tensor:
        """Blocks (num_blocks, block_size) of ``train``, ``val``, ``test`` or (``calibration=heldout``)
        ``calibration``, the whole share, each document cut on its own; errors if the split is empty."""
        self.setup()
        assert self._splits is not None
        blocks = self._splits[split]
        if blocks.shape[0] == 0 and split == "calibration":
            raise ConfigError(
                f"the calibration share of `--data.dataset={self.dataset}` has no block of `--data.block_size="
                f"{self.block_size}` tokens within one document; documents {CALIBRATION_POSITION}, "
                f"{SPLIT_MODULUS + CALIBRATION_POSITION}, ... (0-based) form it, so give at least "
                f"{CALIBRATION_POSITION + 1} documents with enough text, lower --data.block_size, or use "
                "--data.calibration=first")
        if blocks.shape[0] == 0:
            raise ConfigError(
                f"the {split} split of `--data.dataset={self.dataset}` has no block of `--data.block_size="
                f"{self.block_size}` tokens; documents {VAL_POSITION}, {TEST_POSITION}, "
                f"{SPLIT_MODULUS + VAL_POSITION}, ... (0-based) go to val/test, so give at least "
                f"{SPLIT_MODULUS} documents with enough text, or lower --data.block_size"
            )
        return blocks

    def calibration_blocks(self) -> torch.Tensor:
        """The calibration set, LongTensor (num_calibration_samples, block_size); see ``calibration``."""
        if self.calibration_file is not None:
            blocks = self._pack(load_documents(self.calibration_file, "--data.calibration_file"))
            origin = f"`--data.calibration_file={self.calibration_file}`"
        elif self.calibration == "heldout":
            blocks = self.split_blocks("calibration")
            origin = (f"the calibration share of `--data.dataset={self.dataset}` (documents i % {SPLIT_MODULUS} == "
                      f"{CALIBRATION_POSITION}, each cut on its own)")
        else:
            blocks, origin = self.split_blocks("train"), f"the train split of `--data.dataset={self.dataset}`"
        if blocks.shape[0] < self.num_calibration_samples:
            raise ConfigError(
                f"`--data.num_calibration_samples={self.num_calibration_samples}` exceeds the {blocks.shape[0]} "
                f"blocks of {self.block_size} tokens available in {origin}; lower it or give more text"
            )
        if self.reserves_calibration_share:
            return blocks[stratified_sample(blocks.shape[0], self.num_calibration_samples, self.seed)]
        return blocks[: self.num_calibration_samples]

    def _rank_and_world_size(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        """Endless shuffled train stream starting at ``consumed_samples`` (exact resume)."""
        rank, world_size = self._rank_and_world_size()
        stream = TrainBlockStream(self.split_blocks("train"), self.seed, self.consumed_samples,
                                  self.batch_size, rank, world_size)
        return DataLoader(stream, batch_size=self.batch_size, num_workers=self.num_workers)

    def _sequential_loader(self, blocks: torch.Tensor) -> DataLoader:
        return DataLoader(BlockDataset(blocks), batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        """Validation blocks in order."""
        return self._sequential_loader(self.split_blocks("val"))

    def test_dataloader(self) -> DataLoader:
        """Test blocks in order."""
        return self._sequential_loader(self.split_blocks("test"))

    def calibration_dataloader(self) -> DataLoader:
        """The calibration set in order (not a Lightning hook: pruning callbacks call it)."""
        return self._sequential_loader(self.calibration_blocks())

    def extra_eval_blocks(self, names: list[str], option: str = "extra_eval",
                          max_blocks: int | None = None) -> dict[str, torch.Tensor]:
        """Blocks (N, block_size) of all documents of other sources (e.g. ``news``, ``shakespeare``), packed the
        same way, at most ``max_blocks`` of each (None: ``max_test_blocks``) chosen as ``eval_blocks`` says;
        keys are the given names. ``option`` is the caller's CLI flag, named in error messages."""
        cap = max_blocks if max_blocks is not None else self.max_test_blocks
        texts = {}
        for name in names:
            blocks = eval_subset(self._pack(load_documents(name, option)), cap, self.eval_blocks)
            if blocks.shape[0] == 0:
                raise ConfigError(f"`{option}={name}` has no block of `--data.block_size={self.block_size}` "
                                  "tokens; give more text or lower --data.block_size")
            texts[name] = blocks
        return texts

    def extra_eval_dataloaders(self, names: list[str], option: str = "extra_eval") -> dict[str, DataLoader]:
        """Loaders over ``extra_eval_blocks(names, option)`` (capped at ``max_test_blocks``), in order."""
        return {name: self._sequential_loader(blocks) for name, blocks in self.extra_eval_blocks(names, option).items()}

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count training samples when Lightning actually consumes a batch (after its prefetching)."""
        if self.trainer is not None and self.trainer.training:
            self.consumed_samples += batch["input_ids"].shape[0] * self.trainer.world_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: ``consumed_samples``, the global training samples consumed so far, and
        ``calibration_share_reserved``, whether the train split left out the calibration share."""
        return {"consumed_samples": self.consumed_samples,
                "calibration_share_reserved": self.reserves_calibration_share}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the stream position; Lightning calls this before ``train_dataloader``.

        The position only means the same samples on the same train split, so a checkpoint whose run kept
        (or left out) the calibration share is refused by a run that does otherwise. Checkpoints written
        before the share existed trained on it.
        """
        reserved = bool(state_dict.get("calibration_share_reserved", False))
        if reserved != self.reserves_calibration_share:
            written = "heldout" if reserved else "first"
            raise ConfigError(
                f"the checkpoint's run trained {'without' if reserved else 'on'} documents i % {SPLIT_MODULUS} == "
                f"{CALIBRATION_POSITION} (`--data.calibration={written}`) but this run gives "
                f"`--data.calibration={self.calibration}`, a different train split; resume with "
                f"`--data.calibration={written}`, or start a new run without --ckpt_path")
        self.consumed_samples = int(state_dict["consumed_samples"])
