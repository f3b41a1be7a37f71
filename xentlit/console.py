"""What a run shows on the console, and keeps in its log file.

On a terminal, tables are drawn with rich (long values folded, never cut); when stdout is not a terminal (a file,
a pipe, a batch system's log) they are plain aligned lines, so paths stay whole and greppable. Everything shown
here is also written to the ``xentlit.report`` logger, which the run's logging config
(``conf/hydra/job_logging/xentlit.yaml``) sends to the run's log file only (``<run dir>/train.log``): the console
shows it once, the log file keeps it. Outside a Hydra run that logger has no handler and the text is printed only.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary as _LightningModelSummary
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities.model_summary.model_summary import get_formatted_model_size, get_human_readable_count

__all__ = ["REPORT_LOGGER", "ModelSummary", "ProgressBar", "say", "show_table"]

# The logger whose records go to the run's log file only (the console gets the same text printed).
REPORT_LOGGER = "xentlit.report"


def _is_terminal() -> bool:
    return bool(getattr(sys.stdout, "isatty", lambda: False)())


def say(text: str) -> None:
    """Print ``text`` on stdout and keep it in the run's log file."""
    print(text, flush=True)
    logging.getLogger(REPORT_LOGGER).info(text)


def plain_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """``rows`` as left-aligned columns under ``header``, nothing cut."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def show_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]],
               right_aligned: Sequence[int] = ()) -> None:
    """A table: rich on a terminal (long values folded onto more lines), plain lines otherwise; plain lines in
    the run's log file either way."""
    plain = f"{title}\n{plain_table(header, rows)}"
    logging.getLogger(REPORT_LOGGER).info(plain)
    if not _is_terminal():
        print(plain, flush=True)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="right" if i in right_aligned else "left", overflow="fold")
    for row in rows:
        table.add_row(*(str(c) for c in row))
    Console().print(table)


class ModelSummary(_LightningModelSummary):
    """Lightning's model summary (printed when ``fit`` starts), without Lightning's FLOPs column and "Total FLOPs: 0"
    line when no FLOPs were measured (they are counted only for a module with an ``example_input_array``); a rich
    table on a terminal, plain lines otherwise, and in the run's log file."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        columns = [(name, values) for name, values in summary_data if name != "FLOPs" or total_flops]
        header = [name.strip() for name, _ in columns]  # the first column, " ", numbers the layers
        rows = list(zip(*(values for _, values in columns)))
        def count(number: float) -> str:
            return get_human_readable_count(int(number)).strip()

        totals = [
            f"Trainable params: {count(trainable_parameters)}",
            f"Non-trainable params: {count(total_parameters - trainable_parameters)}",
            f"Total params: {count(total_parameters)}",
            f"Total estimated model params size (MB): {get_formatted_model_size(model_size)}",
            f"Modules in train mode: {total_training_modes['train']}, in eval mode: {total_training_modes['eval']}",
        ]
        if total_flops:
            totals.append(f"Total FLOPs: {count(total_flops)}")
        show_table("Model summary", header, rows, right_aligned=[i for i, h in enumerate(header) if h == "Params"])
        say("\n".join(totals))


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar on a terminal. When stdout is not one (a file, a pipe, a batch job) no bar is
    drawn -- rich would print its last frame, the metrics wrapped at 80 columns -- but one plain line per epoch,
    ``epoch 3/29: train/loss 0.1234  train/acc 0.9611  val/loss ...`` (0-based, as Lightning's bar and the CSV log
    count), on stdout and in the run's log file."""

    _finished_epoch: int | None = None  # an epoch whose line waits for its training metrics

    @property
    def _lines(self) -> bool:
        return not _is_terminal()

    @property
    def is_enabled(self) -> bool:
        return super().is_enabled and not self._lines

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # the module logs the epoch's training metrics after the callbacks' hook: the line waits for them
        self._finished_epoch = trainer.current_epoch if self._lines and super().is_enabled else None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_line(trainer)
        super().on_train_epoch_start(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_line(trainer)
        super().on_train_end(trainer, pl_module)

    def _epoch_line(self, trainer: pl.Trainer) -> None:
        epoch, self._finished_epoch = self._finished_epoch, None
        if epoch is None or not trainer.is_global_zero:
            return
        last = f"/{trainer.max_epochs - 1}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        stage = {"train": 0, "val": 1}  # training metrics first, then validation, then any other
        values = sorted(((name, value) for name, value in trainer.progress_bar_metrics.items() if "/" in name),
                        key=lambda item: stage.get(item[0].split("/", 1)[0], 2))
        say(f"epoch {epoch}{last}: " + "  ".join(
            f"{name} {value:.4f}" if isinstance(value, (int, float)) else f"{name} {value}" for name, value in values))
