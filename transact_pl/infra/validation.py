"""Startup checks of the base model and its tokenizer from their config files alone (no weights loaded).

Each check returns the problems it found as one-line messages naming the option as typed
(``--model.model=…``), so a caller can gather every problem of a configuration into one error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from transact_pl.arch import model_type_problem
from transact_pl.infra.assets import resolve_model_source
from transact_pl.errors import ConfigError, first_line
from transact_pl.infra.safe_load import load_checkpoint_file
from transact_pl.infra.loading import num_layers_problem, torch_dtype


def load_model_config(source: str, option: str = "--model.model") -> PretrainedConfig:
    """The Hugging Face config of ``source`` (embedded name, local directory or hub name)."""
    try:
        return AutoConfig.from_pretrained(resolve_model_source(source))
    except (OSError, ValueError, KeyError) as error:
        raise ConfigError(f"`{option}={source}` could not be read ({first_line(error)}); give a local Hugging Face directory, "
                          f"a hub name, or the embedded default 'smollm2-135m-instruct'") from error


def model_problems(config: PretrainedConfig, source: str, num_layers: int | None, dtype: str) -> list[str]:
    """An unsupported architecture, a layer cut outside the model, or an unknown dtype."""
    problems = []
    problem = model_type_problem(getattr(config, "model_type", None))
    if problem:
        problems.append(f"`--model.model={source}`: {problem}")
    problem = num_layers_problem(num_layers, getattr(config, "num_hidden_layers", 0) or 0)
    if problem:
        problems.append(problem)
    try:
        torch_dtype(dtype)
    except ConfigError as error:
        problems.append(str(error))
    return problems


def tokenizer_problem(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, source: str) -> str | None:
    """A tokenizer that can emit ids the model has no embedding for (its vocabulary is larger)."""
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is None or len(tokenizer) <= vocab_size:
        return None
    return (f"`--model.model={source}`: its tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{vocab_size}, so ids >= {vocab_size} have no embedding; put the model's own tokenizer next to it")


def weights_problems(source: str) -> list[str]:
    """Truncated or corrupted ``*.safetensors`` files of a local model directory, found from their headers alone
    (safetensors checks that the header's tensors cover the file exactly); hub names are not checked."""
    directory = Path(resolve_model_source(source))
    if not directory.is_dir():
        return []
    problems = []
    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            problems.append(f"`--model.model={source}`: {file.name} is truncated or corrupted ({first_line(error)}); "
                            "download or save the model again")
    for file in sorted(directory.glob("pytorch_model*.bin")):  # pickles: read weights-only, as transformers will
        try:
            load_checkpoint_file(file, "--model.model", mmap=True)
        except ConfigError as error:
            problems.append(str(error))
    return problems


def context_problems(config: PretrainedConfig, block_size: int, sample_new_tokens: int, prompt_tokens: Sequence[int]) -> list[str]:
    """Blocks or greedy samples longer than the model's context (``max_position_embeddings``), where RoPE models
    run on but never saw such positions in training. ``prompt_tokens``: the token count of each sample prompt."""
    context = getattr(config, "max_position_embeddings", None)
    if context is None:
        return []
    problems = []
    if block_size > context:
        problems.append(f"`--data.block_size={block_size}` is above the model's context of {context} tokens "
                        f"(max_position_embeddings): use at most {context}")
    longest_prompt = max(prompt_tokens, default=0)
    if sample_new_tokens > 0 and longest_prompt + sample_new_tokens > context:
        problems.append(f"`--report.sample_new_tokens={sample_new_tokens}` plus the longest prompt's {longest_prompt} "
                        f"tokens exceeds the model's context of {context} tokens: use at most {context - longest_prompt}")
    return problems
