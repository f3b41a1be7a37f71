"""Checkpoints of a run: the run information stored in them (so a checkpoint alone rebuilds its model),
reading them safely, and which one a resumed run starts from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from xentlit.plain import to_plain
from xentlit.trust import check_no_interpolation, check_targets

RUN_INFO_KEY = "xentlit"


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
