"""The run functions behind ``scripts/train.py``: config in, fitted and tested model out.

Data flows one way: the composed config is instantiated into a datamodule, a network, a loss, a
LightningModule, callbacks, loggers and a Trainer; then fit, then test of the best checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from xentlit.atomic import atomic_path, write_atomic
from xentlit.checkpointing import AtomicCheckpointIO
from xentlit.commands import command_line
from xentlit.console import ModelSummary, say, show_table
from xentlit.plain import to_plain
from xentlit.trust import check_no_interpolation, check_targets

METRICS_FILE = "metrics.json"
RUN_INFO_KEY = "xentlit"


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


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer]:
    """Instantiate the datamodule, the module (with its network and loss) and the trainer from ``cfg``."""
    datamodule = instantiate(cfg.data)
    loss = instantiate(cfg.loss)
    resolve_monitor(cfg, loss)
    module = build_module(cfg, datamodule.num_features, datamodule.num_classes,
                          getattr(datamodule, "categorical_cardinalities", ()), loss=loss)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return datamodule, module, build_trainer(cfg, extra_callbacks=(RunInfoInCheckpoint(resolved),))


class RunInfoInCheckpoint(Callback):
    """Stores the resolved run config, the class names and the input statistics in every checkpoint,
    so that a checkpoint alone rebuilds its model (``scripts/eval.py``, ``scripts/predict.py``)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        datamodule = trainer.datamodule
        info: dict[str, Any] = {"config": self.config}
        if datamodule is not None:
            info["class_names"] = [str(c) for c in getattr(datamodule, "class_names", []) or []]
            info["num_features"] = getattr(datamodule, "num_features", None)
            info["categorical_cardinalities"] = list(getattr(datamodule, "categorical_cardinalities", []) or [])
            for name in ("feature_mean", "feature_std"):
                value = getattr(datamodule, name, None)
                if isinstance(value, torch.Tensor):
                    info[name] = value.detach().cpu()
            preprocessor = getattr(datamodule, "preprocessor", None)
            if preprocessor is not None:
                info["tabular"] = preprocessor.state_dict()
        checkpoint[RUN_INFO_KEY] = to_plain(info)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Resuming a fit: the CSV log forgets what the interrupted run logged after this checkpoint."""
        if trainer.state.fn == "fit" and trainer.is_global_zero:
            for logger in trainer.loggers:
                if hasattr(logger, "forget_after_epoch"):
                    logger.forget_after_epoch(int(checkpoint.get("epoch", 0)))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU (weights only), with a clear error for missing or damaged files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated zips and pickles
        raise ValueError(
            f"checkpoint {path} is corrupt or truncated and cannot be read ({type(err).__name__}: {err}); "
            "use another checkpoint of the run (e.g. last.ckpt or the best one)"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
    return checkpoint


def run_info(checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The run information that :class:`RunInfoInCheckpoint` stored in ``checkpoint``."""
    info = checkpoint.get(RUN_INFO_KEY)
    if not info:
        raise ValueError(f"{path} was not written by xentlit's training script: it holds no run config")
    return info


def _stored_config(checkpoint: dict[str, Any], cfg: DictConfig) -> DictConfig:
    """The run config stored in a checkpoint, its parts that get built checked against the trusted targets."""
    stored = run_info(checkpoint, cfg.ckpt_path)["config"]
    if not isinstance(stored, dict):
        raise ValueError(f"{cfg.ckpt_path}: the stored run config is not a mapping")
    built = {key: stored.get(key) for key in ("data", "model", "loss", "optimizer", "scheduler", "module")}
    check_no_interpolation(built, f"checkpoint {cfg.ckpt_path}")
    check_targets(built, f"checkpoint {cfg.ckpt_path}", cfg.get("trust_targets") or ())
    return OmegaConf.create(built)


# What Lightning's DDP launcher writes into the launching process's environment.
_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextmanager
def _distributed_job() -> Iterator[None]:
    """Leave no DDP state behind, so the next job of a ``-m`` sweep launches its own processes.

    Lightning's launcher sets ``LOCAL_RANK`` (and friends) in the launching process, which would make the
    next job believe an external launcher created its processes; the process group is also left open.
    """
    saved = {name: os.environ.get(name) for name in _LAUNCHER_ENV}
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _one_tracker_run_per_job() -> Iterator[None]:
    """Finish the W&B run when the job ends, also on an error: W&B keeps one global run per process and
    Lightning's WandbLogger reuses it, so later jobs of a -m sweep would log into the first job's run."""
    try:
        yield
    finally:
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish()


