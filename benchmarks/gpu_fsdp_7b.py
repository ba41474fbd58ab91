"""GPU check of the sharded path on a LLaMA-7B-shaped model with random weights (one process, FSDP2, bf16).

    python -m benchmarks.gpu_fsdp_7b --out benchmarks/results/gpu_fsdp_7b.json

Measures: calibration throughput (tokens/s, hooks on the transitional activations), one shrink while
sharded (32 → 16 heads, MLP 11008 → 5504: gather, slice, re-shard, optimizer state carried over), KD and
CE step time and peak memory, and training tokens/s before and after the shrink. Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from transact_pl.arch import Widths, model_widths
from transact_pl.distributed import carry_over_sharded_state, shard_model, shrink_sharded, sum_over_processes
from transact_pl.plan import make_plan
from transact_pl.pruning import compute_scores

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)


def timed(fn, repeats: int) -> tuple[float, float]:
    """(seconds per call, peak GiB) over ``repeats`` calls after one warm-up."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats, torch.cuda.max_memory_allocated() / 2**30


def train_step(student, teacher, optimizer, input_ids, kd: bool) -> None:
    logits = student(input_ids=input_ids, use_cache=False).logits.float()
    if kd:
        with torch.no_grad():
            teacher_logp = F.log_softmax(teacher(input_ids=input_ids, use_cache=False).logits.float(), dim=-1)
        loss = F.kl_div(F.log_softmax(logits, dim=-1), teacher_logp, log_target=True, reduction="batchmean")
    else:
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/gpu_fsdp_7b.json")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--calibration_batches", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    torch.manual_seed(0)
    results: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "seq": args.seq, "batch": args.batch}

    start = time.perf_counter()
    with torch.device("cuda"):
        config = LlamaConfig(**LLAMA_7B, dtype=torch.bfloat16)
        student = LlamaForCausalLM(config).to(torch.bfloat16)
        teacher = LlamaForCausalLM(config).to(torch.bfloat16).eval().requires_grad_(False)
    teacher.load_state_dict(student.state_dict())
    shard_model(student)
    shard_model(teacher)
    results["build_s"] = time.perf_counter() - start
    results["params_before"] = sum(p.numel() for p in student.parameters())

    tokens = args.batch * args.seq
    batches = [{"input_ids": torch.randint(0, 32000, (args.batch, args.seq), device="cuda")} for _ in range(args.calibration_batches)]
    plain = lambda: [student(input_ids=b["input_ids"], use_cache=False) for b in batches]  # noqa: E731
    with torch.no_grad():
        plain_s, _ = timed(plain, 1)
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.cuda.reset_peak_memory_stats()
    scores = compute_scores(student, "acts", batches, seed=0, reduce_fn=sum_over_processes)
    torch.cuda.synchronize()
    calibration_s = time.perf_counter() - start
    results["calibration_tokens_per_s"] = tokens * len(batches) / calibration_s
    results["plain_forward_tokens_per_s"] = tokens * len(batches) / plain_s
    results["calibration_overhead"] = calibration_s / plain_s - 1
    results["calibration_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30

    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    input_ids = batches[0]["input_ids"]
    for kind in ("ce", "kd"):
        seconds, peak = timed(lambda: train_step(student, teacher, optimizer, input_ids, kind == "kd"), 3)
        results[f"{kind}_step_s_before"], results[f"{kind}_peak_gib_before"] = seconds, peak
        results[f"{kind}_tokens_per_s_before"] = tokens / seconds

    before = model_widths(student)
    after = Widths(num_heads=16, num_kv_heads=16, head_dim=128, intermediate_size=5504)
    plan = make_plan(scores, before, after, shot=1, scorer="acts")
    torch.cuda.synchronize()
    start = time.perf_counter()
    old_model, old_optimizer = student, optimizer
    student, slices = shrink_sharded(student, plan, shard_model)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    carry_over_sharded_state(old_model, old_optimizer, student, optimizer, slices)
    del old_model, old_optimizer
    torch.cuda.synchronize()
    results["shrink_s"] = time.perf_counter() - start
    results["params_after"] = sum(p.numel() for p in student.parameters())
    results["widths_after"] = asdict(model_widths(student))
    torch.cuda.empty_cache()
    for kind in ("ce", "kd"):
        seconds, peak = timed(lambda: train_step(student, teacher, optimizer, input_ids, kind == "kd"), 3)
        results[f"{kind}_step_s_after"], results[f"{kind}_peak_gib_after"] = seconds, peak
        results[f"{kind}_tokens_per_s_after"] = tokens / seconds
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
