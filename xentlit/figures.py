"""Figures of a run: learning curves, confusion matrix, reliability diagram, per-class precision/recall.

Plain arrays in, a :class:`matplotlib.figure.Figure` out. They use the Agg canvas directly and never touch
``pyplot``, so importing or calling them leaves a notebook's backend and its current figure alone. Save one with
:func:`save_figure`. :class:`xentlit.plots.PlotCallback` feeds them from a Lightning run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torchmetrics.functional.classification import binary_calibration_error

from xentlit.atomic import atomic_path

__all__ = [
    "DEFAULT_CURVES",
    "FIGURES",
    "figure_to_array",
    "new_figure",
    "plot_confusion_matrix",
    "plot_curves",
    "plot_per_class",
    "plot_reliability",
    "reliability_bins",
    "save_figure",
]

#: The figure names, which are also the PNG file stems and the TensorBoard tags ``plots/<name>``.
FIGURES = ("curves", "confusion_matrix", "reliability", "per_class")

#: Panel title -> the ``callback_metrics`` keys drawn in it.
DEFAULT_CURVES: dict[str, tuple[str, ...]] = {
    "loss": ("train/loss", "val/loss"),
    "accuracy": ("train/acc", "val/acc"),
}

# Above this many classes the axes show every k-th class name only (k chosen to keep about this many).
_MAX_TICK_LABELS = 50


# ------------------------------------------------------------------------------------------- helpers
def new_figure(width: float, height: float) -> Figure:
    """A figure with an Agg canvas and constrained layout (labels are never clipped); no pyplot state."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically (parent folders created) and return the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", facecolor="white")
    return path


def figure_to_array(fig: Figure, dpi: int = 120) -> np.ndarray:
    """Render ``fig`` to an ``(H, W, 3)`` uint8 RGB array (what ``add_image(..., dataformats="HWC")`` takes)."""
    canvas = FigureCanvasAgg(fig)
    original = fig.get_dpi()
    fig.set_dpi(dpi)
    try:
        canvas.draw()
        rgba = np.asarray(canvas.buffer_rgba())
        return np.ascontiguousarray(rgba[..., :3])
    finally:
        fig.set_dpi(original)


def _class_labels(class_names: Sequence[Any] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"got {len(names)} class names for {num_classes} classes")
    return names


def _tick_indices(num_classes: int) -> np.ndarray:
    step = max(1, math.ceil(num_classes / _MAX_TICK_LABELS))
    return np.arange(0, num_classes, step)


def _tick_fontsize(num_classes: int) -> float:
    return float(np.clip(10.0 - (num_classes - 20) / 10.0, 6.0, 10.0))


