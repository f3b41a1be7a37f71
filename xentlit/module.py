"""The LightningModule: a network trained with xentlit's cross-entropy, with metrics that honour the ignore index.

Override points for subclasses (each small, each with a default):

- ``forward(x)``: logits from inputs (defaults to ``self.net(x)``).
- ``unpack_batch(batch)``: ``(inputs, targets)`` from whatever the dataloader yields.
- ``compute_loss(logits, target)``: ``(loss_sum, denominator)``; the mean is their ratio.
- ``configure_metrics(stage)``: the torchmetrics ``MetricCollection`` for ``"train"``, ``"val"`` or ``"test"``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassF1Score,
    MulticlassRecall,
)

from xentlit.losses import CrossEntropyLoss

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
NORMALIZATIONS = ("auto", "local", "global")
STAGES = ("train", "val", "test")


class WeightedMean(MeanMetric):
    """``MeanMetric`` without a per-step NaN check (no host sync) that keeps its weights.

    torchmetrics' own ``nan_strategy="disable"`` replaces the weights by ones
    (Lightning-AI/torchmetrics#3434, fix pending in #3433); this keeps them.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(nan_strategy="disable", **kwargs)

    def _cast_and_nan_check_input(self, x: Any, weight: Any = None) -> tuple[Tensor, Tensor]:
        x = torch.as_tensor(x, device=self.device)
        weight = torch.ones_like(x) if weight is None else torch.as_tensor(weight, device=self.device)
        return x.to(self.dtype), weight.to(self.dtype)


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
        steps_per_execution: optimiser steps per Lightning step, as Keras' ``steps_per_execution``: each batch
            from the dataloader is split into this many consecutive slices, each one optimiser step (so the
            optimiser batch is the dataloader's batch size divided by this). For small networks Lightning's
            per-step overhead is comparable to the step itself; this amortises it. Uses manual optimisation:
            schedulers, loss normalisation, metrics and checkpoints behave as with 1, but
            ``accumulate_grad_batches``, the Trainer's ``gradient_clip_val`` and DDP are not available.
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
        steps_per_execution: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(steps_per_execution, int) or steps_per_execution < 1:
            raise ValueError(f"steps_per_execution must be an int >= 1, got {steps_per_execution!r}")
        if steps_per_execution > 1 and scheduler and scheduler.get("frequency", 1) != 1:
            raise ValueError("steps_per_execution > 1 steps the scheduler itself and needs scheduler frequency 1")
        self.automatic_optimization = steps_per_execution == 1
        if loss_normalization not in NORMALIZATIONS:
            raise ValueError(f"loss_normalization must be one of {NORMALIZATIONS}, got {loss_normalization!r}")
        num_classes = num_classes if num_classes is not None else getattr(net, "num_classes", None)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                f"num_classes must be an int >= 2 (pass it, or give the net a `num_classes` attribute), got {num_classes!r}"
            )
        if scheduler is not None and not isinstance(scheduler, Mapping):
            raise ValueError(
                "scheduler must be a Lightning lr-scheduler config mapping with a 'scheduler' factory, "
                f"got {type(scheduler).__name__}"
            )
        if scheduler is not None and scheduler and not callable(scheduler.get("scheduler")):
            raise ValueError(f"scheduler['scheduler'] must be a factory taking the optimizer, got {scheduler!r}")
        # Modules and factories are passed in, not pickled into hparams: checkpoints stay loadable with
        # weights_only=True and hparams.yaml stays readable.
        self.save_hyperparameters(ignore=["net", "loss", "optimizer", "scheduler"])
        self.net = net
        self.loss = loss if loss is not None else CrossEntropyLoss()
        self.optimizer_factory = optimizer
        self.scheduler_config = dict(scheduler) if scheduler else None
        self.num_classes = num_classes
        self.ignore_index = self.loss.ignore_index
        for stage in STAGES:  # attributes, not a ModuleDict: "train" would clash with nn.Module.train
            setattr(self, f"{stage}_metrics", self.configure_metrics(stage))
            setattr(self, f"{stage}_loss", WeightedMean())
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # in checkpoints, so a resumed run keeps its best so far
        # Not a buffer: DDP would broadcast rank 0's value over every rank's own running sum.
        self._denominator: Tensor | None = None
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
        """Metrics per stage. Training tracks accuracy only (cheap); evaluation tracks everything."""
        common = {"num_classes": self.num_classes, "ignore_index": self.ignore_index, "validate_args": False}
        metrics: dict[str, Any] = {"acc": MulticlassAccuracy(average="micro", **common)}
        if stage != "train":
            metrics["f1_macro"] = MulticlassF1Score(average="macro", **common)
            metrics["balanced_acc"] = MulticlassRecall(average="macro", **common)
            metrics["ece"] = MulticlassCalibrationError(n_bins=self.hparams.ece_bins, **common)
        return MetricCollection(metrics, prefix=f"{stage}/")

    # ------------------------------------------------------------------------------------ set-up helpers
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.steps_per_execution > 1 and self.trainer.world_size > 1:
            # DDP synchronises gradients once per wrapped forward; several backward passes inside one
            # training_step would leave all but the first unsynchronised.
            raise ValueError(
                f"steps_per_execution={self.hparams.steps_per_execution} is not supported with "
                f"{self.trainer.world_size} processes yet; use steps_per_execution=1 under DDP"
            )
        if getattr(self.loss, "needs_class_counts", False):
            counts = getattr(self.trainer.datamodule, "class_counts", None) if self._trainer is not None else None
            if counts is None:
                raise RuntimeError(
                    f"loss class_weights={self.loss.class_weights!r} is computed from the training labels, but the "
                    "datamodule exposes no `class_counts`; call `loss.set_class_counts(counts)` before training"
                )
            self.loss.set_class_counts(torch.as_tensor(counts))

    @property
    def uses_global_normalization(self) -> bool:
        """Whether the loss mean is normalised over the whole global batch (all ranks, all micro-batches)."""
        mode = self.hparams.loss_normalization
        if mode != "auto":
            return mode == "global"
        trainer = self._trainer
        return trainer is not None and (trainer.world_size > 1 or trainer.accumulate_grad_batches > 1)

    # ----------------------------------------------------------------------------------------- steps
    def _shared_step(self, x: Tensor, y: Tensor, stage: str) -> dict[str, Tensor]:
        logits = self(x)
        loss_sum, denominator = self.compute_loss(logits, y)
        mean = loss_sum / denominator.clamp_min(torch.finfo(loss_sum.dtype).tiny)
        # Only updates here: per-step `self.log` of metric objects costs Lightning more than the MLP step.
        getattr(self, f"{stage}_loss").update(mean.detach(), weight=denominator)
        hard = y if not y.is_floating_point() else y.argmax(dim=1)
        getattr(self, f"{stage}_metrics").update(logits.detach().float().softmax(dim=1), hard)
        return {"loss_sum": loss_sum, "denominator": denominator, "mean": mean, "logits": logits.detach(), "target": y}

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
        trainer = self.trainer
        # One scalar all-reduce per optimiser step. Lightning divides each micro-batch loss by
        # accumulate_grad_batches and DDP averages gradients over ranks: undo both, divide by the true total.
        total = trainer.strategy.reduce(self._denominator, reduce_op="sum")
        scale = trainer.accumulate_grad_batches * trainer.world_size / total.clamp_min(torch.finfo(total.dtype).tiny)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.dtype))
        self._denominator = None

    def _several_steps(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """``steps_per_execution`` optimiser steps on consecutive slices of one batch (manual optimisation)."""
        optimizer = self.optimizers()
        outputs = []
        for xs, ys in zip(x.tensor_split(self.hparams.steps_per_execution), y.tensor_split(self.hparams.steps_per_execution)):
            if len(xs) == 0:
                continue
            out = self._shared_step(xs, ys, "train")
            if self.uses_global_normalization:  # one scalar all-reduce per optimiser step; DDP averages over ranks
                total = self.trainer.strategy.reduce(out["denominator"].detach().to(torch.float64), reduce_op="sum")
                scale = self.trainer.world_size / total.clamp_min(torch.finfo(total.dtype).tiny)
                out["loss"] = out["loss_sum"] * scale.to(out["loss_sum"].dtype)
            else:
                out["loss"] = out["mean"]
            optimizer.zero_grad()
            self.manual_backward(out["loss"])
            optimizer.step()
            self._step_schedulers("step")
            outputs.append(out)
        return {
            "loss": outputs[-1]["loss"].detach(),
            "logits": torch.cat([o["logits"] for o in outputs]),
            "target": torch.cat([o["target"] for o in outputs]),
        }

    def _step_schedulers(self, interval: str) -> None:
        """Under manual optimisation Lightning leaves the schedulers to the module."""
        if self.automatic_optimization or not self.scheduler_config:
            return
        if self.scheduler_config.get("interval", "epoch") != interval:
            return
        scheduler = self.lr_schedulers()
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            monitor = self.scheduler_config.get("monitor", "val/loss")
            value = self.trainer.callback_metrics.get(monitor)
            if value is None:
                raise RuntimeError(f"ReduceLROnPlateau monitors {monitor!r}, which was not logged this epoch")
            scheduler.step(value)
        else:
            scheduler.step()

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
        loss_metric, metrics = getattr(self, f"{stage}_loss"), getattr(self, f"{stage}_metrics")
        if not loss_metric.update_called:
            return {}
        values = {f"{stage}/loss": loss_metric.compute(), **metrics.compute()}
        loss_metric.reset()
        metrics.reset()
        self.log_dict(values, prog_bar=stage != "test")
        return values

    def on_train_epoch_end(self) -> None:
        self.log_epoch_metrics("train")
        self._step_schedulers("epoch")

    def on_validation_epoch_end(self) -> None:
        values = self.log_epoch_metrics("val")
        if self.trainer.sanity_checking or "val/acc" not in values:
            return
        self.val_acc_best.update(values["val/acc"])
        self.log("val/acc_best", self.val_acc_best.compute())

    def on_test_epoch_end(self) -> None:
        self.log_epoch_metrics("test")

    # ------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The global RNG drives shuffling and dropout: restoring it makes a resumed run bitwise identical.
        checkpoint["rng_state"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _check_compatible(self.state_dict(), checkpoint.get("state_dict", {}))
        rng = checkpoint.get("rng_state")
        if rng and self._trainer is not None and self.trainer.state.fn == "fit":
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])

    # ----------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> Any:
        factory = self.optimizer_factory or (lambda params: torch.optim.Adam(params, lr=1e-3))
        optimizer = factory(self.parameters())
        if not self.scheduler_config:
            return optimizer
        config = dict(self.scheduler_config)
        make = config.pop("scheduler")
        kwargs: dict[str, Any] = {}
        func = getattr(make, "func", make)
        keywords = getattr(make, "keywords", {}) or {}
        if "total_steps" in _parameters(func) and keywords.get("total_steps") is None:
            kwargs["total_steps"] = int(self.trainer.estimated_stepping_batches)
        config["scheduler"] = make(optimizer, **kwargs)
        return {"optimizer": optimizer, "lr_scheduler": config}


def _check_compatible(own: Mapping[str, Tensor], saved: Mapping[str, Any]) -> None:
    """Raise a ValueError naming the mismatched tensors when a checkpoint belongs to another data shape."""
    mismatched = [
        f"{key}: checkpoint {tuple(saved[key].shape)} vs model {tuple(value.shape)}"
        for key, value in own.items()
        if key in saved and isinstance(saved[key], Tensor) and saved[key].shape != value.shape
        and not key.endswith("loss.weight")  # a pending class-weight strategy is filled from the checkpoint
    ]
    if mismatched:
        raise ValueError(
            "the checkpoint does not fit this model: it was trained with a different number of input features "
            "or classes (or another network). Mismatched tensors: " + "; ".join(mismatched[:4])
        )


def _parameters(func: Any) -> set[str]:
    try:
        return set(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return set()
