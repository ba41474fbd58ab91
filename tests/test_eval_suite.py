"""Held-out perplexity suite and greedy samples on a tiny model; the held-out blocks match the datamodule's."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.tiny_models import tiny_llama, tiny_tokenizer
from transact_pl.eval_suite import block_batches, evaluate_heldout, generate_samples, perplexity_suite


def random_blocks(num_blocks: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 99, (num_blocks, length), generator=torch.Generator().manual_seed(seed))


def reference_perplexity(model, blocks: torch.Tensor) -> float:
    """The documented protocol written out: every block alone, log-softmax in fp32, mean over all predicted tokens."""
    with torch.no_grad():
        log_probs = F.log_softmax(model(input_ids=blocks).logits[:, :-1].float(), dim=-1)
    nll = -log_probs.gather(-1, blocks[:, 1:, None]).squeeze(-1)
    return math.exp(nll.mean().item())


def test_block_batches_cover_every_block_in_order():
    blocks = random_blocks(7, 5, 0)
    pieces = block_batches(blocks, 3)
    assert [p["input_ids"].shape[0] for p in pieces] == [3, 3, 1]
    assert torch.equal(torch.cat([p["input_ids"] for p in pieces]), blocks)
    with pytest.raises(ValueError, match="2-D"):
        block_batches(blocks[0], 3)


def test_suite_follows_the_protocol_for_every_text_and_ignores_batching():
    model = tiny_llama()
    texts = {"first": random_blocks(5, 9, 1), "second": random_blocks(3, 13, 2)}
    results = perplexity_suite(model, texts, batch_size=2)
    assert list(results) == ["first", "second"]
    for name, blocks in texts.items():
        assert results[name]["ppl"] == pytest.approx(reference_perplexity(model, blocks), rel=1e-5)
        assert results[name]["blocks"] == blocks.shape[0] and results[name]["tokens_scored"] == blocks.shape[0] * (blocks.shape[1] - 1)
    assert perplexity_suite(model, texts, batch_size=5)["first"]["ppl"] == pytest.approx(results["first"]["ppl"], rel=1e-6)
    assert results["first"]["ppl"] != results["second"]["ppl"]


def test_suite_refuses_an_empty_text():
    with pytest.raises(ValueError, match="'empty'"):
        perplexity_suite(tiny_llama(), {"empty": torch.zeros(0, 8, dtype=torch.long)})


def test_samples_are_the_greedy_continuation_and_restore_training_mode():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    model.train()
    prompts = ["t5 t17 t42", "t3"]
    samples = generate_samples(model, tokenizer, prompts, max_new_tokens=4)
    assert model.training
    for prompt, sample in zip(prompts, samples):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        expected = []
        model.eval()
        with torch.no_grad():
            for _ in range(4):
                next_id = model(input_ids=torch.tensor([ids + expected])).logits[0, -1].argmax().item()
                if next_id == tokenizer.eos_token_id:
                    break
                expected.append(next_id)
        model.train()
        assert sample == tokenizer.decode(expected)
    assert generate_samples(model, tokenizer, prompts, max_new_tokens=4) == samples  # deterministic


def test_heldout_record_holds_the_suite_and_one_sample_per_prompt():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    texts, prompts = {"first": random_blocks(3, 9, 1)}, ["t5 t17", "t3"]
    record = evaluate_heldout(model, tokenizer, texts, 2, "dense (step 0)", prompts, max_new_tokens=3)
    assert record["stage"] == "dense (step 0)"
    assert record["perplexity"] == perplexity_suite(model, texts, 2)
    assert record["samples"] == dict(zip(prompts, generate_samples(model, tokenizer, prompts, 3)))
    assert evaluate_heldout(model, tokenizer, {}, 2, "final", prompts, max_new_tokens=0) == {"stage": "final", "perplexity": {}, "samples": {}}


@pytest.mark.slow
def test_heldout_blocks_are_the_datamodule_test_and_extra_eval_blocks(smollm2_dir):
    """benchmarks.texts packs the embedded texts exactly as TextDataModule does (real tokenizer and corpora)."""
    from transformers import AutoTokenizer

    from benchmarks.texts import calibration_blocks, heldout_blocks
    from datamodules.text import TextDataModule

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    blocks = heldout_blocks(tokenizer, block_size=64, max_blocks=6)
    data = TextDataModule(tokenizer=str(smollm2_dir), dataset="wikipedia", block_size=64, max_test_blocks=6, num_calibration_samples=5)
    assert torch.equal(blocks["wikipedia_test"], data.split_blocks("test"))
    assert torch.equal(blocks["news"], data.extra_eval_dataloaders(["news"])["news"].dataset.blocks)
    assert torch.equal(calibration_blocks(tokenizer, 64, 5), data.calibration_blocks())
