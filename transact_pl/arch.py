"""Locating the attention and MLP parts of a LLaMA-family causal LM.

Everything TransAct touches lives in two places per decoder layer: the attention
block (q/k/v rows, o columns) and the SwiGLU MLP (gate/up rows, down columns).
This module finds those parts and describes the widths; it never changes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from transact_pl.errors import ConfigError

# model_type values whose decoder layers follow the LLaMA layout (self_attn.{q,k,v,o}_proj,
# mlp.{gate,up,down}_proj) and whose stock config understands an explicit head_dim.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# The linears TransAct slices, named as in every supported family's decoder layer (self_attn.*, mlp.*).
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
PRUNABLE_LINEARS = ATTENTION_LINEARS + MLP_LINEARS


@dataclass(frozen=True)
class Widths:
    """The inner widths of every decoder layer (uniform across layers).

    num_heads · head_dim is the attention width; intermediate_size the MLP width.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    @property
    def attention_width(self) -> int:
        return self.num_heads * self.head_dim


@dataclass
class LayerParts:
    """The prunable linears of one decoder layer."""

    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear
    attention: nn.Module
    mlp: nn.Module


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a *ForCausalLM model (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(
            f"{type(model).__name__} has no `model.layers`; TransAct supports LLaMA-family causal LMs "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return layers


def model_type_problem(model_type: str | None) -> str | None:
    """Why ``model_type`` cannot be pruned here (naming the supported ones), or None."""
    if model_type in SUPPORTED_MODEL_TYPES:
        return None
    return f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"


def check_supported(model: nn.Module) -> None:
    """Refuse architectures whose layout TransAct does not know, naming the supported ones."""
    problem = model_type_problem(getattr(getattr(model, "config", None), "model_type", None))
    if problem:
        raise ConfigError(problem)
    for index, layer in enumerate(decoder_layers(model)):
        layer_parts(layer, index)


def layer_parts(layer: nn.Module, index: int = 0) -> LayerParts:
    """The q/k/v/o and gate/up/down linears of one decoder layer."""
    attention = getattr(layer, "self_attn", None)
    mlp = getattr(layer, "mlp", None)
    names = {"self_attn": ATTENTION_LINEARS, "mlp": MLP_LINEARS}
    found: dict[str, nn.Linear] = {}
    for owner_name, owner in (("self_attn", attention), ("mlp", mlp)):
        for name in names[owner_name]:
            linear = getattr(owner, name, None)
            if not isinstance(linear, nn.Linear):
                raise ConfigError(
                    f"layer {index} has no nn.Linear `{owner_name}.{name}`; TransAct supports LLaMA-family "
                    f"layouts ({', '.join(SUPPORTED_MODEL_TYPES)})"
                )
            found[name] = linear
    return LayerParts(attention=attention, mlp=mlp, **found)


def all_layer_parts(model: nn.Module) -> list[LayerParts]:
    return [layer_parts(layer, index) for index, layer in enumerate(decoder_layers(model))]


def model_widths(model: nn.Module) -> Widths:
    """Current widths, read from the config (kept in sync with the weights by surgery)."""
    return config_widths(model.config)


def config_widths(config) -> Widths:
    """The widths a Hugging Face config describes (head_dim defaults to hidden_size / heads)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Widths(
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
    )


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; the training mode it had comes back after, also on an error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
