"""Whole-batch serving of in-memory tensors: one index op per batch instead of B ``__getitem__`` calls."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

class TensorBatchDataset(Dataset):
    """Features and targets held as two tensors, served a whole batch at a time.

    ``DataLoader``'s fetcher calls :meth:`__getitems__` with the list of sampled indices, so a
    batch costs one tensor index op instead of ``B`` ``__getitem__`` calls plus a collate.
    Pair it with :func:`collate_batch`.
    """

    def __init__(self, x: Tensor, y: Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}; they must match")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        """One sample (kept for code that indexes the dataset directly)."""
        return self.x[i], self.y[i]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """The whole batch for ``indices`` with one index op per tensor."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.x.device)
        return self.x[idx], self.y[idx]


def collate_batch(batch: Any) -> Any:
    """Identity collate: :meth:`TensorBatchDataset.__getitems__` already returns the batch.

    Module level (not a lambda) so it pickles into worker processes.
    """
    return batch
