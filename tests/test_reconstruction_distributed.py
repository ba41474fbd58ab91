"""Reconstruction over two real gloo processes, replicated (DDP-like) and FSDP2-sharded: the second moments and
the sequential variant's per-layer moments are summed over the processes on the model's device, and both refits
equal one process's on the whole calibration set.

Slow-marked (two processes start; ~3 min on 2 busy cores), like test_collective_devices.py whose device checks
it reuses.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_collective_devices import CollectiveDeviceCheck, DefaultDeviceElsewhere
from test_surgery import keep_plan
from tiny_models import random_batches, tiny_llama
from transact_pl.distributed import rank_share, shard_model, sum_over_processes
from transact_pl.reconstruction import collect_second_moments, refit_weights
from transact_pl.sequential_reconstruction import sequential_refit

WORLD_SIZE = 2
LAYOUTS = ("replicated", "fsdp2")
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _refits(model: torch.nn.Module, share: list, reduce_fn) -> dict[str, dict[str, torch.Tensor]]:
    plan = keep_plan(tiny_llama(), [1], list(range(0, 37, 2)))
    with DefaultDeviceElsewhere():  # every tensor handed to a collective was made on the model's device
        moments = collect_second_moments(model, share, storage_device="cpu")
        if reduce_fn is not None:
            moments.all_reduce(reduce_fn)
    return {"dense": refit_weights(model, plan, moments, output_device="cpu"),
            "sequential": sequential_refit(model, plan, share, reduce_fn=reduce_fn, output_device="cpu")}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=120))
    try:
        share = list(rank_share(random_batches(num_batches=4), rank, WORLD_SIZE))
        results = {}
        for layout in LAYOUTS:
            model = tiny_llama()  # same seed on every process
            if layout == "fsdp2":
                shard_model(model)
            check = CollectiveDeviceCheck(torch.device("cpu"))
            with check:
                results[layout] = _refits(model, share, sum_over_processes)
            results[layout]["collectives"] = check.checked
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> list[dict]:
    directory = tmp_path_factory.mktemp("reconstruction")
    mp.start_processes(_worker, args=(str(directory / "init"), str(directory)), nprocs=WORLD_SIZE, start_method="spawn")
    return [torch.load(directory / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_processes_refit_like_one(two_process_results, layout):
    expected = _refits(tiny_llama(), random_batches(num_batches=4), None)
    for results in two_process_results:
        assert results[layout]["collectives"].get("c10d.allreduce_.default", 0) >= 2 * 4  # moments + 2 per layer
        for variant in ("dense", "sequential"):
            assert sorted(results[layout][variant]) == sorted(expected[variant])
            for name, weight in expected[variant].items():
                torch.testing.assert_close(results[layout][variant][name], weight, rtol=1e-4, atol=1e-6)
