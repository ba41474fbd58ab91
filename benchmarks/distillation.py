"""Distillation against cross-entropy recovery: the real SmolLM2, one pruning shot, equal training tokens.

The dense SmolLM2-135M-Instruct is pruned once (acts scorer, Wikipedia calibration blocks) to
``--kv-groups`` KV groups and ``--mlp`` MLP channels; every variant then trains a copy of that same
pruned student on the same batches (same order, same LR schedule) with ``DistillationLM`` inside a
Lightning Trainer, and is scored on the Wikipedia validation and test splits. Variants:

- ce:        alpha=0 (cross-entropy on the data only: the reference recipe)
- kd:        alpha=1 (forward KL to the dense teacher only)
- kd_ce:     alpha=0.5
- kd_hidden: alpha=1 + hidden_weight × normalised MSE between every layer's residual stream

It also measures one training step of the pruned student (CPU seconds on one thread, which a shared
machine disturbs less than wall time; matmul GFLOPs; the peak memory of the tensors the step allocates): CE;
KD with the fused logit loss in chunks of 64 positions and in one chunk; KD with the chunked losses that
recompute the student's chunk in backward; KD naively with full fp32 logits of both models. And the
teacher's memory at full/bf16/int8/nf4 precision with its forward time and its KL to the full-precision
teacher; the KD step is then compared with the sum of its parts, a CE step plus the full teacher's forward.

    python -m benchmarks.distillation                  # writes benchmarks/results/distillation.{json,png}
    python -m benchmarks.distillation --skip-recovery  # re-measure the costs only (keeps the recovery section)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
import weakref
from contextlib import contextmanager

import lightning as L
import matplotlib
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader
from torch.utils.weak import WeakIdKeyDictionary

from benchmarks.common import RESULTS_DIR, batches, console, environment, load_dense, markdown_table, print_table, pruned_copy
from benchmarks.common import size_figures, widths_for, write_results
from benchmarks.texts import calibration_blocks
from datamodules.text import load_documents, pack_blocks, split_documents, tokenize_documents
from transact_pl.arch import model_widths
from transact_pl.infra.assets import EMBEDDED_MODEL
from transact_pl.lightning_modules.distillation_lm import DistillationLM
from transact_pl.evaluation import perplexity
from transact_pl.kd_losses import chunked_logit_losses, final_hidden_states, kl_divergence_sum
from transact_pl.lightning_modules.transact_lm import TransActLM
from transact_pl.pruning import compute_scores
from transact_pl.infra.teacher import PRECISIONS, load_teacher, module_memory_bytes

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402

VARIANTS = {
    "ce": {"alpha": 0.0},
    "kd": {"alpha": 1.0},
    "kd_ce": {"alpha": 0.5},
    "kd_hidden": {"alpha": 1.0, "hidden_weight": 1.0},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--kv-groups", type=int, default=2, help="KV groups kept per layer (of 3; 3 query heads each)")
    parser.add_argument("--mlp", type=int, default=768, help="MLP channels kept per layer (of 1536)")
    parser.add_argument("--steps", type=int, default=40, help="recovery steps per variant")
    parser.add_argument("--batch-size", type=int, default=2, help="training blocks per step")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--hidden-weight", type=float, default=1.0, help="hidden-state loss weight of kd_hidden")
    parser.add_argument("--chunk-size", type=int, default=64, help="sequence positions per logit chunk")
    parser.add_argument("--calibration-blocks", type=int, default=16)
    parser.add_argument("--val-blocks", type=int, default=8)
    parser.add_argument("--test-blocks", type=int, default=16)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--cost-batch-size", type=int, default=4, help="blocks per step when measuring step and teacher costs")
    parser.add_argument("--parts-rounds", type=int, default=3, help="interleaved rounds of KD step vs CE step + teacher forward")
    parser.add_argument("--parts-only", action="store_true", help="with --skip-recovery --skip-costs: re-measure only the "
                        "KD step against its parts (keeps the rest of the previous JSON)")
    parser.add_argument("--num-layers", type=int, default=None, help="cut the model to its first N layers (quick runs)")
    parser.add_argument("--skip-recovery", action="store_true", help="keep the recovery section of the previous JSON")
    parser.add_argument("--skip-costs", action="store_true", help="keep the step/teacher cost section of the previous JSON "
                        "(with --skip-recovery too: only redraw the tables and the PNG from the JSON)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def train_batches(tokenizer, args: argparse.Namespace) -> list[dict]:
    """``steps × batch_size`` blocks drawn (seeded) from the whole Wikipedia train split minus the calibration
    blocks, like the datamodule's shuffled stream: a prefix of the split would be a handful of articles."""
    documents = split_documents(load_documents("wikipedia"))["train"]
    blocks = pack_blocks(tokenize_documents(documents, tokenizer), tokenizer.eos_token_id, args.block_size)
    blocks = blocks[args.calibration_blocks :]
    needed = args.steps * args.batch_size
    if blocks.shape[0] < needed:
        raise SystemExit(f"the Wikipedia train split has too few blocks for --steps={args.steps} --batch-size={args.batch_size}")
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(args.seed))[:needed]
    return batches(blocks[order], args.batch_size)


