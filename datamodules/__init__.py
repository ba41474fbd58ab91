"""LightningDataModules of transact-pl."""

from datamodules.text import TextDataModule

__all__ = ["TextDataModule"]
