"""The :class:`ConvergenceDoctor` callback: gathers what the checks need during ``fit`` and dispatches to them."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from xentlit.callbacks.doctor import report as reporting
from xentlit.callbacks.doctor.batch import batch_statistics
from xentlit.callbacks.doctor.checks.base import C
from xentlit.callbacks.doctor.contract import (datamodule_class_counts, known_num_classes, resolve_ignore_index,
                                               step_outputs, unpack)
from xentlit.callbacks.doctor.epoch import sum_over_ranks, train_epoch, val_epochs, val_size
from xentlit.callbacks.doctor.diagnosis import Diagnosis
from xentlit.callbacks.doctor.findings import Finding
from xentlit.callbacks.doctor.first_step import FirstLayerProbe, first_step
from xentlit.callbacks.doctor.observations import FitState
from xentlit.callbacks.doctor.snapshot import WeightSnapshot
from xentlit.callbacks.doctor.statistics import EpochSums, train_statistics, validation_statistics
from xentlit.callbacks.doctor.steps import Ready, StepWatch

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
        self._reset()

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

    # ------------------------------------------------------------------- what the checks may use (Doctor)
    @property
    def findings(self) -> list[Finding]:
        """The findings of the current (or last) fit, one per code."""
        return self._diagnosis.findings

    @findings.setter
    def findings(self, value: list[Finding]) -> None:
        self._diagnosis.findings = value

    @property
    def trainer(self) -> pl.Trainer:
        """The trainer of the current fit."""
        if self._trainer is None:
            raise RuntimeError("ConvergenceDoctor is not part of a fit")
        return self._trainer

    def has(self, *codes: str) -> bool:
        return self._diagnosis.has(*codes)

    def check(self, kind: type[C]) -> C:
        return self._diagnosis.check(kind)

    def halt(self, stop: bool) -> int | None:
        if not self.stop_on_divergence:
            return None
        restored = self._snapshot.restore(self.trainer, self.trainer.lightning_module)
        if stop:
            self.trainer.should_stop = True
            self.state.stopped = True
        return restored

    def measure_weight_change(self) -> None:
        self._snapshot.measure_change = True

    # ----------------------------------------------------------------------------------- fit lifecycle
    def _reset(self) -> None:
        self._diagnosis = Diagnosis(self.verbose)
        self.state = FitState()
        self._trainer: pl.Trainer | None = None
        self._active = self._finished = self._warned_contract = False
        self._device: torch.device | None = None
        self._dtype = torch.float64
        self._checked_first: set[str] = set()
        self._last_batch: tuple[str, Any] | None = None
        self._batch_step = 0  # the first optimiser step of the current training batch
        self._step0_pending = True
        self._input_stats: dict[str, float] | None = None  # the first training batch's inputs
        self._probe = FirstLayerProbe()
        self._steps = StepWatch()
        limit = 4 * self.chunk_size
        self._train = EpochSums(lambda items: train_statistics(items, self.state.ignore_index, self._dtype), limit)
        self._val = EpochSums(lambda items: validation_statistics(items, self.state.ignore_index, self._dtype), limit)
        self._val_pending: list[tuple[int, int, Tensor | None]] = []  # validation runs of this training epoch
        self._dm_counts: Tensor | None = None
        self._snapshot = WeightSnapshot()

    def _dispatch(self, event: str, *args: Any) -> list[str]:
        return self._diagnosis.dispatch(self, self._trainer, event, *args)

    def _safely(self, what: str, fn: Any, *args: Any) -> Any:
        return self._diagnosis.safely(what, fn, *args)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING.value:
            return
        self._reset()
        tuners = [type(cb).__name__ for cb in trainer.callbacks if type(cb).__name__ in _TUNER_CALLBACKS]
        if tuners:  # an lr / batch-size search diverges on purpose: nothing to diagnose
            if trainer.is_global_zero:
                log.info("ConvergenceDoctor is off for this fit: %s runs in it.", ", ".join(tuners))
            return
        self._active, self._trainer = True, trainer
        self.state.ignore_index = resolve_ignore_index(pl_module, self.ignore_index)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        self._device = pl_module.device
        self._dtype = torch.float32 if self._device.type == "mps" else torch.float64
        self._steps.start(int(trainer.global_step), int(getattr(trainer, "log_every_n_steps", 10) or 10), self._device)
        self.state.single = trainer.world_size == 1
        self._dm_counts = datamodule_class_counts(trainer)
        if self.keep_last_good:
            self._snapshot.take(pl_module, int(trainer.global_step), check=False)

    # --------------------------------------------------------------------------------------- training
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            self._train.take()
            self.state.start_epoch()
            self._steps.measured = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._active:
            return
        self._last_batch = ("train", batch)
        self._batch_step = self._steps.step
        if self._step0_pending and "train" not in self._checked_first:
            self._checked_first.add("train")
            self._safely("the first training batch's checks", self._check_batch, pl_module, batch, "train")
            self._safely("the first-layer probe", self._probe.install, pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if not self._active:
            return
        step = self._steps.before_optimizer_step(optimizer)
        loss = getattr(pl_module, "step_loss", None)
        if isinstance(loss, Tensor):
            # Inside a training step that runs several optimiser steps (XentModule's steps_per_execution): judge
            # each step's loss before the optimiser applies it. A divergence stops the execution (the module
            # checks trainer.should_stop) and the step is skipped (its gradients dropped).
            self._judge_steps(self._steps.read(step, loss))
            if self.state.stopped:
                for group in trainer.optimizers[0].param_groups if trainer.optimizers else []:
                    for p in group["params"]:
                        p.grad = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._active:
            return
        self.state.steps_seen += 1
        logits, target, loss = step_outputs(outputs, self.logits_key, self.target_key, self.loss_key)
        rows = list(outputs["step_rows"]) if isinstance(outputs, Mapping) and outputs.get("step_rows") else None
        counted = False
        if self._step0_pending:
            self._step0_pending = False
            try:
                if logits is not None:
                    counted = bool(self._safely("the first step's checks", self._first_step, pl_module, logits,
                                                target, rows))
                else:
                    self._warn_contract(trainer)
            finally:
                self._probe.remove()
        if logits is not None and target is not None and not counted and self._train.add(logits, target, rows):
            self._safely("the training statistics", self._train.reduce)
        if rows is None:  # (each step of an execution was judged in on_before_optimizer_step)
            self._judge_steps(self._steps.read(self._batch_step, loss if loss is not None and loss.numel() == 1
                                               else None))

    def _judge_steps(self, ready: Ready) -> None:
        for step, loss, grad_norm in ready:  # (every optimiser step: kept short)
            if self.state.stopped:
                return
            self.state.add_step(loss, grad_norm)
            self._diagnosis.dispatch(self, self._trainer, "on_step", step, loss, grad_norm)

    def _check_batch(self, pl_module: pl.LightningModule, batch: Any, stage: str) -> list[str]:
        """The input and target checks of a raw batch; the codes it shows (also those reported before)."""
        x, y = unpack(pl_module, batch, self.batch_input_key, self.batch_target_key)
        num_classes = self.state.num_classes or known_num_classes(self.trainer, pl_module, self.num_classes)
        stats = batch_statistics(x, y, stage, num_classes, self.state.ignore_index)
        if stats is None:
            return []
        if stage == "train" and "x_numel" in stats.values:
            self._input_stats = stats.values
        return self._dispatch("on_batch", stats)

    def _first_step(self, pl_module: pl.LightningModule, logits: Tensor, target: Tensor,
                    rows: list[int] | None) -> bool:
        """The first training step's checks; whether its statistics were added to the epoch's."""
        stats = train_statistics([(logits, target, rows)], self.state.ignore_index, self._dtype)
        if stats is not None:
            self._train.add_reduced(stats)
        first = first_step(pl_module, logits, target, stats[0] if stats is not None else None, self._probe,
                           self._batch_step, self._input_stats)
        self.state.add_first_step(first)
        self._dispatch("on_first_step", first)
        if self._dm_counts is not None:
            self._dispatch("on_class_counts", self._dm_counts, first.num_classes, "datamodule.class_counts")
        return stats is not None

    def _warn_contract(self, trainer: pl.Trainer) -> None:
        if not self._warned_contract and trainer.is_global_zero:
            log.warning(
                "ConvergenceDoctor: the step output has no %r/%r tensors (see the callback's docstring for the "
                "contract); logit and target checks are skipped, gradient checks still run.",
                self.logits_key, self.target_key)
        self._warned_contract = True

    def _epoch_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before checkpoints are written: read the last steps' values, then keep the weights if healthy."""
        self._judge_steps(self._steps.reader.flush())
        if self.keep_last_good and not self.state.stopped:
            self._snapshot.take(pl_module, int(trainer.global_step))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        self._epoch_boundary(trainer, pl_module)
        self._safely("the training statistics", self._train.reduce)
        state, c = self.state, self.state.num_classes or 0
        pending, self._val_pending = self._val_pending, []
        # one collective, on every rank
        values = sum_over_ranks(trainer, state.single, self._train.take(), [v for _, _, v in pending], c,
                                self._device or pl_module.device, self._dtype)
        state.epochs_seen += 1
        epoch, counts = train_epoch(int(trainer.current_epoch), values, c, state, self._snapshot.take_change(),
                                    max(int(trainer.world_size), 1))
        state.train_history.append(epoch.record)
        if c:
            state.add_class_counts(counts)
            if state.epochs_seen == 1 and self._dm_counts is None:
                self._dispatch("on_class_counts", torch.tensor(counts, dtype=torch.float64), c,
                               "the first epoch's targets")
            train_counts = self._dm_counts.tolist() if self._dm_counts is not None else state.train_counts
            for val in val_epochs(values, [(e, s) for e, s, _ in pending], c, epoch.record["train_nll"],
                                  train_counts):
                state.val_history.append(val.record)
                self._dispatch("on_validation", val)
        if self.log_metrics:
            metrics = {"doctor/grad_norm": epoch.record["grad_norm"]} if state.epoch_grad[1] > 0 else {}
            if epoch.rows > 0:
                metrics["doctor/max_prob"] = epoch.record["max_prob"]
            reporting.log_metrics(trainer, metrics)
        self._dispatch("on_train_epoch", epoch)

    # ------------------------------------------------------------------------------------- validation
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        self._val.take()
        if not trainer.sanity_checking:
            self._epoch_boundary(trainer, pl_module)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._active:
            return
        self._last_batch = ("val", batch)
        if "val" not in self._checked_first:
            self._checked_first.add("val")
            self._safely("the first validation batch's checks", self._check_batch, pl_module, batch, "val")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._active or trainer.sanity_checking:
            return
        logits, target, _ = step_outputs(outputs, self.logits_key, self.target_key, self.loss_key)
        if logits is not None and target is not None and self._val.add(logits, target):
            self._safely("the validation statistics", self._val.reduce)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active or trainer.sanity_checking or self.state.num_classes is None:
            return
        # Kept, not reduced over ranks: the training epoch's end reduces everything with one collective.
        self._safely("the validation statistics", self._val.reduce)
        stats, _, _ = self._val.take()
        size = val_size(self.state.num_classes)
        self._val_pending.append((int(trainer.current_epoch), int(trainer.global_step),
                                  stats if stats is not None and stats.numel() == size else None))

    # ----------------------------------------------------------------------------------------- ending
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        self._dispatch("on_fit_end")
        reporting.gather(trainer, self.findings)
        self._finish(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not self._active or self._finished:
            return
        try:
            self._probe.remove()
            if not isinstance(exception, KeyboardInterrupt) and self._last_batch is not None:
                stage, batch = self._last_batch
                self._checked_first.add(stage)
                shown = self._check_batch(pl_module, batch, stage)
                step = self._batch_step if stage == "train" else int(trainer.global_step)
                self._dispatch("on_exception", exception, stage, step, shown)
        except Exception as err:  # diagnosing must never hide the original error
            log.debug("ConvergenceDoctor could not analyse the exception: %s", err)
        self._finish(trainer, exception=exception)

    def _finish(self, trainer: pl.Trainer, exception: BaseException | None = None) -> None:
        self._finished, self._active = True, False
        content = self.report()
        if exception is not None:
            content["exception"] = f"{type(exception).__name__}: {exception}"
        reporting.publish(trainer, content, self.report_file, self.summary(), self.verbose)
