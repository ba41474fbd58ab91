"""Distillation recovery: losses, the frozen teacher, quantized teachers, checkpoints and resume."""

import importlib.util
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from tests.tiny_models import random_batches, tiny_llama
from transact_pl.arch import Widths, model_widths
from transact_pl.lightning_modules.distillation_lm import DistillationLM
from transact_pl.errors import ConfigError
from transact_pl.evaluation import token_nll
from transact_pl.kd_losses import chunked_logit_losses, hidden_state_loss, kl_divergence_sum
from transact_pl.plan import make_plan
from transact_pl.pruning import compute_scores
from transact_pl.infra.teacher import load_teacher, module_memory_bytes

HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(path)
    return path


def distiller(tiny_dir: Path, **options) -> DistillationLM:
    module = DistillationLM(model=str(tiny_dir), **options)
    module.configure_model()
    return module


def prune_student(module: DistillationLM) -> None:
    """One shot to 1 of 2 KV groups and 20 of 37 MLP channels, chosen by the acts scorer."""
    model = module.model
    scores = compute_scores(model, "acts", random_batches(), seed=0)
    module.apply_plan(make_plan(scores, model_widths(model), Widths(2, 1, 8, 20), 1, "acts"))


def trainer(tmp_path: Path, max_steps: int, **options) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, **options)


def batches_loader(num_batches: int = 4) -> DataLoader:
    return DataLoader(random_batches(num_batches=num_batches), batch_size=None)


# ----- losses ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_kl_is_zero_for_equal_logits_and_positive_otherwise(divergence):
    logits = torch.randn(3, 5, 99)
    assert kl_divergence_sum(logits, logits.clone(), 2.0, divergence).abs() < 1e-5
    assert kl_divergence_sum(logits, torch.randn(3, 5, 99), 2.0, divergence) > 0.1


def test_forward_and_reverse_kl_follow_their_definitions():
    student, teacher = torch.randn(4, 7), torch.randn(4, 7)
    p_s, p_t = student.softmax(-1), teacher.softmax(-1)
    forward = (p_t * (p_t.log() - p_s.log())).sum()
    reverse = (p_s * (p_s.log() - p_t.log())).sum()
    assert torch.allclose(kl_divergence_sum(student, teacher, 1.0, "forward"), forward, atol=1e-5)
    assert torch.allclose(kl_divergence_sum(student, teacher, 1.0, "reverse"), reverse, atol=1e-5)
    hot_s, hot_t = (student / 3).softmax(-1), (teacher / 3).softmax(-1)
    assert torch.allclose(kl_divergence_sum(student, teacher, 3.0), 9 * (hot_t * (hot_t.log() - hot_s.log())).sum(), atol=1e-5)


def test_kd_loss_is_zero_before_pruning_and_positive_after(tiny_dir):
    module = distiller(tiny_dir, alpha=1.0)
    ids = random_batches()[0]["input_ids"]
    _, before = module.compute_loss(ids)
    assert before["kd_loss"].abs() < 1e-7  # float noise only (a random tiny model is nearly uniform)
    prune_student(module)
    _, after = module.compute_loss(ids)
    assert after["kd_loss"] > 1e-5
    assert model_widths(module.dense_teacher()) == Widths(4, 2, 8, 37)  # the teacher stays dense
    assert module.validation_kl(random_batches()) > 1e-5