def train(cfg: DictConfig) -> float | None:
    """Seed, build, fit, test the best checkpoint, write ``metrics.json``; return ``cfg.optimized_metric``."""
    with _distributed_job(), _one_tracker_run_per_job():
        try:
            return _train(cfg)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            run_dir = _configured_run_dir(cfg)
            where = getattr(err, "filename", None) or run_dir
            raise SystemExit(f"xentlit: no space left on the device writing {where}; the checkpoints written before are "
                             f"intact. Free space, then continue with: {command_line('train.py')} resume={run_dir}") from None


# Exit statuses of a run that did not complete (a failed run exits 1, with its error).
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 128 + signal.SIGINT


def _train(cfg: DictConfig) -> float | None:
    started = time.perf_counter()
    run_dir = _configured_run_dir(cfg)
    try:
        if cfg.get("resume"):  # the run directory's recorded overrides are part of this config: untrusted input
            check_targets(cfg, f"resume={cfg.resume}", cfg.get("trust_targets") or ())
            for leftover in Path(cfg.resume).rglob(".*.tmp"):  # temp files of writes a kill cut short
                leftover.unlink(missing_ok=True)
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule, module, trainer = build(cfg)
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


def _configured_run_dir(cfg: DictConfig) -> Path | None:
    """The run directory Hydra made for this run (None outside a Hydra job)."""
    try:
        return Path(cfg.paths.output_dir).resolve()
    except Exception:
        return None


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


def _interrupted(run_dir: Path | None, started: float, signal_name: str, code: int) -> None:
    if run_dir is not None:
        _write_status(run_dir, "interrupted", started, error=f"stopped by {signal_name}")
        rank_zero_info(f"xentlit: run interrupted by {signal_name}. Continue with: {command_line('train.py')} "
                       f"resume={run_dir}")
    raise SystemExit(code) from None


@rank_zero_only
def _write_status(run_dir: Path, status: str, started: float, error: str) -> None:
    """``metrics.json`` of a run that did not complete: how it ended and why, so it never looks like a finished one
    (best effort: on a full disk this write fails too, and the run's own error is what matters)."""
    with contextlib.suppress(OSError):
        _write_status_file(run_dir, status, started, error)


def _write_status_file(run_dir: Path, status: str, started: float, error: str) -> None:
    write_atomic(run_dir / METRICS_FILE, json.dumps({
        "status": status, "error": error, "metrics": {}, "run_dir": str(run_dir),
        "wall_time_s": round(time.perf_counter() - started, 3)}, indent=2, sort_keys=True) + "\n")


def _diverged(trainer: pl.Trainer) -> bool:
    """Whether a callback (the convergence doctor) stopped the fit because training diverged."""
    return any(getattr(callback, "stopped_on_divergence", False) for callback in trainer.callbacks)


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


SCHEMA_FILE = "schema.json"


@rank_zero_only
def _report_schema(datamodule: Any, run_dir: Path) -> None:
    """Print the table schema the datamodule inferred and store it in the run directory (``schema.json``)."""
    preprocessor = getattr(datamodule, "preprocessor", None)
    if preprocessor is None:
        return
    rank_zero_info(f"Columns of {getattr(datamodule, 'path', 'the table')} (role, why):\n{preprocessor.describe()}")
    write_atomic(run_dir / SCHEMA_FILE, json.dumps(preprocessor.state_dict(), indent=2) + "\n")


def _resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint ``fit`` starts from: ``ckpt_path`` if given, else ``resume``'s last.ckpt, checked first."""
    ckpt_path = cfg.get("ckpt_path")
    if cfg.get("resume") and not ckpt_path:
        return _newest_valid_checkpoint(Path(cfg.resume) / "checkpoints", f"resume={cfg.resume}")
    if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
        load_checkpoint(ckpt_path)  # a clear error for a missing or damaged file, before Lightning's own
    return ckpt_path


