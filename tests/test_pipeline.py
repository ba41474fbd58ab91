"""The whole cycle through the real CLI (subprocesses) and a real Trainer on a 2-layer cut of SmolLM2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from callbacks.transact_pruning import TransActPruning
from datamodules.text import TextDataModule
from transact_pl.eval_suite import DEFAULT_PROMPTS, evaluate_heldout
from transact_pl.infra.loading import load_causal_lm
from transact_pl.lightning_modules.transact_lm import TransActLM

REPO = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = REPO / "configs" / "debug_tiny.yaml"


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(DEBUG_CONFIG), *args]
    environment = {key: value for key, value in os.environ.items() if key != "FORCE_COLOR"}  # output is a pipe here
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                            env={**environment, "PYTHONPATH": str(REPO), "TTY_COMPATIBLE": "0"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def max_weight_difference(first: Path, second: Path) -> float:
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, smollm2_dir) -> Path:
    cwd = tmp_path_factory.mktemp("uninterrupted")
    (cwd / "stdout.txt").write_text(run_cli(cwd).stdout)
    return cwd


def test_a_run_whose_output_is_a_file_prints_progress_lines(uninterrupted):
    """Rich draws no bars into a pipe; every calibration/evaluation part and a tenth of the steps get a line."""
    lines = (uninterrupted / "stdout.txt").read_text().splitlines()
    for part in ("dense (step 0): val perplexity", "shot 1: calibrating (acts)", "shot 2: calibrating (acts)",
                 "final (step 8): test perplexity"):
        assert f"{part} ..." in lines and any(line.startswith(f"{part}: done in ") for line in lines), part
    steps = [line.split(",")[0] for line in lines if line.startswith("step ")]
    assert steps == [f"step {n}/8" for n in range(2, 9)], steps  # every step of 8 (a tenth rounds to 1); step 1 warms up


def test_export_loads_in_stock_transformers_with_the_planned_widths(uninterrupted):
    export = uninterrupted / "exports" / "debug_tiny"
    config = json.loads((export / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"], config["intermediate_size"]) == (6, 2, 64, 768)
    model = AutoModelForCausalLM.from_pretrained(export)
    plans = json.loads((export / "transact_plans.json").read_text())
    assert [p["shot"] for p in plans] == [1, 2] and plans[-1]["after"]["num_kv_heads"] == 2
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (128, 576)
    run_dir = uninterrupted / "runs" / "debug_tiny" / "logs" / "version_0"
    rows = json.loads((run_dir / "summary.json").read_text())["stages"]
    assert [r["kv_heads"] for r in rows] == [3, 3, 3, 2, 2] and rows[-1]["stage"].startswith("final")
    assert rows[-1]["kv_bytes_per_token"] * 3 == rows[0]["kv_bytes_per_token"] * 2


def test_dense_and_final_models_are_compared_on_every_heldout_text_in_the_summary_and_the_export(uninterrupted, smollm2_dir):
    summary = json.loads((uninterrupted / "runs" / "debug_tiny" / "logs" / "version_0" / "summary.json").read_text())
    export = uninterrupted / "exports" / "debug_tiny"
    heldout = summary["heldout"]
    assert json.loads((export / "transact_eval.json").read_text()) == heldout
    protocol = heldout["protocol"]
    assert (protocol["block_size"], protocol["max_blocks_per_text"], protocol["bos"]) == (64, 4, False)
    assert protocol["generation"] == {"decoding": "greedy", "max_new_tokens": 8, "prompts": list(DEFAULT_PROMPTS)}
    assert (heldout["dense"]["stage"], heldout["final"]["stage"]) == (summary["stages"][0]["stage"], summary["stages"][-1]["stage"])
    # Measured again from scratch: the dense 2-layer cut of the base model and the exported pruned model, same blocks.
    data = TextDataModule(tokenizer=str(smollm2_dir), block_size=64)
    blocks = data.extra_eval_blocks(["news", "shakespeare"], max_blocks=4)
    card = (export / "README.md").read_text()
    assert "## Evaluation" in card and "no BOS token" in card and "at most 4 blocks of 64 tokens" in card
    for key, model in (("dense", load_causal_lm(str(smollm2_dir), num_layers=2)), ("final", AutoModelForCausalLM.from_pretrained(export))):
        expected = evaluate_heldout(model, data.tokenizer, blocks, 4, heldout[key]["stage"], DEFAULT_PROMPTS, max_new_tokens=8)
        assert heldout[key]["samples"] == expected["samples"] and list(expected["samples"]) == list(DEFAULT_PROMPTS)
        for text in ("news", "shakespeare"):
            measured = heldout[key]["perplexity"][text]
            assert (measured["blocks"], measured["tokens_scored"]) == (4, 4 * 63)
            assert measured["ppl"] == pytest.approx(expected["perplexity"][text]["ppl"], rel=1e-4)
        for prompt, sample in expected["samples"].items():
            assert json.dumps(prompt) in card and json.dumps(sample) in card
    for text in ("news", "shakespeare"):
        dense, final = heldout["dense"]["perplexity"][text]["ppl"], heldout["final"]["perplexity"][text]["ppl"]
        assert final != dense
        assert f"| {text} | 4 × 64 | {dense:.2f} | {final:.2f} | {final / dense:.2f}× |" in card


@pytest.mark.parametrize("step", [2, 6])
def test_resume_from_mid_schedule_checkpoint_gives_the_same_export(uninterrupted, tmp_path, step):
    checkpoint = uninterrupted / "runs" / "debug_tiny" / "logs" / "version_0" / "checkpoints" / f"epoch=0-step={step}.ckpt"
    run_cli(tmp_path, "--ckpt_path", str(checkpoint))
    assert max_weight_difference(uninterrupted / "exports" / "debug_tiny", tmp_path / "exports" / "debug_tiny") <= 1e-6


def test_export_from_a_checkpoint_equals_the_end_of_fit_export(uninterrupted, tmp_path):
    from transact_pl.infra.export_checkpoint import export_checkpoint

    checkpoint = uninterrupted / "runs" / "debug_tiny" / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    export_checkpoint(checkpoint, tmp_path / "from_ckpt")
    assert max_weight_difference(uninterrupted / "exports" / "debug_tiny", tmp_path / "from_ckpt") == 0.0


def independent_acts_selection(model_dir: Path, text: str, num_blocks: int, block_size: int, keep_groups: int, keep_mlp: int):
    """The TransAct selection written again from scratch with its own hooks: channel score sqrt(Σ a²) over the
    calibration tokens at the inputs of o_proj and down_proj; head score mean + (10 / head_dim) · max of its
    channels; a KV group scores the sum of its heads; the top groups and channels are kept."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: num_blocks * block_size]
    blocks = torch.tensor(ids).view(num_blocks, block_size)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.model.layers = model.model.layers[:2]
    sums = {}

    def capture(name):
        def hook(module, args):
            x = args[0].double()
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=(0, 1))
        return hook

    for index, layer in enumerate(model.model.layers):
        layer.self_attn.o_proj.register_forward_pre_hook(capture(("attn", index)))
        layer.mlp.down_proj.register_forward_pre_hook(capture(("mlp", index)))
    with torch.no_grad():
        for block in blocks.split(4):
            model(input_ids=block)
    selection = []
    for index in range(2):
        channel = sums[("attn", index)].sqrt().view(9, 64)
        head = channel.mean(dim=1) + 10 / 64 * channel.max(dim=1).values
        group = head.view(3, 3).sum(dim=1)
        groups = sorted(group.argsort(descending=True)[:keep_groups].tolist())
        mlp = sorted(sums[("mlp", index)].sqrt().argsort(descending=True)[:keep_mlp].tolist())
        selection.append((groups, mlp))
    return selection


