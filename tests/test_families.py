"""Every supported family through the whole pipeline: prune in 2 shots, train, checkpoint, resume, export,
reload in stock transformers with logits parity; unsupported architectures are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.family_models import FAMILIES, family_model, fit, save_family_dir, save_gpt2_dir, write_corpus
from transact_pl.arch import check_supported, layer_parts
from transact_pl.errors import ConfigError
from transact_pl.infra.loading import load_causal_lm
from transact_pl.lightning_modules.transact_lm import TransActLM


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSACT_PL_CACHE", str(tmp_path / "cache"))


def assert_export_matches(module: TransActLM, export: Path) -> None:
    reloaded = AutoModelForCausalLM.from_pretrained(export).eval()
    input_ids = torch.randint(0, module.model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(3))
    module.model.eval()
    with torch.no_grad():
        assert (reloaded(input_ids=input_ids).logits - module.model(input_ids=input_ids).logits).abs().max() <= 1e-5
    assert reloaded.model.embed_tokens.weight.data_ptr() == reloaded.lm_head.weight.data_ptr()  # tied stays tied


def assert_resumed_export_is_identical(first: Path, second: Path) -> None:
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((first / "config.json").read_text()) == json.loads((second / "config.json").read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_family_prunes_trains_resumes_and_exports(family: str, tmp_path: Path) -> None:
    model_dir = save_family_dir(family, tmp_path / "base")
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    base = family_model(family)
    targets = (24, 19) if family == "llama2" else (16, 19)  # MHA 4 → 3 heads (Mistral twin), GQA 2 → 1 group
    module = fit(str(model_dir), str(corpus), tmp_path / "run", targets)
    export = tmp_path / "run" / "export"
    assert_export_matches(module, export)
    config = json.loads((export / "config.json").read_text())
    assert (config["num_attention_heads"], config["intermediate_size"]) == (targets[0] // 8, 19)
    assert not torch.equal(module.model.model.norm.weight, base.model.norm.weight)  # it trained
    resumed = fit(str(model_dir), str(corpus), tmp_path / "resumed", targets,
                  ckpt_path=str(tmp_path / "run" / "checkpoints" / "epoch=0-step=1.ckpt"))
    assert len(resumed.plans) == 2
    assert_resumed_export_is_identical(export, tmp_path / "resumed" / "export")
    check_family_specifics(family, export, config)


def check_family_specifics(family: str, export: Path, config: dict) -> None:
    reloaded = AutoModelForCausalLM.from_pretrained(export)
    attention = reloaded.model.layers[0].self_attn
    if family == "llama2":
        assert type(reloaded).__name__ == "MistralForCausalLM" and config["sliding_window"] is None  # 3 ∤ 32
    if family == "llama3":
        assert config["rope_parameters"]["rope_type"] == "llama3" and config["rope_parameters"]["factor"] == 8.0
    if family == "mistral":
        assert config["sliding_window"] == 5
    if family == "qwen2":
        assert attention.q_proj.bias.shape == (16,) and attention.k_proj.bias.shape == (8,) and attention.o_proj.bias is None
        assert config["layer_types"] == ["full_attention", "sliding_attention"]
    if family == "qwen3":
        assert attention.q_norm.weight.shape == (8,) and attention.k_norm.weight.shape == (8,)


@pytest.mark.slow
def test_real_smollm2_cut_to_two_layers_prunes_trains_resumes_and_exports(tmp_path: Path, smollm2_dir: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRANSACT_PL_CACHE")  # the real converted model lives in the user cache
    module = fit("smollm2-135m-instruct", "news", tmp_path / "run", (384, 768), num_layers=2)
    assert_export_matches(module, tmp_path / "run" / "export")
    resumed = fit("smollm2-135m-instruct", "news", tmp_path / "resumed", (384, 768), num_layers=2,
                  ckpt_path=str(tmp_path / "run" / "checkpoints" / "epoch=0-step=3.ckpt"))
    assert len(resumed.plans) == 2
    assert_resumed_export_is_identical(tmp_path / "run" / "export", tmp_path / "resumed" / "export")


def test_unsupported_architecture_is_refused_with_the_supported_list(tmp_path: Path) -> None:
    gpt2_dir = save_gpt2_dir(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match=r"model_type 'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"):
        load_causal_lm(str(gpt2_dir))


def test_model_without_the_expected_modules_is_refused_naming_layer_and_module() -> None:
    model = family_model("llama3")
    model.model.layers[1].mlp.gate_proj = torch.nn.Identity()
    with pytest.raises(ConfigError, match=r"layer 1 has no nn.Linear `mlp.gate_proj`"):
        check_supported(model)
    layer_parts(model.model.layers[0], 0)  # the intact layer is fine
