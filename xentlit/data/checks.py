"""Validation of features and targets, with errors that say where and what is wrong."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

def _to_tensor(a: Any, what: str, where: str) -> Tensor:
    """Numpy/array-like -> tensor, refusing non-numeric data with a readable message."""
    if isinstance(a, Tensor):
        t = a.detach().cpu()
    else:
        arr = np.asarray(a)
        if arr.dtype.kind not in "biuf":
            raise ValueError(
                f"{what} in {where} must be numeric, got numpy dtype {arr.dtype}"
            )
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex():
        raise ValueError(f"{what} in {where} must be real numeric, got {t.dtype}")
    return t


def _as_features(x: Any, where: str) -> Tensor:
    """Validate features (2-D, numeric, finite) and return them as float32."""
    t = _to_tensor(x, "features x", where)
    if t.ndim != 2:
        raise ValueError(
            f"features x in {where} must be 2-D (rows, features), got shape {tuple(t.shape)}"
        )
    if t.shape[1] == 0:
        raise ValueError(f"features x in {where} have no columns (shape {tuple(t.shape)})")
    t = t.to(torch.float32)
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        row, col = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"features x in {where} contain {int(bad.sum())} non-finite value(s) (NaN/inf); "
            f"first at row {row}, column {col} (value {t[row, col].item()})"
        )
    return t.contiguous()


def _as_targets(y: Any, n_rows: int, ignore_index: int, where: str) -> Tensor:
    """Validate targets and return int64 indices (B,) or float32 soft targets (B, C)."""
    t = _to_tensor(y, "labels y", where)
    if t.ndim == 2 and t.shape[1] == 1 and not t.is_floating_point():
        t = t[:, 0]
    if len(t) != n_rows:
        raise ValueError(
            f"labels y in {where} have {len(t)} rows but features x have {n_rows}; "
            "they must have the same length"
        )
    if t.ndim == 2:
        if not t.is_floating_point():
            raise ValueError(
                f"2-D labels y in {where} must be floating soft targets (probabilities), "
                f"got dtype {t.dtype} with shape {tuple(t.shape)}"
            )
        t = t.to(torch.float32)
        if t.shape[1] < 2:
            raise ValueError(
                f"soft targets in {where} need at least 2 class columns, got shape {tuple(t.shape)}"
            )
        bad = ~torch.isfinite(t) | (t < 0)
        if bool(bad.any()):
            row, col = (int(v) for v in bad.nonzero()[0])
            raise ValueError(
                f"soft targets in {where} must be finite and >= 0; {int(bad.sum())} value(s) are "
                f"not, first at row {row}, column {col} (value {t[row, col].item()})"
            )
        sums = t.sum(dim=1)
        off = (sums - 1).abs() > 1e-3
        if bool(off.any()):
            row = int(off.nonzero()[0])
            raise ValueError(
                f"soft targets in {where} must sum to 1 per row; {int(off.sum())} row(s) do not, "
                f"first row {row} sums to {sums[row].item():.6g}"
            )
        return t.contiguous()
    if t.ndim != 1:
        raise ValueError(
            f"labels y in {where} must be 1-D class indices or 2-D soft targets, "
            f"got shape {tuple(t.shape)}"
        )
    if t.is_floating_point():
        bad = ~torch.isfinite(t) | (t != torch.round(t))
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise ValueError(
                f"labels y in {where} must be whole numbers (class indices); {int(bad.sum())} "
                f"are not, first at row {row} (value {t[row].item()})"
            )
    t = t.to(torch.int64)
    bad = (t < 0) & (t != ignore_index)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(
            f"labels y in {where} contain negative label {int(t[row])} at row {row}; labels must be "
            f"class indices >= 0 or the ignore_index {ignore_index} for unlabeled rows"
        )
    return t.contiguous()


def _is_soft(y: Tensor) -> bool:
    return y.ndim == 2


def _hard_labels(y: Tensor) -> Tensor:
    """Class index per row (argmax for soft targets), used for stratification."""
    return y.argmax(dim=1) if _is_soft(y) else y


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
