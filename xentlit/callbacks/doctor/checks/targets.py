"""Checks of the targets' format, from the raw batch: indices out of range, float indices, one-hot rows."""

from __future__ import annotations

from xentlit.callbacks.doctor.checks.base import Check, Doctor
from xentlit.callbacks.doctor.findings import Verdict, evidence
from xentlit.callbacks.doctor.observations import BatchStats


class TargetOutOfRange(Check):
    """Class indices outside ``[0, C)`` that are not the ignore index; the hint names the likely cause."""

    code, severity, title, local = "target_out_of_range", "error", "class indices outside [0, C)", True

    def on_batch(self, doctor: Doctor, batch: BatchStats) -> Verdict | None:
        v = batch.values
        if batch.target_kind != "index" or v.get("y_one_hot", 0) > 0 or not v["y_bad"] > 0:
            return None
        c, ignore = batch.num_classes, batch.ignore_index
        vmin, vmax = int(v["y_min"]), int(v["y_max"])
        if c is not None and vmin >= 1 and vmax == c:
            hint = (f"the labels look 1-based ({vmin}..{vmax}) while classes are numbered 0..{c - 1}: "
                    "subtract 1 from every label")
        elif vmin < 0:
            hint = (f"negative labels (smallest {vmin}) are not the ignore_index ({ignore}): mark "
                    f"unlabeled rows with ignore_index={ignore}, or set ignore_index={vmin}")
        else:
            hint = (f"the model has {c} outputs but the labels go up to {vmax}: build the network with "
                    f"num_classes={vmax + 1} (or remap the labels to 0..{c - 1})")
        return Verdict(stage=batch.stage, evidence=evidence(
            bad_targets=int(v["y_bad"]), labelled_targets=int(v["y_valid"]), min=vmin, max=vmax,
            num_classes=c if c is not None else "unknown", ignore_index=ignore), message=(
            f"{int(v['y_bad'])} of {int(v['y_valid'])} {batch.stage} targets are outside [0, "
            f"{c if c is not None else 'C'}) and not the ignore_index ({ignore}): cross-entropy fails on "
            f"them (on a GPU with an opaque device-side assert). Fix: {hint}."))


class FloatClassIndices(Check):
    """A float vector of whole numbers: class indices stored as floats."""

    code, severity, title, local = "float_class_indices", "error", "class indices stored as floats", True

    def on_batch(self, doctor: Doctor, batch: BatchStats) -> Verdict | None:
        v = batch.values
        if batch.target_kind != "float_1d" or not v["y_whole"] > 0:
            return None
        dtype, shape = batch.target_dtype, batch.target_shape
        return Verdict(stage=batch.stage, evidence=evidence(
            dtype=str(dtype), shape=shape, min=v["y_min"], max=v["y_max"]), message=(
            f"The {batch.stage} targets are class indices stored as {dtype} (shape {shape}, whole numbers "
            f"{v['y_min']:g}..{v['y_max']:g}): cross-entropy reads float targets as probabilities, "
            "so a float vector of indices is rejected (or misread). Fix: convert the labels to int64 "
            "class indices in the dataset (y.long()), not float."))


class FloatOneHotTargets(Check):
    """Float ``(N, C)`` rows of zeros and a single one: probability targets where class indices were meant."""

    code, severity, title, local = ("float_one_hot_targets", "warning",
                                    "float one-hot targets where class indices were meant", True)

    def on_batch(self, doctor: Doctor, batch: BatchStats) -> Verdict | None:
        if batch.target_kind != "float_2d" or not batch.values["y_one_hot"] > 0:
            return None
        width, dtype, shape = int(batch.values["y_width"]), batch.target_dtype, batch.target_shape
        return Verdict(stage=batch.stage, evidence=evidence(dtype=str(dtype), shape=shape, width=width), message=(
            f"The {batch.stage} targets are float one-hot rows (shape {shape}, dtype {dtype}) where class "
            "indices were meant: the loss treats them as probability targets, so ignore_index cannot mark "
            "unlabeled rows, class weights are normalised per row instead of by the weight sum, and the "
            f"targets take {width}x the memory. Fix: pass int64 class indices (y.argmax(dim=1)), and keep "
            "float targets for genuinely soft labels (label smoothing is an option of the loss)."))


class IntegerOneHotTargets(Check):
    """Integer ``(N, C)`` one-hot rows where class indices ``(N,)`` were meant."""

    code, severity, title, local = ("integer_one_hot_targets", "error",
                                    "integer one-hot targets instead of class indices", True)

    def on_batch(self, doctor: Doctor, batch: BatchStats) -> Verdict | None:
        if batch.target_kind != "index" or not batch.values.get("y_one_hot", 0) > 0:
            return None
        shape = batch.target_shape
        return Verdict(stage=batch.stage, evidence=evidence(dtype=str(batch.target_dtype), shape=shape), message=(
            f"The {batch.stage} targets are integer one-hot rows (shape {shape}) instead of class indices "
            f"of shape ({shape[0]},): cross-entropy reads each 0/1 entry as a class index. Fix: pass "
            "y.argmax(dim=1) (int64 class indices)."))
