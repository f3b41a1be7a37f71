"""The post-hoc step of a run: logits of whole splits, the calibrator fitted on the validation split, metrics
before and after, and the fitted calibrator written into a checkpoint file (atomically).

Used by the command line after training (`xentlit.cli`) and by ``eval``; the maths is `xentlit.calibration`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_recall

from xentlit.atomic import atomic_path
from xentlit.calibration import Calibrator, adjust_logits, calibration_metrics, log_priors

__all__ = ["CALIBRATOR_KEY", "adjusted_balanced_accuracy", "balanced_accuracy", "fit_calibration", "redraw_reliability",
           "split_logits", "store_calibrator", "test_report"]

CALIBRATOR_KEY = "calibrator"  # the module attribute (and state-dict prefix) holding the fitted calibrator


@torch.inference_mode()
def split_logits(module: nn.Module, dataset: Any, batch_size: int = 4096) -> tuple[Tensor, Tensor]:
    """The module's raw float32 logits (N, C) and hard targets (N,) for every row of a tensor dataset (``x``,
    ``y``: probabilities become their argmax), on the module's device, in eval mode."""
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    try:
        chunks = [module(dataset.x[i : i + batch_size].to(device)).float().cpu()
                  for i in range(0, len(dataset), batch_size)]
    finally:
        module.train(was_training)
    y = dataset.y.argmax(dim=1) if dataset.y.is_floating_point() else dataset.y.long()
    logits = torch.cat(chunks) if chunks else torch.zeros((0, 0))
    return logits, y.cpu()


def fit_calibration(module: nn.Module, datamodule: Any, ignore_index: int, n_bins: int = 15) -> dict[str, float]:
    """Fit ``module.calibrator`` on the validation split's logits and return NLL, ECE and Brier of the validation
    and test splits before and after (``calibration/<split>_<metric>_before|after``) and the fitted temperature.

    Raises ValueError when the validation split has no labelled rows (the calibrator is never fitted on the
    training split)."""
    calibrator: Calibrator = getattr(module, CALIBRATOR_KEY)
    val_logits, val_y = split_logits(module, datamodule.val_dataset)
    if not bool((val_y != ignore_index).any()):  # (False for an empty split too)
        raise ValueError(
            f"calibration={calibrator.method} is fitted on the validation split, which has no labelled rows here; "
            "use a data.val_fraction > 0, or calibration=none"
        )
    calibrator.fit(val_logits, val_y, ignore_index)
    metrics: dict[str, float] = {}
    splits = {"val": (val_logits, val_y), "test": split_logits(module, datamodule.test_dataset)}
    for split, (logits, y) in splits.items():
        if len(y) == 0:
            continue
        with torch.no_grad():
            after = calibration_metrics(calibrator(logits), y, ignore_index, n_bins)
        before = calibration_metrics(logits, y, ignore_index, n_bins)
        for name in before:
            metrics[f"calibration/{split}_{name}_before"] = before[name]
            metrics[f"calibration/{split}_{name}_after"] = after[name]
    if calibrator.method == "temperature":
        metrics["calibration/temperature"] = float(calibrator.temperature)
    return metrics


def test_report(module: nn.Module, dataset: Any, ignore_index: int, class_counts: Any = None,
                tau: float = 0.0) -> dict[str, float]:
    """What ``eval`` adds to the test metrics: NLL/ECE/Brier before and after the checkpoint's fitted calibrator,
    and with ``tau`` > 0 the balanced accuracy with and without post-hoc logit adjustment by the training priors."""
    logits, y = split_logits(module, dataset)
    metrics: dict[str, float] = {}
    calibrator: Calibrator = getattr(module, CALIBRATOR_KEY)
    if calibrator.fitted and len(y):
        with torch.no_grad():
            after = calibration_metrics(calibrator(logits), y, ignore_index)
        for name, value in calibration_metrics(logits, y, ignore_index).items():
            metrics[f"calibration/test_{name}_before"] = value
            metrics[f"calibration/test_{name}_after"] = after[name]
    if tau:
        if class_counts is None:
            raise ValueError("logit_adjustment needs the training class counts, which this checkpoint does not hold "
                             "(it was written before xentlit stored them): retrain, or use logit_adjustment=0")
        adjusted = adjusted_balanced_accuracy(logits, y, log_priors(class_counts), tau, ignore_index)
        metrics["test/balanced_acc"] = adjusted["balanced_acc"]
        metrics[f"test/balanced_acc_adjusted_tau{tau:g}"] = adjusted["balanced_acc_adjusted"]
    return metrics


def redraw_reliability(trainer: Any, module: nn.Module, datamodule: Any) -> None:
    """Redraw the run's test reliability diagram (if the plots callback drew one) with the calibrated points."""
    from xentlit.figures import plot_reliability, save_figure
    from xentlit.plots import PlotCallback

    plots = next((c for c in trainer.callbacks if isinstance(c, PlotCallback)), None)
    if plots is None or "reliability" not in plots.written:
        return
    logits, y = split_logits(module, datamodule.test_dataset)
    keep = y != module.ignore_index
    logits, y = logits[keep], y[keep]
    calibrator: Calibrator = getattr(module, CALIBRATOR_KEY)
    with torch.no_grad():
        raw, cal = logits.softmax(dim=1), calibrator(logits.double()).softmax(dim=1)
    raw_conf, raw_pred = raw.max(dim=1)
    cal_conf, cal_pred = cal.max(dim=1)
    fig = plot_reliability(raw_conf.numpy(), (raw_pred == y).numpy(), plots.n_bins,
                           calibrated=(cal_conf.numpy(), (cal_pred == y).numpy()),
                           calibrated_label=f"after {calibrator.method} scaling")
    save_figure(fig, plots.written["reliability"], dpi=plots.dpi)


def store_calibrator(path: str | Path, module: nn.Module) -> None:
    """Write the module's fitted calibrator buffers into the checkpoint at ``path`` (temp file, fsync, rename)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    prefix = f"{CALIBRATOR_KEY}."
    for name, value in getattr(module, CALIBRATOR_KEY).state_dict().items():
        checkpoint["state_dict"][prefix + name] = value.detach().cpu()
    with atomic_path(Path(path)) as tmp:
        torch.save(checkpoint, tmp)


def balanced_accuracy(logits: Tensor, target: Tensor, ignore_index: int = -100) -> float:
    """Mean per-class recall over the labelled rows, as the module's ``balanced_acc`` (torchmetrics' macro
    recall)."""
    return float(multiclass_recall(logits, target, num_classes=logits.shape[1], average="macro",
                                     ignore_index=ignore_index))


def adjusted_balanced_accuracy(logits: Tensor, target: Tensor, log_prior: Tensor, tau: float,
                               ignore_index: int = -100) -> dict[str, float]:
    """Balanced accuracy without and with post-hoc logit adjustment ``logits - tau * log prior``."""
    return {"balanced_acc": balanced_accuracy(logits, target, ignore_index),
            "balanced_acc_adjusted": balanced_accuracy(adjust_logits(logits, log_prior, tau), target, ignore_index)}
