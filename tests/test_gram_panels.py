"""The second moments' G accumulated by upper panels and mirrored equals the full x xᵀ GEMM (fp64 sums of fp32 products)."""

import pytest
import torch
from torch import nn

from tests.tiny_models import random_batches, tiny_llama
from transact_pl.arch import all_layer_parts
from transact_pl.reconstruction import GRAM_PANELS, collect_second_moments, gram_hook, mirror_upper


def full_gram(activations: list[torch.Tensor]) -> torch.Tensor:
    """Σ over batches of the full fp32 GEMM xᵀx, summed in fp64: the plain formulation."""
    return sum((a.T @ a).double() for a in activations)


@pytest.mark.parametrize("width", [37, 48, 3])
def test_upper_panels_mirrored_equal_the_full_gemm_and_are_exactly_symmetric(width):
    generator = torch.Generator().manual_seed(width)
    activations = [torch.randn(2, 21, width, generator=generator) for _ in range(3)]
    gram = torch.zeros(width, width, dtype=torch.float64)
    hook = gram_hook(gram, upper_only=True)
    for activation in activations:
        hook(nn.Identity(), (activation,))
    panel = -(-width // GRAM_PANELS)
    assert not gram[panel:, :panel].any()  # below the first diagonal panel: never multiplied
    mirror_upper(gram)
    reference = full_gram([a.reshape(-1, width) for a in activations])
    assert torch.equal(gram, gram.T)
    assert torch.allclose(gram, reference, rtol=1e-6, atol=1e-6 * reference.diagonal().max().item())


def test_collected_moments_equal_the_full_gemm_of_every_layers_inputs():
    model, batches = tiny_llama(), random_batches(num_batches=3, batch_size=4, length=13)
    inputs: dict[str, list[torch.Tensor]] = {"o_proj": [], "down_proj": []}
    part = all_layer_parts(model)[1]
    handles = [getattr(part, name).register_forward_pre_hook(lambda m, args, name=name: inputs[name].append(
        args[0].detach().reshape(-1, args[0].shape[-1]).clone())) for name in inputs]
    moments = collect_second_moments(model, batches)
    for handle in handles:
        handle.remove()
    attention, mlp = moments.of_layer(1)
    for gram, name in ((attention, "o_proj"), (mlp, "down_proj")):
        reference = full_gram(inputs[name])
        assert torch.equal(gram, gram.T)
        assert torch.allclose(gram, reference, rtol=1e-6, atol=1e-6 * reference.diagonal().max().item())
