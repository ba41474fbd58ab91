"""Every tensor the pruning code hands to a collective lives on the model's device, replicated or FSDP2-sharded.

NCCL takes CUDA tensors only, while gloo (the CPU tests' backend) takes CPU tensors: a tensor that project code
builds without naming a device lands on the CPU, passes every CPU test and crashes the first shot on GPUs. Here
two real gloo processes run every pruning step that talks to the other process (the four scorers with their
statistics summed, head-dim statistics, held-out perplexity and synced greedy samples) on a CPU model while
``DefaultDeviceElsewhere`` sends every tensor that project code creates without a device to ``meta``, as it would
go to the CPU beside a CUDA model; ``CollectiveDeviceCheck`` sees every collective at the dispatcher (ours,
torchmetrics', transformers', FSDP2's) and refuses one whose tensors are not on the model's device. The results
must also equal one process's on the same calibration set: the same scores, so the same plan.

Slow-marked (two processes start, about 40 s on 2 busy cores): `make test-dist` runs it.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tiny_models import random_batches, tiny_llama, tiny_tokenizer
from transact_pl.arch import model_widths
from transact_pl.distributed import rank_share, shard_model, sum_over_processes
from transact_pl.eval_suite import evaluate_heldout
from transact_pl.head_dim import collect_head_dim_stats
from transact_pl.pruning import compute_scores, plan_shot
from transact_pl.schedule import next_widths
from transact_pl.pruning import SCORERS
from transact_pl.scoring import ChannelScores

REPO = Path(__file__).resolve().parents[1]
PROJECT_DIRS = tuple(str(REPO / name) for name in ("transact_pl", "callbacks", "datamodules"))
WORLD_SIZE = 2
LAYOUTS = ("replicated", "fsdp2")
PROMPTS = ("t5 t6 t7", "t9")
COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional")
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


class DefaultDeviceElsewhere(TorchFunctionMode):
    """Tensors that project code creates without a device go to ``meta`` instead of the CPU.

    Only calls made from files of the project are redirected: torch, transformers and torchmetrics create
    CPU tensors on purpose and move them, which a meta tensor cannot do.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None and self._called_from_project():
            kwargs["device"] = "meta"
        return func(*args, **kwargs)

    @staticmethod
    def _called_from_project() -> bool:
        return sys._getframe(2).f_code.co_filename.startswith(PROJECT_DIRS)


