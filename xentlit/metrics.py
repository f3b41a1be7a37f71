"""The module's metrics: which ones each stage tracks, computing them once per epoch, and lean torchmetrics
metrics for the per-step training path (in-place state updates, no host sync).

A torchmetrics ``Metric`` assigns its states with ``self.state += ...``, and every assignment goes through
``nn.Module.__setattr__``; ``MulticlassAccuracy`` also keeps five per-class counters. On a small network that is
a tenth of the step. These metrics update their states in place and keep only what they report; they sync under
DDP like any torchmetrics metric (sum states).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassF1Score,
    MulticlassRecall,
)


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


def stage_metrics(stage: str, num_classes: int, ignore_index: int, ece_bins: int) -> MetricCollection:
    """The metrics of ``stage`` (``"train"``, ``"val"`` or ``"test"``), their keys prefixed ``"{stage}/"``.

    Training tracks accuracy only, with a lean in-place counter, and receives the logits; evaluation tracks
    accuracy, macro-F1, balanced accuracy and ECE, and receives probabilities.
    """
    if stage == "train":
        return MetricCollection({"acc": RunningAccuracy(ignore_index=ignore_index)}, prefix="train/")
    common = {"num_classes": num_classes, "ignore_index": ignore_index, "validate_args": False}
    metrics: dict[str, Metric] = {
        "acc": MulticlassAccuracy(average="micro", **common),
        "f1_macro": MulticlassF1Score(average="macro", **common),
        "balanced_acc": MulticlassRecall(average="macro", **common),
        "ece": MulticlassCalibrationError(n_bins=ece_bins, **common),
    }
    return MetricCollection(metrics, prefix=f"{stage}/")


def compute_epoch_metrics(
    stage: str, loss: Metric, metrics: MetricCollection, nll: Metric | None = None
) -> dict[str, Tensor]:
    """``{"{stage}/loss": ..., **metrics, "{stage}/nll": ...}`` computed (synced across DDP ranks by torchmetrics)
    and reset; empty when nothing was updated this epoch."""
    if not loss.update_called:
        return {}
    values = {f"{stage}/loss": loss.compute(), **metrics.compute()}
    loss.reset()
    metrics.reset()
    if nll is not None:
        values[f"{stage}/nll"] = nll.compute()
        nll.reset()
    return values


def mean_nll(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(mean, rows)``: the plain cross-entropy of ``logits`` (no weights, smoothing or variant) over the rows
    not ignored, for a :class:`WeightedMean` (rows as the weight). Probability targets count every row."""
    rows = torch.tensor(len(target), device=target.device) if target.is_floating_point() else (
        target != ignore_index).sum()
    nll = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return nll / rows.clamp_min(1), rows
