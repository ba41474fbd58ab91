"""TextDataModule with the real SmolLM2 tokenizer on small local corpora."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import TextDataModule
from datamodules.sources import split_documents
from datamodules.text import evenly_spaced, pack_blocks, pack_each_document
from transact_pl.errors import ConfigError

NUM_DOCUMENTS = 30


def make_document(index: int) -> str:
    """A document whose every word names its index, so decoded blocks reveal their source."""
    return " ".join(f"doc{index:02d}w{word}" for word in range(40 + 7 * index))


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the token caches these tests write out of the user cache."""
    monkeypatch.setenv("TRANSACT_PL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def corpus_file(tmp_path: Path, isolated_cache: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": make_document(i)}) + "\n" for i in range(NUM_DOCUMENTS)))
    return path


def make_datamodule(smollm2_dir: Path, dataset: Path | str, **overrides: object) -> TextDataModule:
    # The whole-split and first-blocks mode unless a test asks for the held-out share or spread blocks.
    options: dict = dict(tokenizer=str(smollm2_dir), dataset=str(dataset), block_size=16, batch_size=2,
                         eval_batch_size=3, num_calibration_samples=5, calibration="first", eval_blocks="first")
    options.update(overrides)
    return TextDataModule(**options)


def documents_in(blocks: torch.Tensor, tokenizer) -> set[int]:
    return {int(index) for block in blocks for index in re.findall(r"doc(\d\d)", tokenizer.decode(block))}


def test_split_is_by_document_position() -> None:
    splits = split_documents([str(i) for i in range(25)])
    assert splits["test"] == ["9", "19"] and splits["val"] == ["8", "18"]
    assert sorted(sum(splits.values(), []), key=int) == [str(i) for i in range(25)]
    reserved = split_documents([str(i) for i in range(25)], reserve_calibration=True)
    assert reserved["calibration"] == ["7", "17"] and reserved["val"] == splits["val"] and reserved["test"] == splits["test"]
    assert reserved["train"] == [d for d in splits["train"] if d not in ("7", "17")]


def test_each_document_is_cut_on_its_own() -> None:
    blocks = pack_each_document([[1, 2, 3, 4, 5], [6], [8, 9, 10, 11]], block_size=2)
    assert blocks.tolist() == [[1, 2], [3, 4], [8, 9], [10, 11]]
    assert pack_each_document([], block_size=3).shape == (0, 3)


@pytest.mark.parametrize(("num_blocks", "count", "expected"),
                         [(10, 4, [0, 3, 6, 9]), (10, 2, [0, 9]), (7, 1, [0]), (5, 5, [0, 1, 2, 3, 4]), (3, 8, [0, 1, 2])])
def test_evenly_spaced_runs_from_first_to_last(num_blocks: int, count: int, expected: list[int]) -> None:
    assert evenly_spaced(num_blocks, count).tolist() == expected
    for n in range(1, 40):  # always distinct and increasing, so a spread subset never repeats a block
        for k in range(1, n + 1):
            indices = evenly_spaced(n, k).tolist()
            assert len(indices) == k and indices == sorted(set(indices)) and indices[-1] == (n - 1 if k > 1 else 0)


def test_packing_joins_documents_with_eos_and_drops_remainder() -> None:
    blocks = pack_blocks([[1, 2, 3], [4, 5], [6, 7, 8, 9]], eos_token_id=0, block_size=4)
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6]]
    assert blocks.dtype == torch.long


def test_splits_are_deterministic_disjoint_and_exact(smollm2_dir: Path, smollm2_tokenizer, corpus_file: Path) -> None:
    first, second = make_datamodule(smollm2_dir, corpus_file), make_datamodule(smollm2_dir, corpus_file)
    expected = {"train": {i for i in range(NUM_DOCUMENTS) if i % 10 < 8},
                "val": {8, 18, 28}, "test": {9, 19, 29}}
    for split, documents in expected.items():
        blocks = first.split_blocks(split)
        assert torch.equal(blocks, second.split_blocks(split))
        assert blocks.shape[1] == 16 and documents_in(blocks, smollm2_tokenizer) == documents
        # The packed stream is exactly the tokenizer's output on the documents joined by EOS.
        joined = smollm2_tokenizer.eos_token.join(make_document(i) for i in sorted(documents))
        stream = smollm2_tokenizer(joined, add_special_tokens=False)["input_ids"]
        assert blocks.flatten().tolist() == stream[: blocks.numel()]
        assert len(stream) - blocks.numel() < 16
        assert stream.count(smollm2_tokenizer.eos_token_id) == len(documents) - 1  # one EOS between documents


