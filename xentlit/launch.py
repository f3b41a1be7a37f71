"""What a job sets up around a run and leaves behind for the next job of a ``-m`` sweep: the DDP launcher's
environment and one experiment-tracker run per job. (How a command starts is `xentlit.entry`.)"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch


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
