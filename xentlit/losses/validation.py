"""A loss's input checks, with messages that say what was wrong and what was expected.

`check_shapes` needs no data (no host sync); `soft_target_tolerance` is the row-sum tolerance the loss reads in its
single validation sync; `raise_value_error` runs only after that sync found a problem, to say which one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Soft-target rows must sum to 1 within this (absolute) tolerance; for bf16/fp16 targets the
# tolerance is widened to the dtype's epsilon, since rounding alone can move a row sum that far.
SOFT_TARGET_TOLERANCE = 1e-3


def soft_target_tolerance(dtype: torch.dtype) -> float:
    """How far a probability row of this dtype may sum from 1."""
    return max(SOFT_TARGET_TOLERANCE, torch.finfo(dtype).eps)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_shapes(logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int) -> None:
    """Checks that need no data (no host sync)."""
    if not isinstance(logits, Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(target, Tensor):
        raise ValueError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if not logits.is_floating_point():
        raise ValueError(
            f"logits must be a floating point tensor (N, C[, d1, ...]), got dtype "
            f"{logits.dtype}"
        )
    if logits.dim() < 2:
        raise ValueError(
            f"logits must have shape (N, C) or (N, C, d1, ...), got shape {_shape(logits)}; "
            "for a single sample use logits.unsqueeze(0)"
        )
    n, num_classes = logits.shape[0], logits.shape[1]
    if num_classes == 0:
        raise ValueError(
            f"logits must have at least one class (C >= 1), got shape {_shape(logits)}"
        )
    if target.is_floating_point():
        if target.shape != logits.shape:
            if target.dim() == logits.dim() and target.shape[1:] == logits.shape[1:]:
                raise ValueError(
                    f"batch size mismatch: logits have N={n} rows but target has "
                    f"{target.shape[0]} (logits shape {_shape(logits)}, target shape "
                    f"{_shape(target)})"
                )
            raise ValueError(
                "float targets must be probabilities shaped like the logits (N, C) = "
                f"{_shape(logits)}, got target of shape {_shape(target)} and dtype "
                f"{target.dtype}; class indices must be an integer dtype (use target.long())"
            )
        if ignore_index >= 0:
            raise ValueError(
                f"ignore_index={ignore_index} is not supported for probability "
                "targets (as in torch); use a negative ignore_index such as the default -100"
            )
    elif target.is_complex() or target.dtype == torch.bool:
        raise ValueError(
            "target must be integer class indices or floating point probabilities, got "
            f"dtype {target.dtype}"
        )
    else:
        expected = (n, *logits.shape[2:])
        if target.dim() >= 1 and target.shape[0] != n:
            raise ValueError(
                f"batch size mismatch: logits have N={n} rows but target has "
                f"{target.shape[0]} (logits shape {_shape(logits)}, target shape "
                f"{_shape(target)})"
            )
        if _shape(target) != expected:
            hint = (
                "; one-hot targets must be float probabilities shaped like the logits"
                if target.shape == logits.shape
                else ""
            )
            raise ValueError(
                f"class-index target must have shape {expected} for logits of shape "
                f"{_shape(logits)}, got {_shape(target)}{hint}"
            )
    if weight is not None and _shape(weight) != (num_classes,):
        raise ValueError(
            f"class_weights has {weight.numel()} entries (shape {_shape(weight)}) but logits "
            f"have C={num_classes} classes (logits shape {_shape(logits)})"
        )


def check_class_indices(t: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise the ValueError for class indices outside [0, C) other than ignore_index."""
    bad_target = (t != ignore_index) & ((t < 0) | (t >= num_classes))
    if bool(bad_target.any()):
        bad_values = t[bad_target]
        raise ValueError(
            f"target contains {bad_values.numel()} class indices outside [0, "
            f"{num_classes}): smallest bad value {bad_values.min().item()}, largest bad "
            f"value {bad_values.max().item()}; class indices must be in [0, C) with "
            f"C={num_classes} (logits.shape[1]) or equal ignore_index={ignore_index}"
        )


def raise_value_error(
    x: Tensor, t: Tensor, w: Tensor | None, target_dtype: torch.dtype, loss: Tensor, ignore_index: int
) -> None:
    """Work out which data check failed and raise a ValueError that says so (error path
    only, so the extra host syncs here do not matter)."""
    num_classes = x.shape[1]
    if t.is_floating_point():
        negative = t < 0
        if bool(negative.any()):
            raise ValueError(
                f"soft targets must be probabilities, but {int(negative.sum())} entries are "
                f"negative (most negative {t[negative].min().item():.6g})"
            )
        tol = soft_target_tolerance(target_dtype)
        row_sums = t.sum(dim=1)
        deviation = (row_sums - 1.0).abs().nan_to_num(nan=math.inf)
        bad_rows = ~(deviation <= tol)
        if bool(bad_rows.any()):
            worst = row_sums.flatten()[deviation.flatten().argmax()].item()
            raise ValueError(
                f"soft targets must be probabilities whose class dim sums to 1 (tolerance "
                f"{tol:g}), but {int(bad_rows.sum())} of {bad_rows.numel()} rows do not; "
                f"worst row sum is {worst:.6g}"
            )
    else:
        check_class_indices(t, num_classes, ignore_index)
    if w is not None:
        bad_w = ~torch.isfinite(w) | (w < 0)
        if bool(bad_w.any()):
            idx = int(bad_w.nonzero()[0, 0])
            raise ValueError(
                f"class_weights must be finite and non-negative, got {w[idx].item()} for "
                f"class {idx}"
            )
        if not bool(w.sum() > 0):
            raise ValueError(f"class_weights must not be all zero, got {w.tolist()}")
    non_finite = int((~torch.isfinite(x)).sum())
    if non_finite:
        raise ValueError(
            f"logits contain {non_finite} non-finite values (NaN or inf) out of "
            f"{x.numel()}; this usually means training diverged: lower the learning rate "
            "or clip gradients"
        )
    if not bool(torch.isfinite(loss).all()):  # finite inputs, yet the loss overflowed
        raise ValueError(
            "the loss is non-finite although logits, targets and weights are finite; the "
            f"logits span [{x.min().item():.6g}, {x.max().item():.6g}], too wide to "
            "normalise: lower the learning rate or clip gradients"
        )
    # Otherwise only the sum of a finite "none" loss overflowed: nothing is wrong.