def spread_blocks(split: str, tokenizer, block_size: int, num_blocks: int) -> torch.Tensor:
    """``num_blocks`` blocks evenly spaced over the whole Wikipedia ``split`` (num_blocks, block_size).

    The first blocks of a split come from one or two articles (the test split opens with a long list of
    film titles, perplexity ~200); spacing the blocks samples every part of the split.
    """
    documents = split_documents(load_documents("wikipedia"))[split]
    blocks = pack_blocks(tokenize_documents(documents, tokenizer), tokenizer.eos_token_id, block_size)
    return blocks[torch.linspace(0, blocks.shape[0] - 1, num_blocks).round().long()]


class StepLosses(L.Callback):
    """Records the logged training losses after every step: {name: [(step, value), ...]}."""

    def __init__(self) -> None:
        self.series: dict[str, list[tuple[int, float]]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        for name in ("train_ce_loss", "train_kd_loss", "train_hidden_loss"):
            if name in trainer.callback_metrics:
                self.series.setdefault(name, []).append((trainer.global_step, trainer.callback_metrics[name].item()))


def make_student(variant: str, pruned, plan, args: argparse.Namespace) -> DistillationLM:
    options = dict(VARIANTS[variant])
    if "hidden_weight" in options:
        options["hidden_weight"] = args.hidden_weight
    module = DistillationLM(model=EMBEDDED_MODEL, num_layers=args.num_layers, learning_rate=args.learning_rate,
                            warmup_steps=args.warmup_steps, temperature=args.temperature, chunk_size=args.chunk_size, **options)
    module.model = copy.deepcopy(pruned).train()
    module.plans = [plan]
    return module


def run_variant(variant: str, pruned, plan, train: list[dict], val: list[dict], test: list[dict], args) -> dict:
    """Train one variant for ``args.steps`` steps and score it."""
    L.seed_everything(args.seed)
    module = make_student(variant, pruned, plan, args)
    losses = StepLosses()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[losses])
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=DataLoader(train, batch_size=None))
    train_s = time.perf_counter() - started
    row = {"variant": variant, **{k: v for k, v in module.hparams.items() if k in ("alpha", "hidden_weight", "temperature")},
           "train_tokens": args.steps * args.batch_size * args.block_size, "train_s": round(train_s, 1),
           "val_ppl": perplexity(module.model, val), "test_ppl": perplexity(module.model, test),
           "val_kl": module.validation_kl(val), "losses": losses.series}
    console.print(f"{variant}: val ppl {row['val_ppl']:.2f}, test ppl {row['test_ppl']:.2f}, val KL {row['val_kl']:.3f} "
                  f"({train_s:.0f} s of training)")
    del module, trainer
    gc.collect()
    return row