def _set_class_ticks(ax: Any, axis: str, names: list[str], num_classes: int) -> None:
    ticks = _tick_indices(num_classes)
    labels = [names[i] for i in ticks]
    size = _tick_fontsize(len(ticks))
    if axis == "y":
        ax.set_yticks(ticks, labels, fontsize=size)
        return
    longest = max((len(n) for n in labels), default=0)
    if longest <= 2 or (longest <= 4 and len(ticks) <= 12):
        ax.set_xticks(ticks, labels, fontsize=size)
    elif len(ticks) <= 20:
        ax.set_xticks(ticks, labels, fontsize=size, rotation=45, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(ticks, labels, fontsize=size, rotation=90)


# ------------------------------------------------------------------------------------ figure functions
def plot_curves(
    history: Mapping[str, Sequence[float]],
    epochs: Mapping[str, Sequence[float]] | None = None,
    panels: Mapping[str, Sequence[str]] | None = None,
) -> Figure:
    """Learning curves: one panel per entry of ``panels`` (default: loss and accuracy), one line per key.

    Args:
        history: metric name -> its value at each recorded point (non-finite values are skipped).
        epochs: metric name -> the epoch (x value) of each point; defaults to ``1, 2, ...``.
        panels: panel title -> the metric names drawn in it (:data:`DEFAULT_CURVES` when omitted).
    """
    panels = dict(panels) if panels is not None else dict(DEFAULT_CURVES)
    fig = new_figure(max(5.0, 4.8 * len(panels)), 4.0)
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    for ax, (title, keys) in zip(axes, panels.items()):
        drawn = 0
        for key in keys:
            values = np.asarray(history.get(key, ()), dtype=float).reshape(-1)
            if values.size == 0:
                continue
            if epochs is not None and key in epochs:
                x = np.asarray(epochs[key], dtype=float).reshape(-1)
                if x.shape != values.shape:
                    raise ValueError(f"{key}: {values.size} values but {x.size} epochs")
            else:
                x = np.arange(1, values.size + 1, dtype=float)
            finite = np.isfinite(values)
            if not finite.any():
                continue
            ax.plot(x[finite], values[finite], marker="o", markersize=4, linewidth=1.8, label=key)
            drawn += 1
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(frameon=False)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
    return fig


def plot_confusion_matrix(
    matrix: Any,
    class_names: Sequence[Any] | None = None,
    *,
    annotate: bool | None = None,
    annotate_max: int = 25,
    title: str = "Confusion matrix (test)",
) -> Figure:
    """Row-normalised confusion matrix from a ``(C, C)`` count matrix (rows: true class, columns: predicted).

    Each cell shows the fraction of the true class's samples predicted as the column's class; rows of a class
    with no samples are grey. With ``annotate`` (default: ``C <= annotate_max``) non-zero cells print their
    fraction. Above 50 classes only every k-th class name is written on the axes.
    """
    counts = np.asarray(matrix, dtype=float)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] < 1:
        raise ValueError(f"matrix must be square (C, C), got shape {counts.shape}")
    num_classes = counts.shape[0]
    names = _class_labels(class_names, num_classes)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(totals > 0, counts / np.where(totals > 0, totals, 1.0), np.nan)
    annotate = num_classes <= annotate_max if annotate is None else bool(annotate)

    side = float(np.clip(0.5 * num_classes + 2.5, 5.5, 13.0))
    fig = new_figure(side + 1.3, side)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="0.85")
    # Without cell text, a square-root colour scale keeps small confusions (1% of a class) visible.
    norm = Normalize(0.0, 1.0) if annotate else PowerNorm(0.5, vmin=0.0, vmax=1.0)
    image = ax.imshow(np.ma.masked_invalid(normalised), cmap=cmap, norm=norm, interpolation="nearest")
    colorbar = fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    if not annotate:
        colorbar.set_ticks([0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0])
    _set_class_ticks(ax, "x", names, num_classes)
    _set_class_ticks(ax, "y", names, num_classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = counts.sum()
    accuracy = np.trace(counts) / total if total > 0 else float("nan")
    ax.set_title(f"{title}\n{int(round(total))} samples, accuracy {accuracy:.3f}, rows normalised")
    if annotate:
        cell_points = 72.0 * (side - 1.5) / num_classes
        size = float(np.clip(cell_points * 0.3, 5.0, 10.0))
        for i, j in zip(*np.nonzero(counts)):
            value = normalised[i, j]
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=size,
                    color="white" if value > 0.6 else "black")
    return fig


