"""The LightningModule: a network trained with xentlit's cross-entropy, with metrics that honour the ignore index.

Override points for subclasses (each small, each with a default):

- ``forward(x)``: logits from inputs (defaults to ``self.net(x)``).
- ``unpack_batch(batch)``: ``(inputs, targets)`` from whatever the dataloader yields.
- ``compute_loss(logits, target)``: ``(loss_sum, denominator)``; the mean is their ratio.
- ``configure_metrics(stage)``: the torchmetrics ``MetricCollection`` for ``"train"``, ``"val"`` or ``"test"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MaxMetric, MetricCollection

from xentlit import execution
from xentlit.calibration import Calibrator
from xentlit.checkpointing import check_checkpoint_fits, restore_rng_state, rng_state
from xentlit.execution import AUTO_STEPS_PER_EXECUTION, groups_batches
from xentlit.losses import CrossEntropyLoss
from xentlit.metrics import WeightedMean, compute_epoch_metrics, mean_nll, stage_metrics
from xentlit.optimization import OptimizerFactory, build_optimizers, check_scheduler_config, step_scheduler
from xentlit.plain import make_hparams_plain

__all__ = ["AUTO_STEPS_PER_EXECUTION", "NORMALIZATIONS", "OptimizerFactory", "STAGES", "XentModule"]

NORMALIZATIONS = ("auto", "local", "global")
STAGES = ("train", "val", "test")


class XentModule(LightningModule):
    """Train ``net`` with a cross-entropy ``loss``; log loss, accuracy, macro-F1, balanced accuracy and ECE.

    Args:
        net: any ``nn.Module`` mapping inputs to logits ``(N, C)``.
        loss: a :class:`~xentlit.CrossEntropyLoss` (or subclass); plain cross-entropy when omitted.
        optimizer: a factory taking the parameters, e.g. ``functools.partial(torch.optim.AdamW, lr=1e-3)``
            (what Hydra builds from a ``_partial_: true`` config). Adam(lr=1e-3) when omitted.
        scheduler: Lightning's lr-scheduler config, whose ``"scheduler"`` entry is a factory taking the
            optimizer (``{"scheduler": partial(CosineAnnealingLR, T_max=10), "interval": "epoch"}``).
            A ``total_steps`` argument left unset (OneCycleLR) is filled with the trainer's step count.
        num_classes: defaults to ``net.num_classes``.
        loss_normalization: ``"local"`` divides each batch's loss sum by its own denominator (the usual
            mean); ``"global"`` divides by the denominator summed over all DDP ranks and all micro-batches of
            a gradient-accumulation window, so the optimiser sees exactly the gradient of the whole global
            batch; ``"auto"`` picks global whenever world size > 1 or accumulation > 1.
        ece_bins: number of bins of the expected calibration error.
        compile: compile the network with ``torch.compile`` (in place: checkpoints keep plain keys).
        steps_per_execution: optimiser steps per Lightning step, as Keras' ``steps_per_execution``; the same
            trained model with less of Lightning's per-step overhead. ``"auto"`` (default) uses 8 where that
            changes nothing else, otherwise 1; see :mod:`xentlit.execution`.
        calibration: the post-hoc calibration the ``calibrator`` submodule holds (``"none"``, ``"temperature"``,
            ``"vector"``; see :mod:`xentlit.calibration`): fitted after training on the validation split, stored
            with the weights, applied by ``eval`` and ``predict`` to the probabilities. ``forward`` stays raw.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: CrossEntropyLoss | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: Mapping[str, Any] | None = None,
        num_classes: int | None = None,
        loss_normalization: str = "auto",
        ece_bins: int = 15,
        compile: bool = False,
        steps_per_execution: int | str = "auto",
        calibration: str = "none",
    ) -> None:
        super().__init__()
        execution.check_steps_per_execution(steps_per_execution, scheduler)
        num_classes = _checked_num_classes(net, num_classes, loss_normalization)
        check_scheduler_config(scheduler)
        # Modules and factories are passed in, not pickled into hparams: checkpoints stay loadable with
        # weights_only=True and hparams.yaml stays readable.
        self.save_hyperparameters(ignore=["net", "loss", "optimizer", "scheduler"])
        make_hparams_plain(self)
        self.net = net
        self.loss = loss if loss is not None else CrossEntropyLoss()
        self.optimizer_factory = optimizer
        self.scheduler_config = dict(scheduler) if scheduler else None
        self.num_classes = num_classes
        self.ignore_index = self.loss.ignore_index
        for stage in STAGES:  # attributes, not a ModuleDict: "train" would clash with nn.Module.train
            setattr(self, f"{stage}_metrics", self.configure_metrics(stage))
            setattr(self, f"{stage}_loss", WeightedMean())
        # Plain cross-entropy of the predictions (no class weights, smoothing or loss variant): the validation
        # score that model selection can trust whatever the training loss rewards.
        self.val_nll, self.test_nll = WeightedMean(), WeightedMean()
        self.calibrator = Calibrator(calibration)  # fitted after training (xentlit.posthoc); forward stays raw
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # in checkpoints, so a resumed run keeps its best so far
        # Not a buffer: DDP would broadcast rank 0's value over every rank's own running sum.
        self._denominator: Tensor | None = None
        # (trainer, datamodule, steps, why) of the last resolution of steps_per_execution
        self._execution: tuple[Any, Any, int, str] | None = None
        # rows per optimiser step and whether a short last slice is dropped, when the datamodule groups batches
        self._slice_rows: tuple[int, bool] | None = None
        self._direct_backward = False  # see _setup_execution
        self._log_every_n_steps: int | None = None  # the trainer's own interval, while a fit rescales it
        self.step_loss: Tensor | None = None  # the current optimiser step's mean loss, inside executions
        if compile:
            self.net.compile()

    # ----------------------------------------------------------------------------------- override points
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def unpack_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Split a batch into ``(inputs, targets)``; override for dict batches or extra fields."""
        x, y = batch[0], batch[1]
        return x, y

    def compute_loss(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(loss_sum, denominator)``; the batch mean is ``loss_sum / denominator``."""
        return self.loss.loss_terms(logits, target)

    def configure_metrics(self, stage: str) -> MetricCollection:
        """Metrics per stage, updated with ``(preds, hard_target)`` every step and computed once per epoch.

        Training tracks accuracy only, with a lean in-place counter, and its metrics receive the logits;
        evaluation tracks everything and receives probabilities (see :func:`xentlit.metrics.stage_metrics`).
        """
        return stage_metrics(stage, self.num_classes, self.ignore_index, self.hparams.ece_bins)

    # ------------------------------------------------------------------------------------ set-up helpers
    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._setup_execution()
        if getattr(self.loss, "needs_class_counts", False):
            datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            self.loss.set_class_counts(_class_counts(self.loss, datamodule))

    @property
    def automatic_optimization(self) -> bool:
        """Lightning's automatic optimisation, unless a subclass turned it off or several steps run per batch."""
        return self._automatic_optimization and self.steps_per_execution == 1

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        self._automatic_optimization = value

    @property
    def steps_per_execution(self) -> int:
        """Optimiser steps per Lightning step in the current fit (``"auto"`` resolved against the trainer)."""
        trainer = self._trainer
        if trainer is None:
            requested = self.hparams.steps_per_execution
            return 1 if requested == "auto" else requested
        datamodule = getattr(trainer, "datamodule", None)
        if self._execution is None or self._execution[0] is not trainer or self._execution[1] is not datamodule:
            resolved = execution.resolve_steps_per_execution(
                self.hparams.steps_per_execution, trainer, datamodule, self.scheduler_config
            )
            self._execution = (trainer, datamodule, *resolved)
        return self._execution[2]

    def _setup_execution(self) -> None:
        """Ask a xentlit datamodule for ``steps_per_execution`` batches at once; report what ``auto`` chose."""
        steps = self.steps_per_execution
        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        self._direct_backward = execution.backward_is_plain(trainer, self)
        self._slice_rows = None
        if groups_batches(datamodule):
            datamodule.steps_per_execution = steps
            if steps > 1:
                self._slice_rows = (int(datamodule.batch_size), bool(datamodule.drop_last))
        if steps > 1 and self._log_every_n_steps is None:
            # Trainer(log_every_n_steps) counts optimiser steps; a Lightning step runs `steps` of them
            self._log_every_n_steps = trainer.log_every_n_steps
            trainer.log_every_n_steps = max(1, -(-trainer.log_every_n_steps // steps))
        if self.hparams.steps_per_execution == "auto" and self._execution is not None:
            rank_zero_info(execution.describe_auto(steps, why=self._execution[3]))

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self._log_every_n_steps is not None and self._trainer is not None:
            self._trainer.log_every_n_steps, self._log_every_n_steps = self._log_every_n_steps, None
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and groups_batches(datamodule):
            datamodule.steps_per_execution = 1  # its loaders serve single batches again outside this fit

    @property
    def uses_global_normalization(self) -> bool:
        """Whether the loss mean is normalised over the whole global batch (all ranks, all micro-batches)."""
        mode = self.hparams.loss_normalization
        if mode != "auto":
            return mode == "global"
        trainer = self._trainer
        return trainer is not None and (trainer.world_size > 1 or trainer.accumulate_grad_batches > 1)

    # ----------------------------------------------------------------------------------------- steps
    def _shared_step(self, x: Tensor, y: Tensor, stage: str, update_metrics: bool = True) -> dict[str, Tensor]:
        logits = self(x)
        loss_sum, denominator = self.compute_loss(logits, y)
        mean = loss_sum / denominator.clamp_min(torch.finfo(loss_sum.dtype).tiny)
        out = {"loss_sum": loss_sum, "denominator": denominator, "mean": mean, "logits": logits.detach(), "target": y}
        if update_metrics:
            self._update_metrics(stage, out["logits"], y, mean.detach(), denominator)
        return out

    def _update_metrics(self, stage: str, logits: Tensor, target: Tensor, mean: Tensor, denominator: Tensor) -> None:
        """Only updates: per-step ``self.log`` of metric objects costs Lightning more than a small network's step.

        ``mean``/``denominator`` may hold one value per step (an execution's steps update once, together):
        every metric here is a sum over rows, so one update with all the rows gives the same value.
        """
        getattr(self, f"{stage}_loss").update(mean, weight=denominator)
        hard = target if not target.is_floating_point() else target.argmax(dim=1)
        preds = logits.float()
        if stage != "train":
            getattr(self, f"{stage}_nll").update(*mean_nll(preds, target, self.ignore_index))
        getattr(self, f"{stage}_metrics").update(preds if stage == "train" else preds.softmax(dim=1), hard)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        if not self.automatic_optimization:
            return self._several_steps(*self.unpack_batch(batch))
        out = self._shared_step(*self.unpack_batch(batch), "train")
        if self.uses_global_normalization:
            # Backward the plain sum; on_before_optimizer_step divides by the global denominator.
            denominator = out["denominator"].detach().to(torch.float64)
            self._denominator = denominator if self._denominator is None else self._denominator + denominator
            out["loss"] = out["loss_sum"]
        else:
            out["loss"] = out["mean"]
        return out

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.uses_global_normalization or self._denominator is None:
            return
        # Lightning divides each micro-batch loss by accumulate_grad_batches: undo that too.
        scale = _global_scale(self.trainer, self._denominator, micro_batches=self.trainer.accumulate_grad_batches)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.dtype))
        self._denominator = None

    def _several_steps(self, x: Tensor, y: Tensor) -> dict[str, Tensor] | None:
        """``steps_per_execution`` optimiser steps on consecutive slices of one batch (manual optimisation)."""
        optimizer = self.optimizers()
        trainer = self.trainer
        outputs = []
        for xs, ys in execution.optimizer_batches(x, y, self.steps_per_execution, self._slice_rows):
            if 0 <= trainer.max_steps <= trainer.global_step:
                break
            out = self._shared_step(xs, ys, "train", update_metrics=False)
            if self.uses_global_normalization:
                scale = _global_scale(trainer, out["denominator"].detach().to(torch.float64), micro_batches=1)
                out["loss"] = out["loss_sum"] * scale.to(out["loss_sum"].dtype)
            else:
                out["loss"] = out["mean"]
            optimizer.zero_grad()
            if self._direct_backward:
                out["loss"].backward()
            else:
                self.manual_backward(out["loss"])
            self.step_loss = out["mean"].detach()  # for callbacks' on_before_optimizer_step (the doctor)
            optimizer.step()
            self._step_schedulers("step")
            outputs.append(out)
            if trainer.should_stop:  # e.g. the doctor found a divergence: stop within the execution
                break
        self.step_loss = None
        if not outputs:
            return None
        merged = execution.merge_step_outputs(outputs)
        means = torch.stack([o["mean"].detach() for o in outputs])
        denominators = torch.stack([o["denominator"] for o in outputs])
        self._update_metrics("train", merged["logits"], merged["target"], means, denominators)
        return merged

    def _step_schedulers(self, interval: str) -> None:
        """Under manual optimisation Lightning leaves the schedulers to the module."""
        if self.automatic_optimization or not self.scheduler_config:
            return
        if self.scheduler_config.get("interval", "epoch") == interval:
            step_scheduler(self.lr_schedulers(), self.scheduler_config, self.trainer.callback_metrics)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._shared_step(*self.unpack_batch(batch), "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._shared_step(*self.unpack_batch(batch), "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs = self(x).float().softmax(dim=1)
        return {"probs": probs, "preds": probs.argmax(dim=1)}

    def log_epoch_metrics(self, stage: str) -> dict[str, Tensor]:
        """Compute (synced across DDP ranks by torchmetrics), log and reset the stage's epoch metrics."""
        nll = getattr(self, f"{stage}_nll") if stage != "train" else None
        values = compute_epoch_metrics(stage, getattr(self, f"{stage}_loss"), getattr(self, f"{stage}_metrics"), nll)
        if not values:
            return {}
        # The values are global already (torchmetrics synced them across ranks in compute()); sync_dist with max
        # over identical values changes no bit, and tells Lightning they are synced (no per-metric warning).
        self.log_dict(values, prog_bar=stage != "test", sync_dist=True, reduce_fx="max")
        # The loggers' `step` of every xentlit row: optimiser steps taken (trainer.global_step), also when one
        # Lightning step runs several (steps_per_execution), where Lightning's own count would be Lightning steps.
        # A logged `step` replaces Lightning's, which then adds no `epoch` either: both are logged here.
        self.log_dict({"step": float(self.trainer.global_step), "epoch": float(self.trainer.current_epoch)},
                      sync_dist=True, reduce_fx="max")
        return values

    def on_train_epoch_start(self) -> None:
        set_epoch = getattr(self.loss, "set_epoch", None)  # (deferred re-weighting: loss.reweight_from_epoch)
        if set_epoch is not None:
            set_epoch(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        self.log_epoch_metrics("train")
        self._step_schedulers("epoch")

    def on_validation_epoch_end(self) -> None:
        values = self.log_epoch_metrics("val")
        if self.trainer.sanity_checking or "val/acc" not in values:
            return
        self.val_acc_best.update(values["val/acc"])
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True, reduce_fx="max")  # global already

    def on_test_epoch_end(self) -> None:
        self.log_epoch_metrics("test")

    # ------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The global RNG drives shuffling and dropout: restoring it makes a resumed run bitwise identical.
        checkpoint["rng_state"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_fits(self.state_dict(), checkpoint.get("state_dict", {}))
        rng = checkpoint.get("rng_state")
        if rng and self._trainer is not None and self.trainer.state.fn == "fit":
            restore_rng_state(rng)

    # ----------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> Any:
        return build_optimizers(self.parameters(), self.optimizer_factory, self.scheduler_config,
                                total_steps=self.estimated_optimizer_steps)

    def estimated_optimizer_steps(self) -> int:
        """Optimiser steps of the whole fit (``Trainer.estimated_stepping_batches`` counts Lightning steps)."""
        return execution.estimated_optimizer_steps(self.trainer, self.steps_per_execution, self._slice_rows)


def _checked_num_classes(net: nn.Module, num_classes: int | None, loss_normalization: str) -> int:
    """``num_classes`` (from ``net.num_classes`` when omitted), after checking it and ``loss_normalization``."""
    if loss_normalization not in NORMALIZATIONS:
        raise ValueError(f"loss_normalization must be one of {NORMALIZATIONS}, got {loss_normalization!r}")
    num_classes = num_classes if num_classes is not None else getattr(net, "num_classes", None)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"num_classes must be an int >= 2 (pass it, or give the net a `num_classes` attribute), got {num_classes!r}"
        )
    return num_classes


def _class_counts(loss: CrossEntropyLoss, datamodule: Any) -> Tensor:
    """The training labels' class counts, which a class-weight strategy of ``loss`` is computed from."""
    counts = getattr(datamodule, "class_counts", None)
    if counts is None:
        raise RuntimeError(
            f"loss class_weights={loss.class_weights!r} is computed from the training labels, but the "
            "datamodule exposes no `class_counts`; call `loss.set_class_counts(counts)` before training"
        )
    return torch.as_tensor(counts)


def _global_scale(trainer: Any, denominator: Tensor, micro_batches: int) -> Tensor:
    """What turns gradients of loss sums into those of the global batch's mean, with one scalar all-reduce: DDP
    averages gradients over ranks and the loss was divided by ``micro_batches``; undo both, divide by the total."""
    total = trainer.strategy.reduce(denominator, reduce_op="sum")
    return micro_batches * trainer.world_size / total.clamp_min(torch.finfo(total.dtype).tiny)
