"""Distillation on CUDA (needs a GPU; not run by CI): KD steps in a real Trainer with a full, bf16, int8 and nf4
teacher on a tiny model, then agreement and peak memory of the chunked logit losses at SmolLM2's vocabulary.

    python -m benchmarks.distillation_cuda_check     # writes benchmarks/results/distillation_cuda.json
"""

from __future__ import annotations

import json
import tempfile
import time

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.common import RESULTS_DIR
from tests.tiny_models import random_batches, tiny_llama
from transact_pl.lightning_modules.distillation_lm import DistillationLM
from transact_pl.kd_losses import chunked_logit_losses, kl_divergence_sum
from transact_pl.infra.teacher import PRECISIONS, teacher_precision_problems

CUDA = torch.device("cuda")


def teacher_run(model_dir: str, precision: str) -> dict:
    """Three KD steps in a Trainer on the GPU, then one more step checked by hand."""
    record: dict = {"problems": teacher_precision_problems(precision, CUDA)}
    module = DistillationLM(model=model_dir, teacher_precision=precision, alpha=0.5, hidden_weight=1.0, learning_rate=1e-2,
                            warmup_steps=1)
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(random_batches(num_batches=4), batch_size=None))
    teacher = module.dense_teacher()
    before = [t.detach().clone() for t in [*teacher.parameters(), *teacher.buffers()]]
    loss, metrics = module.compute_loss(random_batches()[0]["input_ids"].to(CUDA))
    loss.backward()
    weight = teacher.model.layers[0].mlp.up_proj.weight
    record.update(loss=loss.item(), kd=metrics["kd_loss"].item(), teacher_bytes=module.teacher_memory_bytes,
                  teacher_device=str(weight.device), teacher_weight_dtype=str(weight.dtype),
                  teacher_grads=sum(p.grad is not None for p in teacher.parameters()),
                  teacher_unchanged=all(torch.equal(a, b) for a, b in zip(before, [*teacher.parameters(), *teacher.buffers()])),
                  val_kl=module.validation_kl(random_batches()))
    return record


def chunk_memory(batch_size: int = 8, length: int = 1024) -> dict:
    """KL value, gradient norm, time and peak extra memory per chunk size; "naive" holds full fp32 logits."""
    config = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536,
                         num_hidden_layers=2, vocab_size=49152, tie_word_embeddings=True)
    torch.manual_seed(0)
    student, teacher = LlamaForCausalLM(config).to(CUDA), LlamaForCausalLM(config).to(CUDA).eval().requires_grad_(False)
    ids = torch.randint(0, config.vocab_size, (batch_size, length), device=CUDA)
    results = {}
    for chunk in (64, 64, 256, length, "naive"):  # the first run warms up
        student.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base, started = torch.cuda.memory_allocated(), time.perf_counter()
        hidden = student.model(input_ids=ids).last_hidden_state
        with torch.no_grad():
            teacher_hidden = teacher.model(input_ids=ids).last_hidden_state
        if chunk == "naive":
            kl = kl_divergence_sum(student.lm_head(hidden), teacher.lm_head(teacher_hidden)) / ids.numel()
        else:
            kl = chunked_logit_losses(hidden, teacher_hidden, student.lm_head, teacher.lm_head, ids, chunk_size=chunk).kl_mean
        kl.backward()
        torch.cuda.synchronize()
        gradient = torch.cat([p.grad.flatten() for p in student.parameters()])
        results[str(chunk)] = {"kl": kl.item(), "grad_norm": gradient.norm().item(), "seconds": time.perf_counter() - started,
                               "peak_extra_MiB": (torch.cuda.max_memory_allocated() - base) / 2**20}
        print(chunk, results[str(chunk)], flush=True)
        del hidden, teacher_hidden, kl, gradient
    return results


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    results: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0)}
    model_dir = tempfile.mkdtemp()
    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(model_dir)
    for precision in PRECISIONS:
        try:
            results[precision] = teacher_run(model_dir, precision)
        except Exception as error:  # noqa: BLE001 - report every precision, failed ones included
            results[precision] = {"error": f"{type(error).__name__}: {error}"}
        print(precision, results[precision], flush=True)
    results["chunks_B8_T1024"] = chunk_memory()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / "distillation_cuda.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
