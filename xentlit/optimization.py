"""The optimiser and lr-scheduler of :class:`~xentlit.XentModule`, built from factories (what Hydra's
``_partial_: true`` configs give), and the scheduler stepping that manual optimisation leaves to the module."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def check_scheduler_config(scheduler: Any) -> None:
    """Raise a ValueError unless ``scheduler`` is None or a Lightning lr-scheduler config with a factory."""
    if scheduler is not None and not isinstance(scheduler, Mapping):
        raise ValueError(
            "scheduler must be a Lightning lr-scheduler config mapping with a 'scheduler' factory, "
            f"got {type(scheduler).__name__}"
        )
    if scheduler is not None and scheduler and not callable(scheduler.get("scheduler")):
        raise ValueError(f"scheduler['scheduler'] must be a factory taking the optimizer, got {scheduler!r}")


def build_optimizers(
    parameters: Iterable[nn.Parameter],
    optimizer_factory: OptimizerFactory | None,
    scheduler_config: Mapping[str, Any] | None,
    total_steps: Callable[[], int],
) -> Any:
    """What ``configure_optimizers`` returns: the factory's optimiser (Adam(lr=1e-3) without one) and, with a
    scheduler config, its scheduler; a ``total_steps`` argument left unset is filled with ``total_steps()``."""
    factory = optimizer_factory or (lambda params: torch.optim.Adam(params, lr=1e-3))
    optimizer = factory(parameters)
    if not scheduler_config:
        return optimizer
    config = dict(scheduler_config)
    make = config.pop("scheduler")
    kwargs: dict[str, Any] = {}
    func = getattr(make, "func", make)
    keywords = getattr(make, "keywords", {}) or {}
    if "total_steps" in _parameters(func) and keywords.get("total_steps") is None:
        kwargs["total_steps"] = total_steps()
    config["scheduler"] = make(optimizer, **kwargs)
    return {"optimizer": optimizer, "lr_scheduler": config}


def step_scheduler(scheduler: Any, config: Mapping[str, Any], callback_metrics: Mapping[str, Tensor]) -> None:
    """Step ``scheduler`` as Lightning would: ``ReduceLROnPlateau`` on its monitored metric (``val/loss`` unless
    the config names another), any other with no argument."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        monitor = config.get("monitor", "val/loss")
        value = callback_metrics.get(monitor)
        if value is None:
            raise RuntimeError(f"ReduceLROnPlateau monitors {monitor!r}, which was not logged this epoch")
        scheduler.step(value)
    else:
        scheduler.step()


def _parameters(func: Any) -> set[str]:
    try:
        return set(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return set()
