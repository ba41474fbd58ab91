"""transact-pl command line: `python train.py fit --config configs/smollm2_transact.yaml`.

The YAML (or --help) has five sections: trainer, model, data, pruning (the TransActPruning
callback) and export (the HFExport callback); e.g. `--pruning.num_shots=4 --export.output_dir=out`.
"""

from lightning.pytorch.cli import LightningCLI

from callbacks.hf_export import HFExport
from callbacks.transact_pruning import TransActPruning
from datamodules.text import TextDataModule
from transact_pl.module import TransActLM


class TransActCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(TransActPruning, "pruning")
        parser.add_lightning_class_args(HFExport, "export")
        parser.link_arguments("model.init_args.model", "data.tokenizer")


def main() -> None:
    TransActCLI(TransActLM, TextDataModule, subclass_mode_model=True, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
