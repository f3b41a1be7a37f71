"""Validation of features, targets, splits and classes, with errors that say where and what is wrong."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
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


def check_datamodule_arguments(
    *, batch_size: Any, eval_batch_size: Any, num_workers: Any, split_seed: Any, val_fraction: Any,
    test_fraction: Any, on_device: bool, pin_memory: bool,
) -> None:
    """Raise a ValueError naming the first of :class:`~xentlit.TensorDataModule`'s arguments that is out of range."""
    _check_int("batch_size", batch_size, minimum=1)
    if eval_batch_size is not None:
        _check_int("eval_batch_size", eval_batch_size, minimum=1)
    _check_int("num_workers", num_workers, minimum=0)
    _check_int("split_seed", split_seed, minimum=0)
    check_split_fractions(val_fraction, test_fraction)
    if on_device and (num_workers or pin_memory):
        raise ValueError(
            f"on_device=True keeps the data on the accelerator, which worker processes and pinned memory cannot "
            f"serve: got num_workers={num_workers}, pin_memory={pin_memory}; use num_workers=0, pin_memory=False"
        )


def check_split_fractions(val_fraction: Any, test_fraction: Any) -> None:
    """Each fraction in [0, 1), and together below 1 so that a train split is left."""
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (isinstance(frac, (int, float)) and 0.0 <= float(frac) < 1.0):
            raise ValueError(f"{name} must be in [0, 1), got {frac!r}")
    if float(val_fraction) + float(test_fraction) >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 to leave a train split, got "
            f"{val_fraction} + {test_fraction} = {float(val_fraction) + float(test_fraction)}"
        )


def checked_splits(
    train: tuple[Any, Any], evals: Sequence[tuple[Any, Any]], ignore_index: int
) -> list[tuple[Tensor, Tensor]]:
    """The train split and the evaluation splits (val, test) validated as features and targets; the evaluation
    splits must match the train split's features and kind of targets (an empty one is made to)."""
    x_tr = _as_features(train[0], "the train split")
    y_tr = _as_targets(train[1], len(x_tr), ignore_index, "the train split")
    if len(x_tr) == 0:
        raise ValueError(
            "the train split is empty; lower val_fraction/test_fraction or provide more rows"
        )
    n_feat = x_tr.shape[1]
    splits = [(x_tr, y_tr)]
    for name, (x, y) in zip(("val", "test"), evals):
        if len(x) == 0 and len(y) == 0:  # empty split: any shape will do
            splits.append((x_tr[:0].clone(), y_tr[:0].clone()))
            continue
        where = f"the {name} split"
        x = _as_features(x, where)
        y = _as_targets(y, len(x), ignore_index, where)
        if x.shape[1] != n_feat:
            raise ValueError(
                f"{where} has {x.shape[1]} features but the train split has {n_feat}"
            )
        if _is_soft(y) != _is_soft(y_tr) or (_is_soft(y) and y.shape[1] != y_tr.shape[1]):
            raise ValueError(
                f"{where}'s labels have shape {tuple(y.shape)} but the train split's have "
                f"{tuple(y_tr.shape)}; use the same kind of targets everywhere"
            )
        splits.append((x, y))
    return splits


def resolve_classes(ys: Sequence[Tensor], names: Sequence[str] | None, ignore_index: int) -> tuple[list[str], int]:
    """Class names and count of the train/val/test targets ``ys`` (from ``names``, the soft targets' width or
    the largest label), checking the labels against them."""
    y0 = ys[0]
    if _is_soft(y0):
        c = int(y0.shape[1])
        if names is not None and len(names) != c:
            raise ValueError(
                f"soft targets have {c} class columns but {len(names)} class_names were given "
                f"({names})"
            )
        return ([str(n) for n in names] if names is not None else [str(i) for i in range(c)]), c
    if names is not None:
        c = len(names)
        for split_name, y in zip(("train", "val", "test"), ys):
            bad = (y >= c) & (y != ignore_index)
            if bool(bad.any()):
                row = int(bad.nonzero()[0])
                raise ValueError(
                    f"label {int(y[row])} at row {row} of the {split_name} split is >= "
                    f"num_classes={c} (the number of class_names); labels must be in [0, {c})"
                )
        return [str(n) for n in names], c
    labelled = torch.cat([y[y != ignore_index] for y in ys])
    if len(labelled) == 0:
        raise ValueError(
            f"no labelled rows: every label equals ignore_index={ignore_index}"
        )
    c = int(labelled.max()) + 1
    if c > len(labelled):  # checked before any per-class list is built: a label of 1e9 is not 1e9 classes
        raise ValueError(
            f"label {c - 1} is a class index, which would make {c} classes for {len(labelled)} labelled rows; "
            "labels must be class indices 0..K-1 (map them, or store them as text: text labels are class names)"
        )
    return [str(i) for i in range(c)], c


def check_label_counts(
    y_train: Tensor, ys: Sequence[Tensor], class_names: Sequence[str], ignore_index: int
) -> None:
    """Enough labelled rows overall and at least two classes to train on."""
    c = len(class_names)
    if _is_soft(y_train):
        return
    n_lab = sum(int((y != ignore_index).sum()) for y in ys)
    if n_lab < c:
        raise ValueError(
            f"only {n_lab} labelled row(s) for num_classes={c}; need at least one per class"
        )
    present = torch.unique(y_train[y_train != ignore_index])
    if len(present) < 2:
        which = f"class {int(present[0])}" if len(present) else "no class"
        raise ValueError(
            f"only one class present among labelled training rows ({which}); a classifier "
            "needs at least 2 classes"
        )
    if c < 2:
        raise ValueError(f"need at least 2 classes, got num_classes={c} ({list(class_names)})")


def class_counts(y: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Float per-class counts of targets ``y`` (unlabeled rows excluded; soft targets: column sums)."""
    if _is_soft(y):
        return y.sum(dim=0).to(torch.float32)
    labelled = y[y != ignore_index]
    return torch.bincount(labelled, minlength=num_classes).to(torch.float32)


def check_constant_features(x_train: Tensor, others: dict[str, Tensor]) -> None:
    """Refuse features that are all constant in the train split (nothing to learn from); say which constant
    features move far in another split (the network never saw them move, and standardising cannot scale them)."""
    if len(x_train) < 2:
        return
    constant = (x_train == x_train[0]).all(dim=0)
    if bool(constant.all()):
        raise ValueError(f"every feature column ({x_train.shape[1]}) is constant in the train split: there is "
                         "nothing to learn from; check the data (or the feature columns chosen)")
    # a train-constant feature moving by more than 10x the largest training spread is not noise the network can absorb
    limit = 10.0 * float(x_train[:, ~constant].double().std(dim=0, unbiased=False).max())
    for name, x in others.items():
        if len(x) == 0 or not bool(constant.any()):
            continue
        moved = ((x - x_train[0]).abs() * constant).amax(dim=0)
        if bool((moved > limit).any()):
            j = int(moved.argmax())
            rank_zero_warn(f"feature column {j} is constant in the train split ({float(x_train[0, j]):g}) but not "
                           f"in the {name} split (it differs by up to {float(moved[j]):.3g}): the network never saw it "
                           f"vary, so its predictions there are unreliable; {int((moved > limit).sum())} column(s) "
                           f"like it (moving by more than 10x the largest training spread, {limit:.3g})")
