"""Checkpoints that survive kills and full disks, and a ``last.ckpt`` that is the last epoch.

- :class:`AtomicCheckpointIO`: Lightning writes through a temp file in ``$TMPDIR`` and moves it, a copy when the run
  directory is on another filesystem (a kill mid-copy truncated ``last.ckpt``). This writes the temp file in the
  checkpoint's own directory, fsyncs it and renames it over the target: a reader sees the old file or the new one.
- :class:`ModelCheckpoint`: Lightning's, except that ``save_last`` rewrites ``last.ckpt`` at the end of every epoch
  (Lightning 2.6 rewrites it only when a top-k checkpoint is saved, so with ``save_top_k=1`` it held the best epoch,
  and ``resume=`` re-trained the epochs after it).
- :func:`check_checkpoint_fits`, :func:`rng_state`, :func:`restore_rng_state`: what :class:`~xentlit.XentModule`
  checks in and adds to its checkpoints (the model's shapes, the global RNG for a bitwise-identical resume).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch import callbacks
from torch import Tensor

from xentlit.atomic import atomic_path

__all__ = ["AtomicCheckpointIO", "ModelCheckpoint", "check_checkpoint_fits", "restore_rng_state", "rng_state"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temp file beside the checkpoint, fsync, rename (remote URLs: Lightning's own way)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()  # serialised first (as Lightning does): a full disk then fails in a plain write, as OSError
        torch.save(checkpoint, buffer)
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getbuffer())


class ModelCheckpoint(callbacks.ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` holds the last completed epoch (see the module doc)."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn == "fit":
            self._resumed_epoch = int(checkpoint.get("epoch", -1))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a resume: remove the checkpoints an interrupted run wrote after the one resumed from (later epochs,
        unknown to the restored state), so ``save_top_k`` holds again and no file of the abandoned run remains."""
        resumed = getattr(self, "_resumed_epoch", None)
        self._resumed_epoch = None
        if resumed is None or not trainer.is_global_zero or self.dirpath is None or not os.path.isdir(self.dirpath):
            return
        known = {os.path.abspath(p) for p in (*self.best_k_models, self.best_model_path, self.last_model_path) if p}
        for name in sorted(os.listdir(self.dirpath)):
            path = os.path.abspath(os.path.join(self.dirpath, name))
            if name.endswith(self.FILE_EXTENSION) and path not in known:
                try:
                    epoch = int(torch.load(path, map_location="cpu", weights_only=True).get("epoch", -1))
                except Exception:  # unreadable: a file cut short by the kill
                    epoch = resumed + 1
                if epoch > resumed:
                    os.remove(path)

    def _save_last_if_behind(self, trainer: pl.Trainer) -> None:
        """Write ``last.ckpt`` unless this step already wrote a checkpoint (then Lightning wrote it too)."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def check_checkpoint_fits(own: Mapping[str, Tensor], saved: Mapping[str, Any]) -> None:
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


def rng_state() -> dict[str, Any]:
    """The global RNG states (torch, and CUDA once initialised): they drive shuffling and dropout."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore :func:`rng_state`'s states (CUDA's only onto as many devices as it was taken from)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
