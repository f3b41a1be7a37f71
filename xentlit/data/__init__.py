"""Datamodules by source: in-memory tensors (:mod:`.base`), generated and bundled data (:mod:`.synthetic`), the
user's own files (:mod:`.files`, with the tabular pipeline of :mod:`.tabular`)."""

from xentlit.data.base import TensorDataModule
from xentlit.data.batching import TensorBatchDataset, collate_batch
from xentlit.data.files import FileDataModule, read_table
from xentlit.data.synthetic import DigitsDataModule, SyntheticDataModule, long_tail_counts

__all__ = [
    "TensorBatchDataset",
    "collate_batch",
    "TensorDataModule",
    "DigitsDataModule",
    "SyntheticDataModule",
    "FileDataModule",
    "read_table",
    "long_tail_counts",
]
