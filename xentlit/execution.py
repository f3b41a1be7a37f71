"""Several optimiser steps per Lightning step (Keras' ``steps_per_execution``), for :class:`~xentlit.XentModule`.

For small networks Lightning's per-step overhead (hooks, closure, progress bar) costs as much as the step itself;
running k optimiser steps per Lightning step amortises it. With a xentlit datamodule the optimiser batches are
exactly those of k=1 (same rows, same order, same number of steps: the datamodule serves k batches at once and the
module steps through them), so the trained model is the same. With another dataloader each batch is split into k
near-equal slices. Schedulers, ``max_steps``, loss normalisation, metrics and checkpoints behave as with 1; the
progress bar and per-batch callback hooks see groups of k batches. ``"auto"`` uses 8 where that changes nothing
else: one process, a xentlit datamodule, no accumulation or Trainer gradient clipping, and no setting that counts
training batches (``limit_train_batches``, ``overfit_batches``, ``fast_dev_run``, ``val_check_interval``,
step-based checkpoints); otherwise 1.

This module decides how many steps one Lightning step runs, cuts the batch into the optimiser's batches and counts
the optimiser steps of a fit; the module itself runs the steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

AUTO_STEPS_PER_EXECUTION = 8


def check_steps_per_execution(steps_per_execution: Any, scheduler: Mapping[str, Any] | None) -> None:
    """Raise a ValueError unless ``steps_per_execution`` is ``"auto"`` or an int >= 1 that the scheduler allows."""
    if steps_per_execution != "auto" and (
        not isinstance(steps_per_execution, int) or isinstance(steps_per_execution, bool) or steps_per_execution < 1
    ):
        raise ValueError(f"steps_per_execution must be 'auto' or an int >= 1, got {steps_per_execution!r}")
    if steps_per_execution not in ("auto", 1) and scheduler and scheduler.get("frequency", 1) != 1:
        raise ValueError("steps_per_execution > 1 steps the scheduler itself and needs scheduler frequency 1")


def groups_batches(datamodule: Any) -> bool:
    """Whether ``datamodule`` can serve several optimiser batches per Lightning step (xentlit's datamodules)."""
    return isinstance(getattr(datamodule, "steps_per_execution", None), int) and hasattr(datamodule, "batch_size")


def resolve_steps_per_execution(
    requested: int | str, trainer: Any, datamodule: Any, scheduler_config: Mapping[str, Any] | None
) -> tuple[int, str]:
    """``(steps, why it is 1)``; raises for an explicit value that the trainer's settings rule out."""
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
        return int(requested), ""
    if not groups_batches(datamodule):
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
    if scheduler_config and scheduler_config.get("frequency", 1) != 1:
        conflicts.append("the scheduler steps every few steps")
    return (1, "; ".join(conflicts)) if conflicts else (AUTO_STEPS_PER_EXECUTION, "")


def describe_auto(steps: int, why: str) -> str:
    """The line that says what ``steps_per_execution="auto"`` chose (``why``: the reason it is 1)."""
    if steps > 1:
        return (f"steps_per_execution=auto: {steps} optimiser steps per Lightning step (the progress "
                f"bar counts groups of {steps} batches)")
    return f"steps_per_execution=auto: 1 ({why})"


def backward_is_plain(trainer: Any, module: LightningModule) -> bool:
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


def optimizer_batches(
    x: Tensor, y: Tensor, steps: int, slice_rows: tuple[int, bool] | None
) -> list[tuple[Tensor, Tensor]]:
    """The optimiser batches of one Lightning batch: ``slice_rows = (rows, drop_short)`` cuts the datamodule's own
    batches (as with one step per batch); without it the batch is split into ``steps`` near-equal slices."""
    if slice_rows is not None:
        rows, drop_short = slice_rows
        slices = list(zip(x.split(rows), y.split(rows)))
        if drop_short and len(slices[-1][0]) < rows:
            slices.pop()
    else:
        slices = list(zip(x.tensor_split(steps), y.tensor_split(steps)))
    return [(xs, ys) for xs, ys in slices if len(xs) > 0]


def estimated_optimizer_steps(trainer: Any, steps: int, slice_rows: tuple[int, bool] | None) -> int:
    """Optimiser steps of the whole fit (``Trainer.estimated_stepping_batches`` counts Lightning steps)."""
    lightning_steps = int(trainer.estimated_stepping_batches)
    if steps == 1:
        return lightning_steps
    if slice_rows is not None:
        rows, drop_short = slice_rows
        n = len(trainer.train_dataloader.dataset)
        epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
        per_epoch = n // rows if drop_short else -(-n // rows)
        total = per_epoch * epochs if epochs is not None else trainer.max_steps
    else:
        total = lightning_steps * steps
    return min(total, trainer.max_steps) if trainer.max_steps >= 0 else total


def merge_step_outputs(outputs: Sequence[dict[str, Tensor]]) -> dict[str, Any]:
    """One training-step output for an execution's steps: their rows concatenated, the last step's loss, and
    ``step_rows`` (rows per optimiser step) for callbacks that look at each step."""
    return {"loss": outputs[-1]["loss"].detach(), "logits": torch.cat([o["logits"] for o in outputs]),
            "target": torch.cat([o["target"] for o in outputs]), "step_rows": [len(o["target"]) for o in outputs]}
