"""One fit under the doctor (:class:`Examination`): what is gathered at each moment of the fit, when the checks are
called, and what they may use of it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from xentlit.callbacks.doctor import report as reporting
from xentlit.callbacks.doctor.batch import batch_statistics
from xentlit.callbacks.doctor.checks.base import C
from xentlit.callbacks.doctor.contract import (datamodule_class_counts, known_num_classes, resolve_ignore_index,
                                               step_outputs, unpack)
from xentlit.callbacks.doctor.diagnosis import Diagnosis
from xentlit.callbacks.doctor.epoch import sum_over_ranks, train_epoch, val_epochs, val_size
from xentlit.callbacks.doctor.first_step import FirstLayerProbe, first_step
from xentlit.callbacks.doctor.observations import FitState
from xentlit.callbacks.doctor.snapshot import WeightSnapshot
from xentlit.callbacks.doctor.statistics import EpochSums, Item, train_statistics, validation_statistics
from xentlit.callbacks.doctor.steps import Ready, StepWatch

if TYPE_CHECKING:
    from xentlit.callbacks.doctor.callback import ConvergenceDoctor

log = logging.getLogger(__name__)


class Examination:
    """One fit: the :class:`~xentlit.callbacks.ConvergenceDoctor` calls one method per Lightning hook; each
    gathers what the checks need (batch, first-step, per-step and epoch statistics) and calls the checks of that
    moment through ``diagnosis``. It is also the :class:`~xentlit.callbacks.doctor.checks.base.Doctor` the checks
    receive: the trainer, the fit's ``state``, the doctor's ``settings``, and :meth:`has`, :meth:`check`,
    :meth:`halt` and :meth:`measure_weight_change`."""

    def __init__(self, settings: ConvergenceDoctor, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 state: FitState, diagnosis: Diagnosis) -> None:
        self.settings, self.trainer, self.state, self.diagnosis = settings, trainer, state, diagnosis
        state.ignore_index = resolve_ignore_index(pl_module, settings.ignore_index)
        self._keys = (settings.logits_key, settings.target_key, settings.loss_key)
        self._device: torch.device | None = None
        self._dtype = torch.float64
        self._checked_first: set[str] = set()  # the stages whose first batch was checked
        self._last_batch: tuple[str, Any] | None = None
        self._batch_step = 0  # the first optimiser step of the current training batch
        self._step0_pending = True
        self._input_stats: dict[str, float] | None = None  # the first training batch's inputs
        self._probe = FirstLayerProbe()
        self._steps = StepWatch()
        limit = 4 * settings.chunk_size
        self._train = EpochSums(self._train_statistics, limit)
        self._val = EpochSums(self._validation_statistics, limit)
        self._val_pending: list[tuple[int, int, Tensor | None]] = []  # validation runs of this training epoch
        self._dm_counts: Tensor | None = None
        self._snapshot = WeightSnapshot()

    # ------------------------------------------------------------------------------ what checks may use
    def has(self, *codes: str) -> bool:
        return self.diagnosis.has(*codes)

    def check(self, kind: type[C]) -> C:
        return self.diagnosis.check(kind)

    def halt(self, stop: bool) -> int | None:
        if not self.settings.stop_on_divergence:
            return None
        restored = self._snapshot.restore(self.trainer, self.trainer.lightning_module)
        if stop:
            self.trainer.should_stop = True
            self.state.stopped = True
        return restored

    def measure_weight_change(self) -> None:
        self._snapshot.measure_change = True

    def _train_statistics(self, items: list[Item]) -> tuple[Tensor, int, int] | None:
        return train_statistics(items, self.state.ignore_index, self._dtype)

    def _validation_statistics(self, items: list[Item]) -> tuple[Tensor, int, int] | None:
        return validation_statistics(items, self.state.ignore_index, self._dtype)

    def _dispatch(self, event: str, *args: Any) -> list[str]:
        return self.diagnosis.dispatch(self, self.trainer, event, *args)

    def _safely(self, what: str, fn: Any, *args: Any) -> Any:
        return self.diagnosis.safely(what, fn, *args)

    # ---------------------------------------------------------------------------------------- start
    def train_start(self, pl_module: pl.LightningModule) -> None:
        trainer, settings = self.trainer, self.settings
        self._device = pl_module.device
        self._dtype = torch.float32 if self._device.type == "mps" else torch.float64
        self._steps.start(int(trainer.global_step), int(getattr(trainer, "log_every_n_steps", 10) or 10), self._device)
        self.state.single = trainer.world_size == 1
        self._dm_counts = datamodule_class_counts(trainer)
        if settings.keep_last_good:
            self._snapshot.take(pl_module, int(trainer.global_step), check=False)

    # --------------------------------------------------------------------------------------- training
    def train_epoch_start(self) -> None:
        self._train.take()
        self.state.start_epoch()
        self._steps.measured = False

    def train_batch_start(self, pl_module: pl.LightningModule, batch: Any) -> None:
        self._last_batch = ("train", batch)
        self._batch_step = self._steps.step
        if self._step0_pending and "train" not in self._checked_first:
            self._checked_first.add("train")
            self._safely("the first training batch's checks", self._check_batch, pl_module, batch, "train")
            self._safely("the first-layer probe", self._probe.install, pl_module)

    def before_optimizer_step(self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        step = self._steps.before_optimizer_step(optimizer)
        loss = getattr(pl_module, "step_loss", None)
        if isinstance(loss, Tensor):
            # Inside a training step that runs several optimiser steps (XentModule's steps_per_execution): judge
            # each step's loss before the optimiser applies it. A divergence stops the execution (the module
            # checks trainer.should_stop) and the step is skipped (its gradients dropped).
            self._judge_steps(self._steps.read(step, loss))
            if self.state.stopped:
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.grad = None

    def train_batch_end(self, pl_module: pl.LightningModule, outputs: Any) -> None:
        self.state.steps_seen += 1
        logits, target, loss = step_outputs(outputs, *self._keys)
        rows = list(outputs["step_rows"]) if isinstance(outputs, Mapping) and outputs.get("step_rows") else None
        counted = False
        if self._step0_pending:
            self._step0_pending = False
            try:
                if logits is not None:
                    counted = bool(self._safely("the first step's checks", self._first_step, pl_module, logits,
                                                target, rows))
                else:
                    self._warn_contract()
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
            self.diagnosis.dispatch(self, self.trainer, "on_step", step, loss, grad_norm)

    def _check_batch(self, pl_module: pl.LightningModule, batch: Any, stage: str) -> list[str]:
        """The input and target checks of a raw batch; the codes it shows (also those reported before)."""
        x, y = unpack(pl_module, batch, self.settings.batch_input_key, self.settings.batch_target_key)
        num_classes = self.state.num_classes or known_num_classes(self.trainer, pl_module, self.settings.num_classes)
        stats = batch_statistics(x, y, stage, num_classes, self.state.ignore_index)
        if stats is None:
            return []
        if stage == "train" and "x_numel" in stats.values:
            self._input_stats = stats.values
        return self._dispatch("on_batch", stats)

    def _first_step(self, pl_module: pl.LightningModule, logits: Tensor, target: Tensor,
                    rows: list[int] | None) -> bool:
        """The first training step's checks; whether its statistics were added to the epoch's."""
        stats = self._train_statistics([(logits, target, rows)])
        if stats is not None:
            self._train.add_reduced(stats)
        first = first_step(pl_module, logits, target, stats[0] if stats is not None else None, self._probe,
                           self._batch_step, self._input_stats)
        self.state.add_first_step(first)
        self._dispatch("on_first_step", first)
        if self._dm_counts is not None:
            self._dispatch("on_class_counts", self._dm_counts, first.num_classes, "datamodule.class_counts")
        return stats is not None

    def _warn_contract(self) -> None:
        if self.trainer.is_global_zero:
            log.warning(
                "ConvergenceDoctor: the step output has no %r/%r tensors (see the callback's docstring for the "
                "contract); logit and target checks are skipped, gradient checks still run.", *self._keys[:2])

    def _epoch_boundary(self, pl_module: pl.LightningModule) -> None:
        """Before checkpoints are written: read the last steps' values, then keep the weights if healthy."""
        self._judge_steps(self._steps.reader.flush())
        if self.settings.keep_last_good and not self.state.stopped:
            self._snapshot.take(pl_module, int(self.trainer.global_step))

    def train_epoch_end(self, pl_module: pl.LightningModule) -> None:
        trainer = self.trainer
        self._epoch_boundary(pl_module)
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
        if self.settings.log_metrics:
            metrics = {"doctor/grad_norm": epoch.record["grad_norm"]} if state.epoch_grad[1] > 0 else {}
            if epoch.rows > 0:
                metrics["doctor/max_prob"] = epoch.record["max_prob"]
            reporting.log_metrics(trainer, metrics)
        self._dispatch("on_train_epoch", epoch)

    # ------------------------------------------------------------------------------------- validation
    def validation_start(self, pl_module: pl.LightningModule) -> None:
        self._val.take()
        if not self.trainer.sanity_checking:
            self._epoch_boundary(pl_module)

    def validation_batch_start(self, pl_module: pl.LightningModule, batch: Any) -> None:
        self._last_batch = ("val", batch)
        if "val" not in self._checked_first:
            self._checked_first.add("val")
            self._safely("the first validation batch's checks", self._check_batch, pl_module, batch, "val")

    def validation_batch_end(self, outputs: Any) -> None:
        if self.trainer.sanity_checking:
            return
        logits, target, _ = step_outputs(outputs, *self._keys)
        if logits is not None and target is not None and self._val.add(logits, target):
            self._safely("the validation statistics", self._val.reduce)

    def validation_epoch_end(self) -> None:
        trainer = self.trainer
        if trainer.sanity_checking or self.state.num_classes is None:
            return
        # Kept, not reduced over ranks: the training epoch's end reduces everything with one collective.
        self._safely("the validation statistics", self._val.reduce)
        stats, _, _ = self._val.take()
        size = val_size(self.state.num_classes)
        self._val_pending.append((int(trainer.current_epoch), int(trainer.global_step),
                                  stats if stats is not None and stats.numel() == size else None))

    # ----------------------------------------------------------------------------------------- ending
    def fit_end(self) -> None:
        self._dispatch("on_fit_end")
        reporting.gather(self.trainer, self.diagnosis.findings)
        self._finish()

    def exception(self, pl_module: pl.LightningModule, exception: BaseException) -> None:
        trainer = self.trainer
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
        self._finish(exception)

    def _finish(self, exception: BaseException | None = None) -> None:
        """Write the report and print the summary (rank 0)."""
        settings = self.settings
        content = settings.report()
        if exception is not None:
            content["exception"] = f"{type(exception).__name__}: {exception}"
        reporting.publish(self.trainer, content, settings.report_file, settings.summary(), settings.verbose)
