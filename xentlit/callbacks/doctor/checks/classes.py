"""Checks of what the training targets cover: a class that never occurs, batches with every target ignored."""

from __future__ import annotations

import torch
from torch import Tensor

from xentlit.callbacks.doctor.checks.base import Check, Doctor, class_names
from xentlit.callbacks.doctor.findings import Verdict, evidence
from xentlit.callbacks.doctor.observations import TrainEpoch


class UnseenClass(Check):
    """A class of the model's outputs with no training target (from the datamodule's ``class_counts``, else
    counted over the first epoch)."""

    code, severity, title = "unseen_class", "warning", "a class never seen in the training split"

    def on_class_counts(self, doctor: Doctor, counts: Tensor, num_classes: int, source: str) -> Verdict | None:
        c = num_classes
        counts = counts.double().flatten().cpu()
        if counts.numel() < c:
            counts = torch.cat([counts, counts.new_zeros(c - counts.numel())])
        counts = counts[:c]
        if counts.sum() <= 0:
            return None
        missing = (counts == 0).nonzero().flatten().tolist()
        if not missing:
            return None
        names = class_names(doctor.trainer, missing)
        return Verdict(evidence=evidence(
            unseen_classes=missing, class_counts=counts.tolist(), num_classes=c, source=source), message=(
            f"Class(es) {names} never occur among the training targets (counts from {source}: "
            f"{[int(v) for v in counts.tolist()]}), but the model has {c} outputs: it can only learn never to "
            "predict them (their recall will be 0) and class-weight strategies give them the largest "
            "weight. Fix: check the label mapping and the split (stratify it), add examples of these "
            "classes, or drop them from num_classes/class_names."))


class AllIgnoredBatch(Check):
    """Training batches whose every target is the ignore index (no gradient, yet momentum moves the weights)."""

    code, severity, title = "all_ignored_batch", "warning", "training batches with every target ignored"

    def on_train_epoch(self, doctor: Doctor, epoch: TrainEpoch) -> Verdict | None:
        if not epoch.all_ignored > 0:
            return None
        ignore, labelled = doctor.state.ignore_index, epoch.labelled / max(epoch.rows, 1)
        n, batches = int(epoch.all_ignored), int(epoch.batches)
        return Verdict(evidence=evidence(
            batches_all_ignored=n, batches=batches, epoch=int(doctor.trainer.current_epoch),
            labelled_fraction=labelled, ignore_index=ignore), message=(
            f"{n} of {batches} training batches (summed over {epoch.world} rank(s)) had every "
            f"target equal to the ignore_index ({ignore}): they carry no gradient (xentlit's loss is 0 "
            "for them, a plain mean is NaN) yet still move momentum-based optimisers. Only "
            f"{100 * labelled:.3g}% of the training targets are labelled. Fix: drop unlabeled "
            "rows from the training loader (or sample them with labelled ones), use larger batches, and check "
            "that ignore_index matches how the data marks unlabeled rows."))
