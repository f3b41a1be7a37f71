"""The :class:`ConvergenceDoctor` callback: its settings, the diagnosis it reports, and the Lightning hooks, each
handed to the :class:`~xentlit.callbacks.doctor.examination.Examination` of the fit under way."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from xentlit.callbacks.doctor import report as reporting
from xentlit.callbacks.doctor.diagnosis import Diagnosis
from xentlit.callbacks.doctor.examination import Examination
from xentlit.callbacks.doctor.findings import Finding
from xentlit.callbacks.doctor.observations import FitState

log = logging.getLogger(__name__)

_TUNER_CALLBACKS = {"LearningRateFinder", "BatchSizeFinder", "_LRCallback"}


class ConvergenceDoctor(Callback):
    """Detect and explain why a cross-entropy classifier does not train; see :mod:`xentlit.callbacks.doctor`.

    Args:
        logits_key, target_key, loss_key: keys of the dicts returned by ``training_step``/``validation_step``.
        batch_input_key, batch_target_key: keys of a dict batch, for modules without ``unpack_batch``.
        num_classes: number of classes, for the target checks made before the first forward pass (default:
            the module's or the datamodule's ``num_classes``; always the logits' width afterwards).
        ignore_index: ignored target value (default: the module's ``ignore_index``, else -100).
        stop_on_divergence: on divergence restore the last healthy weights, clear the optimiser state and stop.
        keep_last_good: keep a CPU copy of the weights at every healthy epoch boundary (what divergence
            restores, and what measures how far the weights move per epoch for ``lr_too_low``).
        divergence_factor: a batch loss above ``divergence_factor`` times the initial loss (at least that of
            uniform predictions) counts as divergence.
        grad_explosion_factor: a gradient norm above this multiple of the first steps' norm, two steps in a
            row, counts as divergence.
        max_input_scale: largest per-feature RMS of the inputs accepted without comment.
        max_preactivation: largest RMS of the first layer's outputs accepted without comment.
        window: epochs over which a flat loss (``lr_too_low``), persistent collapse (``majority_collapse``)
            and rising validation loss (``overconfidence``) are judged.
        chunk_size: how many logits (float32 elements' worth of memory, logits and targets together) are held
            before their statistics are computed: bounds the memory the doctor holds (16 MiB by default) and
            the number of kernels it launches.
        report_file: file name of the report in ``trainer.default_root_dir`` (None: no file).
        log_metrics: log ``doctor/grad_norm`` and ``doctor/max_prob`` once per epoch.
        verbose: log each finding as a warning when found and print the summary at the end of ``fit``.
    """

    def __init__(self, logits_key: str = "logits", target_key: str = "target", loss_key: str = "loss",
                 batch_input_key: str = "x", batch_target_key: str = "y", num_classes: int | None = None,
                 ignore_index: int | None = None, stop_on_divergence: bool = True, keep_last_good: bool = True,
                 divergence_factor: float = 10.0, grad_explosion_factor: float = 1000.0,
                 max_input_scale: float = 100.0, max_preactivation: float = 30.0, window: int = 3,
                 chunk_size: int = 1 << 22, report_file: str | None = reporting.DIAGNOSIS_FILE,
                 log_metrics: bool = True, verbose: bool = True) -> None:
        super().__init__()
        if window < 2:
            raise ValueError(f"window must be at least 2 epochs, got {window}")
        for name, value in (("divergence_factor", divergence_factor), ("grad_explosion_factor", grad_explosion_factor),
                            ("max_input_scale", max_input_scale), ("max_preactivation", max_preactivation)):
            if not value > 1.0:
                raise ValueError(f"{name} must be > 1, got {value}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.logits_key, self.target_key, self.loss_key = logits_key, target_key, loss_key
        self.batch_input_key, self.batch_target_key = batch_input_key, batch_target_key
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.stop_on_divergence, self.keep_last_good = stop_on_divergence, keep_last_good
        self.divergence_factor, self.grad_explosion_factor = float(divergence_factor), float(grad_explosion_factor)
        self.max_input_scale, self.max_preactivation = float(max_input_scale), float(max_preactivation)
        self.window, self.chunk_size = int(window), int(chunk_size)
        self.report_file, self.log_metrics, self.verbose = report_file, log_metrics, verbose
        self.state = FitState()  # what the current (or last) fit gathered
        self._diagnosis = Diagnosis(verbose)
        self._exam: Examination | None = None  # the fit under way

    # ------------------------------------------------------------------------------------------ public API
    def report(self) -> dict[str, Any]:
        """The diagnosis as a JSON-serialisable dict (what ``diagnosis.json`` holds)."""
        return reporting.report(self.findings, self.state.stopped, self.state.epochs_seen, self.state.steps_seen)

    @property
    def history(self) -> dict[str, list[dict[str, float]]]:
        """Per-epoch statistics: ``train`` (NLL, module loss, mean max-probability, gradient norm, ...) and
        ``val`` (NLL, accuracy, confidence, ECE and its overconfident part, ...), reduced over ranks."""
        return {"train": list(self.state.train_history), "val": list(self.state.val_history)}

    @property
    def stopped_on_divergence(self) -> bool:
        """Whether this fit was stopped because training diverged (the last healthy weights were restored)."""
        return self.state.stopped

    def summary(self) -> str:
        """A readable multi-line summary of the findings."""
        return reporting.summary(self.findings, self.state.epochs_seen, self.state.steps_seen)

    def state_dict(self) -> dict[str, Any]:
        return {"findings": [f.to_dict() for f in self.findings]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.findings = [Finding(**f) for f in state_dict.get("findings", [])]

    @property
    def findings(self) -> list[Finding]:
        """The findings of the current (or last) fit, one per code."""
        return self._diagnosis.findings

    @findings.setter
    def findings(self, value: list[Finding]) -> None:
        self._diagnosis.findings = value

    # --------------------------------------------------------------- hooks: each to the fit's examination
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING.value:
            return
        self.state, self._diagnosis, self._exam = FitState(), Diagnosis(self.verbose), None
        tuners = [type(cb).__name__ for cb in trainer.callbacks if type(cb).__name__ in _TUNER_CALLBACKS]
        if tuners:  # an lr / batch-size search diverges on purpose: nothing to diagnose
            if trainer.is_global_zero:
                log.info("ConvergenceDoctor is off for this fit: %s runs in it.", ", ".join(tuners))
            return
        self._exam = Examination(self, trainer, pl_module, self.state, self._diagnosis)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._exam is not None:
            self._exam.train_start(pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._exam is not None:
            self._exam.train_epoch_start()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._exam is not None:
            self._exam.train_batch_start(pl_module, batch)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self._exam is not None:
            self._exam.before_optimizer_step(pl_module, optimizer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._exam is not None:
            self._exam.train_batch_end(pl_module, outputs)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._exam is not None:
            self._exam.train_epoch_end(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._exam is not None:
            self._exam.validation_start(pl_module)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._exam is not None:
            self._exam.validation_batch_start(pl_module, batch)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._exam is not None:
            self._exam.validation_batch_end(outputs)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._exam is not None:
            self._exam.validation_epoch_end()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        exam, self._exam = self._exam, None
        if exam is not None:
            exam.fit_end()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        exam, self._exam = self._exam, None
        if exam is not None:
            exam.exception(pl_module, exception)
