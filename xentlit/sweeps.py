"""What a ``-m`` sweep leaves in its sweep directory besides the jobs: ``summary.csv`` and ``summary.md``.

One row per job: its directory, how it ended, its overrides (one column per overridden key, from the job's
``.hydra/overrides.yaml``) and its final metrics (from its ``metrics.json``). :class:`SweepSummary`, a Hydra
callback that ``conf/hydra/default.yaml`` installs, rewrites both files after every job (so a sweep cut short still
has one) and once more when the sweep ends; :func:`write_sweep_summary` does it for any sweep directory. Job
directories are named ``<job number>_<overrides>`` (:func:`job_dirname`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from xentlit.atomic import write_atomic

__all__ = ["SUMMARY_CSV", "SUMMARY_MD", "SweepSummary", "job_dirname", "read_jobs", "write_sweep_summary"]

SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
# Longest job directory name (filesystems allow 255 bytes).
MAX_DIRNAME = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")


def job_dirname(num: Any, override_dirname: str, max_length: int = MAX_DIRNAME) -> str:
    """``<num>_<overrides>`` with every character outside ``A-Z a-z 0-9 . _ = , + -`` replaced by ``_``, cut to
    ``max_length`` characters; ``<num>`` alone for a job without overrides. The number keeps names unique."""
    safe = _UNSAFE.sub("_", str(override_dirname))
    return f"{num}_{safe}"[:max_length] if safe else str(num)


def read_jobs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every job directory of ``sweep_dir`` (a folder holding ``.hydra/overrides.yaml``) in job order:
    ``{"job", "num", "overrides": {key: value}, "summary": metrics.json's content or None}``."""
    jobs = []
    for folder in sorted(Path(sweep_dir).iterdir()) if Path(sweep_dir).is_dir() else []:
        recorded = folder / ".hydra" / "overrides.yaml"
        if not recorded.is_file():
            continue
        overrides = {}
        for override in yaml.safe_load(recorded.read_text()) or []:
            key, _, value = str(override).partition("=")
            overrides[key] = value
        summary = None
        if (folder / "metrics.json").is_file():
            try:
                summary = json.loads((folder / "metrics.json").read_text())
            except ValueError:  # being written by a job of a parallel launcher: read at the next summary
                summary = None
        number = folder.name.split("_", 1)[0]
        jobs.append({"job": folder.name, "num": int(number) if number.isdigit() else math.inf,
                     "overrides": overrides, "summary": summary})
    return sorted(jobs, key=lambda j: (j["num"], j["job"]))


_STAGES = ("val/", "test/", "train/")


def _metric_order(name: str) -> tuple[int, str]:
    return next((i for i, stage in enumerate(_STAGES) if name.startswith(stage)), len(_STAGES)), name


def _table(jobs: list[dict[str, Any]]) -> tuple[list[str], list[str], list[str], list[list[Any]]]:
    """``(override keys, metric names, header, rows)`` of the summary."""
    keys = list(dict.fromkeys(k for job in jobs for k in job["overrides"]))
    metrics = sorted({m for job in jobs for m in ((job["summary"] or {}).get("metrics") or {})}, key=_metric_order)
    header = ["job", "status", *keys, *metrics, "best_epoch", "wall_time_s"]
    rows = []
    for job in jobs:
        summary = job["summary"] or {}
        values = summary.get("metrics") or {}
        rows.append([job["job"], summary.get("status", "unfinished"), *(job["overrides"].get(k, "") for k in keys),
                     *(values.get(m, "") for m in metrics), summary.get("best_epoch", ""),
                     summary.get("wall_time_s", "")])
    return keys, metrics, header, rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|")


def write_sweep_summary(sweep_dir: str | Path, optimized_metric: str | None = None) -> tuple[Path, Path] | None:
    """Write ``summary.csv`` (every override and metric) and ``summary.md`` (the overrides that differ between jobs,
    ``optimized_metric``, the ``test/`` metrics, and the best job by ``optimized_metric``: maximised for accuracies
    and F1, else minimised) in ``sweep_dir``, atomically. None when it holds no job yet."""
    from xentlit.cli import _MAXIMISED

    sweep_dir = Path(sweep_dir)
    jobs = read_jobs(sweep_dir)
    if not jobs:
        return None
    keys, metrics, header, rows = _table(jobs)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_atomic(sweep_dir / SUMMARY_CSV, out.getvalue())

    swept = [k for k in keys if len({job["overrides"].get(k) for job in jobs}) > 1]
    same = [f"{k}={jobs[0]['overrides'][k]}" for k in keys if k not in swept and k in jobs[0]["overrides"]]
    scores = [optimized_metric] if optimized_metric in metrics else []
    shown = ["job", "status", *swept, *scores, *(m for m in metrics if m.startswith("test/") and m not in scores),
             "best_epoch"]
    index = [header.index(name) for name in shown]
    lines = [f"# Sweep {sweep_dir.name}: {len(jobs)} job(s)", ""]
    if same:
        lines += [f"Every job: {', '.join(same)}", ""]
    lines += ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(row[i]) for i in index) + " |" for row in rows]
    if optimized_metric and optimized_metric in metrics:
        column = header.index(optimized_metric)
        scored = [row for row in rows if isinstance(row[column], (int, float)) and math.isfinite(row[column])]
        if scored:
            maximise = optimized_metric.rsplit("/", 1)[-1] in _MAXIMISED
            best = (max if maximise else min)(scored, key=lambda row: row[column])
            lines += ["", f"Best by {optimized_metric} ({'max' if maximise else 'min'}): {best[0]} "
                          f"({_cell(best[column])})"]
    lines += ["", f"Every metric of every job: {SUMMARY_CSV}."]
    write_atomic(sweep_dir / SUMMARY_MD, "\n".join(lines) + "\n")
    return sweep_dir / SUMMARY_CSV, sweep_dir / SUMMARY_MD


class SweepSummary(Callback):
    """Hydra callback: the sweep's ``summary.csv`` / ``summary.md``, rewritten after each job of a ``-m`` sweep
    and when the sweep ends."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if config.hydra.mode == RunMode.MULTIRUN:
            write_sweep_summary(config.hydra.sweep.dir, config.get("optimized_metric"))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_sweep_summary(config.hydra.sweep.dir, config.get("optimized_metric"))
