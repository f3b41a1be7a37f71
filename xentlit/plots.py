"""Pictures for every run: learning curves, test confusion matrix, reliability diagram, per-class precision/recall.

Two layers:

- **Figure functions** (:func:`plot_curves`, :func:`plot_confusion_matrix`, :func:`plot_reliability`,
  :func:`plot_per_class`, in :mod:`xentlit.figures` and importable from here): plain arrays in, a
  :class:`matplotlib.figure.Figure` out. They use the Agg canvas directly and never touch ``pyplot``, so
  importing or calling them leaves a notebook's backend and its current figure alone. Save one with
  :func:`save_figure`.
- **The callback** :class:`PlotCallback`, which feeds them from a Lightning run and writes PNGs to
  ``<trainer.default_root_dir>/plots/`` (and images to every ``TensorBoardLogger``).

The callback works with any ``LightningModule`` under this contract:

- the curves read epoch-level scalars from ``trainer.callback_metrics`` (by default ``train/loss``,
  ``val/loss``, ``train/acc``, ``val/acc``), logged with ``on_epoch=True`` from the step methods or logged in
  the module's own epoch-end hooks: keys whose first word starts with ``val`` are read after each validation
  run of ``fit`` (sanity check excluded), the others after each training epoch;
- ``test_step`` returns a mapping with ``"logits"`` ``(N, C)`` (raw scores; softmax is taken here) and
  ``"target"``: class indices ``(N,)`` (rows equal to the ignore index are left out) or soft targets
  ``(N, C)`` (their argmax is the class). The keys are configurable; several test dataloaders are pooled.
  A module whose ``test_step`` returns something else gets a warning and no test figures.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_calibration_error,
    multiclass_confusion_matrix,
    multiclass_precision,
    multiclass_recall,
)

from xentlit.figures import (
    DEFAULT_CURVES,
    FIGURES,
    figure_to_array,
    new_figure,
    plot_confusion_matrix,
    plot_curves,
    plot_per_class,
    plot_reliability,
    reliability_bins,
    save_figure,
)

__all__ = [
    "DEFAULT_CURVES",
    "FIGURES",
    "PlotCallback",
    "figure_to_array",
    "new_figure",
    "plot_confusion_matrix",
    "plot_curves",
    "plot_per_class",
    "plot_reliability",
    "reliability_bins",
    "save_figure",
]


# ------------------------------------------------------------------------------------------ callback
class PlotCallback(Callback):
    """Write learning curves and test-set figures as PNGs to ``<run dir>/<dirpath>/`` and to TensorBoard.

    - ``curves.png`` at the end of ``fit`` (again at the end of ``test`` if it changed, and when training stops
      on an exception);
    - ``confusion_matrix.png``, ``reliability.png``, ``per_class.png`` at the end of ``test``.

    The run dir is ``trainer.default_root_dir``. See the module docstring for what the LightningModule must
    log and return. Cost: one float per curve metric per epoch; during test, per batch, a softmax, a max and
    four numbers per row kept on the device (no host sync); one gather over ranks at the end of the test
    epoch (collective: every rank takes part), and only global rank 0 draws and writes.

    Args:
        dirpath: the output folder; relative paths are under ``trainer.default_root_dir``.
        curves: panel title -> ``callback_metrics`` keys (:data:`DEFAULT_CURVES` when ``None``).
        n_bins: bins of the reliability diagram (and of the ECE in its title).
        annotate_max: the confusion matrix prints cell values up to this many classes.
        dpi: resolution of the PNGs and TensorBoard images.
        logits_key, target_key: where ``test_step``'s returned mapping holds logits and targets.
        ignore_index: target value of unlabeled rows; ``None``: the module's ``ignore_index`` attribute
            (default -100).
        class_names: names shown on the axes; ``None``: ``trainer.datamodule.class_names`` if it exists and
            has one name per class, else the class indices.
        log_to_tensorboard: also send the figures as images to every ``TensorBoardLogger`` (tags ``plots/<name>``).
    """

    def __init__(
        self,
        dirpath: str = "plots",
        curves: dict[str, list[str]] | None = None,
        n_bins: int = 15,
        annotate_max: int = 25,
        dpi: int = 120,
        logits_key: str = "logits",
        target_key: str = "target",
        ignore_index: int | None = None,
        class_names: list[str] | None = None,
        log_to_tensorboard: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
        curves = DEFAULT_CURVES if curves is None else curves
        if not isinstance(curves, Mapping) or not all(
            isinstance(keys, Sequence) and not isinstance(keys, str) and all(isinstance(k, str) for k in keys)
            for keys in curves.values()
        ):
            raise ValueError(
                "curves must map each panel title to a list of logged metric names, e.g. "
                f"{{'loss': ['train/loss', 'val/loss']}}; got {curves!r}"
            )
        self.dirpath = str(dirpath)
        self.curves = {str(title): list(keys) for title, keys in curves.items()}
        self.n_bins = n_bins
        self.annotate_max = int(annotate_max)
        self.dpi = int(dpi)
        self.logits_key = logits_key
        self.target_key = target_key
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.log_to_tensorboard = bool(log_to_tensorboard)

        self.history: dict[str, list[float]] = {}
        self.epochs: dict[str, list[float]] = {}
        #: After a test epoch, on global rank 0: ``confidences``, ``preds``, ``targets`` (labelled rows of all
        #: ranks), ``confusion_matrix`` (counts), ``precision``, ``recall`` and ``ece``.
        self.test_results: dict[str, Any] | None = None
        #: Figure name -> the PNG path last written.
        self.written: dict[str, Path] = {}
        self._rows: list[Tensor] = []
        self._num_classes = 0
        self._test_ignore_index: int | None = -100
        self._test_unusable = False
        self._curves_drawn_at: tuple[int, ...] | None = None
        self._pending_train_epoch: int | None = None
        self._trainer: Trainer | None = None

    # ------------------------------------------------------------------------------- curves
    @property
    def _curve_keys(self) -> list[str]:
        return list(dict.fromkeys(k for keys in self.curves.values() for k in keys))

    @staticmethod
    def _is_validation_key(key: str) -> bool:
        return re.split(r"[/_.\-]", key, maxsplit=1)[0].lower().startswith("val")

    def _record(self, trainer: Trainer, validation: bool, x: float) -> None:
        metrics = trainer.callback_metrics
        for key in self._curve_keys:
            if self._is_validation_key(key) != validation or key not in metrics:
                continue
            value = float(metrics[key])
            xs, ys = self.epochs.setdefault(key, []), self.history.setdefault(key, [])
            while xs and xs[-1] >= x:  # a re-run epoch (resumed training) replaces the old points
                xs.pop()
                ys.pop()
            xs.append(x)
            ys.append(value)

    # Epoch metrics logged in the module's own epoch-end hooks (as XentModule does) reach
    # ``callback_metrics`` only after the callbacks' ``on_train_epoch_end``/``on_validation_epoch_end``;
    # so validation values are read at ``on_validation_end``, and an epoch's training values at the next
    # ``on_train_epoch_start``, at ``on_train_end``, or when a checkpoint is written in between.
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._pending_train_epoch = trainer.current_epoch + 1

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush_train(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush_train(trainer)

    def _flush_train(self, trainer: Trainer) -> None:
        if self._pending_train_epoch is not None:
            self._record(trainer, validation=False, x=float(self._pending_train_epoch))
            self._pending_train_epoch = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        x = float(trainer.current_epoch + 1)
        total = trainer.num_training_batches
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if isinstance(total, int) and 0 < done < total:  # mid-epoch validation (val_check_interval < 1)
            x = trainer.current_epoch + done / total
        self._record(trainer, validation=True, x=x)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write_curves(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        try:
            self._flush_train(trainer)
            self._write_curves(trainer)
        except Exception:  # never mask the original error
            pass

    def _write_curves(self, trainer: Trainer) -> None:
        if not trainer.is_global_zero or not any(self.history.values()):
            return
        state = tuple(len(v) for v in self.history.values())
        if state == self._curves_drawn_at and "curves" in self.written and self.written["curves"].exists():
            return
        fig = plot_curves(self.history, self.epochs, self.curves)
        self._emit(trainer, "curves", fig)
        self._curves_drawn_at = state

    # --------------------------------------------------------------------------------- test
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rows = []
        self._num_classes = 0
        self._test_unusable = False
        self.test_results = None
        module_ignore = getattr(pl_module, "ignore_index", -100)
        self._test_ignore_index = self.ignore_index if self.ignore_index is not None else module_ignore

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._test_unusable:
            return
        logits = outputs.get(self.logits_key) if isinstance(outputs, Mapping) else None
        target = outputs.get(self.target_key) if isinstance(outputs, Mapping) else None
        if not isinstance(logits, Tensor) or not isinstance(target, Tensor) or logits.ndim != 2:
            self._test_unusable = True
            rank_zero_warn(
                f"PlotCallback: test_step must return a mapping with {self.logits_key!r} (N, C) logits and "
                f"{self.target_key!r} targets; got {type(outputs).__name__}. No test figures will be drawn."
            )
            return
        with torch.no_grad():
            confidence, pred = logits.detach().float().softmax(dim=1).max(dim=1)
            target = target.detach()
            if target.is_floating_point() and target.ndim == 2:
                hard = target.argmax(dim=1)
                valid = torch.ones_like(hard, dtype=torch.bool)
            else:
                hard = target.reshape(-1).long()
                ignore = self._test_ignore_index
                valid = hard != ignore if ignore is not None else torch.ones_like(hard, dtype=torch.bool)
            # Kept on the device, four numbers per row, no host sync; filtered once at the end of the epoch.
            row = torch.stack([confidence, pred.float(), hard.float(), valid.float()], dim=1)
        self._rows.append(row)
        self._num_classes = max(self._num_classes, int(logits.shape[1]))

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._test_unusable:
            return
        device = pl_module.device
        rows = torch.cat(self._rows) if self._rows else torch.zeros(0, 4, device=device)
        self._rows = []
        num_classes = self._num_classes
        if trainer.world_size > 1:  # collective: every rank must get here
            rows, num_classes = _gather_rows(trainer, rows, num_classes)
        if not trainer.is_global_zero:
            return
        rows = rows[rows[:, 3] > 0].cpu()
        confidences, preds, targets = rows[:, 0], rows[:, 1].long(), rows[:, 2].long()
        in_range = (targets >= 0) & (targets < num_classes)
        if not bool(in_range.all()):
            rank_zero_warn(f"PlotCallback: {int((~in_range).sum())} test targets outside [0, {num_classes}) "
                           "that are not the ignore index were left out of the figures.")
            confidences, preds, targets = confidences[in_range], preds[in_range], targets[in_range]
        if targets.numel() == 0 or num_classes < 1:
            rank_zero_warn("PlotCallback: no labelled test rows; no test figures.")
            return
        matrix = multiclass_confusion_matrix(preds, targets, num_classes=num_classes, validate_args=False)
        precision = multiclass_precision(preds, targets, num_classes, average="none", validate_args=False)
        recall = multiclass_recall(preds, targets, num_classes, average="none", validate_args=False)
        predicted, support = matrix.sum(dim=0), matrix.sum(dim=1)
        precision = torch.where(predicted > 0, precision, torch.nan)  # undefined, not 0
        recall = torch.where(support > 0, recall, torch.nan)
        correct = (preds == targets).long()
        self.test_results = {
            "confidences": confidences.numpy(),
            "preds": preds.numpy(),
            "targets": targets.numpy(),
            "confusion_matrix": matrix.numpy(),
            "precision": precision.numpy(),
            "recall": recall.numpy(),
            "ece": float(binary_calibration_error(confidences.double(), correct, n_bins=self.n_bins)),
        }

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._write_curves(trainer)
        results = self.test_results
        if results is None:
            return
        names = self._resolve_class_names(trainer, len(results["confusion_matrix"]))
        self._emit(trainer, "confusion_matrix",
                   plot_confusion_matrix(results["confusion_matrix"], names, annotate_max=self.annotate_max))
        self._emit(trainer, "reliability",
                   plot_reliability(results["confidences"], results["preds"] == results["targets"], self.n_bins))
        self._emit(trainer, "per_class", plot_per_class(results["precision"], results["recall"], names))

    # ------------------------------------------------------------------------------ output
    def _resolve_class_names(self, trainer: Trainer, num_classes: int) -> list[str] | None:
        names = self.class_names
        if names is None:
            datamodule = getattr(trainer, "datamodule", None)
            try:
                names = getattr(datamodule, "class_names", None) if datamodule is not None else None
            except Exception:  # a property that cannot answer (no data yet) is no reason to lose the figures
                names = None
        if names is None:
            return None
        names = [str(n) for n in names]
        if len(names) != num_classes:
            rank_zero_warn(f"PlotCallback: {len(names)} class names for {num_classes} classes; using indices.")
            return None
        return names

    def output_dir(self, trainer: Trainer) -> Path:
        """Where the PNGs go: ``dirpath`` under ``trainer.default_root_dir`` (or ``dirpath`` if absolute)."""
        return Path(trainer.default_root_dir) / self.dirpath

    def _emit(self, trainer: Trainer, name: str, fig: Figure) -> None:
        self.written[name] = save_figure(fig, self.output_dir(trainer) / f"{name}.png", dpi=self.dpi)
        if not self.log_to_tensorboard:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        image = figure_to_array(fig, dpi=self.dpi)
        for logger in loggers:
            logger.experiment.add_image(f"plots/{name}", image, global_step=trainer.global_step, dataformats="HWC")
            logger.experiment.flush()

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The curves so far, so a resumed run draws its whole history."""
        if self._trainer is not None:  # a checkpoint written at the end of a training epoch: include that epoch
            self._flush_train(self._trainer)
        return {"history": {k: list(v) for k, v in self.history.items()},
                "epochs": {k: list(v) for k, v in self.epochs.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: [float(x) for x in v] for k, v in state_dict.get("history", {}).items()}
        self.epochs = {k: [float(x) for x in v] for k, v in state_dict.get("epochs", {}).items()}


def _gather_rows(trainer: Trainer, rows: Tensor, num_classes: int) -> tuple[Tensor, int]:
    """All ranks' rows (ranks may hold different counts) and the largest class count, on every rank."""
    strategy = trainer.strategy
    meta = torch.tensor([rows.shape[0], num_classes], device=rows.device, dtype=torch.long)
    meta = strategy.all_gather(meta).reshape(-1, 2)
    sizes = [int(n) for n in meta[:, 0].tolist()]
    if max(sizes) == 0:
        return rows, int(meta[:, 1].max())
    padded = rows.new_zeros((max(sizes), rows.shape[1]))
    padded[: rows.shape[0]] = rows
    gathered = strategy.all_gather(padded).reshape(len(sizes), max(sizes), rows.shape[1])
    return torch.cat([gathered[rank, :n] for rank, n in enumerate(sizes)]), int(meta[:, 1].max())
