"""Checks of the inputs: NaN/inf values, and feature scales that saturate the first layer."""

from __future__ import annotations

from xentlit.callbacks.doctor.checks.base import Check, Doctor
from xentlit.callbacks.doctor.findings import Verdict, evidence
from xentlit.callbacks.doctor.observations import BatchStats, FirstStep


class NonFiniteInputs(Check):
    """A batch holds NaN/inf input values (a data problem that looks like divergence)."""

    code, severity, title, local = "non_finite_inputs", "error", "NaN/inf in the inputs", True

    def on_batch(self, doctor: Doctor, batch: BatchStats) -> Verdict | None:
        if batch.values.get("x_nonfinite", 0) <= 0:
            return None
        n, total = int(batch.values["x_nonfinite"]), int(batch.values["x_numel"])
        return Verdict(stage=batch.stage, evidence=evidence(
            non_finite_values=n, values_in_batch=total, fraction=n / max(total, 1)), message=(
            f"{n} of {total} input values in a {batch.stage} batch are NaN or inf: every logit, loss and gradient "
            "they touch becomes NaN, which looks like divergence but is a data problem. Fix: find and drop "
            "or impute the missing values before training (e.g. torch.nan_to_num, or fill with the training "
            "mean), and check the feature pipeline for divisions by zero or log(0)."))


class UnscaledInputs(Check):
    """Feature scales so large that the first layer's outputs are huge (judged on its response when it is known:
    category codes or pixel values of moderate scale are not a problem by themselves)."""

    code, severity, title, local = "unscaled_inputs", "warning", "unnormalised inputs saturate the first layer", True

    def on_first_step(self, doctor: Doctor, first: FirstStep) -> Verdict | None:
        stats = first.inputs
        if stats is None or stats.get("x_nonfinite", 0) != 0:
            return None
        scale = stats["x_feature_rms_max"]
        layer = first.first_layer
        preact = first.values.get("first_layer_rms")
        if preact is not None:
            fire = preact > doctor.settings.max_preactivation and scale > 10.0
        else:
            fire = scale > doctor.settings.max_input_scale
        if not fire:
            return None
        where = (f"the first layer ({layer}) outputs values of RMS {preact:.3g}" if preact is not None
                 else "the first layer receives them as they are")
        return Verdict(step=first.step, evidence=evidence(
            input_feature_rms_max=scale, input_abs_max=stats["x_abs_max"],
            input_feature_mean_abs_max=stats["x_feature_mean_abs_max"], first_layer=layer or "unknown",
            first_layer_output_rms=preact if preact is not None else "unknown"), message=(
            f"The inputs are not normalised: features reach an RMS of {scale:.3g} (largest |x| "
            f"{stats['x_abs_max']:.3g}) and {where}, so tanh/sigmoid units saturate, ReLU units die and "
            "the logits start huge. Fix: standardise the features with training-split statistics "
            "((x - mean) / std; xentlit's data modules do it with standardize=True), or put a "
            "normalisation layer (BatchNorm1d/LayerNorm) first."))
