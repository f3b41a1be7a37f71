"""The run functions behind ``scripts/train.py``: config in, fitted and tested model out.

Data flows one way: the composed config is instantiated into a datamodule, a network, a loss, a
LightningModule, callbacks, loggers and a Trainer; then fit, then test of the best checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

METRICS_FILE = "metrics.json"


def _instantiate_group(node: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-of-configs group (loggers, callbacks)."""
    if not node:
        return []
    return [instantiate(entry) for entry in node.values() if entry is not None and "_target_" in entry]


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer]:
    """Instantiate the datamodule, the module (with its network and loss) and the trainer from ``cfg``."""
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model, in_features=datamodule.num_features, num_classes=datamodule.num_classes)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    module = instantiate(
        cfg.module,
        net=net,
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optimizer),
        scheduler=scheduler,
        num_classes=datamodule.num_classes,
    )
    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return datamodule, module, trainer


def train(cfg: DictConfig) -> float | None:
    """Seed, build, fit, test the best checkpoint, write ``metrics.json``; return ``cfg.optimized_metric``."""
    started = time.perf_counter()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, module, trainer = build(cfg)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    if cfg.train:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    fit_metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}

    test_metrics: dict[str, float] = {}
    if cfg.test:
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None and cfg.train else ""
        ckpt_path = best or (None if cfg.train else cfg.get("ckpt_path"))
        results = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        test_metrics = {name: float(value) for name, value in (results[0] if results else {}).items()}

    metrics = {**fit_metrics, **test_metrics}
    summary = {
        "metrics": metrics,
        "best_checkpoint": getattr(trainer.checkpoint_callback, "best_model_path", "") or None,
        "best_epoch": _best_epoch(trainer),
        "run_dir": str(Path(trainer.default_root_dir).resolve()),
        "wall_time_s": round(time.perf_counter() - started, 3),
    }
    _write_summary(summary, Path(trainer.default_root_dir))
    value = metrics.get(cfg.optimized_metric)
    return None if value is None or math.isnan(value) else value


def _best_epoch(trainer: pl.Trainer) -> int | None:
    path = getattr(trainer.checkpoint_callback, "best_model_path", "")
    if not path:
        return None
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except (OSError, KeyError, RuntimeError):
        return None


@rank_zero_only
def _write_summary(summary: dict[str, Any], run_dir: Path) -> None:
    """Write ``metrics.json`` in the run directory and print the final table (rank 0 only)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / METRICS_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    from rich.console import Console
    from rich.table import Table

    table = Table(title="xentlit: final metrics", show_lines=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in sorted(summary["metrics"].items()):
        if name.startswith("test/"):
            table.add_row(name, f"{value:.4f}")
    for key in ("best_epoch", "best_checkpoint", "run_dir", "wall_time_s"):
        table.add_row(key, str(summary[key]))
    Console().print(table)
