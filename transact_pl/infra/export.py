"""Exporting a pruned model as a stock Hugging Face directory, whole or not at all.

The directory holds safetensors weights, config.json with the pruned widths (explicit head_dim,
num_attention_heads, num_key_value_heads, intermediate_size), tokenizer, generation config,
``transact_plans.json`` (every shot's plan), ``transact_eval.json`` (dense-vs-pruned held-out perplexities and
samples with their protocol, when the run measured them) and a README model card. It is written to a temporary
sibling directory, reloaded with stock ``AutoModelForCausalLM.from_pretrained`` and compared with the
in-memory model (max |Δlogit| ≤ tolerance, fp32) before it is renamed into place.
"""

from __future__ import annotations

import errno
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from transact_pl.arch import eval_mode
from transact_pl.errors import ConfigError
from transact_pl.infra.export_dir import check_export_dir, make_staging_dir, move_into_place, share_files, write_manifest
from transact_pl.plan import PruningPlan
from transact_pl.infra.report import (COLUMNS, COMMON_TASK_HEADERS, HELDOUT_HEADERS, common_task_cells, format_row,
                                      heldout_ppl_cells, heldout_samples, uniform_warning)

PLANS_FILE = "transact_plans.json"
EVAL_FILE = "transact_eval.json"


@torch.no_grad()
def max_logit_difference(model: PreTrainedModel, other: PreTrainedModel, input_ids: torch.Tensor) -> float:
    device = next(model.parameters()).device
    first = model(input_ids=input_ids.to(device), use_cache=False).logits.float().cpu()
    second = other(input_ids=input_ids.to(device), use_cache=False).logits.float().cpu()
    return (first - second).abs().max().item()


def export_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | Path,
    plans: list[PruningPlan],
    summary_rows: list[dict] | None = None,
    heldout: dict | None = None,
    overwrite: bool = False,
    check_input_ids: torch.Tensor | None = None,
    tolerance: float = 1e-4,
    option: str = "--export.output_dir",
    finish: Callable[[Path], object] | None = None,
) -> Path:
    """Write ``model`` as a stock HF directory at ``output_dir``; verify it by reloading; return the path.

    ``heldout`` is the report's dense-vs-final record (``callbacks.pruning_report.RunRecord.heldout_report()``).
    ``finish`` is called with the written, verified directory before its manifest is made, to add files that
    belong to the export (e.g. ``transact_pl.infra.gguf.GGUFExport``).
    """
    output = Path(output_dir)
    problem = tolerance_problem(tolerance)
    if problem:
        raise ConfigError(problem)
    check_export_dir(output, overwrite, option)
    staging = make_staging_dir(output)
    try:
        _write(model, tokenizer, staging, plans, summary_rows or [], heldout)
        if check_input_ids is not None:
            _verify(model, staging, check_input_ids, tolerance)
        if finish is not None:
            finish(staging)
        write_manifest(staging)
        share_files(staging)
        move_into_place(staging, output, overwrite, option)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if is_out_of_space(error):
            size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
            raise ConfigError(
                f"no space left on the device of `{option}={output}` (the weights alone need {size_mb:.1f} MB); "
                "nothing was written: free space or choose another directory, then export the last checkpoint with "
                "`python -m transact_pl.infra.export_checkpoint <ckpt> <dir>`"
            ) from error
        raise
    return output


def tolerance_problem(tolerance: float, option: str = "--export.tolerance") -> str | None:
    """A verification tolerance that no export could meet (negative) or that checks nothing (NaN/Inf)."""
    if not math.isfinite(tolerance) or tolerance < 0:
        return f"`{option}={tolerance}` must be a finite number >= 0 (the largest allowed |Δlogit|, e.g. 1e-4)"
    return None


