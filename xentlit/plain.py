"""Plain data for checkpoints: what ``torch.load(weights_only=True)`` reads back without running any code.

Hydra hands constructors ``ListConfig``/``DictConfig`` values, users' own ``load()`` may return numpy strings and
scalars; pickled into a checkpoint, each of those makes ``weights_only`` loading refuse the whole file. Everything
xentlit stores goes through :func:`to_plain` first.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import numpy as np
import torch

__all__ = ["to_plain", "make_hparams_plain"]


def to_plain(value: Any) -> Any:
    """``value`` with containers as dict/list and scalars as Python's own types (tensors kept, on the CPU)."""
    from omegaconf import Container, OmegaConf

    if isinstance(value, Container):
        return to_plain(OmegaConf.to_container(value, resolve=True))
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (np.generic, np.ndarray)):
        return to_plain(value.tolist())
    if isinstance(value, (str, PurePath)):  # str subclasses (np.str_) and paths
        return str(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):  # int subclasses (IntEnum)
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k) if not isinstance(k, (int, float, bool)) else k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_plain(v) for v in value]
    return value


def make_hparams_plain(owner: Any) -> None:
    """Turn the hyperparameters Lightning recorded for ``owner`` (module or datamodule) into plain data, so its
    checkpoints load with ``weights_only=True`` whatever containers the caller passed."""
    for name in ("_hparams", "_hparams_initial"):
        hparams = getattr(owner, name, None)
        if hparams is not None:
            for key in list(hparams):
                hparams[key] = to_plain(hparams[key])
