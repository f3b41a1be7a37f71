"""Whole-batch serving of in-memory tensors: one index op per batch instead of B ``__getitem__`` calls.

The loaders stay plain :class:`~torch.utils.data.DataLoader` objects so that Lightning can still inject a
``DistributedSampler`` under DDP.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

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


def batch_loader(
    ds: TensorBatchDataset, batch_size: int, *, shuffle: bool, drop_last: bool = False, sampler: Any = None,
    num_workers: int = 0, pin_memory: bool = False,
) -> DataLoader:
    """A ``DataLoader`` that cuts each batch of ``ds`` with one index op (:func:`collate_batch`)."""
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        drop_last=drop_last,
        collate_fn=collate_batch,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


def eval_sampler(ds: TensorBatchDataset, trainer: Any) -> UnrepeatedDistributedSampler | None:
    """Under DDP, a sampler that gives each rank its own rows in order, each row seen exactly once; else None."""
    world_size = int(getattr(trainer, "world_size", 1)) if trainer is not None else 1
    if world_size <= 1:
        return None
    rank = int(getattr(trainer, "global_rank", 0))
    if len(ds) < world_size:
        raise ValueError(
            f"an evaluation split has {len(ds)} rows, fewer than world_size={world_size}; "
            "every rank needs at least one row"
        )
    return UnrepeatedDistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=False)