def is_out_of_space(error: BaseException) -> bool:
    """ENOSPC, raised by Python (OSError) or by safetensors' Rust writer (a plain exception naming os error 28)."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return "os error 28" in str(error) or "No space left on device" in str(error)


def _write(model, tokenizer, path: Path, plans: list[PruningPlan], rows: list[dict], heldout: dict | None) -> None:
    with eval_mode(model):
        stock_model_for_export(model).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    make_portable(path)
    (path / PLANS_FILE).write_text(json.dumps([plan.to_dict() for plan in plans], indent=1))
    if heldout:
        (path / EVAL_FILE).write_text(json.dumps(heldout, indent=1))
    (path / "README.md").write_text(model_card(model, plans, rows, heldout))


def stock_model_for_export(model: PreTrainedModel) -> PreTrainedModel:
    """``model`` itself, or an equivalent stock model whose config accepts the pruned widths.

    transformers' LlamaConfig refuses a hidden size that is not a multiple of num_attention_heads
    even with an explicit head_dim (e.g. LLaMA-2-7B pruned to 6 heads). Mistral's decoder is the
    same computation as a bias-free Llama with full attention and takes any head count, so such
    a model is exported as MistralForCausalLM (same weight names, same logits).
    """
    config = model.config
    if config.model_type != "llama" or config.hidden_size % config.num_attention_heads == 0:
        return model
    if config.attention_bias or config.mlp_bias:
        raise ValueError(
            f"{config.num_attention_heads} heads do not divide hidden size {config.hidden_size} and stock LlamaConfig "
            "refuses that; a Llama with biases has no stock equivalent: choose a target with a head count that divides it"
        )
    fields = {k: v for k, v in config.to_dict().items() if k in MistralConfig.__dataclass_fields__ and k not in ("model_type", "architectures")}
    twin_config = MistralConfig(**{**fields, "sliding_window": None})
    with torch.device("meta"):
        twin = MistralForCausalLM(twin_config)
    twin.load_state_dict(model.state_dict(), assign=True)
    twin.tie_weights()
    twin.generation_config = model.generation_config
    return twin.to(model.dtype)


def _verify(model: PreTrainedModel, path: Path, input_ids: torch.Tensor, tolerance: float) -> None:
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=model.dtype)
    with eval_mode(model):
        difference = max_logit_difference(model, reloaded.to(next(model.parameters()).device), input_ids)
    if difference > tolerance:
        raise RuntimeError(f"exported model differs from the in-memory model: max |Δlogit| = {difference:.3g} > {tolerance}")


# transformers 5.x names the generic fast tokenizer TokenizersBackend; 4.x knows it as PreTrainedTokenizerFast.
PORTABLE_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def make_portable(path: Path) -> None:
    """Rewrite config.json and tokenizer_config.json so that transformers 4.5x and 5.x build the same model.

    5.x keeps the RoPE settings only under ``rope_parameters``; 4.x reads the top-level ``rope_theta`` and
    ``rope_scaling`` and, finding none, silently uses θ = 10000. Both are written beside ``rope_parameters``.
    ``auto_map`` entries (pointers to custom code files, which an export never carries) are dropped.
    """
    config = _read_json(path / "config.json")
    if config is not None:
        config.pop("auto_map", None)
        config.update(legacy_rope_keys(config.get("rope_parameters")))
        _write_json(path / "config.json", config)
    tokenizer_config = _read_json(path / "tokenizer_config.json")
    if tokenizer_config is not None:
        tokenizer_config.pop("auto_map", None)
        name = tokenizer_config.get("tokenizer_class")
        tokenizer_config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASSES.get(name, name)
        _write_json(path / "tokenizer_config.json", tokenizer_config)


def legacy_rope_keys(rope_parameters: dict | None) -> dict:
    """``rope_theta`` and ``rope_scaling`` as transformers 4.x reads them, from 5.x's ``rope_parameters``."""
    if not isinstance(rope_parameters, dict) or "rope_theta" not in rope_parameters:
        return {}
    scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", "default")
    legacy_scaling = None if rope_type == "default" else {**scaling, "type": rope_type}
    return {"rope_theta": rope_parameters["rope_theta"], "rope_scaling": legacy_scaling}


