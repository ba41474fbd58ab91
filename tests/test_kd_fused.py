"""The fused logit loss against the plain formulation (full logits, autograd) and the chunked one it replaces."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.tiny_models import random_batches, tiny_llama
from transact_pl import kd_losses
from transact_pl.kd_losses import (IGNORE_INDEX, chunk_logit_gradient, chunked_logit_losses, fused_logit_loss, kl_divergence_sum,
                                   next_token_targets)

VOCAB, HIDDEN = 99, 32


def plain_loss(hidden, weight, teacher_hidden, teacher_weight, input_ids, kl_weight, ce_weight, temperature, divergence):
    """The definition: full fp32 logits of both models, autograd through everything."""
    logits = (hidden @ weight.T).float()
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten(), reduction="mean")
    loss = ce_weight * ce
    if teacher_hidden is not None:
        teacher_logits = (teacher_hidden @ teacher_weight.T).float()
        loss = loss + kl_weight * kl_divergence_sum(logits, teacher_logits, temperature, divergence) / input_ids.numel()
    return loss


def random_case(dtype: torch.dtype, length: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, length, HIDDEN, generator=generator).to(dtype).requires_grad_()
    student_head = nn.Linear(HIDDEN, VOCAB, bias=False).to(dtype)
    with torch.no_grad():
        student_head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=generator).mul(0.3))
    teacher_hidden = torch.randn(3, length, HIDDEN, generator=generator).to(dtype)
    teacher_head = nn.Linear(HIDDEN, VOCAB, bias=False).to(dtype)
    with torch.no_grad():
        teacher_head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=generator).mul(0.3))
    input_ids = torch.randint(0, VOCAB, (3, length), generator=generator)
    return hidden, student_head, teacher_hidden, teacher_head, input_ids


def gradients(loss, *inputs):
    return torch.autograd.grad(loss, inputs)


def close(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> bool:
    """Relative to the reference's largest entry (a gradient has entries near 0)."""
    return (a.float() - b.float()).abs().max().item() <= tolerance * b.float().abs().max().clamp_min(1e-12).item()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("length, chunk_size", [(12, 4), (12, 5), (11, 11), (11, 64)])
@pytest.mark.parametrize("divergence, temperature, alpha", [("forward", 1.0, 1.0), ("forward", 2.0, 0.5),
                                                            ("reverse", 1.0, 0.5), ("reverse", 3.0, 1.0), ("forward", 1.0, 0.0)])
@pytest.mark.parametrize("row_block", [5, 16])
def test_fused_loss_and_gradients_equal_the_plain_formulation(dtype, tolerance, length, chunk_size, divergence, temperature, alpha,
                                                              row_block, monkeypatch):
    monkeypatch.setattr(kd_losses, "ROW_BLOCK", row_block)  # 5: several row blocks per chunk, the last one short
    hidden, student_head, teacher_hidden, teacher_head, ids = random_case(dtype, length)
    weight = student_head.weight
    fused, sums = fused_logit_loss(hidden, teacher_hidden, student_head, teacher_head, ids, alpha, 1 - alpha, temperature,
                                   divergence, chunk_size)
    reference = plain_loss(hidden, weight, teacher_hidden, teacher_head.weight, ids, alpha, 1 - alpha, temperature, divergence)
    assert close(fused.detach(), reference.detach(), tolerance)
    assert not sums.kl.requires_grad and not sums.ce.requires_grad and sums.kl_tokens == ids.numel()
    for mine, theirs in zip(gradients(3.0 * fused, hidden, weight), gradients(3.0 * reference, hidden, weight)):
        assert mine.dtype == theirs.dtype and close(mine, theirs, tolerance)


def test_fused_loss_without_teacher_is_the_cross_entropy():
    hidden, head, _, _, ids = random_case(torch.float32, 11)
    weight = head.weight
    fused, sums = fused_logit_loss(hidden, None, head, None, ids, 1.0, 1.0, 2.0, "forward", 4)
    reference = plain_loss(hidden, weight, None, None, ids, 1.0, 1.0, 1.0, "forward")
    assert close(fused.detach(), reference.detach(), 1e-6) and sums.kl == 0 and sums.kl_tokens == 0
    for mine, theirs in zip(gradients(fused, hidden, weight), gradients(reference, hidden, weight)):
        assert close(mine, theirs, 1e-5)


@pytest.mark.parametrize("divergence, temperature", [("forward", 1.0), ("forward", 2.0), ("reverse", 1.0), ("reverse", 2.0)])
def test_chunk_gradient_skips_ignored_rows_like_autograd(divergence, temperature):
    generator = torch.Generator().manual_seed(4)
    logits, teacher = torch.randn(7, VOCAB, generator=generator), torch.randn(7, VOCAB, generator=generator)
    targets = torch.randint(0, VOCAB, (7,), generator=generator)
    targets[[1, 4]] = IGNORE_INDEX
    kl, ce, gradient = chunk_logit_gradient(logits.clone(), teacher.clone(), targets, 0.3, 0.7, temperature, divergence)
    logits.requires_grad_()
    reference_kl = kl_divergence_sum(logits, teacher, temperature, divergence)
    reference_ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    (reference,) = gradients(0.3 * reference_kl + 0.7 * reference_ce, logits)
    assert close(kl, reference_kl.detach(), 1e-6) and close(ce, reference_ce.detach(), 1e-6)
    assert close(gradient, reference, 1e-6)


