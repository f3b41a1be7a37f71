"""The epoch's statistics summed over ranks (one collective per epoch) and turned into history records."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor

from xentlit.callbacks.doctor.observations import FitState, TrainEpoch, ValEpoch
from xentlit.callbacks.doctor.statistics import N_BINS, TRAIN_HEAD, VAL_HEAD


def val_size(num_classes: int) -> int:
    """Length of a validation run's statistics vector."""
    return VAL_HEAD + 3 * N_BINS + 3 * num_classes


def sum_over_ranks(trainer: pl.Trainer, single: bool, train: tuple[Tensor | None, int, int],
                   vals: list[Tensor | None], num_classes: int, device: torch.device,
                   dtype: torch.dtype) -> list[float]:
    """``[rows, batches, *train statistics, *each validation run's statistics]`` summed over ranks, on the host.

    Called on every rank at every epoch end (missing statistics count as zeros), so that DDP cannot deadlock;
    one collective.
    """
    stats, rows, batches = train
    if stats is None or stats.numel() != TRAIN_HEAD + num_classes:
        stats = torch.zeros(TRAIN_HEAD + num_classes, device=device, dtype=dtype)
    size = val_size(num_classes)
    filled = [v if v is not None else torch.zeros(size, device=device, dtype=dtype) for v in vals]
    if single:
        return [float(rows), float(batches)] + stats.tolist() + [x for v in filled for x in v.tolist()]
    sizes = torch.tensor([rows, batches], dtype=dtype).to(device, non_blocking=True)
    packed = trainer.strategy.reduce(torch.cat([sizes, stats.to(device, dtype), *filled]), reduce_op="sum")
    return packed.double().cpu().tolist()


def train_epoch(epoch: int, values: list[float], num_classes: int, state: FitState,
                weight_change: float | None, world: int) -> tuple[TrainEpoch, list[float]]:
    """The training epoch (from :func:`sum_over_ranks`' values and the per-step values of ``state``) and its
    class counts."""
    n_rows, batches, nll_sum, n_valid, maxprob_sum, all_ignored = values[:2 + TRAIN_HEAD]
    counts = values[2 + TRAIN_HEAD:2 + TRAIN_HEAD + num_classes]
    # (per-step values read on the host: gradient norms are the same on every rank, the loss is this rank's)
    gn_sum, gn_count, gn_max = state.epoch_grad
    loss_sum, loss_count = state.epoch_loss
    nan = float("nan")
    record = {
        "epoch": epoch,
        "train_nll": nll_sum / n_valid if n_valid > 0 else nan,
        "train_loss": loss_sum / loss_count if loss_count > 0 else nan,
        "max_prob": maxprob_sum / n_rows if n_rows > 0 else nan,
        "grad_norm": gn_sum / gn_count if gn_count > 0 else nan,
        "grad_norm_max": gn_max if gn_count > 0 else nan,
    }
    if weight_change is not None:
        record["weight_change"] = weight_change
    return TrainEpoch(record, n_rows, batches, n_valid, all_ignored, world), counts


def val_epochs(values: list[float], pending: list[tuple[int, int]], num_classes: int, train_nll: float,
               train_counts: list[float]) -> list[ValEpoch]:
    """The validation runs of the epoch (``pending``: their epoch and step), those with labelled targets."""
    c, k = num_classes, N_BINS
    size = val_size(c)
    runs = []
    for i, (epoch, step) in enumerate(pending):
        val = values[2 + TRAIN_HEAD + c + i * size:2 + TRAIN_HEAD + c + (i + 1) * size]
        n = val[1]
        if n <= 0:
            continue
        # (per bin: count, confidence sum, correct sum)
        conf, correct = val[VAL_HEAD + k:VAL_HEAD + 2 * k], val[VAL_HEAD + 2 * k:VAL_HEAD + 3 * k]
        rest = val[VAL_HEAD + 3 * k:]
        record = {
            "epoch": epoch, "step": step, "val_nll": val[0] / n, "val_acc": val[2] / n, "val_conf": val[3] / n,
            "val_ece": sum(abs(a - b) for a, b in zip(conf, correct)) / n,
            "val_ece_over": sum(max(a - b, 0.0) for a, b in zip(conf, correct)) / n,
            "train_nll": train_nll,
        }
        runs.append(ValEpoch(record, rest[:c], rest[c:2 * c], rest[2 * c:3 * c], train_counts))
    return runs
