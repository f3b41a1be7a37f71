"""Seeded, stratified train/val/test splits of one dataset by row fractions."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from xentlit.data.checks import _hard_labels

Split = tuple[Tensor, Tensor]


def split_rows(y: Tensor, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Sorted row indices of each split (``"train"``, ``"val"``, ``"test"``), of ``round(fraction * n)`` rows,
    seeded by ``seed`` and stratified by class where sklearn allows."""
    n = len(y)
    n_test = int(round(test_fraction * n))
    n_val = int(round(val_fraction * n))
    if n - n_test - n_val < 1:
        raise ValueError(
            f"the train split is empty: {n} rows with val_fraction={val_fraction} "
            f"({n_val} rows) and test_fraction={test_fraction} ({n_test} rows)"
        )
    strata = _hard_labels(y).numpy()
    rng = np.random.RandomState(seed)
    idx = np.arange(n)
    rest, test_idx = _take(idx, strata, n_test, rng)
    train_idx, val_idx = _take(rest, strata, n_val, rng)
    return {"train": np.sort(train_idx), "val": np.sort(val_idx), "test": np.sort(test_idx)}


def take_splits(x: Tensor, y: Tensor, indices: dict[str, np.ndarray]) -> tuple[Split, Split, Split]:
    """The train, val and test rows of ``(x, y)`` named by :func:`split_rows`' indices."""

    def rows(ix: np.ndarray) -> Split:
        t = torch.as_tensor(ix, dtype=torch.long)
        return x[t], y[t]

    return rows(indices["train"]), rows(indices["val"]), rows(indices["test"])


def _take(
    idx: np.ndarray, strata: np.ndarray, n_take: int, rng: np.random.RandomState
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n_take`` of ``idx`` (stratified when every stratum can be split), return (rest, taken)."""
    if n_take == 0:
        return idx, idx[:0]
    s = strata[idx]
    _, counts = np.unique(s, return_counts=True)
    n_strata = len(counts)
    stratify = (
        counts.min() >= 2 and n_take >= n_strata and len(idx) - n_take >= n_strata
    )
    from sklearn.model_selection import train_test_split  # lazily: scikit-learn takes a second to import

    rest, taken = train_test_split(
        idx, test_size=n_take, random_state=rng, stratify=s if stratify else None
    )
    return rest, taken