def _newest_valid_checkpoint(folder: Path, what: str) -> str:
    """``last.ckpt`` of ``folder``, or, when it is missing or damaged, the readable checkpoint of the latest step
    (and a line saying so)."""
    last = folder / "last.ckpt"
    try:
        load_checkpoint(last)
        return str(last)
    except (FileNotFoundError, ValueError) as err:
        problem = str(err).split(" (")[0]
    candidates = []
    for path in sorted(folder.glob("*.ckpt")) if folder.is_dir() else []:
        if path != last:
            try:
                checkpoint = load_checkpoint(path)
            except ValueError:
                continue
            candidates.append((int(checkpoint.get("global_step", -1)), int(checkpoint.get("epoch", -1)), path))
    if not candidates:
        raise FileNotFoundError(f"{what}: no readable checkpoint to resume from in {folder} ({problem})")
    step, epoch, path = max(candidates)
    rank_zero_info(f"{what}: {problem}; resuming from {path.name} instead (epoch {epoch}, step {step})")
    return str(path)


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
    """Write ``metrics.json`` in the run directory and show the final table (rank 0 only)."""
    write_atomic(run_dir / METRICS_FILE, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    rows = [(name, f"{value:.4f}") for name, value in sorted(summary["metrics"].items()) if name.startswith("test/")]
    rows += [(key, str(value)) for key, value in summary.items() if key != "metrics"]
    show_table("xentlit: final metrics", ("metric", "value"), rows, right_aligned=(1,))


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


def _prediction_inputs(cfg: DictConfig, run_cfg: DictConfig, info: dict[str, Any], label_column: str) -> tuple:
    """``(features, columns to copy through or None, raw labels or None)`` of the prediction input file."""
    import numpy as np
    import pandas as pd

    from xentlit.data import read_table
    from xentlit.data.files import read_frame
    from xentlit.data.tabular import TabularPreprocessor

    if info.get("tabular"):
        preprocessor = TabularPreprocessor.from_state_dict(info["tabular"])
        frame = read_frame(cfg.input, label_column)
        x = preprocessor.transform(frame, source=str(cfg.input))
        inputs = {c.name for c in preprocessor.columns_ if c.role != "dropped"}
        keep = [c for c in frame.column_names if c not in inputs]
        passthrough = pd.DataFrame({c: frame[c] for c in keep}) if keep else None
        labels = np.asarray(frame[label_column]) if label_column in frame else None
        return torch.from_numpy(x), passthrough, labels
    num_features = int(info["num_features"])
    x, labels = read_table(cfg.input, label_column=label_column,
                           feature_columns=run_cfg.get("data", {}).get("feature_columns"), require_label=False)
    if x.ndim != 2 or x.shape[1] != num_features:
        raise ValueError(
            f"{cfg.input} has {x.shape[1] if x.ndim == 2 else x.shape} feature columns but the model in "
            f"{cfg.ckpt_path} was trained on {num_features}"
        )
    if not np.isfinite(x).all():
        row, col = map(int, np.argwhere(~np.isfinite(x))[0])
        raise ValueError(f"{cfg.input} has non-finite features, first at row {row}, column {col}")
    features = torch.as_tensor(x, dtype=torch.float32)
    if "feature_mean" in info:
        features = (features - info["feature_mean"].float()) / info["feature_std"].float()
    return features, None, labels


def _label_metrics(labels: Any, logits: torch.Tensor, class_names: list[str], label_column: str,
                   source: str) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1 and NLL over the rows whose label is one of the model's classes."""
    import pandas as pd
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score, multiclass_recall

    from xentlit.data.tabular import _category_keys

    keys = _category_keys(pd.Series(labels))  # as the class names were made: 3.0 and "3" are class "3"
    codes = pd.Index(class_names).get_indexer(keys)  # -1: missing or not a class of the model
    known = codes >= 0
    result: dict[str, Any] = {"rows": int(len(codes)), "rows_with_known_label": int(known.sum())}
    unknown = keys[(~known) & keys.notna().to_numpy()]
    if len(unknown):
        result["unknown_labels"] = sorted(set(unknown.tolist()))[:10]
        say(f"{len(unknown)} row(s) of {source} have a {label_column!r} the model does not know "
              f"(e.g. {unknown.iloc[0]!r}); metrics leave them out")
    if not known.any():
        return result
    target = torch.as_tensor(codes[known], dtype=torch.long)
    out = logits[torch.as_tensor(known)]
    c = len(class_names)
    result.update({
        "acc": float(multiclass_accuracy(out, target, c, average="micro")),
        "balanced_acc": float(multiclass_recall(out, target, c, average="macro")),
        "f1_macro": float(multiclass_f1_score(out, target, c, average="macro")),
        "nll": float(torch.nn.functional.cross_entropy(out.double(), target)),
    })
    return result


if __name__ == "__main__":  # `python -m xentlit.cli <command> ...` is `python -m xentlit <command> ...`
    from xentlit.commands import main

    sys.exit(main())
