"""The frozen dense teacher of distillation: loading at a chosen precision and its memory footprint.

Precisions: ``full`` (the student's ``--model.dtype``), ``bf16``, and the bitsandbytes weight-only
formats ``int8`` (LLM.int8(), Linear8bitLt) and ``nf4`` (4-bit NormalFloat, Linear4bit), which run on
CPU and CUDA. Only the decoder layers' q/k/v/o and gate/up/down linears are quantized; embeddings,
norms and the LM head keep the load dtype (as transformers' BitsAndBytesConfig does).
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from transact_pl.arch import ATTENTION_LINEARS, MLP_LINEARS, all_layer_parts
from transact_pl.infra.loading import load_causal_lm

PRECISIONS = ("full", "bf16", "int8", "nf4")
QUANTIZED = ("int8", "nf4")
_QUANTIZED_DEVICE_TYPES = ("cpu", "cuda")
_LINEAR_NAMES = {"attention": ATTENTION_LINEARS, "mlp": MLP_LINEARS}


def teacher_precision_problems(precision: str, device: torch.device, option: str = "--model.teacher_precision") -> list[str]:
    """What prevents a teacher at ``precision`` on ``device`` (empty when it works); probes bitsandbytes for real."""
    if precision not in PRECISIONS:
        return [f"`{option}={precision}` is not one of {', '.join(PRECISIONS)}"]
    if precision not in QUANTIZED:
        return []
    if importlib.util.find_spec("bitsandbytes") is None:
        return [f"`{option}={precision}` needs bitsandbytes (pip install 'transact-pl[quant]'), or use full/bf16"]
    if device.type not in _QUANTIZED_DEVICE_TYPES:
        return [f"`{option}={precision}` runs on {'/'.join(_QUANTIZED_DEVICE_TYPES)} only, not {device.type}; use full or bf16"]
    try:  # a 64×64 layer quantized and run once: catches builds without this backend's kernels
        probe = quantized_linear(nn.Linear(64, 64), precision, torch.float32, device)
        probe(torch.ones(2, 64, device=device))
    except Exception as error:  # noqa: BLE001 - any failure of the library means: this combination is unsupported
        return [f"`{option}={precision}` fails on {device.type} with this bitsandbytes ({type(error).__name__}: {error}); use full or bf16"]
    return []


def quantized_linear(linear: nn.Linear, precision: str, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A frozen bitsandbytes copy of ``linear`` on ``device`` (quantization happens on the move there)."""
    import bitsandbytes as bnb

    has_bias = linear.bias is not None
    if precision == "int8":
        quantized = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                        threshold=6.0, device="meta")
        quantized.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    elif precision == "nf4":
        quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                      quant_type="nf4", device="meta")
        quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4", module=quantized)
        # bitsandbytes' packed CPU kernel (AVX512-BF16) asserts whole quantization blocks per row and rows in tiles of
        # 32; other shapes (tiny test models, odd pruned widths) take its generic path, which handles any shape.
        if linear.in_features % quantized.weight.blocksize or linear.out_features % 32:
            quantized.support_avx512bf16_for_cpu = False
    else:
        raise ValueError(f"precision must be one of {QUANTIZED}, not {precision!r}")
    if has_bias:
        quantized.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return quantized.to(device)


class _DropRepeatedCastWarning(logging.Filter):
    """bitsandbytes logs this on every int8 matmul of non-fp16 inputs; it is expected here (said once in the docs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def quantize_decoder_linears(model: PreTrainedModel, precision: str, device: torch.device) -> None:
    """Replace every decoder layer's attention/MLP linear by its ``precision`` bitsandbytes version, in place."""
    compute_dtype = model.get_input_embeddings().weight.dtype
    if precision == "int8":  # LLM.int8() quantizes activations from float16: expected, not worth a line per matmul
        bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
        if not any(isinstance(existing, _DropRepeatedCastWarning) for existing in bnb_logger.filters):
            bnb_logger.addFilter(_DropRepeatedCastWarning())
    for parts in all_layer_parts(model):
        for owner_name, names in _LINEAR_NAMES.items():
            owner = getattr(parts, owner_name)
            for name in names:
                setattr(owner, name, quantized_linear(getattr(owner, name), precision, compute_dtype, device))


def load_teacher(source: str, num_layers: int | None, dtype: str, precision: str, device: torch.device) -> PreTrainedModel:
    """The dense model at ``precision`` on ``device``: eval mode, every parameter frozen.

    ``dtype`` is the student's; ``full`` keeps it, ``bf16`` loads bfloat16, int8/nf4 load it then quantize.
    """
    load_dtype = "bfloat16" if precision == "bf16" else dtype
    teacher = load_causal_lm(source, num_layers, load_dtype)
    if precision in QUANTIZED:
        quantize_decoder_linears(teacher, precision, device)
    teacher.to(device)
    teacher.requires_grad_(False)
    return teacher.eval()


def _quant_state_tensors(parameter: Tensor) -> list[Tensor]:
    """bitsandbytes' quantization statistics stored beside a weight (absmax, codebooks, row scales)."""
    found = [getattr(parameter, "SCB", None)]
    state = getattr(parameter, "quant_state", None)
    while state is not None:
        found += [getattr(state, "absmax", None), getattr(state, "code", None), getattr(state, "offset", None)]
        state = getattr(state, "state2", None)
    return [tensor for tensor in found if isinstance(tensor, Tensor)]


def _local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def module_memory_bytes(model: nn.Module) -> int:
    """Bytes this process holds for a model's parameters, buffers and quantization statistics (shared storage
    counted once; of a sharded parameter, the local shard)."""
    tensors = [_local(tensor) for tensor in list(model.parameters()) + list(model.buffers())]
    tensors += [stat for parameter in model.parameters() for stat in _quant_state_tensors(parameter)]
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total
