"""Loading the base causal LM and its tokenizer from the embedded default, a local directory or a hub name."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from transact_pl.arch import check_supported, decoder_layers
from transact_pl.infra.assets import resolve_model_source
from transact_pl.errors import ConfigError, first_line

# What from_pretrained raises for a missing, truncated or corrupted file, or a pickle that weights_only refuses.
_UNLOADABLE = (OSError, ValueError, SafetensorError, pickle.UnpicklingError, EOFError)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str, option: str = "--model.dtype") -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"`{option}={name}` is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_causal_lm(source: str, num_layers: int | None = None, dtype: str = "float32") -> PreTrainedModel:
    """Load a supported causal LM; ``num_layers`` keeps only the first layers (for fast tests/debugging)."""
    path = resolve_model_source(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    except _UNLOADABLE as error:
        raise ConfigError(f"`--model.model={source}` could not be loaded ({first_line(error)}); give a local Hugging Face "
                          f"directory, a hub name, or the embedded default 'smollm2-135m-instruct'") from error
    check_supported(model)
    if num_layers is not None:
        truncate_layers(model, num_layers)
    return model


def truncate_layers(model: PreTrainedModel, num_layers: int) -> None:
    """Keep the first ``num_layers`` decoder layers (and the config in sync)."""
    layers = decoder_layers(model)
    problem = num_layers_problem(num_layers, len(layers))
    if problem:
        raise ConfigError(problem)
    model.model.layers = nn.ModuleList(list(layers)[:num_layers])
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = model.config.layer_types[:num_layers]


def num_layers_problem(num_layers: int | None, available: int) -> str | None:
    """Why ``--model.num_layers`` cannot cut a model of ``available`` layers, or None."""
    if num_layers is None or 1 <= num_layers <= available:
        return None
    return f"`--model.num_layers={num_layers}` must lie in 1..{available} (the model's layers)"


def load_tokenizer(source: str, option: str = "--model.model") -> PreTrainedTokenizerBase:
    """The tokenizer saved with the model ``source``; a directory without one is a ConfigError naming ``option``."""
    path = resolve_model_source(source)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as error:
        found = sorted(file.name for file in Path(path).glob("tokenizer*")) if Path(path).is_dir() else None
        reason = "no tokenizer.json, tokenizer.model or tokenizer_config.json in it" if found == [] else first_line(error)
        raise ConfigError(f"`{option}={source}` has no usable tokenizer ({reason}); save the model's tokenizer next to it "
                          "(tokenizer.save_pretrained(<dir>) writes tokenizer.json and tokenizer_config.json)") from error
