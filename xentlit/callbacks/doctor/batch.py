"""Statistics of a raw batch's inputs and targets, before the forward pass (one host synchronisation)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from xentlit.callbacks.doctor.observations import BatchStats
from xentlit.callbacks.doctor.steps import to_host


def _input_values(x: Tensor) -> tuple[list[Tensor], list[str]]:
    """Non-finite values, and the largest |x|, feature RMS and feature |mean| of the finite ones (others as 0)."""
    xf = x.detach().float()
    xf = xf.reshape(xf.shape[0], -1) if xf.dim() > 1 else xf.reshape(-1, 1)
    # x - x is 0 where x is finite and NaN where it is not (float kernels: boolean masks are slow on CPU)
    # (counted per feature in float32, exact below 2**24 rows, then summed in float64)
    nonfinite = torch.nan_to_num(xf - xf, nan=1.0).sum(0).sum(dtype=torch.float64)
    xz = torch.nan_to_num(xf, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = torch.aminmax(xz)
    return ([nonfinite, torch.maximum(high, -low), xz.pow(2).mean(0).sqrt().amax(), xz.mean(0).abs().amax()],
            ["x_nonfinite", "x_abs_max", "x_feature_rms_max", "x_feature_mean_abs_max"])


def _target_values(y: Tensor, c: int | None, ignore: int) -> tuple[str | None, list[Tensor], list[str]]:
    yd = y.detach()
    dev = yd.device
    if yd.is_floating_point():
        finite_y = torch.isfinite(yd)
        yz = torch.where(finite_y, yd, torch.zeros((), device=dev, dtype=yd.dtype))
        if yd.dim() == 1:
            whole = (yz == yz.round()).all() & finite_y.all()
            return "float_1d", [whole, yz.amin(), yz.amax()], ["y_whole", "y_min", "y_max"]
        if yd.dim() == 2 and yd.shape[1] >= 2:
            one_hot = ((yz == 0) | (yz == 1)).all() & (yz.sum(1) == 1).all()
            return "float_2d", [one_hot], ["y_one_hot"]
        return None, [], []
    yl = yd.long()
    valid = yl != ignore
    bad = valid & ((yl < 0) | (yl >= c)) if c is not None else valid & (yl < 0)
    big = torch.iinfo(torch.long).max
    values = [bad.sum(), valid.sum(), torch.where(valid, yl, big).amin(), torch.where(valid, yl, -big).amax()]
    names = ["y_bad", "y_valid", "y_min", "y_max"]
    if yl.dim() == 2 and yl.shape[1] >= 2 and (c is None or yl.shape[1] == c):
        values.append(((yl == 0) | (yl == 1)).all() & (yl.sum(1) == 1).all())
        names.append("y_one_hot")
    return "index", values, names


def batch_statistics(x: Any, y: Any, stage: str, num_classes: int | None, ignore_index: int) -> BatchStats | None:
    """What the input and target checks need of a raw batch (``None``: neither is a tensor to judge)."""
    values: list[Tensor] = []
    names: list[str] = []
    known: dict[str, float] = {}
    if isinstance(x, Tensor) and x.is_floating_point() and x.numel() > 0:
        values, names = _input_values(x)
        known["x_numel"] = float(x.numel())
    kind = None
    if isinstance(y, Tensor) and y.numel() > 0 and not y.is_complex() and y.dtype != torch.bool:
        kind, y_values, y_names = _target_values(y, num_classes, ignore_index)
        values += y_values
        names += y_names
        if kind == "float_2d":
            known["y_width"] = float(y.shape[1])
    if not values:
        return None
    host = {**dict(zip(names, to_host(values))), **known}
    return BatchStats(stage=stage, values=host, target_kind=kind, target_dtype=y.dtype if kind else None,
                      target_shape=list(y.shape) if kind else [], num_classes=num_classes, ignore_index=ignore_index)