def reliability_bins(confidences: Any, correct: Any, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per-bin ``count``, ``accuracy`` and ``confidence`` (means; 0 in empty bins) over ``n_bins`` equal bins.

    Bins are ``[k/n, (k+1)/n)`` like torchmetrics' calibration error; a confidence of exactly 1 counts in the
    last bin. Also returns the bin ``edges``.
    """
    conf = np.clip(np.asarray(confidences, dtype=np.float64).reshape(-1), 0.0, 1.0)
    hits = np.asarray(correct, dtype=np.float64).reshape(-1)
    if conf.shape != hits.shape:
        raise ValueError(f"{conf.size} confidences but {hits.size} correctness flags")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    safe = np.maximum(count, 1.0)
    return {
        "edges": edges,
        "count": count,
        "accuracy": np.bincount(index, weights=hits, minlength=n_bins) / safe,
        "confidence": np.bincount(index, weights=conf, minlength=n_bins) / safe,
    }


def plot_reliability(confidences: Any, correct: Any, n_bins: int = 15, *, title: str = "Reliability (test)") -> Figure:
    """Reliability diagram: accuracy per confidence bin against the diagonal, over a histogram of confidences.

    Args:
        confidences: top-1 probability per sample, in ``[0, 1]``.
        correct: whether the top-1 prediction was right, per sample.
        n_bins: equal-width bins over ``[0, 1]``.

    The title carries the expected calibration error (torchmetrics' top-label L1 ECE over the same bins,
    the value ``XentModule`` logs as ``test/ece``). Red hatched bars show the gap between each bin's accuracy
    and its mean confidence.
    """
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    bins = reliability_bins(confidences, correct, n_bins)
    conf = np.clip(np.asarray(confidences, dtype=np.float64).reshape(-1), 0.0, 1.0)
    hits = np.asarray(correct, dtype=np.float64).reshape(-1)
    n = conf.size
    ece = (
        float(binary_calibration_error(torch.from_numpy(conf), torch.from_numpy(hits).long(), n_bins=n_bins))
        if n else float("nan")
    )
    edges, count, accuracy, mean_conf = bins["edges"], bins["count"], bins["accuracy"], bins["confidence"]
    width = 1.0 / n_bins
    nonempty = count > 0

    fig = new_figure(6.0, 7.0)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.bar(edges[:-1], accuracy, width=width, align="edge", color="tab:blue", edgecolor="black",
            linewidth=0.6, label="accuracy in bin")
    gap_bottom = np.where(nonempty, np.minimum(accuracy, mean_conf), 0.0)
    gap = np.where(nonempty, np.abs(mean_conf - accuracy), 0.0)
    top.bar(edges[:-1], gap, bottom=gap_bottom, width=width, align="edge", fill=False, edgecolor="tab:red",
            hatch="///", linewidth=0.8, label="gap to mean confidence")
    top.plot([0, 1], [0, 1], linestyle="--", color="0.3", linewidth=1.2, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_aspect("auto")
    top.grid(alpha=0.3)
    top.set_title(f"{title}: ECE = {ece:.4f}\n{n_bins} bins, {n} samples")

    bars = bottom.bar(edges[:-1], count, width=width, align="edge", color="0.55", edgecolor="black", linewidth=0.6)
    if n:
        bottom.axvline(conf.mean(), color="tab:orange", linewidth=1.5, label=f"mean confidence {conf.mean():.3f}")
        bottom.axvline(hits.mean(), color="tab:green", linewidth=1.5, linestyle="--",
                       label=f"accuracy {hits.mean():.3f}")
    # Counts over the bars: a bin of 3 samples is visible next to one of 3000 and its accuracy read with care.
    labels = bottom.bar_label(bars, labels=[f"{int(c)}" if c else "" for c in count], fontsize=7, padding=1)
    for label in labels:
        label.set(zorder=5, bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 0.5})
    bottom.set_ylim(0, max(1.0, count.max()) * 1.3)
    # Legends outside the axes: bars can reach any corner.
    fig.legend(*_legend_entries(top, bottom), loc="outside lower center", ncols=3, frameon=False, fontsize=8)
    bottom.set_xlabel("confidence (top-1 probability)")
    bottom.set_ylabel("samples")
    bottom.grid(alpha=0.3)
    return fig


def _legend_entries(*axes: Any) -> tuple[list[Any], list[str]]:
    handles: list[Any] = []
    labels: list[str] = []
    for ax in axes:
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    return handles, labels


def plot_per_class(
    precision: Any,
    recall: Any,
    class_names: Sequence[Any] | None = None,
    *,
    title: str = "Per-class precision and recall (test)",
) -> Figure:
    """Grouped bars of precision and recall per class, with their macro averages as dashed lines.

    A ``NaN`` (precision of a class never predicted, recall of a class absent from the data) draws no bar and
    is left out of the averages.
    """
    p = np.asarray(precision, dtype=float).reshape(-1)
    r = np.asarray(recall, dtype=float).reshape(-1)
    if p.shape != r.shape or p.size < 1:
        raise ValueError(f"precision and recall must have one value per class, got {p.size} and {r.size}")
    num_classes = p.size
    names = _class_labels(class_names, num_classes)
    x = np.arange(num_classes)
    fig = new_figure(float(np.clip(0.32 * num_classes + 3.0, 6.5, 18.0)), 4.8)
    ax = fig.subplots()
    ax.bar(x - 0.2, p, width=0.4, color="tab:blue", label="precision")
    ax.bar(x + 0.2, r, width=0.4, color="tab:orange", label="recall")
    with np.errstate(invalid="ignore"):
        macro_p = np.nanmean(p) if np.isfinite(p).any() else float("nan")
        macro_r = np.nanmean(r) if np.isfinite(r).any() else float("nan")
    ax.axhline(macro_p, color="tab:blue", linestyle="--", linewidth=1, label=f"macro precision {macro_p:.3f}")
    ax.axhline(macro_r, color="tab:orange", linestyle="--", linewidth=1, label=f"macro recall {macro_r:.3f}")
    ax.set_xlim(-0.6, num_classes - 0.4)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_xlabel("class")
    _set_class_ticks(ax, "x", names, num_classes)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title)
    fig.legend(loc="outside lower center", ncols=4, frameon=False)
    return fig
