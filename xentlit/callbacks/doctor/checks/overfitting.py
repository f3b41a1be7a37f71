"""Overconfidence: overfitting that shows in calibration, the validation loss and its overconfident calibration
error growing while the training loss falls."""

from __future__ import annotations

import math

from xentlit.callbacks.doctor.checks.base import Check, Doctor
from xentlit.callbacks.doctor.checks.collapse import MajorityCollapse
from xentlit.callbacks.doctor.findings import Verdict, evidence
from xentlit.callbacks.doctor.observations import ValEpoch


class Overconfidence(Check):
    """Since its best validation run (at least two runs ago, 5% below the first) the validation NLL rose to at
    least ``max(1.2 x best, best + 0.05)`` while the training NLL fell to at most 0.8x its value then, and the
    overconfident part of the calibration error is >= 0.05 and grew by >= 0.03. Not judged while predictions
    collapse (that is the problem then) or after a divergence."""

    code, severity, title = "overconfidence", "warning", "overfitting: validation loss and overconfidence grow"

    def on_validation(self, doctor: Doctor, val: ValEpoch) -> Verdict | None:
        hist = doctor.state.val_history
        if (doctor.has(self.code, "divergence", "majority_collapse") or doctor.check(MajorityCollapse).streak > 0
                or len(hist) < doctor.settings.window):
            return None
        best_i = min(range(len(hist)), key=lambda i: hist[i]["val_nll"])
        best, now, first = hist[best_i], hist[-1], hist[0]
        # Overfitting: the validation loss first improved, then rose for at least two epochs while the
        # training loss kept falling (a validation loss that never improved is a distribution problem instead).
        if best_i == 0 or best["val_nll"] > 0.95 * first["val_nll"] or len(hist) - 1 - best_i < 2:
            return None
        rising = now["val_nll"] >= max(1.2 * best["val_nll"], best["val_nll"] + 0.05)
        falling = math.isfinite(now["train_nll"]) and now["train_nll"] <= 0.8 * best["train_nll"]
        # Calibration: the overconfident part of the calibration error (bins whose confidence exceeds their
        # accuracy) grew, so confidence, not just the loss, went wrong.
        overconfident = now["val_ece_over"] >= 0.05 and now["val_ece_over"] >= best["val_ece_over"] + 0.03
        if not (rising and falling and overconfident):
            return None
        return Verdict(stage="val", evidence=evidence(
            best_epoch=best["epoch"], val_loss_best=best["val_nll"], val_loss_now=now["val_nll"],
            train_loss_at_best=best["train_nll"], train_loss_now=now["train_nll"],
            val_overconfidence_error_best=best["val_ece_over"], val_overconfidence_error_now=now["val_ece_over"],
            val_ece_now=now["val_ece"], val_confidence_now=now["val_conf"], val_accuracy_now=now["val_acc"]),
            message=(
            f"The model is overfitting and becoming overconfident: since epoch {best['epoch']} the training "
            f"loss fell from {best['train_nll']:.3g} to {now['train_nll']:.3g} while the validation loss rose "
            f"from {best['val_nll']:.3g} to {now['val_nll']:.3g}, and the overconfident part of the validation "
            f"calibration error grew from {best['val_ece_over']:.3g} to {now['val_ece_over']:.3g} (mean "
            f"confidence {now['val_conf']:.3g} vs accuracy {now['val_acc']:.3g}). Fix: add label smoothing "
            "(CrossEntropyLoss(label_smoothing=0.1)), weight decay (AdamW), dropout or more data, and stop "
            f"early on val/loss (EarlyStopping), keeping the best checkpoint (epoch {best['epoch']})."))
