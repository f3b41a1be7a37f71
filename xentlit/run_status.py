"""What a run leaves in its directory about how it went: ``metrics.json`` (completed, diverged, interrupted
or failed), the exit status, the final table and the inferred table schema."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import DictConfig

from xentlit.atomic import write_atomic
from xentlit.commands import command_line
from xentlit.console import show_table

METRICS_FILE = "metrics.json"

# Exit statuses of a run that did not complete (a failed run exits 1, with its error).
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 128 + signal.SIGINT


def _configured_run_dir(cfg: DictConfig) -> Path | None:
    """The run directory Hydra made for this run (None outside a Hydra job)."""
    try:
        return Path(cfg.paths.output_dir).resolve()
    except Exception:
        return None


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


@rank_zero_only
def _write_summary(summary: dict[str, Any], run_dir: Path) -> None:
    """Write ``metrics.json`` in the run directory and show the final table (rank 0 only)."""
    write_atomic(run_dir / METRICS_FILE, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    rows = [(name, f"{value:.4f}") for name, value in sorted(summary["metrics"].items()) if name.startswith("test/")]
    rows += [(key, str(value)) for key, value in summary.items() if key != "metrics"]
    show_table("xentlit: final metrics", ("metric", "value"), rows, right_aligned=(1,))