def step_loss_fn(name: str, module: TransActLM, chunk_size: int = 64):
    """The loss of one training step for a case of ``step_costs``: "naive" holds full fp32 logits of both models,
    "recompute" is the chunked KD loss with the student's chunk recomputed in backward, anything else the module's."""
    if name == "recompute":
        def recompute_kd(input_ids: torch.Tensor) -> torch.Tensor:
            student_hidden = final_hidden_states(module.model, input_ids)
            with torch.no_grad():
                teacher_hidden = final_hidden_states(module.dense_teacher(), input_ids)
            return chunked_logit_losses(student_hidden, teacher_hidden, module.model.get_output_embeddings(),
                                        module.dense_teacher().get_output_embeddings(), input_ids, chunk_size=chunk_size).kl_mean

        return recompute_kd
    if name != "naive":
        return lambda input_ids: module.compute_loss(input_ids)[0]

    def naive_kd(input_ids: torch.Tensor) -> torch.Tensor:
        student_logits = module.model(input_ids=input_ids, use_cache=False).logits.float()
        with torch.no_grad():
            teacher_logits = module.dense_teacher()(input_ids=input_ids, use_cache=False).logits.float()
        return kl_divergence_sum(student_logits, teacher_logits) / input_ids.numel()

    return naive_kd


class StepMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the block and alive at the same time (any device).

    Every op's outputs are seen here, backward included (on the CPU autograd runs on the calling thread);
    a storage counts from its creation until it is freed (weakref finalizer), views and in-place results
    count once. Weights that exist before the block are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0

    def _release(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(output):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                if storage not in self.live:
                    self.live[storage] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._release, storage.nbytes())
        return output


