"""Export any checkpoint of a run as a stock Hugging Face directory.

    python -m transact_pl.export_checkpoint runs/<run>/logs/version_0/checkpoints/last.ckpt exports/<name> [--overwrite]

The checkpoint's own hyper-parameters name the base model; its plans are replayed before its
weights load (see TransActLM.on_load_checkpoint), so any point of the schedule exports.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from transact_pl.errors import ConfigError
from transact_pl.export import check_export_dir, export_model
from transact_pl.loading import load_tokenizer


def export_checkpoint(checkpoint: str | Path, output_dir: str | Path, overwrite: bool = False) -> Path:
    """Load ``checkpoint`` (written by train.py) and export it, verified against the loaded model."""
    from transact_pl.module import TransActLM  # Lightning only when this entry point is used

    check_export_dir(output_dir, overwrite, option="output_dir")
    path = Path(checkpoint)
    if not path.is_file():
        raise ConfigError(f"checkpoint `{path}` does not exist; give a .ckpt written by train.py")
    try:
        module = TransActLM.load_from_checkpoint(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, KeyError) as error:
        raise ConfigError(f"checkpoint `{path}` cannot be read ({type(error).__name__}); it may be truncated: use another one") from error
    generator = torch.Generator().manual_seed(0)
    check_ids = torch.randint(0, module.model.config.vocab_size, (2, 32), generator=generator)
    return export_model(module.model, load_tokenizer(module.hparams.model), output_dir, module.plans,
                        overwrite=overwrite, check_input_ids=check_ids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a transact-pl checkpoint as a Hugging Face directory.")
    parser.add_argument("checkpoint", help="a .ckpt written by train.py (any point of the schedule)")
    parser.add_argument("output_dir", help="the Hugging Face directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace output_dir if it exists")
    args = parser.parse_args(argv)
    try:
        print(f"exported to {export_checkpoint(args.checkpoint, args.output_dir, args.overwrite)}")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