def test_calibration_set_is_first_train_blocks(smollm2_dir: Path, corpus_file: Path) -> None:
    datamodule = make_datamodule(smollm2_dir, corpus_file, num_calibration_samples=7)
    calibration = torch.cat([batch["input_ids"] for batch in datamodule.calibration_dataloader()])
    assert torch.equal(calibration, datamodule.split_blocks("train")[:7])


def test_calibration_file_overrides_train_split(smollm2_dir: Path, smollm2_tokenizer, corpus_file: Path,
                                                tmp_path: Path) -> None:
    calibration_text = tmp_path / "calibration.txt"
    calibration_text.write_text(make_document(77))
    datamodule = make_datamodule(smollm2_dir, corpus_file, calibration="first", calibration_file=str(calibration_text),
                                 num_calibration_samples=4)
    calibration = datamodule.calibration_blocks()
    stream = smollm2_tokenizer(make_document(77), add_special_tokens=False)["input_ids"]
    assert calibration.flatten().tolist() == stream[: 4 * 16]
    datamodule.num_calibration_samples = 1000
    with pytest.raises(ConfigError, match=r"--data.num_calibration_samples=1000.* exceeds the \d+ blocks"):
        datamodule.calibration_blocks()


@pytest.fixture
def long_corpus_file(tmp_path: Path, isolated_cache: Path) -> Path:
    """100 documents: a calibration share of 10 (7, 17, ..., 97), each several 16-token blocks long."""
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"text": make_document(i)}) + "\n" for i in range(100)))
    return path


def test_heldout_share_is_never_trained_on(smollm2_dir: Path, smollm2_tokenizer, corpus_file: Path) -> None:
    datamodule = make_datamodule(smollm2_dir, corpus_file, calibration="heldout")
    share = {7, 17, 27}
    expected = {"train": {i for i in range(NUM_DOCUMENTS) if i % 10 < 7}, "val": {8, 18, 28}, "test": {9, 19, 29},
                "calibration": share}
    for split, documents in expected.items():
        assert documents_in(datamodule.split_blocks(split), smollm2_tokenizer) == documents
    calibration = datamodule.calibration_blocks()
    assert calibration.shape == (5, 16)
    assert all(len(documents_in(block[None], smollm2_tokenizer)) == 1 for block in calibration)  # no block straddles
    assert smollm2_tokenizer.eos_token_id not in calibration.flatten().tolist()
    # The default keeps today's train split: the share is reserved only when asked for.
    assert documents_in(make_datamodule(smollm2_dir, corpus_file).split_blocks("train"), smollm2_tokenizer) == {
        i for i in range(NUM_DOCUMENTS) if i % 10 < 8}


def test_heldout_sample_is_seeded_and_spread_over_the_share(smollm2_dir: Path, smollm2_tokenizer,
                                                           long_corpus_file: Path) -> None:
    datamodule = make_datamodule(smollm2_dir, long_corpus_file, calibration="heldout", num_calibration_samples=12)
    share = datamodule.split_blocks("calibration")
    assert documents_in(share, smollm2_tokenizer) == set(range(7, 100, 10))
    position = {tuple(block.tolist()): index for index, block in enumerate(share)}  # every block's words are unique
    assert len(position) == share.shape[0]

    def sample(seed: int) -> torch.Tensor:
        datamodule.seed = seed  # the share does not depend on the seed; only the draw does
        return torch.cat([batch["input_ids"] for batch in datamodule.calibration_dataloader()])

    samples = {seed: sample(seed) for seed in (1234, 99, 5)}
    assert torch.equal(samples[1234], sample(1234)) and not torch.equal(samples[1234], samples[99])
    for drawn_blocks in samples.values():
        drawn = [position[tuple(block.tolist())] for block in drawn_blocks]
        # one block from each twelfth of the share, so the sample runs over all of it
        assert all(j * len(position) // 12 <= index < (j + 1) * len(position) // 12 for j, index in enumerate(drawn))
        assert len(documents_in(drawn_blocks, smollm2_tokenizer)) >= 7  # 12 blocks over 10 documents
    fresh = make_datamodule(smollm2_dir, long_corpus_file, calibration="heldout", num_calibration_samples=12, seed=99)
    assert torch.equal(fresh.calibration_blocks(), samples[99])


def test_heldout_share_too_small_names_the_option(smollm2_dir: Path, corpus_file: Path, tmp_path: Path) -> None:
    datamodule = make_datamodule(smollm2_dir, corpus_file, calibration="heldout", num_calibration_samples=1000)
    with pytest.raises(ConfigError, match=r"--data.num_calibration_samples=1000.* exceeds the \d+ blocks of 16 tokens "
                                          r"available in the calibration share"):
        datamodule.calibration_blocks()
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"text": make_document(i)}) + "\n" for i in range(5)))
    with pytest.raises(ConfigError, match=r"calibration share of .* has no block .*documents 7, 17, .*--data.calibration=first"):
        make_datamodule(smollm2_dir, few, calibration="heldout").calibration_blocks()


