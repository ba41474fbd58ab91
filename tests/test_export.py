import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny_models import random_batches, tiny_llama, tiny_tokenizer
from transact_pl.arch import Widths, model_widths
from transact_pl.errors import ConfigError
from transact_pl.infra.export import PLANS_FILE, export_model
from transact_pl.plan import make_plan
from transact_pl.pruning import compute_scores
from transact_pl.surgery import apply_plan


def pruned(model, after: Widths):
    plan = make_plan(compute_scores(model, "acts", random_batches(), 0), model_widths(model), after, 1, "acts")
    apply_plan(model, plan)
    return model, plan


def test_export_loads_in_stock_transformers_with_the_planned_widths(tmp_path):
    model, plan = pruned(tiny_llama(), Widths(2, 1, 8, 19))
    check = random_batches(num_batches=1)[0]["input_ids"]
    out = export_model(model, tiny_tokenizer(), tmp_path / "export", [plan], check_input_ids=check)
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"], config["intermediate_size"]) == (2, 1, 8, 19)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert (reloaded(input_ids=check).logits - model(input_ids=check).logits).abs().max() <= 1e-5
    assert json.loads((out / PLANS_FILE).read_text())[0]["after"]["intermediate_size"] == 19
    assert (out / "README.md").exists() and (out / "tokenizer.json").exists()
    assert reloaded.model.embed_tokens.weight.data_ptr() == reloaded.lm_head.weight.data_ptr()


def test_head_count_not_dividing_hidden_size_exports_as_equivalent_mistral(tmp_path):
    model, plan = pruned(tiny_llama(num_heads=5, num_kv_heads=5, hidden_size=40), Widths(3, 3, 8, 20))
    check = random_batches(num_batches=1)[0]["input_ids"]
    out = export_model(model, tiny_tokenizer(), tmp_path / "export", [plan], check_input_ids=check)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded).__name__ == "MistralForCausalLM" and reloaded.config.num_attention_heads == 3
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=check).logits, model(input_ids=check).logits, atol=1e-5)


def test_existing_directory_is_refused_unless_overwrite(tmp_path):
    model, plan = pruned(tiny_llama(), Widths(2, 1, 8, 19))
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "old.txt").write_text("previous")
    with pytest.raises(ConfigError, match="already exists.*overwrite"):
        export_model(model, tiny_tokenizer(), tmp_path / "export", [plan])
    with pytest.raises(ConfigError, match=r"old\.txt.*never other files"):  # not an export of ours: kept
        export_model(model, tiny_tokenizer(), tmp_path / "export", [plan], overwrite=True)
    (tmp_path / "export" / "old.txt").unlink()
    export_model(model, tiny_tokenizer(), tmp_path / "export", [plan], overwrite=True)
    export_model(model, tiny_tokenizer(), tmp_path / "export", [plan], overwrite=True)  # replaces its own export
    assert (tmp_path / "export" / "config.json").exists()


def test_failed_verification_leaves_nothing_behind(tmp_path):
    model, plan = pruned(tiny_llama(), Widths(2, 1, 8, 19))
    rotary = model.model.rotary_emb
    rotary.inv_freq.mul_(1.5)  # the in-memory model no longer computes what its config describes
    with pytest.raises(RuntimeError, match="differs"):
        export_model(model, tiny_tokenizer(), tmp_path / "export", [plan], check_input_ids=random_batches(num_batches=1)[0]["input_ids"])
    assert list(tmp_path.iterdir()) == []


def test_config_and_tokenizer_are_written_for_transformers_4_and_5(tmp_path):
    model = tiny_llama(rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    check = random_batches(num_batches=1)[0]["input_ids"]
    out = export_model(model, tiny_tokenizer(), tmp_path / "export", [], check_input_ids=check)  # reloaded by 5.x here
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 50000.0  # 4.x reads only this key
    assert config["rope_scaling"]["type"] == config["rope_scaling"]["rope_type"] == "llama3"
    assert config["rope_scaling"]["factor"] == 8.0 and "rope_theta" not in config["rope_scaling"]
    tokenizer_class = json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"]
    assert tokenizer_class == "PreTrainedTokenizerFast"  # 5.x's TokenizersBackend does not exist in 4.x
