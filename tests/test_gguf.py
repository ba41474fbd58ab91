"""--export.gguf: a GGUF made by llama.cpp's own converter and quantizer, listed in the export's manifest, with its
llama.cpp perplexity in the model card; without the llama.cpp build, one line at startup says how to get it.

The real conversions need the cached build (`make llama-cpp`, ~30 min once) and are marked `llama_cpp` (and `slow`):
`pytest -m llama_cpp tests/test_gguf.py`. Without the build they are skipped, saying so."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from callbacks.hf_export import HFExport
from tests.tiny_models import tiny_llama, tiny_tokenizer
from transact_pl.errors import ConfigError
from transact_pl.infra.export import export_model
from transact_pl.infra.export_dir import MANIFEST_FILE
from transact_pl.infra.gguf import GGUFExport, card_section, convert, find_llama_cpp, gguf_problem

BUILD = find_llama_cpp()
needs_build = pytest.mark.skipif(bool(BUILD.missing()) or not BUILD.logits.exists(),
                                 reason=f"no llama.cpp build in {BUILD.root}: `make llama-cpp` builds it (~30 min)")


# ----- without llama.cpp (default suite) ---------------------------------------------------------------------------
def test_missing_llama_cpp_is_one_line_naming_the_option_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSACT_LLAMA_CPP", str(tmp_path / "no_build"))
    problem = gguf_problem("q4_k_m")
    assert problem.startswith("`--export.gguf=q4_k_m` needs llama.cpp's converter") and "\n" not in problem
    assert "`make llama-cpp`" in problem and str(tmp_path / "no_build") in problem
    assert "not a GGUF type" in gguf_problem("q3_xyz") and gguf_problem(None) is None
    trainer = SimpleNamespace(default_root_dir=str(tmp_path / "runs"), loggers=[], checkpoint_callbacks=[])
    problems = HFExport(str(tmp_path / "export"), gguf="q4_k_m").config_problems(trainer)
    assert problems == [problem]  # found at startup, with the export's other checks
    with pytest.raises(ConfigError, match="make llama-cpp"):
        GGUFExport("q8_0", {})


def test_files_added_by_finish_are_in_the_manifest_and_replaced_by_overwrite(tmp_path):
    model = tiny_llama()
    out = tmp_path / "export"
    export_model(model, tiny_tokenizer(), out, [],
                 finish=lambda staging: (staging / "model-q8_0.gguf").write_bytes(b"GGUF"))
    assert "model-q8_0.gguf" in json.loads((out / MANIFEST_FILE).read_text())["files"]
    export_model(model, tiny_tokenizer(), out, [], overwrite=True)  # the earlier export, GGUF included, is ours
    assert not (out / "model-q8_0.gguf").exists()


def test_card_section_shows_both_perplexities_and_what_was_not_measured():
    record = {"file": "model-q4_k_m.gguf", "type": "q4_k_m", "bytes": 105_000_000, "fallback_tensors": 3,
              "protocol": "llama-perplexity ...",
              "perplexity": {"f32": {"news": 20.5, "tiny": "llama.cpp llama-perplexity failed: too short"},
                             "q4_k_m": {"news": 22.25, "tiny": "llama.cpp llama-perplexity failed: too short"}}}
    lines = card_section(record)
    assert "## GGUF (llama.cpp)" in lines and "| text | f32 GGUF ppl | q4_k_m GGUF ppl |" in lines
    assert "| news | 20.50 | 22.25 |" in lines and "| tiny | not measured | not measured |" in lines
    assert any("3 tensors have rows" in line for line in lines)
    no_texts = card_section({**record, "perplexity": {"f32": {}, "q4_k_m": {}}})
    assert no_texts[-1].startswith("Perplexity not measured")


# ----- with the llama.cpp build ------------------------------------------------------------------------------------
def smollm2_vocab_llama(smollm2_dir: Path) -> tuple[LlamaForCausalLM, object]:
    """A random 2-layer Llama with SmolLM2's tokenizer (llama.cpp's converter knows its pre-tokenizer); rows of 256
    so that k-quants need no fallback."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                         rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval(), AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.slow
@pytest.mark.llama_cpp
@needs_build
def test_gguf_export_is_listed_measured_and_computes_the_exported_model(tmp_path, smollm2_dir):
    from benchmarks.check_clients import read_llama_logits
    from transact_pl.eval_suite import heldout_protocol
    from transact_pl.infra.assets import corpus_documents

    model, tokenizer = smollm2_vocab_llama(smollm2_dir)
    heldout = {"protocol": heldout_protocol(64, 4, torch.float32, [], 0),
               "final": {"stage": "final (step 0)", "perplexity": {}, "samples": {}}}
    out = export_model(model, tokenizer, tmp_path / "export", [], heldout=heldout,
                       finish=GGUFExport("q4_k_m", {"news": corpus_documents("news")}))
    assert "model-q4_k_m.gguf" in json.loads((out / MANIFEST_FILE).read_text())["files"]
    record = json.loads((out / "transact_eval.json").read_text())["gguf"]
    assert record["fallback_tensors"] == 0 and (out / "model-q4_k_m.gguf").stat().st_size == record["bytes"]
    f32, q4 = record["perplexity"]["f32"]["news"], record["perplexity"]["q4_k_m"]["news"]
    assert math.isfinite(f32) and abs(math.log(q4 / f32)) < 0.1  # a random model: ppl near the vocab size, both
    assert f"| news | {f32:.2f} | {q4:.2f} |" in (out / "README.md").read_text()

    # llama.cpp's f32 GGUF of the export computes the exported model: same tokens, same logits (fp32 attention)
    text = tmp_path / "text.txt"
    text.write_text("The capital of France is Paris, and the river that runs through it is the Seine.")
    convert(BUILD, out, tmp_path / "f32.gguf")
    subprocess.run([str(BUILD.logits), str(tmp_path / "f32.gguf"), str(text), str(tmp_path / "logits.bin"), "fp32"],
                   check=True, capture_output=True)
    llama = read_llama_logits(tmp_path / "logits.bin")
    ids = tokenizer(text.read_text(), add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert torch.equal(llama["input_ids"], ids[0])
    with torch.no_grad():
        assert (model(input_ids=ids).logits[0] - llama["logits"]).abs().max() <= 1e-3

    export_model(model, tokenizer, out, [], overwrite=True)  # the GGUF was part of the export: replaced with it
    assert not (out / "model-q4_k_m.gguf").exists()
