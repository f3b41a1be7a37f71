"""Checks of a loss's options and per-class vectors: each returns the checked value or raises a ValueError
that names the option, the value and what was expected. Small inputs, outside the hot path."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def check_beta(beta: float) -> float:
    """Return `beta` as a float, or raise if it is not in [0, 1) (the range Cui et al. allow)."""
    try:
        value = float(beta)
    except (TypeError, ValueError):
        raise ValueError(f"beta must be a number in [0, 1), got {beta!r}") from None
    if not 0.0 <= value < 1.0:  # also rejects NaN
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    return value


def to_float64_vector(values: Any, what: str) -> Tensor:
    """Turn a tensor or a sequence of numbers into a checked 1-D float64 CPU tensor.

    Checked: 1-D, non-empty, finite, non-negative. Used for class counts and explicit weights,
    which are small and handled outside the training hot path, so the host syncs are harmless.
    """
    if isinstance(values, Tensor):
        if values.is_complex() or values.dtype == torch.bool:
            raise ValueError(f"{what} must be real numbers, got a tensor of dtype {values.dtype}")
        vec = values.detach().to(device="cpu", dtype=torch.float64)
    else:
        if isinstance(values, (str, bytes)):
            raise ValueError(f"{what} must be a 1-D sequence of numbers, got {values!r}")
        try:
            vec = torch.tensor([float(v) for v in values], dtype=torch.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be a 1-D sequence of numbers, got {values!r}") from None
    if vec.dim() != 1:
        raise ValueError(f"{what} must be 1-D (one entry per class), got shape {tuple(vec.shape)}")
    if vec.numel() == 0:
        raise ValueError(f"{what} must not be empty (one entry per class), got {values!r}")
    bad = ~torch.isfinite(vec) | (vec < 0)
    if bool(bad.any()):
        idx = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{what} must be finite and non-negative, got {vec[idx].item()} for class {idx}"
        )
    return vec


def weights_tensor(values: Sequence[float] | Tensor, check_values: bool = True) -> Tensor:
    """Explicit class weights as a 1-D float tensor, checked finite, non-negative, not all zero.

    A floating-point tensor keeps its dtype and device (float64 weights stay exact); anything
    else becomes float32. With ``check_values=False`` a tensor is only shape-checked (no host
    sync); its values are then checked by the loss's forward validation instead.
    """
    if isinstance(values, Tensor) and not check_values:
        if values.dim() != 1 or values.numel() == 0:
            raise ValueError(
                "class_weights must be a non-empty 1-D tensor (one weight per class), "
                f"got shape {tuple(values.shape)}"
            )
        return values.detach() if values.is_floating_point() else values.detach().float()
    vec = to_float64_vector(values, "class_weights")
    if not bool(vec.sum() > 0):
        raise ValueError(f"class_weights must not be all zero, got {vec.tolist()}")
    if isinstance(values, Tensor) and values.is_floating_point():
        return values.detach().clone()
    return vec.to(torch.float32)


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float within [low, high] (``*_open``: excluded), else ValueError
    naming the knob, the value and the allowed range."""
    left = "-inf" if low is None else f"{low:g}"
    right = "inf" if high is None else f"{high:g}"
    opening = "(" if low_open or low is None else "["
    closing = ")" if high_open or high is None else "]"
    interval = f"{opening}{left}, {right}{closing}"
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}") from None
    ok = math.isfinite(number)
    if ok and low is not None:
        ok = number > low if low_open else number >= low
    if ok and high is not None:
        ok = number < high if high_open else number <= high
    if not ok:
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return number
