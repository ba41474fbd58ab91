"""Shrinking an FSDP2-sharded model and carrying its optimizer state, in-process on a one-rank gloo group.

The multi-process runs are in test_distributed.py (slow); these check the sharded code paths in seconds.
"""

import os

import torch

from callbacks.atomic_checkpoint import finish_interrupted_replace, replace_directory
from tests.test_surgery import keep_plan
from tests.tiny_models import random_batches, tiny_llama
from transact_pl.distributed import carry_over_sharded_state, full_copy, shard_model, shrink_sharded


def train_steps(model, optimizer, batch, steps):
    for _ in range(steps):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_an_optimizer_that_never_stepped_carries_no_state(mesh):
    """Otherwise Adam would start the shrunk model at step 2, with a smaller first update than one process."""
    model = shard_model(tiny_llama().train(), mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    plan = keep_plan(model, [1], list(range(0, 37, 2)))
    new_model, slices = shrink_sharded(model, plan, lambda m: shard_model(m, mesh=mesh))
    new_optimizer = torch.optim.AdamW(new_model.parameters(), lr=1e-2)
    carry_over_sharded_state(model, optimizer, new_model, new_optimizer, slices)
    assert not optimizer.state and not new_optimizer.state


def test_kept_rows_keep_their_adam_moments_through_a_sharded_shrink(mesh):
    model = shard_model(tiny_llama().train(), mesh=mesh)
    batch = random_batches(num_batches=1)[0]["input_ids"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, batch, 2)
    old_q = model.model.layers[0].self_attn.q_proj.weight
    old_moment = optimizer.state[old_q]["exp_avg"].full_tensor().clone()
    plan = keep_plan(model, [1], list(range(0, 37, 2)))
    new_model, slices = shrink_sharded(model, plan, lambda m: shard_model(m, mesh=mesh))
    new_optimizer = torch.optim.AdamW(new_model.parameters(), lr=1e-2)
    carry_over_sharded_state(model, optimizer, new_model, new_optimizer, slices)
    new_q = new_model.model.layers[0].self_attn.q_proj.weight
    assert tuple(new_q.shape) == (16, 32)  # heads 2 and 3 of 4, head_dim 8
    state = new_optimizer.state[new_q]
    assert torch.equal(state["exp_avg"].full_tensor(), old_moment[16:32])
    assert state["step"].item() == 2
    before = full_copy(new_model).model.layers[0].self_attn.q_proj.weight.detach().clone()
    train_steps(new_model, new_optimizer, batch, 1)
    after = full_copy(new_model).model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(after, before) and torch.isfinite(after).all()


def test_a_checkpoint_directory_replaces_the_previous_one_whole(tmp_path):
    """FSDP2 checkpoint directories: the staged one takes the target's place; nothing partial or stale is left."""
    target, staging = tmp_path / "last.ckpt", tmp_path / "last.ckpt.tmp"
    target.mkdir()
    (target / "__0_0.distcp").write_bytes(b"old shard")
    (target / "stale_only_in_old").write_bytes(b"x")
    staging.mkdir()
    (staging / "__0_0.distcp").write_bytes(b"new shard")
    (staging / "meta.pt").write_bytes(b"meta")
    replace_directory(staging, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert sorted(p.name for p in target.iterdir()) == ["__0_0.distcp", "meta.pt"]
    assert (target / "__0_0.distcp").read_bytes() == b"new shard"


def test_a_save_killed_between_the_renames_is_finished_by_the_next_resume_or_save(tmp_path):
    """The state a kill between replace_directory's two renames leaves: only <target>.old and the staged copy."""
    target, previous, staging = tmp_path / "last.ckpt", tmp_path / "last.ckpt.old", tmp_path / "last.ckpt.tmp"
    previous.mkdir()
    (previous / "meta.pt").write_bytes(b"step 4")
    staging.mkdir()
    (staging / "meta.pt").write_bytes(b"step 6")
    replace_directory(staging, target)  # the next save: the new copy lands, the old one goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"] and (target / "meta.pt").read_bytes() == b"step 6"
    os.replace(target, previous)  # killed again between the renames; a resume puts the old copy back
    finish_interrupted_replace(target)
    finish_interrupted_replace(target)  # a second process of the same launch finds it done
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"] and (target / "meta.pt").read_bytes() == b"step 6"