def test_chunked_and_unchunked_losses_and_gradients_agree(tiny_dir):
    student, teacher = tiny_llama(seed=3), tiny_llama(seed=0)
    ids = random_batches(length=11)[0]["input_ids"]
    with torch.no_grad():
        teacher_hidden = teacher.model(input_ids=ids).last_hidden_state
    results = []
    for chunk_size in (3, 11):
        student.zero_grad()
        hidden = student.model(input_ids=ids).last_hidden_state
        sums = chunked_logit_losses(hidden, teacher_hidden, student.lm_head, teacher.lm_head, ids, 2.0, "forward", chunk_size)
        (sums.kl_mean + sums.ce_mean).backward()
        results.append((sums.kl_mean.detach(), sums.ce_mean.detach(), [p.grad.clone() for p in student.parameters()]))
    (kl_a, ce_a, grads_a), (kl_b, ce_b, grads_b) = results
    assert abs(kl_a - kl_b) <= 1e-5 and abs(ce_a - ce_b) <= 1e-5
    assert all(torch.allclose(a, b, atol=1e-5, rtol=0) for a, b in zip(grads_a, grads_b))
    reference_ce = token_nll(student(input_ids=ids).logits, ids).mean()
    assert abs(ce_a - reference_ce) <= 1e-5


def test_hidden_loss_is_zero_for_equal_states_and_scale_free():
    teacher = [torch.randn(2, 5, 32) for _ in range(3)]
    student = [t + 0.1 * torch.randn_like(t) for t in teacher]
    for kind in ("mse", "cosine"):
        assert hidden_state_loss(teacher, [t.clone() for t in teacher], kind) < 1e-6
        loss = hidden_state_loss(student, teacher, kind)
        assert loss > 1e-4
        assert torch.allclose(hidden_state_loss([7 * s for s in student], [7 * t for t in teacher], kind), loss, rtol=1e-4)


def test_hidden_loss_trains_the_chosen_layers(tiny_dir):
    module = distiller(tiny_dir, alpha=0.0, hidden_weight=1.0, hidden_layers=[0])
    prune_student(module)
    loss, metrics = module.compute_loss(random_batches()[0]["input_ids"])
    assert metrics["hidden_loss"] > 0 and metrics["kd_loss"] > 0  # KD is still measured, with weight 0
    assert torch.allclose(loss, metrics["ce_loss"] + metrics["hidden_loss"])
    loss.backward()
    layers = module.model.model.layers
    assert layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


# ----- the frozen teacher -------------------------------------------------------------------------------------------
def test_gradients_reach_only_the_student(tiny_dir):
    module = distiller(tiny_dir, alpha=0.5, hidden_weight=1.0)
    prune_student(module)
    loss, _ = module.compute_loss(random_batches()[0]["input_ids"])
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.parameters())
    assert all(p.grad is None and not p.requires_grad for p in module.dense_teacher().parameters())
    teacher_ids = {id(p) for p in module.dense_teacher().parameters()}
    assert not teacher_ids & {id(p) for p in module.parameters()}


def test_teacher_unchanged_by_training_and_absent_from_the_checkpoint(tiny_dir, tmp_path):
    module = distiller(tiny_dir, alpha=0.5, hidden_weight=1.0, learning_rate=1e-2, warmup_steps=1)
    before = {k: v.clone() for k, v in module.dense_teacher().state_dict().items()}
    student_before = module.model.model.layers[0].mlp.up_proj.weight.clone()
    fit = trainer(tmp_path, max_steps=3, enable_checkpointing=False)
    fit.fit(module, train_dataloaders=batches_loader())
    after = module.dense_teacher().state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(module.model.model.layers[0].mlp.up_proj.weight, student_before)
    optimizer_ids = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert not optimizer_ids & {id(p) for p in module.dense_teacher().parameters()}
    fit.save_checkpoint(tmp_path / "kd.ckpt")
    checkpoint = torch.load(tmp_path / "kd.ckpt", weights_only=False)
    assert set(checkpoint["state_dict"]) == {f"model.{k}" for k in module.model.state_dict()}
    assert checkpoint["transact"]["teacher"] == {"source": str(tiny_dir), "num_layers": None, "precision": "full", "dtype": "float32"}
    assert module.teacher_memory_bytes == module_memory_bytes(module.dense_teacher()) > 0


def test_resume_with_another_teacher_is_refused(tiny_dir, tmp_path):
    module = distiller(tiny_dir)
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    with pytest.raises(ConfigError, match="--model.teacher_precision=full"):
        distiller(tiny_dir, teacher_precision="bf16").on_load_checkpoint(checkpoint)