def test_spread_eval_blocks_cover_the_split(smollm2_dir: Path, smollm2_tokenizer, corpus_file: Path,
                                            tmp_path: Path) -> None:
    full = make_datamodule(smollm2_dir, corpus_file)
    spread = make_datamodule(smollm2_dir, corpus_file, eval_blocks="spread", max_val_blocks=4, max_test_blocks=3)
    first = make_datamodule(smollm2_dir, corpus_file, max_val_blocks=4, max_test_blocks=3)
    for split, count in (("val", 4), ("test", 3)):
        blocks, every = spread.split_blocks(split), full.split_blocks(split)
        assert torch.equal(blocks, every[evenly_spaced(every.shape[0], count)])
        assert torch.equal(blocks[0], every[0]) and torch.equal(blocks[-1], every[-1])  # start to end
        assert torch.equal(first.split_blocks(split), every[:count])
    assert documents_in(spread.split_blocks("val"), smollm2_tokenizer) == {8, 18, 28}
    assert documents_in(first.split_blocks("val"), smollm2_tokenizer) == {8}
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": make_document(i)}) + "\n" for i in (50, 51, 52)))
    every = full.extra_eval_blocks([str(other)])[str(other)]
    extra = spread.extra_eval_blocks([str(other)], max_blocks=5)[str(other)]
    assert torch.equal(extra, every[evenly_spaced(every.shape[0], 5)])
    assert documents_in(extra, smollm2_tokenizer) == {50, 51, 52}


def test_bad_choices_are_reported_together(smollm2_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        TextDataModule(tokenizer=str(smollm2_dir), calibration="random", eval_blocks="middle", batch_size=0)
    message = str(error.value)
    assert "\n" not in message
    assert "`--data.calibration=random` is not a valid choice; use one of first, heldout" in message
    assert "`--data.eval_blocks=middle` is not a valid choice; use one of first, spread" in message
    assert "`--data.batch_size=0` must be at least 1" in message
    # A calibration file is read in order whatever the mode, and then no share of the dataset is held out.
    assert not TextDataModule(tokenizer=str(smollm2_dir), calibration="heldout", calibration_file="c.txt").reserves_calibration_share


def test_a_checkpoint_is_resumed_only_on_its_train_split(smollm2_dir: Path) -> None:
    first, heldout = (TextDataModule(tokenizer=str(smollm2_dir), calibration=mode) for mode in ("first", "heldout"))
    assert heldout.state_dict() == {"consumed_samples": 0, "calibration_share_reserved": True}
    first.load_state_dict({"consumed_samples": 6})  # written before the share existed: trained on every document
    assert first.consumed_samples == 6
    with pytest.raises(ConfigError, match=r"trained on documents i % 10 == 7 \(`--data.calibration=first`\) but this "
                                          r"run gives `--data.calibration=heldout`.*resume with `--data.calibration=first`"):
        heldout.load_state_dict({"consumed_samples": 6})
    with pytest.raises(ConfigError, match=r"trained without documents i % 10 == 7 .*resume with `--data.calibration=heldout`"):
        first.load_state_dict(heldout.state_dict())


def test_train_stream_walks_seeded_permutations(smollm2_dir: Path, corpus_file: Path) -> None:
    datamodule = make_datamodule(smollm2_dir, corpus_file, seed=7)
    train = datamodule.split_blocks("train")
    batches = iter(datamodule.train_dataloader())
    samples = torch.cat([next(batches)["input_ids"] for _ in range(train.shape[0])])  # 2 passes (batch_size 2)
    expected = [train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(7 + p))]
                for p in (0, 1)]
    assert torch.equal(samples, torch.cat(expected)[: samples.shape[0]])

    datamodule.load_state_dict({"consumed_samples": 6})
    assert torch.equal(next(iter(datamodule.train_dataloader()))["input_ids"], samples[6:8])


def test_workers_do_not_duplicate_samples(smollm2_dir: Path, corpus_file: Path) -> None:
    single = iter(make_datamodule(smollm2_dir, corpus_file).train_dataloader())
    parallel = iter(make_datamodule(smollm2_dir, corpus_file, num_workers=2).train_dataloader())
    for _ in range(5):
        assert torch.equal(next(single)["input_ids"], next(parallel)["input_ids"])


