"""Checks of the untrained model's outputs (first training step): probabilities instead of logits, and an
initial loss far above that of uniform predictions."""

from __future__ import annotations

import math

from xentlit.callbacks.doctor.checks.base import Check, Doctor
from xentlit.callbacks.doctor.findings import Verdict, evidence
from xentlit.callbacks.doctor.observations import FirstStep


class SoftmaxBeforeLoss(Check):
    """Every output in [0, 1] and every row summing to 1: the model returns probabilities."""

    code, severity, title, local = ("softmax_before_loss", "error",
                                    "probabilities passed to the loss instead of logits", True)

    def on_first_step(self, doctor: Doctor, first: FirstStep) -> Verdict | None:
        v, c = first.values, first.num_classes
        if not (c >= 2 and v["min"] >= -1e-6 and v["max"] <= 1 + 1e-6 and v["row_dev"] <= 1e-3):
            return None
        floor = math.log(c - 1 + math.e) - 1.0  # the loss of one-hot "logits": the best it can do
        return Verdict(step=first.step, evidence=evidence(
            output_min=v["min"], output_max=v["max"], max_row_sum_deviation=v["row_dev"],
            num_classes=c, loss_floor=floor), message=(
            f"The model's outputs are probabilities, not logits: every value lies in [0, 1] "
            f"(min {v['min']:.3g}, max {v['max']:.3g}) and every row sums to 1. Cross-entropy applies "
            "log-softmax itself, so a softmax before it squashes the logits into [0, 1]: the loss can never "
            f"go below ln(C - 1 + e) - 1 = {floor:.3g} (C={c}) and the gradients vanish. Fix: return raw "
            "logits from forward()/the last layer (remove the final softmax / nn.Softmax); apply softmax only "
            "at prediction time."))


class InitialLoss(Check):
    """The untrained model's loss far above the module's own loss at uniform logits (which includes its label
    smoothing and class weights): more than ``max(1, expected / 2)`` above it."""

    code, severity, title, local = ("initial_loss", "warning",
                                    "initial loss far above that of an untrained model", True)

    def on_first_step(self, doctor: Doctor, first: FirstStep) -> Verdict | None:
        observed, expected, v, c = first.observed_loss, first.expected_loss, first.values, first.num_classes
        if observed is None or not math.isfinite(expected) or doctor.has("softmax_before_loss"):
            return None  # (a softmax before the loss is the root cause of its odd initial loss)
        tolerance = max(1.0, 0.5 * abs(expected))
        if math.isfinite(observed) and observed <= expected + tolerance:
            return None
        ln_c = math.log(c)
        return Verdict(step=first.step, evidence=evidence(
            initial_loss=observed, expected_loss=expected, ln_num_classes=ln_c,
            logit_std=v["spread"], logit_min=v["min"], logit_max=v["max"]), message=(
            f"The initial loss is {observed:.4g}, far above {expected:.4g}, the loss of uniform "
            f"predictions for this loss and batch (ln C = {ln_c:.4g} for C={c}, with its label smoothing "
            f"and class weights): the untrained model is already confidently wrong (logits spread "
            f"{v['spread']:.3g} per row, in [{v['min']:.3g}, {v['max']:.3g}]). Fix: initialise "
            "the output layer with small weights and a zero bias, make sure nothing scales the logits "
            "(a temperature below 1, an extra multiplication), and normalise the inputs."))
