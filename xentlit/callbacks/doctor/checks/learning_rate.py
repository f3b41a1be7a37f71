"""Learning rate too low: the loss stays flat near its initial value while the gradients are healthy and the
weights barely move."""

from __future__ import annotations

import math

from xentlit.callbacks.doctor.checks.base import Check, Doctor, learning_rates
from xentlit.callbacks.doctor.findings import Verdict, evidence
from xentlit.callbacks.doctor.observations import TrainEpoch


class LearningRateTooLow(Check):
    """Over the last ``window`` epochs the training loss moves by at most 1% of its mean (flat) and stays at or
    above 90% of the initial loss (stuck), the gradient norms are healthy (finite, > 1e-6 and > 1e-3 times the
    reference) and, with ``keep_last_good``, the weights moved less than 1e-3 (relative) over the last epoch
    (measured, one CPU difference of two snapshots, only once the loss looks stuck)."""

    code, severity, title = "lr_too_low", "warning", "learning rate too low"

    def on_train_epoch(self, doctor: Doctor, epoch: TrainEpoch) -> Verdict | None:
        w, state = doctor.settings.window, doctor.state
        hist = state.train_history
        if len(hist) < w or doctor.has(self.code, "softmax_before_loss", "divergence") or state.stopped:
            return None
        key, initial = "train_nll", state.initial_nll
        if not all(math.isfinite(h["train_nll"]) for h in hist[-w:]):  # no logits: the module's own loss
            key, initial = "train_loss", state.module_loss0 if state.module_loss0 is not None else state.last_loss
        recent = [h[key] for h in hist[-w:]]
        if not all(math.isfinite(v) for v in recent):
            return None
        if initial is None or not math.isfinite(initial):
            initial = hist[0][key]
        mean = sum(recent) / w
        flat = (max(recent) - min(recent)) <= 0.01 * mean
        stuck = recent[-1] >= 0.9 * initial
        grads = [h["grad_norm"] for h in hist[-w:] if not math.isnan(h["grad_norm"])]
        healthy = bool(grads) and all(math.isfinite(g) and g > 1e-6 for g in grads) and (
            state.grad_reference is None or min(grads) > 1e-3 * state.grad_reference)
        if not (flat and stuck and healthy):
            return None
        changes: list[float] = []
        if doctor.settings.keep_last_good:
            # Distinguish "too low" from "no signal / too high": how far did the weights move in an epoch?
            change = hist[-1].get("weight_change")
            if change is None:
                doctor.measure_weight_change()
                return None
            changes = [change]
        if changes and not max(changes) < 1e-3:
            return None
        lrs = learning_rates(doctor.trainer)
        lr_text = ", ".join(f"{v:g}" for v in lrs) or "?"
        return Verdict(evidence=evidence(
            train_loss_last_epochs=recent, initial_loss=initial, grad_norm_last_epochs=grads,
            weight_change_per_epoch=changes if changes else "unknown", lr=lrs[0] if len(lrs) == 1 else lr_text),
            message=(
            f"The training loss has stayed flat at {recent[-1]:.4g} (initial {initial:.4g}) for {w} epochs "
            f"while the gradients are healthy (mean norm {grads[-1]:.3g})"
            + (f" and the weights barely move ({max(changes):.2g} relative change per epoch)" if changes else "")
            + f": the learning rate ({lr_text}) is too low. Fix: raise it by 10-1000x (about 1e-3 for "
            "Adam/AdamW, 0.01-0.1 for SGD with momentum), or run a learning-rate range test "
            "(lightning.pytorch.tuner.Tuner(trainer).lr_find(model))."))
