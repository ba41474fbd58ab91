"""transact-pl command line: `python train.py fit --config configs/smollm2_transact.yaml`.

The YAML (or --help) has six sections: trainer, model, data, pruning (the TransActPruning callback),
report (the PruningReport callback) and export (the HFExport callback); e.g. `--pruning.num_shots=4
--export.output_dir=out`.
"""

import sys

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI

from callbacks.config_check import RunConfigCallback, check_fit_config, strategy_problem
from callbacks.hf_export import HFExport
from callbacks.pruning_report import PruningReport
from callbacks.resume import WEIGHTS_ONLY_REFUSAL, checked_ckpt_parse, hand_checkpoint_to_trainer
from callbacks.run_guard import RunGuard, RunInterrupted, ignore_stop_signals, interruptible, interruption_behind
from callbacks.transact_pruning import TransActPruning
from datamodules.text import TextDataModule
from transact_pl.infra.assets import AssetError
from transact_pl.errors import ConfigError
from transact_pl.lightning_modules.transact_lm import TransActLM


class TransActCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(TransActPruning, "pruning")
        parser.add_lightning_class_args(PruningReport, "report")
        parser.add_lightning_class_args(HFExport, "export")
        parser.link_arguments("model.init_args.model", "data.tokenizer")

    def before_instantiate_classes(self) -> None:
        # Before the Trainer exists: Lightning itself would fail deep inside for some of these (FSDP1 on a CPU).
        config = self.config[self.subcommand] if self.subcommand else self.config  # no subcommand: run=False
        problem = strategy_problem(config["trainer"].get("strategy"))
        if problem:
            raise ConfigError(problem)
        if config.get("weights_only") is False:
            raise ConfigError(WEIGHTS_ONLY_REFUSAL)

    def _parse_ckpt_path(self) -> None:
        # Lightning swaps in the checkpoint's model hyper-parameters here: refuse another base model instead.
        checked_ckpt_parse(self, super()._parse_ckpt_path)

    def before_fit(self) -> None:
        check_fit_config(self.trainer, self.model, self.datamodule)
        hand_checkpoint_to_trainer(self)


def main(args: list[str] | None = None) -> None:
    """Run the CLI; configuration problems end it with one `error: ...` line (exit 2), NaN/Inf with exit 1,
    SIGTERM/SIGINT with the command that resumes the run (exit 143/130)."""
    try:
        with interruptible():
            TransActCLI(TransActLM, TextDataModule, subclass_mode_model=True, save_config_callback=RunConfigCallback,
                        save_config_kwargs={"overwrite": True},
                        trainer_defaults={"callbacks": [RunGuard()]}, args=args)
    except RunInterrupted as interruption:
        stop_interrupted(interruption, args)
    except (ConfigError, AssetError, MisconfigurationException) as error:  # the last: Lightning's word for a bad option
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except Exception as error:  # a failure that a stop signal caused on its way out (a half-written record) is the stop
        interruption = interruption_behind(error)
        if interruption is None:
            raise
        stop_interrupted(interruption, args)


def stop_interrupted(interruption: RunInterrupted, args: list[str] | None) -> None:
    """Print the resume line (rank 0) and exit with 128 + signal."""
    if interruption.rank_zero:
        print(interruption.resume_line(sys.argv[1:] if args is None else args), file=sys.stderr)
    sys.exit(interruption.code)


if __name__ == "__main__":
    main()
    ignore_stop_signals()  # the run is complete; only Python's shutdown is left