def _read_json(file: Path) -> dict | None:
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    return data if isinstance(data, dict) else None


def _write_json(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def model_card(model: PreTrainedModel, plans: list[PruningPlan], rows: list[dict], heldout: dict | None = None) -> str:
    config = model.config
    lines = [
        "---",
        "library_name: transformers",
        "tags: [pruned, transact, structured-pruning]",
        "---",
        "# TransAct-pruned model",
        "",
        "Structured pruning of the transitional activations (attention heads / KV groups and MLP channels); "
        "hidden size, embeddings, norms and layer count unchanged. Loads with stock transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained('<this directory>')",
        "```",
        "",
        f"- layers: {config.num_hidden_layers}, hidden size: {config.hidden_size}",
        f"- attention heads: {config.num_attention_heads} (KV heads: {config.num_key_value_heads}, head_dim {config.head_dim})",
        f"- MLP intermediate size: {config.intermediate_size}",
        f"- shots: {len(plans)}" + (f", scorer: {plans[0].scorer}" if plans else ""),
        f"- per-shot kept indices: `{PLANS_FILE}`",
    ]
    warning = uniform_warning(rows, config.vocab_size)
    if warning:  # right under the title: whoever loads this model must see it
        lines[5:5] = ["", f"> **Warning:** {warning}"]
    if rows:
        lines += ["", "## Pruning summary", "", "| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for row in rows:
            lines.append("| " + " | ".join(format_row(row)) + " |")
    if heldout:
        lines += evaluation_section(heldout)
    return "\n".join(lines) + "\n"


def evaluation_section(heldout: dict) -> list[str]:
    """The model card's "Evaluation" lines: protocol, per-text perplexity (dense vs pruned) and greedy samples."""
    protocol = heldout["protocol"]
    stages = {key: heldout[key]["stage"] for key in ("dense", "final") if key in heldout}
    lines = ["", "## Evaluation", "",
             f"The dense base model (run stage `{stages.get('dense', 'not measured')}`) and this pruned model "
             f"(run stage `{stages.get('final', 'not measured')}`) on held-out text; `{EVAL_FILE}` holds the same "
             "numbers.", "",
             f"- perplexity: at most {protocol['max_blocks_per_text']} blocks of {protocol['block_size']} tokens per text, "
             f"each block scored on its own ({protocol['blocks']}), no BOS token, {protocol['logits']}, "
             f"{protocol['mean']}; model weights in {protocol['model_dtype']}",
             f"- samples: {protocol['generation']['decoding']} decoding, at most "
             f"{protocol['generation']['max_new_tokens']} new tokens, prompts without special tokens"]
    ppl_cells = heldout_ppl_cells(heldout)
    if ppl_cells:
        lines += ["", "| " + " | ".join(HELDOUT_HEADERS) + " |", "|" + "---|" * len(HELDOUT_HEADERS)]
        lines += ["| " + " | ".join(row) + " |" for row in ppl_cells]
    task_cells = common_task_cells(heldout)
    if task_cells:
        lines += ["", "Common-task accuracy (%, `acc`: each choice scored by the summed log-probabilities of its tokens with "
                  "the prompts of lm-eval 0.4.13's tasks; a seeded sample spread over each validation split, ARC and "
                  f"OpenBookQA scored on validation; task, split, examples, shots and prompt source per task in `{EVAL_FILE}`):",
                  "", "| " + " | ".join(COMMON_TASK_HEADERS) + " |", "|" + "---|" * len(COMMON_TASK_HEADERS)]
        lines += ["| " + " | ".join(row) + " |" for row in task_cells]
    for prompt, dense, final in heldout_samples(heldout):
        lines += ["", f"**Prompt:** {json.dumps(prompt)}", "", "- dense: " + json.dumps(dense), "- pruned: " + json.dumps(final)]
    return lines
