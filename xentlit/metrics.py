"""Lean torchmetrics metrics for the per-step training path (in-place state updates, no host sync).

A torchmetrics ``Metric`` assigns its states with ``self.state += ...``, and every assignment goes through
``nn.Module.__setattr__``; ``MulticlassAccuracy`` also keeps five per-class counters. On a small network that is
a tenth of the step. These metrics update their states in place and keep only what they report; they sync under
DDP like any torchmetrics metric (sum states).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanMetric, Metric


class WeightedMean(MeanMetric):
    """Weighted running mean without a per-step NaN check (no host sync) that keeps its weights.

    torchmetrics' own ``nan_strategy="disable"`` replaces the weights by ones
    (Lightning-AI/torchmetrics#3434, fix pending in #3433); this keeps them.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(nan_strategy="disable", **kwargs)

    def update(self, value: Tensor | float, weight: Tensor | float | None = None) -> None:  # type: ignore[override]
        value = torch.as_tensor(value, device=self.device).to(self.dtype)
        weight = torch.ones_like(value) if weight is None else torch.as_tensor(weight, device=self.device).to(self.dtype)
        weight = torch.broadcast_to(weight, value.shape)
        self.mean_value.add_((value * weight).sum())
        self.weight.add_(weight.sum())


class RunningAccuracy(Metric):
    """Micro-averaged multiclass accuracy (``MulticlassAccuracy(average="micro")``'s value), for training.

    ``preds`` are logits or probabilities ``(N, C[, d1, ...])`` or class indices; ``target`` class indices,
    rows equal to ``ignore_index`` are not counted. 0 when nothing was counted (as torchmetrics).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, ignore_index: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        if preds.dim() == target.dim() + 1:
            preds = preds.argmax(dim=1)
        hit = preds == target
        if self.ignore_index is None:
            self.correct.add_(hit.sum())
            self.total.add_(target.numel())
        else:
            valid = target != self.ignore_index
            self.correct.add_((hit & valid).sum())
            self.total.add_(valid.sum())

    def compute(self) -> Tensor:
        return self.correct / self.total.clamp_min(1)