class RecordingModule(L.LightningModule):
    """Records every training batch it sees; one parameter so the optimizer has something to step."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["input_ids"].clone())
        return self.weight.sum() * batch["input_ids"].float().mean()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_mean", batch["input_ids"].float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(datamodule: TextDataModule, root: Path, ckpt_path: str | None = None) -> list[torch.Tensor]:
    module = RecordingModule()
    checkpoints = ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    # Validation every 2 steps (and the sanity check) must not advance the training stream position.
    trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, val_check_interval=2,
                        limit_val_batches=2, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[checkpoints])
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module.seen


@pytest.mark.parametrize("calibration", ["first", "heldout"])
def test_resumed_run_sees_the_same_batches(smollm2_dir: Path, corpus_file: Path, tmp_path: Path, calibration: str) -> None:
    uninterrupted = fit(make_datamodule(smollm2_dir, corpus_file, calibration=calibration), tmp_path / "full")
    assert len(uninterrupted) == 6
    checkpoint = tmp_path / "full" / "step=3.ckpt"
    assert torch.load(checkpoint, weights_only=False)["TextDataModule"] == {
        "consumed_samples": 6, "calibration_share_reserved": calibration == "heldout"}

    resumed = fit(make_datamodule(smollm2_dir, corpus_file, calibration=calibration), tmp_path / "resumed",
                  ckpt_path=str(checkpoint))
    assert len(resumed) == 3
    assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted[3:]))


def test_extra_eval_loaders_cover_all_documents(smollm2_dir: Path, smollm2_tokenizer, corpus_file: Path,
                                                tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "b.txt").write_text(make_document(41))
    (other / "a.txt").write_text(make_document(40))
    datamodule = make_datamodule(smollm2_dir, corpus_file, max_test_blocks=2)
    loaders = datamodule.extra_eval_dataloaders([str(other)])
    blocks = torch.cat([batch["input_ids"] for batch in loaders[str(other)]])
    assert blocks.shape == (2, 16) and documents_in(blocks, smollm2_tokenizer) == {40}
    full = make_datamodule(smollm2_dir, corpus_file).extra_eval_dataloaders([str(other)])[str(other)]
    assert documents_in(full.dataset.blocks, smollm2_tokenizer) == {40, 41}


@pytest.mark.parametrize(
    ("dataset", "overrides", "message"),
    [
        ("missing.jsonl", {}, r"--data.dataset=.*missing.jsonl` does not exist; give an embedded corpus "
                              r"\(wikipedia, news, shakespeare\)"),
        ("wikipedio", {}, r"--data.dataset=wikipedio` does not exist"),
        ("empty.txt", {}, r"--data.dataset=.*empty.txt` holds no non-empty documents"),
        ("table.csv", {}, r"unsupported suffix; use one of .txt, .jsonl, .json"),
        ("bad.jsonl", {}, r"every record must be an object with a `text` field"),
    ],
)
def test_bad_sources_name_the_option(smollm2_dir: Path, tmp_path: Path, isolated_cache: Path, dataset: str,
                                     overrides: dict, message: str) -> None:
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "table.csv").write_text("a,b\n")
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    source = dataset if dataset == "wikipedio" else str(tmp_path / dataset)
    with pytest.raises(ConfigError, match=message):
        make_datamodule(smollm2_dir, source, **overrides).setup()


def test_bad_numbers_are_reported_together(smollm2_dir: Path) -> None:
    with pytest.raises(ConfigError) as error:
        TextDataModule(tokenizer=str(smollm2_dir), block_size=1, batch_size=0)
    assert "`--data.block_size=1` must be at least 2" in str(error.value)
    assert "`--data.batch_size=0` must be at least 1" in str(error.value)


def test_empty_split_says_how_many_documents_are_needed(smollm2_dir: Path, tmp_path: Path,
                                                         isolated_cache: Path) -> None:
    single = tmp_path / "single.txt"
    single.write_text(make_document(3))
    datamodule = make_datamodule(smollm2_dir, single)
    assert datamodule.split_blocks("train").shape[0] > 0
    with pytest.raises(ConfigError, match=r"val split of `--data.dataset=.*` has no block.*at least 10 documents"):
        datamodule.val_dataloader()


@pytest.mark.slow
def test_wikipedia_default_splits(smollm2_dir: Path) -> None:
    datamodule = TextDataModule(tokenizer="smollm2-135m-instruct")
    datamodule.prepare_data()
    sizes = {split: datamodule.split_blocks(split).shape for split in ("train", "val", "test")}
    assert all(shape[0] > 100 and shape[1] == 256 for shape in sizes.values())
    assert sizes["train"][0] > 5 * sizes["val"][0]
    loaders = datamodule.extra_eval_dataloaders(["news", "shakespeare"])
    assert set(loaders) == {"news", "shakespeare"} and all(len(loader) > 0 for loader in loaders.values())
