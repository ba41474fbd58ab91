"""Export any checkpoint of a run as a stock Hugging Face directory.

    python -m transact_pl.infra.export_checkpoint runs/<run>/logs/version_0/checkpoints/last.ckpt exports/<name> [--overwrite]
        [--gguf q4_k_m [--gguf-texts news shakespeare]]

A checkpoint is a ``.ckpt`` file (one process, DDP) or an FSDP2 checkpoint directory; both are read in one
process on the CPU, with ``weights_only=True`` (see ``transact_pl.infra.safe_load``). The checkpoint's own
metadata names the base model; its plans are replayed on that model before the trained weights load, so
any point of the schedule exports. Only the pruned model's weights are read (a distillation teacher and the
optimizer state are not needed). ``--gguf`` also writes a GGUF into the export, as ``--export.gguf`` does
(``transact_pl.infra.gguf``), measured in llama.cpp on the embedded texts named by ``--gguf-texts``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedModel

from transact_pl.errors import ConfigError, first_line
from transact_pl.infra.assets import CORPORA, corpus_documents
from transact_pl.infra.export import check_export_dir, export_model
from transact_pl.infra.gguf import GGUF_TYPES, GGUFExport, gguf_problem
from transact_pl.infra.loading import load_causal_lm, load_tokenizer
from transact_pl.plan import CHECKPOINT_KEY, PruningPlan
from transact_pl.infra.safe_dcp import CheckedCheckpoint, check_distributed_checkpoint, load_distributed
from transact_pl.infra.safe_load import is_distributed_checkpoint, load_checkpoint_file
from transact_pl.surgery import apply_plan

MODEL_PREFIX = "model."  # the LightningModule's attribute holding the pruned model
DCP_MODEL_PREFIX = "state_dict."  # Lightning's ModelParallelStrategy nests the module state under this key


def pruned_model_from_checkpoint(checkpoint: str | Path, option: str = "checkpoint") -> tuple[PreTrainedModel, list[PruningPlan], str]:
    """(the pruned model with the checkpoint's weights, its plans, the base model's name) for a .ckpt or directory."""
    checked = check_distributed_checkpoint(checkpoint, option) if is_distributed_checkpoint(checkpoint) else None
    metadata = checked.meta if checked is not None else load_checkpoint_file(checkpoint, option, mmap=True)
    record = metadata.get(CHECKPOINT_KEY)
    if not isinstance(record, dict) or "plans" not in record:
        raise ConfigError(f"`{option}={checkpoint}` has no TransAct metadata; give a checkpoint written by this project's train.py")
    dtype = (metadata.get("hyper_parameters") or {}).get("dtype", "float32")
    model = load_causal_lm(record["base_model"], record["num_layers"], dtype)
    plans = [PruningPlan.from_dict(data) for data in record["plans"]]
    for plan in plans:
        apply_plan(model, plan)
    expected = {MODEL_PREFIX + name: tensor for name, tensor in model.state_dict().items()}
    if checked is not None:
        weights = _distributed_weights(checked, expected, option)
    else:
        weights = {k: v for k, v in metadata["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    _load_weights(model, weights, expected, checkpoint, option)
    return model.eval(), plans, record["base_model"]


def _distributed_weights(checked: CheckedCheckpoint, expected: dict[str, Tensor], option: str) -> dict[str, Tensor]:
    """The pruned model's full tensors from a checked FSDP2 checkpoint directory, consolidated in this one process."""
    from torch.distributed.checkpoint.api import CheckpointException

    directory = checked.directory
    key = DCP_MODEL_PREFIX.rstrip(".")
    state = {key: {name: torch.empty_like(tensor) for name, tensor in expected.items()}}
    try:
        load_distributed(state, checked, no_dist=True)
    except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
        raise ConfigError(f"`{option}={directory}` does not hold this model's weights ({first_line(error, limit=200)}); "
                          "give a checkpoint directory written by train.py under FSDP2") from error
    return state[key]


def _load_weights(model: PreTrainedModel, weights: dict[str, Tensor], expected: dict[str, Tensor],
                  checkpoint: str | Path, option: str) -> None:
    missing = sorted(expected.keys() - weights.keys())
    wrong = sorted(k for k in expected.keys() & weights.keys() if weights[k].shape != expected[k].shape)
    if missing or wrong:
        what = f"missing {missing[0]}" if missing else f"{wrong[0]} of shape {tuple(weights[wrong[0]].shape)}"
        raise ConfigError(f"`{option}={checkpoint}` does not match its own plans ({what}); it may be damaged: "
                          "give another checkpoint of the run")
    model.load_state_dict({k.removeprefix(MODEL_PREFIX): weights[k] for k in expected})


def export_checkpoint(checkpoint: str | Path, output_dir: str | Path, overwrite: bool = False, gguf: str | None = None,
                      gguf_texts: tuple[str, ...] = ()) -> Path:
    """Load ``checkpoint`` (written by train.py) and export it, verified against the loaded model; ``gguf``: also a
    GGUF of that llama.cpp type, its perplexity measured on the embedded corpora ``gguf_texts``."""
    problem = gguf_problem(gguf, option="--gguf")
    if problem:  # before the checkpoint is read: the converter's absence is known at once
        raise ConfigError(problem)
    check_export_dir(output_dir, overwrite, option="output_dir")
    if not Path(checkpoint).exists():
        raise ConfigError(f"checkpoint `{checkpoint}` does not exist; give a .ckpt file or an FSDP2 checkpoint "
                          "directory written by train.py")
    model, plans, base_model = pruned_model_from_checkpoint(checkpoint)
    generator = torch.Generator().manual_seed(0)
    check_ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=generator)
    finish = None
    if gguf is not None:
        finish = GGUFExport(gguf, {name: corpus_documents(name) for name in gguf_texts}, Path(output_dir).name)
    return export_model(model, load_tokenizer(base_model), output_dir, plans, overwrite=overwrite,
                        check_input_ids=check_ids, option="output_dir", finish=finish)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a transact-pl checkpoint as a Hugging Face directory.")
    parser.add_argument("checkpoint", help="a .ckpt file or an FSDP2 checkpoint directory written by train.py")
    parser.add_argument("output_dir", help="the Hugging Face directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace output_dir if it holds an earlier export")
    parser.add_argument("--gguf", default=None, metavar="TYPE",
                        help=f"also write model-<TYPE>.gguf with llama.cpp's converter and quantizer ({', '.join(GGUF_TYPES)}); "
                             "needs `make llama-cpp`")
    parser.add_argument("--gguf-texts", nargs="*", default=[], choices=CORPORA, metavar="TEXT",
                        help=f"embedded texts to measure the GGUF's llama.cpp perplexity on ({', '.join(CORPORA)})")
    args = parser.parse_args(argv)
    try:
        path = export_checkpoint(args.checkpoint, args.output_dir, args.overwrite, args.gguf, tuple(args.gguf_texts))
        print(f"exported to {path}")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
