"""The dry run: widths of every shot from a config YAML, on the CPU, without weights."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from tests.tiny_models import tiny_llama
from transact_pl.arch import Widths, all_layer_parts
from transact_pl.evaluation import kv_cache_bytes_per_token, parameter_counts
from transact_pl.plan import LayerPlan, PruningPlan
from transact_pl.infra.plan_preview import ShotRow, main, preview
from transact_pl.schedule import width_schedule
from transact_pl.surgery import apply_plan

LLAMA_7B_YAML = Path(__file__).parent.parent / "configs" / "llama_7b_transact_fsdp_8gpu.yaml"


def run_preview(config: Path, config_json: Path | None = None):
    output = io.StringIO()
    rows = preview(str(config), None if config_json is None else str(config_json), Console(file=output, width=200))
    return rows, output.getvalue()


def widths_of(row: ShotRow) -> Widths:
    return Widths(row.heads, row.kv_heads, row.head_dim, row.mlp)


def write_yaml(path: Path, model: str, **pruning) -> Path:
    document = {"trainer": {"max_steps": 4},
                "model": {"class_path": "transact_pl.lightning_modules.transact_lm.TransActLM", "init_args": {"model": model, "num_layers": 1}},
                "pruning": {"num_shots": 2, "steps_between_shots": 2, **pruning}}
    path.write_text(yaml.safe_dump(document))
    return path


def test_the_7b_recipe_previews_offline_to_the_paper_widths():
    rows, printed = run_preview(LLAMA_7B_YAML)
    reference = width_schedule(Widths(32, 32, 128, 11008), 6 * 128, 1536, num_shots=8)
    assert [widths_of(row) for row in rows] == reference
    assert [r.step for r in rows] == [None, *range(0, 16000, 2000)]
    # LLaMA-2-7B has 6,738,415,616 parameters, of which 2 × 32000 × 4096 in its untied embedding and LM head
    assert rows[0].non_embedding_params == 6_738_415_616 - 2 * 32000 * 4096
    assert rows[0].kv_bytes_per_token == 2 * 32 * 32 * 128 * 2 and rows[-1].kv_bytes_per_token == 2 * 32 * 6 * 128 * 2
    words = " ".join(printed.split())  # the title wraps with the length of the config's path
    assert "published shape" in words and "6/6" in words and "14,000" in words


def test_costs_equal_those_of_a_model_pruned_by_surgery(tmp_path: Path):
    """Fractions round half up (0.5 of MLP 37 → 19); the meta-device counts match a really pruned model."""
    model = tiny_llama()
    model.config.save_pretrained(tmp_path / "base")
    config = write_yaml(tmp_path / "run.yaml", str(tmp_path / "base"), target_attention=0.5, target_mlp=0.5)
    rows, _ = run_preview(config)
    assert [(r.heads, r.kv_heads, r.mlp) for r in rows] == [(4, 2, 37), (4, 2, 28), (2, 1, 19)]
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    for shot, row in enumerate(rows[1:], start=1):
        before, after = widths_of(rows[shot - 1]), widths_of(row)
        layers = [LayerPlan(list(range(after.num_heads)), list(range(after.num_kv_heads)), list(range(after.intermediate_size)))
                  for _ in all_layer_parts(model)]
        apply_plan(model, PruningPlan(shot, "acts", before, after, layers))
        assert (row.non_embedding_params, row.kv_bytes_per_token) == (parameter_counts(model)[1], kv_cache_bytes_per_token(model))


def test_a_local_config_json_and_a_head_dim_target(tmp_path: Path):
    tiny_llama().config.to_json_file(tmp_path / "config.json")
    config = write_yaml(tmp_path / "run.yaml", "nobody/not-on-this-machine", target_attention=32, target_mlp=37,
                        head_dim_target=4)
    rows, printed = run_preview(config, tmp_path / "config.json")
    assert [r.head_dim for r in rows] == [8, 6, 4] and [r.heads for r in rows] == [4, 4, 4]
    assert [r.kv_bytes_per_token for r in rows] == [2 * 1 * 2 * d * 2 for d in (8, 6, 4)]
    assert "config.json" in printed


@pytest.mark.parametrize("pruning,config_json,message", [
    ({}, None, "`--model.model=nobody/not-on-this-machine` is neither a local directory nor in the Hugging Face "
               "cache, and its shape is not embedded; pass --model-config /path/to/its/config.json"),
    ({"num_shotz": 3}, "config.json", "does not accept option 'num_shotz'"),
    ({"target_attention": 20}, "config.json", "`--pruning.target_attention=20` is not a whole number of KV groups"),
    ({}, "missing.json", "`--model-config="),
])
def test_mistakes_end_with_one_error_line(tmp_path: Path, capsys, pruning: dict, config_json: str | None, message: str):
    tiny_llama().config.to_json_file(tmp_path / "config.json")
    config = write_yaml(tmp_path / "run.yaml", "nobody/not-on-this-machine", **pruning)
    arguments = ["--config", str(config)] + (["--model-config", str(tmp_path / config_json)] if config_json else [])
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(error.splitlines()) == 1
    assert error.startswith("error: ") and message in error


def test_serving_sizes_round_the_head_dim_and_an_off_kernel_size_warns(tmp_path: Path):
    tiny_llama().config.to_json_file(tmp_path / "config.json")
    config = write_yaml(tmp_path / "run.yaml", "nobody/not-on-this-machine", target_attention=32, target_mlp=37,
                        head_dim_target=2, serving_head_dims=4)
    with pytest.warns(UserWarning, match="head_dim 4 is not taken by vLLM FlashAttention"):
        rows, _ = run_preview(config, tmp_path / "config.json")
    assert [r.head_dim for r in rows] == [8, 8, 4]  # target 2 → 4; shot 1's 6 is halfway between 4 and 8: 8


def test_a_budget_lists_its_candidates_with_costs_and_says_scoring_needs_the_weights(tmp_path: Path):
    """Without weights the dry run cannot choose: it lists each (KV groups, head_dim) with the widest MLP that fits."""
    model = tiny_llama()
    model.config.to_json_file(tmp_path / "config.json")
    config = write_yaml(tmp_path / "run.yaml", "nobody/not-on-this-machine", budget_non_embedding_params=0.5,
                        head_dim_target=4, serving_head_dims=[4, 6])
    with pytest.warns(UserWarning, match="head_dim 6 is not taken by .*; head_dim 4 is not taken by"):
        candidates, printed = run_preview(config, tmp_path / "config.json")
    model.model.layers = model.model.layers[:1]  # write_yaml keeps 1 layer
    limit = parameter_counts(model)[1] // 2
    assert [(c.widths.num_kv_heads, c.widths.head_dim) for c in candidates] == [(g, d) for g in (1, 2) for d in (4, 6, 8)]
    assert all(c.meets == (c.costs.non_embedding_params <= limit) for c in candidates) and any(c.meets for c in candidates)
    words = " ".join(printed.split())
    assert "budget candidates" in words and "needs the weights" in words and f"= {limit:,} non-embedding" in words
    assert "calib loss" not in words and "◀" not in words  # nothing is scored without weights


def test_a_bad_budget_ends_with_one_error_line(tmp_path: Path, capsys):
    tiny_llama().config.to_json_file(tmp_path / "config.json")
    config = write_yaml(tmp_path / "run.yaml", "nobody/not-on-this-machine", budget_params="60Q")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "--model-config", str(tmp_path / "config.json")])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(error.splitlines()) == 1
    assert error.startswith("error: `--pruning.budget_params=60Q` is not a budget")