class CollectiveDeviceCheck(TorchDispatchMode):
    """Refuses a collective (any c10d op reaching the dispatcher) holding a tensor off ``device``; counts them."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.checked: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in COLLECTIVE_NAMESPACES:
            devices = {t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            if devices - {self.device}:
                raise AssertionError(f"{func} got tensors on {sorted(map(str, devices))}; the model is on {self.device}")
            self.checked[str(func)] = self.checked.get(str(func), 0) + 1
        return func(*args, **kwargs)


def _scores_as_lists(scores: ChannelScores) -> dict[str, list[list[float]]]:
    return {"attention": [s.tolist() for s in scores.attention], "mlp": [s.tolist() for s in scores.mlp]}


def _every_collective_step(model: torch.nn.Module, share: list, blocks: torch.Tensor) -> dict:
    """Each scorer's channel scores, head-dim statistics and a held-out record, summed/synced over processes."""
    results = {scorer: _scores_as_lists(compute_scores(model, scorer, share, 0, reduce_fn=sum_over_processes))
               for scorer in SCORERS}
    stats = collect_head_dim_stats(model, share)
    stats.all_reduce(sum_over_processes)
    results["head_dim"] = torch.cat([*stats.query, *stats.key, *stats.output]).tolist()
    results["heldout"] = evaluate_heldout(model, tiny_tokenizer(), {"text": blocks}, 2, "dense", PROMPTS, 3,
                                          synced_gpus=dist.is_initialized())
    return results


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=120))
    try:
        batches, blocks = random_batches(num_batches=4), random_batches(num_batches=1, batch_size=3)[0]["input_ids"]
        results = {}
        for layout in LAYOUTS:
            model = tiny_llama()  # same seed on every process
            if layout == "fsdp2":
                shard_model(model)
            check = CollectiveDeviceCheck(torch.device("cpu"))
            with check, DefaultDeviceElsewhere():
                results[layout] = _every_collective_step(model, list(rank_share(batches, rank, WORLD_SIZE)), blocks)
            results[layout]["collectives"] = check.checked
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> list[dict]:
    directory = tmp_path_factory.mktemp("collectives")
    mp.start_processes(_worker, args=(str(directory / "init"), str(directory)), nprocs=WORLD_SIZE, start_method="spawn")
    return [torch.load(directory / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def one_process_results() -> dict:
    batches, blocks = random_batches(num_batches=4), random_batches(num_batches=1, batch_size=3)[0]["input_ids"]
    return _every_collective_step(tiny_llama(), batches, blocks)


@pytest.fixture(scope="module")
def one_process_taylor_abs_of_fsdp2_steps() -> dict:
    """What ``taylor_abs`` means under FSDP2 (``collect_gradient_stats``): each backward's gradient is already the
    mean over the ranks' batches of that step, so a "batch" of the Σ|·| is the union of one step's batches (rank r
    runs batches r, r + W, …), and the mean is scaled back by W. One process: the step unions, times W."""
    batches = random_batches(num_batches=4)
    steps = [{"input_ids": torch.cat([batches[i]["input_ids"] for i in range(start, start + WORLD_SIZE)])}
             for start in range(0, len(batches), WORLD_SIZE)]
    scores = _scores_as_lists(compute_scores(tiny_llama(), "taylor_abs", steps, 0))
    return {part: [[WORLD_SIZE * value for value in layer] for layer in layers] for part, layers in scores.items()}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_collective_gets_tensors_on_the_model_device(two_process_results, layout):
    # The workers refuse a collective off the model's device; here: the steps really talked to each other.
    checked = two_process_results[0][layout]["collectives"]
    assert checked.get("c10d.allreduce_.default", 0) >= 2 * len(SCORERS)
    if layout == "fsdp2":  # FSDP2's own parameter all-gathers went through the check too
        assert any("allgather" in name for name in checked)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scorer", SCORERS)
def test_two_processes_score_and_plan_like_one(two_process_results, one_process_results,
                                              one_process_taylor_abs_of_fsdp2_steps, layout, scorer):
    expected = one_process_results[scorer]
    if (layout, scorer) == ("fsdp2", "taylor_abs"):
        expected = one_process_taylor_abs_of_fsdp2_steps
    for rank in range(WORLD_SIZE):
        got = two_process_results[rank][layout][scorer]
        for part in ("attention", "mlp"):
            for layer_got, layer_expected in zip(got[part], expected[part], strict=True):
                torch.testing.assert_close(torch.tensor(layer_got), torch.tensor(layer_expected), rtol=1e-5, atol=1e-7)
    model = tiny_llama()
    before = model_widths(model)
    after = next_widths(before, 16, 20, shot=1, num_shots=1)  # one KV group (2 heads × 8) of two, 20 of 37 MLP
    plans = [plan_shot(model, _to_scores(results[layout][scorer]), after, 1, scorer) for results in two_process_results]
    assert plans[0] == plans[1] == plan_shot(model, _to_scores(expected), after, 1, scorer)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_processes_measure_heldout_and_head_dim_like_one(two_process_results, one_process_results, layout):
    for results in two_process_results:
        torch.testing.assert_close(torch.tensor(results[layout]["head_dim"]), torch.tensor(one_process_results["head_dim"]))
        heldout, expected = results[layout]["heldout"], one_process_results["heldout"]
        assert heldout["samples"] == expected["samples"]
        assert heldout["perplexity"]["text"]["ppl"] == pytest.approx(expected["perplexity"]["text"]["ppl"], rel=1e-5)


def _to_scores(lists: dict) -> ChannelScores:
    return ChannelScores([torch.tensor(s) for s in lists["attention"]], [torch.tensor(s) for s in lists["mlp"]])
