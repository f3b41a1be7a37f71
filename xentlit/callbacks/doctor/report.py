"""The diagnosis as a whole: findings merged over ranks, ``diagnosis.json`` and the printed summary."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from xentlit.atomic import write_atomic
from xentlit.console import say
from xentlit.callbacks.doctor.findings import SEVERITY_ORDER, Finding

log = logging.getLogger(__name__)

DIAGNOSIS_FILE = "diagnosis.json"


def ordered(findings: list[Finding]) -> list[Finding]:
    """Errors first, then warnings; by step within each."""
    return sorted(findings, key=lambda f: (SEVERITY_ORDER.get(f.severity, 9), f.step))


def report(findings: list[Finding], stopped: bool, epochs: int, steps: int) -> dict[str, Any]:
    """The diagnosis as a JSON-serialisable dict (what ``diagnosis.json`` holds)."""
    found = ordered(findings)
    return {
        "status": "problems_found" if found else "ok",
        "stopped_on_divergence": stopped,
        "epochs_seen": epochs,
        "steps_seen": steps,
        "findings": [f.to_dict() for f in found],
        "codes": [f.code for f in found],
    }


def summary(findings: list[Finding], epochs: int, steps: int) -> str:
    """A readable multi-line summary of the findings."""
    if not findings:
        return f"ConvergenceDoctor: no problems found ({epochs} epochs, {steps} steps checked)."
    lines = [f"ConvergenceDoctor: {len(findings)} problem(s) found"]
    for f in ordered(findings):
        lines.append("  " + f.format())
        if f.evidence:
            lines.append("      evidence: " + ", ".join(f"{k}={v}" for k, v in f.evidence.items()))
    return "\n".join(lines)


def gather(trainer: pl.Trainer, findings: list[Finding]) -> None:
    """Add the findings of every other rank to ``findings``, one per code (one object all-gather, called on
    every rank)."""
    if trainer.world_size <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, [f.to_dict() for f in findings])
    seen = {f.code for f in findings}
    for rank_findings in gathered:
        for item in rank_findings or []:
            if item["code"] not in seen:
                seen.add(item["code"])
                findings.append(Finding(**item))


def write(trainer: pl.Trainer, content: dict[str, Any], file_name: str | None) -> Path | None:
    """Write ``content`` as ``file_name`` in ``trainer.default_root_dir`` (atomically); the path, or ``None``
    when there is no file name or it could not be written (logged)."""
    if not file_name:
        return None
    path = Path(trainer.default_root_dir) / file_name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(content, indent=2) + "\n")
    except OSError as err:
        log.warning("ConvergenceDoctor could not write %s: %s", path, err)
        return None
    return path


def publish(trainer: pl.Trainer, content: dict[str, Any], file_name: str | None, text: str, verbose: bool) -> None:
    """On rank 0: write the report file and (``verbose``) print the summary ``text`` with the file's path."""
    if not trainer.is_global_zero:
        return
    path = write(trainer, content, file_name)
    if verbose:
        say(text + (f"\n  report: {path}" if path is not None else ""))


def log_metrics(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Epoch values (already reduced over ranks) straight to the trainer's loggers (rank 0).

    Not through ``LightningModule.log``, which costs about a millisecond per key and epoch (it rebuilds its
    result objects every epoch): too much for a callback that stays on.
    """
    if metrics and trainer.is_global_zero:
        metrics = {**metrics, "epoch": trainer.current_epoch}  # an int, as in Lightning's own rows
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
