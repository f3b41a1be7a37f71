"""How the doctor reads any LightningModule: its step outputs, its batches, its number of classes and ignore
index, and the datamodule's class counts (see :mod:`xentlit.callbacks.doctor` for the contract)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor


def step_outputs(outputs: Any, logits_key: str, target_key: str,
                 loss_key: str) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(logits, target, loss)`` of a step's output dict, detached; logits and target are ``None`` unless both
    are tensors (logits at least 2-d); a bare tensor output is the loss."""
    if not isinstance(outputs, Mapping):
        return None, None, outputs if isinstance(outputs, Tensor) else None
    logits, target, loss = (outputs.get(k) for k in (logits_key, target_key, loss_key))
    ok = isinstance(logits, Tensor) and logits.dim() >= 2 and isinstance(target, Tensor)
    if not ok:
        logits = target = None
    elif logits.requires_grad or target.requires_grad:
        logits, target = logits.detach(), target.detach()
    if not isinstance(loss, Tensor):
        loss = None
    elif loss.requires_grad:
        loss = loss.detach()
    return logits, target, loss


def unpack(pl_module: pl.LightningModule, batch: Any, input_key: str, target_key: str) -> tuple[Any, Any]:
    """Inputs and targets of a batch: ``pl_module.unpack_batch(batch)`` when it has one, else
    ``batch[input_key]``/``batch[target_key]`` of a dict batch, else ``batch[0]``/``batch[1]``."""
    fn = getattr(pl_module, "unpack_batch", None)
    if callable(fn):
        try:
            x, y = fn(batch)
            return x, y
        except Exception:
            pass
    if isinstance(batch, Mapping):
        return batch.get(input_key), batch.get(target_key)
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    return None, None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def known_num_classes(trainer: pl.Trainer, pl_module: pl.LightningModule, configured: int | None) -> int | None:
    """The number of classes before any logits are seen: ``configured``, else the module's, its hyperparameters'
    or the datamodule's ``num_classes`` (at least 2)."""
    if configured is not None:
        return int(configured)
    for owner in (pl_module, getattr(pl_module, "hparams", None), getattr(trainer, "datamodule", None)):
        try:
            value = _int(getattr(owner, "num_classes", None)) if owner is not None else None
        except Exception:  # a datamodule property that cannot be computed
            value = None
        if value is not None and value >= 2:
            return value
    return None


def resolve_ignore_index(pl_module: pl.LightningModule, configured: int | None) -> int:
    """``configured``, else the module's ``ignore_index``, else -100."""
    if configured is not None:
        return int(configured)
    value = _int(getattr(pl_module, "ignore_index", None))
    return value if value is not None else -100


def datamodule_class_counts(trainer: pl.Trainer) -> Tensor | None:
    """The datamodule's ``class_counts`` of the training split (CPU, float64), if it has them."""
    try:
        counts = getattr(trainer.datamodule, "class_counts", None) if trainer.datamodule is not None else None
        return torch.as_tensor(counts, dtype=torch.float64).flatten().cpu() if counts is not None else None
    except Exception:
        return None