def test_every_invalid_option_is_named_at_once(tiny_dir, tmp_path):
    # Reported, not raised, by __init__ (LightningCLI would wrap it in a traceback); fit refuses them in setup.
    module = DistillationLM(model=str(tiny_dir), teacher_precision="int4", alpha=1.5, divergence="js", chunk_size=0)
    with pytest.raises(ConfigError) as error:
        trainer(tmp_path, max_steps=1, enable_checkpointing=False).fit(module, train_dataloaders=batches_loader())
    for option in ("--model.teacher_precision=int4", "--model.alpha=1.5", "--model.divergence=js", "--model.chunk_size=0"):
        assert option in str(error.value)


def test_bad_hidden_layers_fail_before_training(tiny_dir, tmp_path):
    module = distiller(tiny_dir, hidden_weight=1.0, hidden_layers=[5])
    with pytest.raises(ConfigError, match="--model.hidden_layers"):
        trainer(tmp_path, max_steps=1, enable_checkpointing=False).fit(module, train_dataloaders=batches_loader())


# ----- quantized teachers -------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_BITSANDBYTES, reason="bitsandbytes is not installed (pip install 'transact-pl[quant]')")
@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_quantized_teacher_runs_a_kd_step_on_cpu(tiny_dir, precision):
    module = distiller(tiny_dir, teacher_precision=precision, alpha=0.5, hidden_weight=1.0)
    prune_student(module)
    loss, metrics = module.compute_loss(random_batches()[0]["input_ids"])
    loss.backward()
    assert torch.isfinite(loss) and metrics["kd_loss"] > 0
    assert all(p.grad is not None for p in module.model.parameters())
    teacher = module.dense_teacher()
    expected = torch.int8 if precision == "int8" else torch.uint8
    assert teacher.model.layers[0].mlp.up_proj.weight.dtype == expected
    full = load_teacher(str(tiny_dir), None, "float32", "full", torch.device("cpu"))
    linear_bytes = lambda m: sum(module_memory_bytes(layer) for layer in m.model.layers)  # noqa: E731
    assert linear_bytes(teacher) < linear_bytes(full) / 2


def test_unknown_device_for_a_quantized_teacher_is_a_config_error():
    from transact_pl.infra.teacher import teacher_precision_problems

    problems = teacher_precision_problems("nf4", torch.device("meta"))
    assert problems and "--model.teacher_precision=nf4" in problems[0]
    assert teacher_precision_problems("bf16", torch.device("cpu")) == []


# ----- resume with the pruning callback ----------------------------------------------------------------------------
def kd_run(root: Path, smollm2_dir: Path, ckpt_path: Path | None = None) -> DistillationLM:
    """A KD run on a 2-layer SmolLM2 cut: shots before steps 0 and 3 (attention 576 → 384, MLP 1536 → 768), 4 steps."""
    from callbacks.transact_pruning import TransActPruning
    from datamodules.text import TextDataModule

    L.seed_everything(0)
    module = DistillationLM(model="smollm2-135m-instruct", num_layers=2, alpha=0.5, temperature=2.0, hidden_weight=0.5,
                            chunk_size=16, learning_rate=1e-3, warmup_steps=1)
    data = TextDataModule(tokenizer="smollm2-135m-instruct", block_size=32, batch_size=2, eval_batch_size=4,
                          num_calibration_samples=4, max_val_blocks=4, max_test_blocks=4)
    pruning = TransActPruning(target_attention=384, target_mlp=768, num_shots=2, first_shot_step=0, steps_between_shots=3)
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=2, save_top_k=-1)
    fit = trainer(root, max_steps=4, callbacks=[pruning, checkpoints], deterministic=True, limit_val_batches=0)
    fit.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


