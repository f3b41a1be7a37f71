"""Per-feature standardisation with statistics of the train split, and the checks on statistics that come from
a checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def fit_standardizer(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean and population std (std 1 for constant features), in float64."""
    x64 = x.to(torch.float64)
    mean = x64.mean(dim=0)
    std = x64.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-12 * torch.clamp(mean.abs(), min=1.0), std, torch.ones_like(std))
    return mean.to(torch.float32), std.to(torch.float32)


def feature_statistics(
    x_train: Tensor, loaded: tuple[Tensor, Tensor] | None, fit: bool
) -> tuple[Tensor, Tensor]:
    """``(mean, std)``: the ``loaded`` ones (a checkpoint's, checked against the data's width), else fitted on
    ``x_train`` when ``fit``, else zeros and ones (no change)."""
    n_features = x_train.shape[1]
    if loaded is not None:
        check_statistics_width(loaded[0], n_features)
        return loaded
    if fit:
        return fit_standardizer(x_train)
    return torch.zeros(n_features), torch.ones(n_features)


def is_identity(mean: Tensor, std: Tensor) -> bool:
    """Whether standardising with ``(mean, std)`` changes nothing (then no copy of the data is made)."""
    return not bool(mean.any()) and bool((std == 1).all())


def check_statistics_width(mean: Tensor, n_features: int) -> None:
    """Raise a ValueError when loaded statistics cover another number of features than the data has."""
    if mean.shape != (n_features,):
        raise ValueError(
            f"loaded feature statistics cover {mean.shape[0]} features but the data has "
            f"{n_features}"
        )


def statistics_from_state(state_dict: Mapping[str, Any]) -> tuple[Tensor, Tensor] | None:
    """``(feature_mean, feature_std)`` of a datamodule state dict, checked; None when it holds none."""
    if "feature_mean" not in state_dict or "feature_std" not in state_dict:
        return None
    mean = torch.as_tensor(state_dict["feature_mean"], dtype=torch.float32).cpu()
    std = torch.as_tensor(state_dict["feature_std"], dtype=torch.float32).cpu()
    if mean.ndim != 1 or mean.shape != std.shape:
        raise ValueError(
            f"feature_mean/feature_std must be 1-D of equal length, got shapes "
            f"{tuple(mean.shape)} and {tuple(std.shape)}"
        )
    if bool((std <= 0).any()):
        raise ValueError("feature_std in the state dict must be positive")
    return mean, std
