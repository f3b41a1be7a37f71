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
from torch.nn import functional as F
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MaxMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassF1Score,
    MulticlassRecall,
)

from xentlit.losses import CrossEntropyLoss
from xentlit.metrics import RunningAccuracy, WeightedMean
from xentlit.plain import make_hparams_plain

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
NORMALIZATIONS = ("auto", "local", "global")
STAGES = ("train", "val", "test")
AUTO_STEPS_PER_EXECUTION = 8


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
        steps_per_execution: optimiser steps per Lightning step, as Keras' ``steps_per_execution``. For small
            networks Lightning's per-step overhead (hooks, closure, progress bar) costs as much as the step
            itself; running k optimiser steps per Lightning step amortises it. With a xentlit datamodule the
            optimiser batches are exactly those of k=1 (same rows, same order, same number of steps: the
            datamodule serves k batches at once and the module steps through them), so the trained model is the
            same. With another dataloader each batch is split into k near-equal slices. Schedulers, ``max_steps``,
            loss normalisation, metrics and checkpoints behave as with 1; the progress bar and per-batch
            callback hooks see groups of k batches. ``"auto"`` (default) uses 8 where that changes nothing else:
            one process, a xentlit datamodule, no accumulation or Trainer gradient clipping, and no setting that
            counts training batches (``limit_train_batches``, ``overfit_batches``, ``fast_dev_run``,
            ``val_check_interval``, step-based checkpoints); otherwise 1.
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
    ) -> None:
        super().__init__()
        if steps_per_execution != "auto" and (
            not isinstance(steps_per_execution, int) or isinstance(steps_per_execution, bool) or steps_per_execution < 1
        ):
            raise ValueError(f"steps_per_execution must be 'auto' or an int >= 1, got {steps_per_execution!r}")
        if steps_per_execution not in ("auto", 1) and scheduler and scheduler.get("frequency", 1) != 1:
            raise ValueError("steps_per_execution > 1 steps the scheduler itself and needs scheduler frequency 1")
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
        evaluation tracks everything and receives probabilities.
        """
        if stage == "train":
            return MetricCollection({"acc": RunningAccuracy(ignore_index=self.ignore_index)}, prefix="train/")
        common = {"num_classes": self.num_classes, "ignore_index": self.ignore_index, "validate_args": False}
        metrics: dict[str, Any] = {"acc": MulticlassAccuracy(average="micro", **common)}
        if stage != "train":
            metrics["f1_macro"] = MulticlassF1Score(average="macro", **common)
            metrics["balanced_acc"] = MulticlassRecall(average="macro", **common)
            metrics["ece"] = MulticlassCalibrationError(n_bins=self.hparams.ece_bins, **common)
        return MetricCollection(metrics, prefix=f"{stage}/")

    # ------------------------------------------------------------------------------------ set-up helpers
    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._setup_execution()
        if getattr(self.loss, "needs_class_counts", False):
            counts = getattr(self.trainer.datamodule, "class_counts", None) if self._trainer is not None else None
            if counts is None:
                raise RuntimeError(
                    f"loss class_weights={self.loss.class_weights!r} is computed from the training labels, but the "
                    "datamodule exposes no `class_counts`; call `loss.set_class_counts(counts)` before training"
                )
            self.loss.set_class_counts(torch.as_tensor(counts))

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
            self._execution = (trainer, datamodule, *self._resolve_steps_per_execution(trainer, datamodule))
        return self._execution[2]

    def _resolve_steps_per_execution(self, trainer: Any, datamodule: Any) -> tuple[int, str]:
        """``(steps, why it is 1)``; raises for an explicit value that the trainer's settings rule out."""
        requested = self.hparams.steps_per_execution
        if requested == 1:
            return 1, "steps_per_execution=1"
        conflicts = []
        if trainer.world_size > 1:
            # DDP synchronises gradients once per wrapped forward: the inner steps would not be synchronised.
            conflicts.append(f"{trainer.world_size} processes (DDP)")
        if trainer.accumulate_grad_batches != 1:
            conflicts.append(f"accumulate_grad_batches={trainer.accumulate_grad_batches}")
        if trainer.gradient_clip_val:
            conflicts.append(f"gradient_clip_val={trainer.gradient_clip_val}")
        if requested != "auto":
            if conflicts:
                raise ValueError(
                    f"steps_per_execution={requested} cannot be combined with {', '.join(conflicts)}; "
                    "use steps_per_execution=1 (or auto)"
                )
            return requested, ""
        if not _groups_batches(datamodule):
            conflicts.append("the training data does not come from a xentlit datamodule")
        for name, value, default in (("fast_dev_run", trainer.fast_dev_run, False),
                                     ("overfit_batches", trainer.overfit_batches, 0),
                                     ("limit_train_batches", trainer.limit_train_batches, 1.0)):
            if value != default:
                conflicts.append(f"{name}={value} counts training batches")
        if trainer.val_check_interval != 1.0:
            conflicts.append(f"val_check_interval={trainer.val_check_interval} validates within an epoch")
        if any(getattr(cb, "_every_n_train_steps", 0) for cb in trainer.checkpoint_callbacks):
            conflicts.append("a checkpoint is written every n training steps")
        if self.scheduler_config and self.scheduler_config.get("frequency", 1) != 1:
            conflicts.append("the scheduler steps every few steps")
        return (1, "; ".join(conflicts)) if conflicts else (AUTO_STEPS_PER_EXECUTION, "")

    def _setup_execution(self) -> None:
        """Ask a xentlit datamodule for ``steps_per_execution`` batches at once; report what ``auto`` chose."""
        steps = self.steps_per_execution
        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        self._direct_backward = _backward_is_plain(trainer, self)
        self._slice_rows = None
        if _groups_batches(datamodule):
            datamodule.steps_per_execution = steps
            if steps > 1:
                self._slice_rows = (int(datamodule.batch_size), bool(datamodule.drop_last))
        if steps > 1 and self._log_every_n_steps is None:
            # Trainer(log_every_n_steps) counts optimiser steps; a Lightning step runs `steps` of them
            self._log_every_n_steps = trainer.log_every_n_steps
            trainer.log_every_n_steps = max(1, -(-trainer.log_every_n_steps // steps))
        if self.hparams.steps_per_execution == "auto" and self._execution is not None:
            if steps > 1:
                rank_zero_info(f"steps_per_execution=auto: {steps} optimiser steps per Lightning step (the progress "
                               f"bar counts groups of {steps} batches)")
            else:
                rank_zero_info(f"steps_per_execution=auto: 1 ({self._execution[3]})")

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self._log_every_n_steps is not None and self._trainer is not None:
            self._trainer.log_every_n_steps, self._log_every_n_steps = self._log_every_n_steps, None
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and _groups_batches(datamodule):
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
            rows = torch.tensor(len(target), device=target.device) if target.is_floating_point() else (
                target != self.ignore_index).sum()
            nll = F.cross_entropy(preds, target, ignore_index=self.ignore_index, reduction="sum")
            getattr(self, f"{stage}_nll").update(nll / rows.clamp_min(1), weight=rows)
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

    def _several_steps(self, x: Tensor, y: Tensor) -> dict[str, Tensor] | None:
        """``steps_per_execution`` optimiser steps on consecutive slices of one batch (manual optimisation)."""
        optimizer = self.optimizers()
        trainer = self.trainer
        if self._slice_rows is not None:  # the datamodule's own batches, as with steps_per_execution=1
            rows, drop_short = self._slice_rows
            slices = list(zip(x.split(rows), y.split(rows)))
            if drop_short and len(slices[-1][0]) < rows:
                slices.pop()
        else:
            slices = list(zip(x.tensor_split(self.steps_per_execution), y.tensor_split(self.steps_per_execution)))
        outputs = []
        for xs, ys in slices:
            if len(xs) == 0:
                continue
            if 0 <= trainer.max_steps <= trainer.global_step:
                break
            out = self._shared_step(xs, ys, "train", update_metrics=False)
            if self.uses_global_normalization:  # one scalar all-reduce per optimiser step; DDP averages over ranks
                total = trainer.strategy.reduce(out["denominator"].detach().to(torch.float64), reduce_op="sum")
                scale = trainer.world_size / total.clamp_min(torch.finfo(total.dtype).tiny)
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
        logits = torch.cat([o["logits"] for o in outputs])
        target = torch.cat([o["target"] for o in outputs])
        means = torch.stack([o["mean"].detach() for o in outputs])
        self._update_metrics("train", logits, target, means, torch.stack([o["denominator"] for o in outputs]))
        return {"loss": outputs[-1]["loss"].detach(), "logits": logits, "target": target,
                "step_rows": [len(o["target"]) for o in outputs]}

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
        if stage != "train":
            values[f"{stage}/nll"] = getattr(self, f"{stage}_nll").compute()
            getattr(self, f"{stage}_nll").reset()
        # The values are global already (torchmetrics synced them across ranks in compute()); sync_dist with max
        # over identical values changes no bit, and tells Lightning they are synced (no per-metric warning).
        self.log_dict(values, prog_bar=stage != "test", sync_dist=True, reduce_fx="max")
        # The loggers' `step` of every xentlit row: optimiser steps taken (trainer.global_step), also when one
        # Lightning step runs several (steps_per_execution), where Lightning's own count would be Lightning steps.
        # A logged `step` replaces Lightning's, which then adds no `epoch` either: both are logged here.
        self.log_dict({"step": float(self.trainer.global_step), "epoch": float(self.trainer.current_epoch)},
                      sync_dist=True, reduce_fx="max")
        return values

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
            kwargs["total_steps"] = self.estimated_optimizer_steps()
        config["scheduler"] = make(optimizer, **kwargs)
        return {"optimizer": optimizer, "lr_scheduler": config}

    def estimated_optimizer_steps(self) -> int:
        """Optimiser steps of the whole fit (``Trainer.estimated_stepping_batches`` counts Lightning steps)."""
        trainer = self.trainer
        lightning_steps = int(trainer.estimated_stepping_batches)
        steps = self.steps_per_execution
        if steps == 1:
            return lightning_steps
        if self._slice_rows is not None:
            rows, drop_short = self._slice_rows
            n = len(trainer.train_dataloader.dataset)
            epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
            per_epoch = n // rows if drop_short else -(-n // rows)
            total = per_epoch * epochs if epochs is not None else trainer.max_steps
        else:
            total = lightning_steps * steps
        return min(total, trainer.max_steps) if trainer.max_steps >= 0 else total


def _backward_is_plain(trainer: Any, module: LightningModule) -> bool:
    """Whether Lightning's ``manual_backward`` would do nothing but ``loss.backward()`` (~50 us less per step):
    one device, no loss scaling, and no backward hook overridden by the module or a callback."""
    from lightning.pytorch import Callback
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision
    from lightning.pytorch.strategies import SingleDeviceStrategy
    from lightning.pytorch.utilities.model_helpers import is_overridden

    plugin = trainer.precision_plugin
    plain_precision = type(plugin) is Precision or (type(plugin) is MixedPrecision and plugin.scaler is None)
    hooks = ("on_before_backward", "on_after_backward")
    hooked = any(is_overridden(h, module, LightningModule) for h in (*hooks, "backward")) or any(
        is_overridden(h, callback, Callback) for callback in trainer.callbacks for h in hooks
    )
    return plain_precision and type(trainer.strategy) is SingleDeviceStrategy and not hooked


def _groups_batches(datamodule: Any) -> bool:
    """Whether ``datamodule`` can serve several optimiser batches per Lightning step (xentlit's datamodules)."""
    return isinstance(getattr(datamodule, "steps_per_execution", None), int) and hasattr(datamodule, "batch_size")


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