@pytest.mark.slow
def test_resumed_kd_run_equals_the_uninterrupted_run(smollm2_dir, tmp_path):
    uninterrupted = kd_run(tmp_path / "a", smollm2_dir)
    checkpoint = tmp_path / "a" / "checkpoints" / "epoch=0-step=2.ckpt"  # after shot 1, before shot 2
    saved = torch.load(checkpoint, weights_only=False)
    assert all(key.startswith("model.") for key in saved["state_dict"]) and saved["transact"]["teacher"]["precision"] == "full"
    resumed = kd_run(tmp_path / "b", smollm2_dir, ckpt_path=checkpoint)
    assert model_widths(resumed.model) == Widths(6, 2, 64, 768)
    assert model_widths(resumed.dense_teacher()) == Widths(9, 3, 64, 1536)
    final_a, final_b = uninterrupted.model.state_dict(), resumed.model.state_dict()
    assert final_a.keys() == final_b.keys()
    difference = max((final_a[k] - final_b[k]).abs().max().item() for k in final_a)
    print(f"max |Δw| resumed vs uninterrupted: {difference:.3g}")
    assert difference <= 1e-6


# ----- configs ------------------------------------------------------------------------------------------------------
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def launch_configs(config: Path) -> list[Path]:
    """The --config files of the launch command on a config's first line (an overlay follows its base)."""
    repo = Path(__file__).resolve().parents[1]
    first = config.read_text().splitlines()[0]
    assert first.startswith("# python train.py fit --config "), f"{config.name} must open with its launch command"
    words = first.split()
    return [repo / words[i + 1] for i, word in enumerate(words) if word == "--config"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_every_config_opens_with_its_launch_command_and_parses(config, tmp_path, monkeypatch):
    from train import TransActCLI
    from datamodules.text import TextDataModule
    from transact_pl.lightning_modules.transact_lm import TransActLM

    class ParseOnly(TransActCLI):  # types and class paths are checked; nothing is built (some configs need GPUs)
        def instantiate_classes(self) -> None:
            pass

    files = launch_configs(config)
    assert files[-1] == config, f"{config.name}'s first line must be its launch command, ending with this file"
    monkeypatch.chdir(tmp_path)
    args = [argument for path in files for argument in ("--config", str(path))]
    cli = ParseOnly(TransActLM, TextDataModule, subclass_mode_model=True, run=False, args=args)
    assert cli.config.model.class_path.startswith("transact_pl.") and cli.config.trainer.max_steps >= 0


def test_default_config_recovers_by_distillation_and_the_ce_config_by_cross_entropy(tmp_path, monkeypatch):
    """Both build (model, data, trainer, callbacks) and differ only in the recovery objective and output paths."""
    from train import TransActCLI
    from datamodules.text import TextDataModule
    from transact_pl.lightning_modules.transact_lm import TransActLM

    configs = Path(__file__).resolve().parents[1] / "configs"
    monkeypatch.chdir(tmp_path)
    launches = {"default": [configs / "smollm2_transact.yaml"],
                "ce": [configs / "smollm2_transact.yaml", configs / "variants" / "ce.yaml"]}
    built = {name: TransActCLI(TransActLM, TextDataModule, subclass_mode_model=True, run=False,
                               args=[argument for path in files for argument in ("--config", str(path))])
             for name, files in launches.items()}
    assert isinstance(built["default"].model, DistillationLM) and built["default"].model.hparams.alpha > 0
    assert type(built["ce"].model) is TransActLM
    assert built["default"].config.data == built["ce"].config.data
    assert built["default"].config.pruning == built["ce"].config.pruning
    assert built["ce"].config.export.output_dir == "exports/smollm2_transact_ce"


def test_final_hidden_states_are_the_models_own_and_give_its_logits():
    from transact_pl.kd_losses import final_hidden_states

    model, ids = tiny_llama(), random_batches()[0]["input_ids"]
    with torch.no_grad():
        hidden = final_hidden_states(model, ids)
        reference = model.model(input_ids=ids).last_hidden_state
        assert torch.equal(hidden, reference)
        assert torch.allclose(model.lm_head(hidden), model(input_ids=ids).logits, atol=1e-6)