def test_chunk_gradient_works_in_place_on_the_logits_buffers():
    """The gradient overwrites the student's logits: no second (N, V) buffer per chunk."""
    logits, teacher = torch.randn(40, VOCAB), torch.randn(40, VOCAB)
    targets = torch.randint(0, VOCAB, (40,))
    _, _, gradient = chunk_logit_gradient(logits, teacher, targets, 0.5, 0.5, 1.0, "forward")
    assert gradient.data_ptr() == logits.data_ptr()
    assert torch.allclose(gradient.sum(-1), torch.zeros(40), atol=1e-6)  # softmax − onehot and p_s − p_t sum to 0


@pytest.mark.parametrize("alpha, temperature, divergence, hidden_teacher", [(1.0, 1.0, "forward", True), (0.5, 2.0, "reverse", True),
                                                                           (0.0, 1.0, "forward", False)])
def test_fused_equals_the_chunked_losses_on_a_model(alpha, temperature, divergence, hidden_teacher):
    """Values to 1e-6 relative and the gradients of every parameter (tied or not), as DistillationLM combines them."""
    student, teacher = tiny_llama(seed=3), tiny_llama(seed=0)
    ids = random_batches(length=11)[0]["input_ids"]
    with torch.no_grad():
        teacher_hidden = teacher.model(input_ids=ids).last_hidden_state if hidden_teacher else None
    teacher_head = teacher.lm_head if hidden_teacher else None
    results = []
    for fused in (True, False):
        student.zero_grad()
        hidden = student.model(input_ids=ids).last_hidden_state
        if fused:
            loss, sums = fused_logit_loss(hidden, teacher_hidden, student.lm_head, teacher_head, ids, alpha, 1 - alpha,
                                          temperature, divergence, 4)
        else:
            sums = chunked_logit_losses(hidden, teacher_hidden, student.lm_head, teacher_head, ids, temperature, divergence, 4)
            loss = (1 - alpha) * sums.ce_mean + (alpha * sums.kl_mean if hidden_teacher else 0)
        loss.backward()
        results.append((loss.detach(), sums.kl.detach(), sums.ce.detach(), [p.grad.clone() for p in student.parameters()]))
    (loss_a, kl_a, ce_a, grads_a), (loss_b, kl_b, ce_b, grads_b) = results
    for a, b in ((loss_a, loss_b), (kl_a, kl_b), (ce_a, ce_b)):
        assert (a - b).abs() <= 1e-6 * b.abs()
    assert all(close(a, b, 1e-5) for a, b in zip(grads_a, grads_b))


def test_other_heads_fall_back_to_the_chunked_losses():
    hidden, _, teacher_hidden, teacher_head, ids = random_case(torch.float32, 9)
    biased = nn.Linear(HIDDEN, VOCAB)
    loss, sums = fused_logit_loss(hidden, teacher_hidden, biased, teacher_head, ids, 0.5, 0.5, 1.0, "forward", 4)
    reference = chunked_logit_losses(hidden, teacher_hidden, biased, teacher_head, ids, 1.0, "forward", 4)
    assert torch.allclose(loss, 0.5 * reference.ce_mean + 0.5 * reference.kl_mean)
    assert loss.requires_grad and not sums.kl.requires_grad


def test_fused_loss_under_no_grad_builds_no_graph_and_keeps_no_gradient():
    hidden, head, teacher_hidden, teacher_head, ids = random_case(torch.float32, 9)
    with torch.no_grad():
        loss, sums = fused_logit_loss(hidden, teacher_hidden, head, teacher_head, ids, 1.0, 0.0, 1.0, "forward", 4)
    assert not loss.requires_grad and loss.grad_fn is None
    assert torch.equal(next_token_targets(ids)[:, -1], torch.full((3,), IGNORE_INDEX))
    with pytest.raises(ValueError, match="divergence"):
        fused_logit_loss(hidden, teacher_hidden, head, teacher_head, ids, 1.0, 0.0, 1.0, "js", 4)


def test_fused_loss_trains_an_fsdp2_student_like_an_unsharded_one(mesh):
    """Under FSDP2 the LM head's weight is the root's unsharded parameter during the loss; its gradient must reach
    the sharded parameter (reduce-scattered by FSDP) exactly as autograd through the module would."""
    import copy

    from transact_pl.distributed import shard_model
    from transact_pl.kd_losses import final_hidden_states

    student, teacher = tiny_llama(seed=3).train(), tiny_llama(seed=0)
    sharded = shard_model(copy.deepcopy(student), mesh=mesh)
    ids = random_batches(length=11)[0]["input_ids"]
    with torch.no_grad():
        teacher_hidden = teacher.model(input_ids=ids).last_hidden_state
    for model in (student, sharded):
        hidden = final_hidden_states(model, ids)
        loss, _ = fused_logit_loss(hidden, teacher_hidden, model.lm_head, teacher.lm_head, ids, 0.5, 0.5, 1.0, "forward", 4)
        loss.backward()
    for (name, plain), sharded_parameter in zip(student.named_parameters(), sharded.parameters()):
        assert close(sharded_parameter.grad.full_tensor(), plain.grad, 1e-5), name
