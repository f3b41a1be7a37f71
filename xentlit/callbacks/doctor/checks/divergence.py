"""Divergence: a NaN/inf loss or gradient, a loss far above its initial value, an exploding gradient norm, or an
exception that says so. On divergence the doctor restores the last healthy weights and stops (``doctor.halt``)."""

from __future__ import annotations

import math
import re
from typing import Any

from xentlit.callbacks.doctor.checks.base import Check, Doctor, learning_rates
from xentlit.callbacks.doctor.findings import Verdict, evidence, num

_DIVERGENCE_TEXT = re.compile(r"non-finite|diverg|\bnan\b|\binf\b|overflow", re.IGNORECASE)
# codes that explain a failing batch's NaN/overflow error better than divergence does
_EXPLAINED_BY = ("non_finite_inputs", "target_out_of_range", "float_class_indices", "integer_one_hot_targets")


class Divergence(Check):
    """Per optimiser step: the loss limit is ``max(divergence_factor * reference, reference + 10 * scale)``, the
    reference being the first finite loss but at least the module's loss at uniform logits (a per-rank loss
    judges only a single process); the gradient norm explodes when it exceeds ``grad_explosion_factor`` times
    the reference norm two measurements in a row."""

    code, severity, title = "divergence", "error", "training diverged"

    def __init__(self) -> None:
        self.reference: float | None = None  # the initial loss the limit is relative to
        self.limit: float | None = None
        self.explode_streak = 0

    def on_step(self, doctor: Doctor, step: int, loss: float | None, grad_norm: float | None) -> Verdict | None:
        if grad_norm is None and loss is not None and self.limit is not None and loss <= self.limit:
            return None  # the common case: a finite loss below the limit, no gradient norm measured
        state = doctor.state
        reason = None
        found: dict[str, Any] = {"at_step": step}
        if loss is not None:
            found["batch_loss"] = loss
            if math.isfinite(loss):
                if self.reference is None:
                    scale = loss / state.module_loss0 if state.module_loss0 else 1.0
                    uniform = state.uniform_loss if state.uniform_loss is not None else 0.0
                    self.reference = max(loss, scale * uniform)
                    self.limit = (max(doctor.settings.divergence_factor * self.reference, self.reference + 10.0 * scale)
                                  if state.single else math.inf)
            elif state.single:
                reason = "the training loss became NaN/inf"
        if grad_norm is not None:
            found["grad_norm"] = grad_norm
            reference = state.grad_reference
            if math.isfinite(grad_norm):
                if reference and grad_norm > doctor.settings.grad_explosion_factor * reference:
                    self.explode_streak += 1
                    if self.explode_streak >= 2 and reason is None:
                        reason = (f"the gradient norm exploded to {grad_norm:.4g}, {grad_norm / reference:.3g}x "
                                  f"its value in the first steps ({reference:.4g})")
                        found["reference_grad_norm"] = reference
                else:
                    self.explode_streak = 0
            elif getattr(doctor.trainer.precision_plugin, "scaler", None) is None and reason is None:
                reason = "the gradient norm became NaN/inf"  # (a GradScaler skips such steps itself)
        if (reason is None and state.single and loss is not None and math.isfinite(loss)
                and self.limit is not None and loss > self.limit):
            reason = (f"the batch loss ({loss:.4g}) rose above {doctor.settings.divergence_factor:g}x its initial "
                      f"value ({self.reference:.4g})")
            found["initial_loss"] = self.reference
        return None if reason is None else self.diverged(doctor, reason, evidence(**found), step)

    def on_exception(self, doctor: Doctor, exception: BaseException, stage: str, step: int,
                     shown: list[str]) -> Verdict | None:
        if (any(code in _EXPLAINED_BY for code in shown) or not _DIVERGENCE_TEXT.search(str(exception))
                or doctor.has(self.code)):
            return None
        last = doctor.state.last_loss
        return self.diverged(doctor, f"{type(exception).__name__}: {exception}",
                             evidence(at_step=step, last_finite_train_loss="n/a" if last is None else last),
                             step, stop=False)

    def diverged(self, doctor: Doctor, reason: str, found: dict[str, Any], step: int, stop: bool = True) -> Verdict:
        """Halt training (restore the last healthy weights, as configured) and say what to change."""
        trainer = doctor.trainer
        lrs = learning_rates(trainer)
        found = {**found, "lr": [num(v) for v in lrs] if len(lrs) > 1 else num(lrs[0]) if lrs else "n/a"}
        restored = doctor.halt(stop)
        found["restored_weights_from_step"] = restored if restored is not None else "none"
        clip = trainer.gradient_clip_val
        lr_text = f"{lrs[0]:g}" if len(lrs) == 1 else (str(lrs) if lrs else "the learning rate")
        action = ""
        if doctor.settings.stop_on_divergence:
            if restored is None:
                action = " Training was stopped."
            else:
                which = ("the initial weights" if restored == 0 else
                         f"the weights of step {restored} (the last healthy epoch boundary)")
                action = (f" Training was stopped and {which} restored, so checkpoints written from now on hold "
                          "finite weights.")
        return Verdict(step=step, evidence=found, message=(
            f"Training diverged at step {step}: {reason}.{action} "
            f"Fix: lower the learning rate (now {lr_text}; try 10x lower), clip gradients "
            f"(Trainer(gradient_clip_val=1.0){'' if not clip else f', now {clip}'}), add a warm-up, "
            "and check the inputs for extreme values."))
