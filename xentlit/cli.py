"""The run functions behind ``scripts/train.py``: config in, fitted and tested model out.

Data flows one way: the composed config is instantiated into a datamodule, a network, a loss, a
LightningModule, callbacks, loggers and a Trainer; then fit, then test of the best checkpoint.
"""

from __future__ import annotations

import errno
import inspect
import json
import math
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from xentlit.atomic import atomic_path, write_atomic
from xentlit.checkpointing import AtomicCheckpointIO
from xentlit.commands import command_line
from xentlit.console import ModelSummary, say
from xentlit.launch import _distributed_job, _one_tracker_run_per_job
from xentlit.prediction import _label_metrics, _prediction_inputs
from xentlit.run_checkpoints import (  # noqa: F401
    RUN_INFO_KEY,
    RunInfoInCheckpoint,
    _best_epoch,
    _resume_checkpoint,
    _stored_config,
    load_checkpoint,
    run_info,
)
from xentlit.run_status import (  # noqa: F401
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    METRICS_FILE,
    SCHEMA_FILE,
    _configured_run_dir,
    _diverged,
    _in_sweep,
    _interrupted,
    _report_schema,
    _write_status,
    _write_summary,
)
from xentlit.trust import check_targets


def _instantiate_group(node: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-of-configs group (loggers, callbacks)."""
    if not node:
        return []
    return [instantiate(entry) for entry in node.values() if entry is not None and "_target_" in entry]


# The networks whose options the shipped model configs hold.
_OWN_NETWORKS = ("xentlit.MLP", "xentlit.nets.MLP")


def _mlp_options() -> set[str]:
    from xentlit.nets import MLP

    return set(inspect.signature(MLP).parameters)


def build_module(
    cfg: DictConfig, num_features: int, num_classes: int, categorical_cardinalities: Sequence[int] = (),
    loss: Any = None,
) -> pl.LightningModule:
    """The LightningModule of ``cfg`` (network, loss, optimiser, scheduler) for the given data shape.

    With categorical inputs (the last ``len(categorical_cardinalities)`` columns hold integer codes) the network
    is given ``categorical_cardinalities`` too.
    """
    shape: dict[str, Any] = {"in_features": num_features, "num_classes": num_classes}
    if categorical_cardinalities:
        shape["categorical_cardinalities"] = list(categorical_cardinalities)
    try:
        net = instantiate(cfg.model, **shape)
    except InstantiationException as err:
        if categorical_cardinalities and "categorical_cardinalities" in str(err):
            raise ValueError(
                f"the data has {len(categorical_cardinalities)} categorical column(s), but the network "
                f"{cfg.model.get('_target_')} takes no `categorical_cardinalities` argument: accept it (the last "
                "that many input columns hold integer codes, 0 = missing or unseen; xentlit.MLP embeds them), or "
                "make the columns numeric with data.numeric_columns / drop them with data.drop_columns"
            ) from None
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        options = sorted(k for k in cfg.model if k != "_target_")
        if (unexpected and unexpected.group(1) in options and set(options) <= _mlp_options()
                and cfg.model.get("_target_") not in _OWN_NETWORKS):
            raise ValueError(
                f"model._target_={cfg.model._target_} does not take `{unexpected.group(1)}`: it kept model=mlp's "
                f"options {options}. Give your network its own option file: "
                "<your config dir>/model/<name>.yaml holding `_target_:` and its own arguments, then run with "
                "--config-dir <your config dir> model=<name> (README: Your own configs and networks)"
            ) from None
        raise
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    return instantiate(
        cfg.module,
        net=net,
        loss=loss if loss is not None else instantiate(cfg.loss),
        optimizer=instantiate(cfg.optimizer),
        scheduler=scheduler,
        num_classes=num_classes,
    )


def build_trainer(cfg: DictConfig, extra_callbacks: tuple[Callback, ...] = ()) -> pl.Trainer:
    """The Trainer of ``cfg`` with its loggers and callbacks (``monitor: auto`` resolved first)."""
    if cfg.get("monitor") is not None and "auto" in (cfg.monitor.metric, cfg.monitor.mode):
        resolve_monitor(cfg, instantiate(cfg.loss) if cfg.get("loss") else None)
    callbacks = [*_instantiate_group(cfg.get("callbacks")), *extra_callbacks]
    extra: dict[str, Any] = {}
    trainer_cfg = cfg.get("trainer") or {}
    if trainer_cfg.get("enable_model_summary") is not False and not any(
            isinstance(c, pl.callbacks.ModelSummary) for c in callbacks):
        # Lightning's summary without its "Total FLOPs: 0" (xentlit.console); Lightning adds no second one
        callbacks.append(ModelSummary())
        extra["enable_model_summary"] = False
    loggers = _instantiate_group(cfg.get("logger"))
    # checkpoints written atomically in their own directory (see xentlit.checkpointing)
    plugins = cfg.trainer.get("plugins") if cfg.get("trainer") is not None else None
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                       plugins=plugins if plugins is not None else [AtomicCheckpointIO()], **extra)


# Metrics where larger is better (their mode is max); every other monitored metric is minimised.
_MAXIMISED = ("acc", "acc_best", "balanced_acc", "f1_macro")


def resolve_monitor(cfg: DictConfig, loss: Any) -> None:
    """Fill ``cfg.monitor``'s ``auto`` values (see :class:`~xentlit.config.MonitorConfig`) from the loss."""
    monitor = cfg.get("monitor")
    if monitor is None:
        return
    if monitor.metric == "auto":
        monitor.metric = "val/balanced_acc" if getattr(loss, "rebalances_classes", False) else "val/nll"
    if monitor.mode == "auto":
        monitor.mode = "max" if str(monitor.metric).rsplit("/", 1)[-1] in _MAXIMISED else "min"
    if monitor.mode not in ("min", "max"):
        raise ValueError(f"monitor.mode must be min, max or auto, got {monitor.mode!r}")


def build(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> tuple[pl.LightningDataModule, pl.LightningModule,
                                                                       pl.Trainer]:
    """Instantiate the datamodule, the module (with its network and loss) and the trainer from ``cfg``
    (``callbacks``: objects added to the configured callbacks, e.g. a search's pruning callback)."""
    datamodule = instantiate(cfg.data)
    loss = instantiate(cfg.loss)
    resolve_monitor(cfg, loss)
    module = build_module(cfg, datamodule.num_features, datamodule.num_classes,
                          getattr(datamodule, "categorical_cardinalities", ()), loss=loss)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return datamodule, module, build_trainer(cfg, extra_callbacks=(RunInfoInCheckpoint(resolved), *callbacks))


def train(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> float | None:
    """Seed, build, fit, test the best checkpoint, write ``metrics.json``; return ``cfg.optimized_metric``.

    ``callbacks`` are Lightning callbacks added to the configured ones (objects a config cannot describe, e.g. the
    hyperparameter search's callback that reports each epoch to its trial)."""
    with _distributed_job(), _one_tracker_run_per_job():
        try:
            return _train(cfg, callbacks)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            run_dir = _configured_run_dir(cfg)
            where = getattr(err, "filename", None) or run_dir
            raise SystemExit(f"xentlit: no space left on the device writing {where}; the checkpoints written before are "
                             f"intact. Free space, then continue with: {command_line('train.py')} resume={run_dir}") from None


def _train(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> float | None:
    started = time.perf_counter()
    run_dir = _configured_run_dir(cfg)
    try:
        if cfg.get("resume"):  # the run directory's recorded overrides are part of this config: untrusted input
            check_targets(cfg, f"resume={cfg.resume}", cfg.get("trust_targets") or ())
            for leftover in Path(cfg.resume).rglob(".*.tmp"):  # temp files of writes a kill cut short
                leftover.unlink(missing_ok=True)
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule, module, trainer = build(cfg, callbacks)
        run_dir = Path(trainer.default_root_dir).resolve()
        _report_schema(datamodule, run_dir)
        for logger in trainer.loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        if cfg.train:
            _fit(cfg, trainer, module, datamodule, run_dir, started)
        status = "diverged" if _diverged(trainer) else "completed"
        fit_metrics = _metric_values(trainer.callback_metrics)
        if cfg.train and not any(name.startswith("val/") for name in fit_metrics):
            fit_metrics.update(_final_validation(trainer, module, datamodule))
        test_metrics: dict[str, float] = {}
        if cfg.test:
            checkpoint = trainer.checkpoint_callback
            best = checkpoint.best_model_path if checkpoint is not None and cfg.train else ""
            ckpt_path = best or (None if cfg.train else cfg.get("ckpt_path"))
            results = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
            test_metrics = _metric_values(results[0] if results else {})
    except KeyboardInterrupt:  # Ctrl-C outside fit (Lightning handles it inside)
        _interrupted(run_dir, started, "SIGINT", EXIT_INTERRUPTED)
        raise  # not reached
    except Exception as err:
        if run_dir is not None:
            _write_status(run_dir, "failed", started, error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        raise

    metrics = {**fit_metrics, **test_metrics}
    summary = {
        "status": status,
        "metrics": metrics,
        "best_checkpoint": getattr(trainer.checkpoint_callback, "best_model_path", "") or None,
        "best_epoch": _best_epoch(trainer),
        "run_dir": str(run_dir),
        "wall_time_s": round(time.perf_counter() - started, 3),
    }
    _write_summary(summary, run_dir)
    if status == "diverged":
        rank_zero_info(f"xentlit: run diverged: the convergence doctor stopped training (see {run_dir / 'diagnosis.json'}); "
                       "the checkpoints hold the last healthy weights")
        if not _in_sweep():
            raise SystemExit(EXIT_DIVERGED)
        leaf = str(cfg.optimized_metric).rsplit("/", 1)[-1]
        return float("-inf") if leaf in _MAXIMISED else float("inf")  # the worst objective: the sweep goes on
    rank_zero_info(f"xentlit: run completed ({run_dir})")
    value = metrics.get(cfg.optimized_metric)
    return None if value is None or math.isnan(value) else value


def _metric_values(logged: Any) -> dict[str, float]:
    """The logged metrics as floats, without the loggers' ``step`` and ``epoch`` columns."""
    return {name: float(value) for name, value in logged.items() if name not in ("step", "epoch")}


def _final_validation(trainer: pl.Trainer, module: Any, datamodule: Any) -> dict[str, float]:
    """Validation metrics of a fit that ran no epoch (a resume of a run killed after its last epoch, e.g. during
    testing): the final weights validated again, and the best accuracy so far from the module's restored state."""
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = _metric_values(results[0] if results else {})
    best = getattr(module, "val_acc_best", None)
    if best is not None and "val/acc" in metrics:
        best.update(torch.tensor(metrics["val/acc"]))
        metrics["val/acc_best"] = float(best.compute())
    return metrics


def _fit(cfg: DictConfig, trainer: pl.Trainer, module: Any, datamodule: Any, run_dir: Path, started: float) -> None:
    """``trainer.fit``; a SIGTERM or Ctrl-C ends the run with its status recorded and the resume command printed."""
    from lightning.pytorch.trainer.states import TrainerStatus

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=_resume_checkpoint(cfg))
    except SIGTERMException:
        # Lightning stops cleanly (no half-written checkpoint) but exits with status 0: say what happened.
        _interrupted(run_dir, started, "SIGTERM", 128 + signal.SIGTERM)
    except SystemExit:  # Lightning turns Ctrl-C into exit(1) after its graceful shutdown
        if trainer.state.status == TrainerStatus.INTERRUPTED:
            _interrupted(run_dir, started, "SIGINT", EXIT_INTERRUPTED)
        raise


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Re-test a checkpoint on the test split of the data it was trained on; write ``metrics.json``."""
    with _distributed_job():
        started = time.perf_counter()
        checkpoint = load_checkpoint(cfg.ckpt_path)
        run_cfg = _stored_config(checkpoint, cfg)
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule = instantiate(run_cfg.data)
        module = build_module(run_cfg, datamodule.num_features, datamodule.num_classes,
                              getattr(datamodule, "categorical_cardinalities", ()))
        trainer = build_trainer(cfg)
        results = trainer.test(module, datamodule=datamodule, ckpt_path=str(cfg.ckpt_path), verbose=False)
        metrics = _metric_values(results[0] if results else {})
        summary = {
            "metrics": metrics,
            "checkpoint": str(Path(cfg.ckpt_path).resolve()),
            "epoch": checkpoint.get("epoch"),
            "run_dir": str(Path(trainer.default_root_dir).resolve()),
            "wall_time_s": round(time.perf_counter() - started, 3),
        }
        _write_summary(summary, Path(trainer.default_root_dir))
        return metrics


def predict(cfg: DictConfig) -> Path:
    """Class predictions and probabilities for the rows of ``cfg.input``, written as CSV to ``cfg.output``.

    Needs only the checkpoint: the network, the class names and the training split's preprocessing are rebuilt
    from what :class:`RunInfoInCheckpoint` stored. Tables are matched by column name (any order, extra columns
    copied through to the output, a missing one named in the error); a label column, if present, also gives
    metrics (printed and written beside the output as ``<output>.metrics.json``). Runs on the CPU unless
    ``cfg.device`` says otherwise.
    """
    import pandas as pd

    checkpoint = load_checkpoint(cfg.ckpt_path)
    info = run_info(checkpoint, cfg.ckpt_path)
    run_cfg = _stored_config(checkpoint, cfg)
    class_names = [str(c) for c in info["class_names"]]
    label_column = run_cfg.get("data", {}).get("label_column", "label")
    features, passthrough, labels = _prediction_inputs(cfg, run_cfg, info, label_column)

    module = build_module(run_cfg, features.shape[1], len(class_names), info.get("categorical_cardinalities") or ())
    module.load_state_dict(checkpoint["state_dict"])
    device = torch.device(cfg.device)
    module.to(device).eval()
    logits = []
    with torch.inference_mode():
        for start in range(0, len(features), cfg.batch_size):
            logits.append(module(features[start : start + cfg.batch_size].to(device)).float().cpu())
    logit = torch.cat(logits) if logits else torch.zeros((0, len(class_names)))
    prob = logit.softmax(dim=1).numpy()
    index = prob.argmax(axis=1)
    table = passthrough if passthrough is not None else pd.DataFrame(index=range(len(index)))
    table["prediction"] = [class_names[i] for i in index]
    table["class_index"] = index
    for k, name in enumerate(class_names):
        table[f"prob_{name}"] = prob[:, k]
    output = Path(cfg.output)
    with atomic_path(output) as tmp:
        table.to_csv(tmp, index=False)
    say(f"wrote {len(table)} predictions to {output}")
    if labels is not None:
        metrics = _label_metrics(labels, logit, class_names, label_column, str(cfg.input))
        write_atomic(output.with_name(output.name + ".metrics.json"), json.dumps(metrics, indent=2) + "\n")
        say("metrics on the rows with a known label: " + ", ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    return output


if __name__ == "__main__":  # `python -m xentlit.cli <command> ...` is `python -m xentlit <command> ...`
    from xentlit.commands import main

    sys.exit(main())
