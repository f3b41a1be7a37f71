"""Loggers. Lightning's CSV logger, made to keep what a resumed run logged before."""

from __future__ import annotations

import csv
import io

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch import loggers
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from xentlit.atomic import write_atomic


class _AppendingWriter(ExperimentWriter):
    """An experiment writer that appends to an existing ``metrics.csv`` instead of deleting it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])


class CSVLogger(loggers.CSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` that appends: a run resumed in its own directory keeps the
    rows it logged before the interruption (Lightning's own logger deletes them)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Lightning's row, with a whole-number ``epoch`` written as an integer (logged values arrive as floats)."""
        epoch = metrics.get("epoch")
        if isinstance(epoch, float) and epoch.is_integer():
            metrics = {**metrics, "epoch": int(epoch)}
        super().log_metrics(metrics, step)

    def forget_after_epoch(self, epoch: int) -> None:
        """Drop the rows a killed run logged after the checkpoint it resumes from (epoch > ``epoch``), and a last row
        cut short by the kill, so the resumed run's rows are not duplicated. Rewritten atomically."""
        path = self.experiment.metrics_file_path
        if not self._fs.isfile(path):
            return
        with self._fs.open(path, "r", newline="") as file:
            reader = csv.DictReader(file)
            fields = list(reader.fieldnames or [])
            rows = list(reader)
        kept = [row for row in rows if None not in row.values() and None not in row
                and (not row.get("epoch") or float(row["epoch"]) <= epoch)]
        if len(kept) == len(rows):
            return
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
        write_atomic(path, out.getvalue())
