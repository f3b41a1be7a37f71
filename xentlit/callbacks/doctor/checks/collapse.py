"""Majority collapse: the validation predictions concentrate on the training majority class while macro-F1 stays
at chance level."""

from __future__ import annotations

from typing import Any

from xentlit.callbacks.doctor.checks.base import Check, Doctor, class_names
from xentlit.callbacks.doctor.findings import Verdict, evidence
from xentlit.callbacks.doctor.observations import ValEpoch


class MajorityCollapse(Check):
    """Collapsed in a validation run: the training classes are imbalanced (>= 3:1), the most predicted class is
    the training majority, it takes >= 50% of the predictions and >= 1.5x its true share, and macro-F1 is no more
    than 0.05 above that of chance predictions with the same class frequencies. Reported after ``window``
    collapsed runs in a row, or at the end of ``fit`` if the last runs collapsed."""

    code, severity, title = "majority_collapse", "warning", "predictions collapsed onto the majority class"

    def __init__(self) -> None:
        self.streak = 0  # consecutive collapsed validation runs
        self.last: dict[str, Any] | None = None  # the evidence of the last one

    def on_validation(self, doctor: Doctor, val: ValEpoch) -> Verdict | None:
        if doctor.has(self.code):
            return None
        collapse = self.collapsed(val)
        if collapse is None:
            self.streak, self.last = 0, None
            return None
        self.streak += 1
        self.last = {**collapse, "consecutive_epochs": self.streak}
        return self.verdict(doctor) if self.streak >= doctor.settings.window else None

    def on_fit_end(self, doctor: Doctor) -> Verdict | None:
        return self.verdict(doctor) if self.streak > 0 and not doctor.has(self.code) else None

    @staticmethod
    def collapsed(val: ValEpoch) -> dict[str, Any] | None:
        """The evidence of a collapse in this validation run, or ``None``."""
        tp, pred, tgt = val.true_positives, val.predicted, val.targets
        c, n = len(tgt), sum(tgt)
        tc = (list(val.train_counts) + [0.0] * c)[:c]
        if n <= 0 or len(tc) < c or sum(tc) <= 0:
            return None
        nonzero = [v for v in tc if v > 0]
        imbalance = max(tc) / min(nonzero)
        share = [v / n for v in pred]
        prior = [v / n for v in tgt]
        top = max(range(c), key=share.__getitem__)
        present = [i for i in range(c) if tgt[i] > 0 or pred[i] > 0]
        macro_f1 = sum(2 * tp[i] / (tgt[i] + pred[i]) for i in present) / max(len(present), 1)
        # macro-F1 of predictions drawn independently of the truth with the same class frequencies
        chance_f1 = sum(2 * prior[i] * share[i] / (prior[i] + share[i]) for i in present) / max(len(present), 1)
        if not (imbalance >= 3.0 and top == max(range(c), key=tc.__getitem__) and share[top] >= 0.5
                and share[top] >= 1.5 * prior[top] and macro_f1 <= chance_f1 + 0.05):
            return None
        return dict(majority_class=top, predicted_share=share[top], true_share=prior[top], macro_f1=macro_f1,
                    chance_macro_f1=chance_f1, train_imbalance_ratio=imbalance, train_majority_share=tc[top] / sum(tc))

    def verdict(self, doctor: Doctor) -> Verdict | None:
        ev = self.last
        if ev is None:
            return None
        names = class_names(doctor.trainer, [ev["majority_class"]])
        return Verdict(stage="val", evidence=evidence(**ev), message=(
            f"Predictions have collapsed onto the majority class {names}: it receives "
            f"{100 * ev['predicted_share']:.3g}% of the val predictions (its true share there is "
            f"{100 * ev['true_share']:.3g}%) and macro-F1 is {ev['macro_f1']:.3g}, at chance level "
            f"({ev['chance_macro_f1']:.3g}), for {ev['consecutive_epochs']} epoch(s); the training classes are "
            f"imbalanced {ev['train_imbalance_ratio']:.3g}:1. Fix: weight the loss by class "
            "(CrossEntropyLoss(class_weights='balanced' or 'effective_number')), use a focal loss or logit "
            "adjustment (subtract tau * log prior from the logits during training), or resample the classes."))
