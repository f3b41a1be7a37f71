"""What the doctor gathers and hands to the checks: the fit's running state and one observation per moment."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

GRAD_REFERENCE_STEPS = 5  # the gradient-norm reference is the median of this many first measurements


@dataclass
class FitState:
    """What the doctor knows about the current fit (made anew at every fit); the checks read it.

    The per-step values (loss, gradient norm) are added by :meth:`add_step`: epoch totals, the last finite loss
    and the reference gradient norm.
    """

    ignore_index: int = -100
    single: bool = True  # one process: a rank's own loss may stop training
    num_classes: int | None = None  # the logits' width, from the first training step on
    initial_nll: float | None = None  # plain NLL of the first training step's logits
    module_loss0: float | None = None  # the module's own loss on the first training step
    uniform_loss: float | None = None  # the module's loss at uniform logits on the first step (else ln C)
    last_loss: float | None = None  # the last finite per-step training loss
    grad_reference: float | None = None  # median norm of the first measured gradients
    stopped: bool = False  # training was stopped on divergence
    train_counts: list[float] | None = None  # training class counts summed over the epochs so far
    epochs_seen: int = 0
    steps_seen: int = 0
    train_history: list[dict[str, float]] = field(default_factory=list)
    val_history: list[dict[str, float]] = field(default_factory=list)
    grad_history: list[float] = field(default_factory=list)
    epoch_loss: list[float] = field(default_factory=lambda: [0.0, 0])  # sum, count
    epoch_grad: list[float] = field(default_factory=lambda: [0.0, 0, 0.0])  # sum, count, max

    def add_step(self, loss: float | None, grad_norm: float | None) -> None:
        """Count one optimiser step's loss and (when measured) gradient norm."""
        if loss is not None:
            self.epoch_loss[0] += loss
            self.epoch_loss[1] += 1
            if math.isfinite(loss):
                self.last_loss = loss
        if grad_norm is not None and math.isfinite(grad_norm):
            grads = self.epoch_grad
            grads[0] += grad_norm
            grads[1] += 1
            grads[2] = max(grads[2], grad_norm)
            if len(self.grad_history) < GRAD_REFERENCE_STEPS:  # provisional until there are 5
                self.grad_history.append(grad_norm)
                ordered = sorted(self.grad_history)
                self.grad_reference = ordered[(len(ordered) - 1) // 2]

    def start_epoch(self) -> None:
        self.epoch_loss = [0.0, 0]
        self.epoch_grad = [0.0, 0, 0.0]

    def add_first_step(self, first: FirstStep) -> None:
        """The references the first training step sets: number of classes, initial and uniform losses."""
        self.num_classes = first.num_classes
        if first.nll is not None and math.isfinite(first.nll):
            self.initial_nll = first.nll
        if first.observed_loss is not None and math.isfinite(first.observed_loss) and first.observed_loss > 0:
            self.module_loss0 = first.observed_loss
        expected = first.expected_loss
        self.uniform_loss = expected if math.isfinite(expected) else math.log(first.num_classes)

    def add_class_counts(self, counts: list[float]) -> None:
        """Add an epoch's training class counts."""
        self.train_counts = counts if self.train_counts is None else [a + b for a, b in zip(self.train_counts, counts)]


@dataclass
class BatchStats:
    """Inputs and targets of a raw batch (before the forward pass): ``values`` holds ``x_nonfinite``,
    ``x_abs_max``, ``x_feature_rms_max``, ``x_feature_mean_abs_max``, ``x_numel`` for floating inputs, and per
    target kind (``"float_1d"``, ``"float_2d"``, ``"index"``) ``y_whole``/``y_min``/``y_max``, ``y_one_hot``/
    ``y_width``, or ``y_bad``/``y_valid``/``y_min``/``y_max`` (and ``y_one_hot`` for 2-d indices)."""

    stage: str
    values: dict[str, float]
    target_kind: str | None
    target_dtype: Any
    target_shape: list[int]
    num_classes: int | None
    ignore_index: int


@dataclass
class FirstStep:
    """The first training step's logits: ``values`` holds ``min``, ``max``, ``row_dev`` (largest deviation of a
    row sum from 1), ``spread`` (mean per-row std) and, when known, ``first_layer_rms``."""

    step: int
    num_classes: int
    values: dict[str, float]
    nll: float | None  # plain NLL of the step's targets
    observed_loss: float | None  # the module's loss (else the plain NLL)
    expected_loss: float  # the module's loss at uniform logits (else ln C)
    inputs: dict[str, float] | None  # the first training batch's BatchStats values
    first_layer: str | None  # the first layer with weights that ran


@dataclass
class TrainEpoch:
    """A training epoch, summed over ranks: its history record, rows, optimiser batches, labelled targets and
    batches without any."""

    record: dict[str, float]
    rows: float
    batches: float
    labelled: float
    all_ignored: float
    world: int


@dataclass
class ValEpoch:
    """A validation run, summed over ranks: its history record, per-class true positives, predictions and
    targets, and the training class counts so far."""

    record: dict[str, float]
    true_positives: list[float]
    predicted: list[float]
    targets: list[float]
    train_counts: list[float]