@contextmanager
def one_thread():
    """Run on one thread: its CPU time is the work done, unlike two threads spinning on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cpu_seconds(function, repeats: int = 1) -> float:
    """CPU seconds of this process per call (on one thread), averaged over ``repeats`` calls after one warm-up."""
    with one_thread():
        function()
        started = time.process_time()
        for _ in range(repeats):
            function()
        return (time.process_time() - started) / repeats


def measured_step(loss_fn, model: torch.nn.Module, batch: dict) -> dict:
    """One training step (loss + backward): CPU seconds on one thread, matmul GFLOPs (PyTorch's FlopCounterMode)
    and the peak bytes of the tensors it allocates (activations, temporaries, logits, gradients; not weights)."""

    def step() -> None:
        loss_fn(batch["input_ids"]).backward()
        model.zero_grad(set_to_none=True)

    seconds = cpu_seconds(step)
    with FlopCounterMode(display=False) as flops:
        step()
    with StepMemory() as memory:  # separate steps: counting slows every op down
        step()
    return {"step_cpu_s": round(seconds, 2), "gflop": round(flops.get_total_flops() / 1e9, 1), "peak_step_bytes": memory.peak}


def step_costs(pruned, plan, batch: dict, args: argparse.Namespace) -> list[dict]:
    """Step time and peak step memory of CE (TransActLM) and of KD fused (in chunks, in one chunk), chunked with
    recompute, and naive."""
    cases = (("ce (TransActLM)", "ce"), (f"kd, fused, chunks of {args.chunk_size} positions", args.chunk_size),
             (f"kd, fused, one chunk ({args.block_size} positions)", args.block_size),
             (f"kd, chunks of {args.chunk_size} recomputed in backward (before)", "recompute"),
             ("kd, naive: full fp32 logits, no recompute", "naive"))
    rows = []
    for name, case in cases:
        module = TransActLM(model=EMBEDDED_MODEL, num_layers=args.num_layers) if case == "ce" else DistillationLM(
            model=EMBEDDED_MODEL, num_layers=args.num_layers, chunk_size=case if isinstance(case, int) else args.chunk_size)
        module.model, module.plans = copy.deepcopy(pruned).train(), [plan]
        if isinstance(module, DistillationLM):
            module.dense_teacher()
        rows.append({"step": name, **measured_step(step_loss_fn(str(case), module, args.chunk_size), module.model, batch)})
        console.print(f"{name}: {rows[-1]}")
        del module
        gc.collect()
    return rows


def teacher_costs(batch: dict, args: argparse.Namespace) -> list[dict]:
    """Memory of the teacher at every precision, its forward time and its KL to the full-precision teacher."""
    rows, reference = [], None
    for precision in PRECISIONS:
        teacher = load_teacher(EMBEDDED_MODEL, args.num_layers, "float32", precision, torch.device("cpu"))
        outputs = []
        with torch.no_grad():
            seconds = cpu_seconds(lambda: outputs.append(teacher(input_ids=batch["input_ids"], use_cache=False).logits))
        logits = outputs[0].float()
        log_probs = logits.log_softmax(-1)
        reference = log_probs if reference is None else reference
        kl = torch.nn.functional.kl_div(log_probs, reference, log_target=True, reduction="sum").item() / log_probs[..., 0].numel()
        rows.append({"precision": precision, "memory_bytes": module_memory_bytes(teacher), "forward_cpu_s": round(seconds, 2),
                     "kl_to_full": kl})
        console.print(f"teacher {precision}: {rows[-1]}")
        del teacher, logits, log_probs, outputs
        gc.collect()
    return rows


def recovery_section(args: argparse.Namespace, dense, pruned, plan, tokenizer, val: list[dict]) -> dict:
    test = batches(spread_blocks("test", tokenizer, args.block_size, args.test_blocks), args.eval_batch_size)
    train = train_batches(tokenizer, args)
    reference = [{"variant": "dense", **size_figures(dense), "val_ppl": perplexity(dense, val), "test_ppl": perplexity(dense, test)},
                 {"variant": "pruned, no recovery", **size_figures(pruned), "val_ppl": perplexity(pruned, val),
                  "test_ppl": perplexity(pruned, test)}]
    console.print(f"dense test ppl {reference[0]['test_ppl']:.2f}; pruned (no recovery) {reference[1]['test_ppl']:.2f}")
    rows = [run_variant(variant, pruned, plan, train, val, test, args) for variant in args.variants]
    return {"settings": vars(args) | {"description": describe(args)}, "reference": reference, "rows": rows,
            "verdict": kd_verdict(rows), "environment": environment()}


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    path = RESULTS_DIR / "distillation.json"
    sections = json.loads(path.read_text()) if path.exists() and (args.skip_recovery or args.skip_costs) else {}
    if not (args.skip_recovery and args.skip_costs) or args.parts_only:  # both skipped: only redraw the tables and the PNG
        torch.manual_seed(args.seed)
        dense, tokenizer = load_dense(args.num_layers)
        calibration = batches(calibration_blocks(tokenizer, args.block_size, args.calibration_blocks), args.eval_batch_size)
        val = batches(spread_blocks("val", tokenizer, args.block_size, args.val_blocks), args.eval_batch_size)
        scores = compute_scores(dense, "acts", calibration, args.seed)
        pruned, plan = pruned_copy(dense, scores, widths_for(model_widths(dense), args.kv_groups, args.mlp), "acts")
        if not args.skip_recovery:
            section_started = time.perf_counter()
            sections["recovery"] = recovery_section(args, dense, pruned, plan, tokenizer, val)
            sections["recovery"]["wall_time_s"] = round(time.perf_counter() - section_started, 1)
        del dense
        gc.collect()
        batch = {"input_ids": torch.cat([b["input_ids"] for b in val])[: args.cost_batch_size]}
        if args.skip_costs and args.parts_only:
            sections["costs"]["kd_to_parts"] = kd_against_parts(pruned, plan, batch, args)
        elif not args.skip_costs:
            section_started = time.perf_counter()
            sections["costs"] = {"kd_to_parts": kd_against_parts(pruned, plan, batch, args),
                                 "steps": step_costs(pruned, plan, batch, args), "teachers": teacher_costs(batch, args),
                                 "batch": f"{args.cost_batch_size}×{args.block_size} tokens", "environment": environment(),
                                 "settings": {k: vars(args)[k] for k in ("cost_batch_size", "block_size", "chunk_size")},
                                 "wall_time_s": round(time.perf_counter() - section_started, 1)}
    report(sections, started)


def kd_against_parts(pruned, plan, batch: dict, args: argparse.Namespace) -> dict:
    """The KD step (fused loss, chunks of ``--chunk-size``, alpha 0.5 as in the default job) against its parts,
    a CE step plus the full teacher's forward (with logits), measured in ``--parts-rounds`` interleaved rounds
    (the order rotates), so that load from other processes, which drifts over seconds, hits both sides of a
    round alike. Target: KD ≤ 1.1× the parts."""
    ce = TransActLM(model=EMBEDDED_MODEL, num_layers=args.num_layers)
    kd = DistillationLM(model=EMBEDDED_MODEL, num_layers=args.num_layers, chunk_size=args.chunk_size, alpha=0.5)
    for module in (ce, kd):
        module.model, module.plans = copy.deepcopy(pruned).train(), [plan]
    teacher, input_ids = kd.dense_teacher(), batch["input_ids"]

    def training_step(module: TransActLM):
        def step() -> None:
            module.compute_loss(input_ids)[0].backward()
            module.model.zero_grad(set_to_none=True)

        return step

    @torch.no_grad()
    def teacher_forward() -> None:
        teacher(input_ids=input_ids, use_cache=False).logits

    passes = {"ce_step": training_step(ce), "teacher_forward": teacher_forward, "kd_step": training_step(kd)}
    rounds = []
    with one_thread():
        for function in passes.values():
            function()  # warm-up
        for index in range(args.parts_rounds):
            names = list(passes)[index % 3:] + list(passes)[: index % 3]
            timings = {}
            for name in names:
                cpu, wall = time.process_time(), time.perf_counter()
                passes[name]()
                timings[name] = {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}
            rounds.append(timings)
            console.print(f"round {index + 1}: " + ", ".join(f"{n} {t['cpu_s']:.2f} s CPU" for n, t in timings.items()))
    ratio = {clock: statistics.median(r["kd_step"][clock] / (r["ce_step"][clock] + r["teacher_forward"][clock]) for r in rounds)
             for clock in ("cpu_s", "wall_s")}
    medians = {name: statistics.median(r[name]["cpu_s"] for r in rounds) for name in passes}
    return {"rounds": rounds, "median_cpu_s": medians, "kd_over_parts": ratio, "target": 1.1,
            "within_target": ratio["cpu_s"] <= 1.1, "environment": environment()}


def describe(args: argparse.Namespace) -> str:
    tokens = args.steps * args.batch_size * args.block_size
    return (f"SmolLM2-135M-Instruct{'' if args.num_layers is None else f' (first {args.num_layers} layers)'}, one acts shot "
            f"to {args.kv_groups * 3} heads ({args.kv_groups} KV groups) and MLP {args.mlp}, then {args.steps} steps × "
            f"{args.batch_size}×{args.block_size} tokens ({tokens:,} tokens) per variant, lr {args.learning_rate}, "
            f"T={args.temperature}; val {args.val_blocks}×{args.block_size}, test {args.test_blocks}×{args.block_size} tokens "
            f"(blocks evenly spaced over the Wikipedia val/test splits)")


def report(sections: dict, started: float) -> None:
    """Print the tables, draw the PNG and write the JSON (a skipped section is kept from the previous JSON)."""
    markdown = {}
    if "recovery" in sections:
        recovery = sections["recovery"]
        headers = ["recovery", "alpha", "hidden weight", "val ppl", "test ppl", "val KL to teacher (nats/token)"]
        table = [[r["variant"], "-", "-", r["val_ppl"], r["test_ppl"], "-"] for r in recovery["reference"]]
        table += [[r["variant"], r["alpha"], r["hidden_weight"], r["val_ppl"], r["test_ppl"], f"{r['val_kl']:.3f}"]
                  for r in recovery["rows"]]
        print_table(f"Distillation vs CE — {recovery['settings']['description']}", headers, table)
        markdown["recovery"] = markdown_table(headers, table)
        plot_recovery(recovery, RESULTS_DIR / "distillation.png")
        console.print(recovery["verdict"])
    if "costs" in sections:
        costs = sections["costs"]
        step_headers = ["step (pruned student, " + costs["batch"] + ")", "CPU s/step (1 thread)", "GFLOP/step",
                        "peak step memory (MiB)"]
        step_table = [[c["step"], c["step_cpu_s"], c["gflop"], f"{c['peak_step_bytes'] / 2**20:,.0f}"] for c in costs["steps"]]
        teacher_headers = ["teacher precision", "memory (MiB)", "forward CPU s (1 thread)", "KL to full teacher (nats/token)"]
        teacher_table = [[c["precision"], f"{c['memory_bytes'] / 2**20:,.0f}", c["forward_cpu_s"], f"{c['kl_to_full']:.4f}"]
                         for c in costs["teachers"]]
        print_table("One training step (loss + backward)", step_headers, step_table)
        print_table("Teacher", teacher_headers, teacher_table)
        if "kd_to_parts" in costs:
            parts = costs["kd_to_parts"]
            medians, ratio = parts["median_cpu_s"], parts["kd_over_parts"]
            parts_headers = ["CE step (CPU s)", "teacher forward (CPU s)", "KD step, fused (CPU s)", "KD ÷ (CE + teacher), CPU",
                             "same, wall", "rounds", "load (1 min)"]
            parts_table = [[medians["ce_step"], medians["teacher_forward"], medians["kd_step"], f"{ratio['cpu_s']:.3f}×",
                            f"{ratio['wall_s']:.3f}×", len(parts["rounds"]), parts["environment"]["load_average_1min"]]]
            print_table("KD step against its parts (medians over interleaved rounds; target ≤ 1.1×)", parts_headers, parts_table)
            markdown["parts"] = markdown_table(parts_headers, parts_table)
        markdown["steps"] = markdown_table(step_headers, step_table)
        markdown["teachers"] = markdown_table(teacher_headers, teacher_table)
    sections.pop("environment", None)
    sections.pop("wall_time_s", None)
    write_results("distillation", {**sections, "markdown": markdown}, started)


def plot_recovery(recovery: dict, path) -> None:
    """Left: training CE on the data per step; right: val/test perplexity of every variant after recovery."""
    figure, (curves, bars) = plt.subplots(1, 2, figsize=(13, 4.8), constrained_layout=True)
    ce = dict(next((r for r in recovery["rows"] if r["variant"] == "ce"), recovery["rows"][0])["losses"]["train_ce_loss"])
    for row in recovery["rows"]:
        steps, values = zip(*row["losses"]["train_ce_loss"])
        curves.plot(steps, [value - ce[step] for step, value in zip(steps, values)], label=row["variant"], linewidth=1.2)
    curves.set(xlabel="step", ylabel="training CE − the ce variant's on the same batch (nats/token)",
               title="Training CE on the data, paired by batch")
    curves.legend()
    curves.grid(alpha=0.3)
    names = [row["variant"] for row in recovery["rows"]]
    positions = range(len(names))
    for offset, split in ((-0.2, "val"), (0.2, "test")):
        values = [row[f"{split}_ppl"] for row in recovery["rows"]]
        drawn = bars.bar([p + offset for p in positions], values, width=0.4, label=f"{split} ppl")
        bars.bar_label(drawn, fmt="%.1f", fontsize=8)
    dense = recovery["reference"][0]
    bars.axhline(dense["test_ppl"], color="black", linestyle=":", label=f"dense test ppl {dense['test_ppl']:.1f}")
    bars.set_xticks(list(positions), names)
    bars.set(ylabel="perplexity", title="After recovery (pruned, no recovery: test ppl "
             f"{recovery['reference'][1]['test_ppl']:.0f})")
    highest = max(row[f"{split}_ppl"] for row in recovery["rows"] for split in ("val", "test"))
    bars.set_ylim(0, 1.3 * max(highest, dense["test_ppl"]))
    bars.legend(loc="upper center", ncols=3, fontsize=8)  # in the headroom above the bars
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def kd_verdict(rows: list[dict]) -> str:
    """Does any KD variant beat CE on test perplexity at equal tokens?"""
    by_variant = {r["variant"]: r["test_ppl"] for r in rows}
    if "ce" not in by_variant or len(by_variant) < 2:
        return "no CE baseline to compare with"
    best = min((v for v in by_variant if v != "ce"), key=by_variant.get)
    change = 100 * (by_variant[best] / by_variant["ce"] - 1)
    return (f"best KD variant {best}: test ppl {by_variant[best]:.2f} vs CE {by_variant['ce']:.2f} ({change:+.1f} %); "
            + ("KD beats CE at equal tokens" if by_variant[best] < by_variant["ce"] else "KD does not beat CE at equal tokens"))


if __name__ == "__main__":
    main()