def test_one_shot_acts_selection_on_a_calibration_file_matches_the_formula(tmp_path, smollm2_dir):
    text = (REPO / "README.md").read_text() if (REPO / "README.md").exists() else ""
    text += " ".join(json.loads(line)["text"] for line in (Path.home() / ".cache" / "transact_pl" / "corpora" / "news.jsonl").read_text().splitlines()[:60])
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(text)
    run_cli(tmp_path, "--trainer.max_steps=0", "--pruning.num_shots=1", "--pruning.target_attention=192",
            "--pruning.target_mlp=500", "--report.evaluate=false", f"--data.calibration_file={calibration}",
            "--data.num_calibration_samples=6")
    plan = json.loads((tmp_path / "runs" / "debug_tiny" / "logs" / "version_0" / "plans" / "shot_1.json").read_text())
    expected = independent_acts_selection(smollm2_dir, text, 6, 64, keep_groups=1, keep_mlp=500)
    for layer, (groups, mlp) in zip(plan["layers"], expected):
        assert layer["kept_kv_heads"] == groups
        assert layer["kept_heads"] == [3 * g + o for g in groups for o in range(3)]
        assert layer["kept_mlp_channels"] == mlp


class ShrinkWatcher(L.Callback):
    """Checks, right after each shot, that the optimizer holds exactly the live parameters."""

    def __init__(self):
        self.after_last_shot = None
        self.checked = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        live = {id(p) for p in pl_module.parameters()}
        held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        assert held == live
        self.checked += 1
        if len(pl_module.plans) == 2 and self.after_last_shot is None:
            self.after_last_shot = pl_module.model.model.layers[1].self_attn.q_proj.weight.detach().clone()


def test_kept_parameters_keep_training_after_a_shrink(tmp_path, smollm2_dir):
    module = TransActLM(num_layers=2, learning_rate=1e-3, warmup_steps=0)
    data = TextDataModule(tokenizer="smollm2-135m-instruct", block_size=32, batch_size=2, eval_batch_size=4,
                          num_calibration_samples=4, max_val_blocks=2, max_test_blocks=2)
    watcher = ShrinkWatcher()
    pruning = TransActPruning(target_attention=384, target_mlp=700, num_shots=2, steps_between_shots=2)
    trainer = L.Trainer(max_steps=4, callbacks=[pruning, watcher], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    weight = module.model.model.layers[1].self_attn.q_proj.weight
    assert weight.shape == (384, 576) and watcher.checked == 4
    assert not torch.equal(weight, watcher.after_last_shot)
    assert trainer.optimizers[0].state[weight]["step"].item() == 4  # moments carried over both shrinks
