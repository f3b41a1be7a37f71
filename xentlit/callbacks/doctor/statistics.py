"""Epoch statistics of the logits and targets, computed on their device in chunks of several steps.

Per step the doctor only keeps references to the step's (detached) logits and targets; every ``chunk_size``
logits' worth of memory (or at the end of the stage) they are reduced together into one vector of sums, so the
number of kernels per step stays near zero and memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

N_BINS = 15  # calibration bins (as XentModule's default ECE)
TRAIN_HEAD = 4  # [nll_sum, labelled, max_prob_sum, all_ignored_batches], then the class counts
VAL_HEAD = 4  # [nll_sum, labelled, correct, confidence_sum], then the calibration bins and per-class counts

#: a step's detached logits, its targets and the rows of each optimiser batch in it (None: one batch)
Item = tuple[Tensor, Tensor, list[int] | None]


def flatten_classes(logits: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``(N, C, d1, ...)`` logits -> ``(N*d1*..., C)``; targets follow (indices ``(M,)`` or probabilities
    ``(M, C)``), or ``None`` when their shape does not match the logits."""
    c = logits.shape[1]
    flat = logits.movedim(1, -1).reshape(-1, c) if logits.dim() > 2 else logits
    if target is None:
        return flat, None
    if target.is_floating_point() and target.dim() == logits.dim() and target.shape[1] == c and target.dim() > 1:
        soft = target.movedim(1, -1).reshape(-1, c) if target.dim() > 2 else target
        return flat, soft if soft.shape == flat.shape else None
    index = target.reshape(-1)
    return flat, index if index.numel() == flat.shape[0] else None


def batch_sizes(item: Item) -> list[int]:
    """The number of targets of each optimiser batch of a step."""
    _, target, rows = item
    if not rows or sum(rows) != target.shape[0]:
        return [target.numel()]
    per_row = target.numel() // max(target.shape[0], 1)
    return [r * per_row for r in rows]


class EpochSums:
    """One stage's statistics over an epoch: steps are kept (:meth:`add`) until about ``limit_bytes`` of storage
    is held (a view keeps all of its storage alive), then reduced together by ``reduce`` into one vector and
    summed on the device. ``reduce(items)`` returns ``(vector, rows, batches)`` or ``None``."""

    def __init__(self, reduce: Callable[[list[Item]], tuple[Tensor, int, int] | None], limit_bytes: int) -> None:
        self._reduce = reduce
        self.limit = limit_bytes
        self.items: list[Item] = []
        self.held = 0
        self.total: Tensor | None = None
        self.rows = self.batches = 0

    def add(self, logits: Tensor, target: Tensor, rows: list[int] | None = None) -> bool:
        """Keep a step; True when enough has accumulated to be reduced."""
        self.items.append((logits, target, rows))
        self.held += logits.untyped_storage().nbytes() + target.untyped_storage().nbytes()
        return self.held >= self.limit

    def add_reduced(self, result: tuple[Tensor, int, int]) -> None:
        """Add the statistics of steps already reduced."""
        stats, rows, batches = result
        self.rows += rows
        self.batches += batches
        self.total = stats if self.total is None or self.total.shape != stats.shape else self.total + stats

    def reduce(self) -> None:
        """Reduce the steps kept so far (they are dropped even if reducing fails)."""
        items, self.items, self.held = self.items, [], 0
        result = self._reduce(items) if items else None
        if result is not None:
            self.add_reduced(result)

    def take(self) -> tuple[Tensor | None, int, int]:
        """The epoch's sums, rows and batches (what :meth:`reduce` has summed); starts afresh."""
        out = (self.total, self.rows, self.batches)
        self.items, self.held, self.total, self.rows, self.batches = [], 0, None, 0, 0
        return out


def _flatten_items(items: list[Item]) -> tuple[Tensor, Tensor, list[Item]] | None:
    """The chunk's logits ``(M, C)`` (float32) and targets concatenated, and the steps kept (same C,
    same target kind)."""
    c = items[0][0].shape[1]
    soft = None
    kept, flat = [], []
    for item in items:
        f_lg, f_t = flatten_classes(item[0], item[1])
        if f_t is None or f_lg.shape[1] != c:
            continue
        is_soft = f_t.is_floating_point() and f_t.dim() == 2
        if soft is None:
            soft = is_soft
        if is_soft != soft:
            continue
        kept.append(item)
        flat.append((f_lg, f_t))
    if not flat:
        return None
    if len(flat) == 1:
        return flat[0][0].float(), flat[0][1], kept
    return torch.cat([lg for lg, _ in flat]).float(), torch.cat([t for _, t in flat]), kept


def _valid_targets(t: Tensor, c: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(valid, safe)``: which index targets count, and the targets with every other one set to ``c``
    (out of range: ``bincount``'s spill bin, never equal to a prediction)."""
    tl = t.long()
    valid = tl.clamp(0, c - 1) == tl
    if 0 <= ignore_index < c:  # (a negative ignore_index, the usual one, is already out of range)
        valid &= tl != ignore_index
    return valid, torch.where(valid, tl, c)


def _log_partition(x: Tensor, with_argmax: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(logsumexp, 1 / sum(exp(x - max)), argmax)`` per row; ``1 / sum(...)`` is the max probability.

    Built from max, one exp and a sum instead of ``log_softmax``, whose CPU kernel is about ten times
    slower over a short class dimension, and without materialising the (N, C) log-probabilities.
    """
    if with_argmax:
        top, arg = x.max(dim=1, keepdim=True)
    else:
        top, arg = x.amax(dim=1, keepdim=True), None
    total = (x - top).exp_() @ x.new_ones(x.shape[1])  # (a row sum; the product is faster over a short row)
    return total.log() + top.squeeze(1), total.reciprocal(), (arg.squeeze(1) if arg is not None else None)


def _nll_sum(x: Tensor, lse: Tensor, t: Tensor, valid: Tensor | None, safe: Tensor | None) -> Tensor:
    """Summed negative log-likelihood of index targets (``valid``/``safe``) or of probability targets."""
    if valid is None or safe is None:
        return (t.float() * (lse.unsqueeze(1) - x)).where(t > 0, 0.0).sum()
    picked = x.gather(1, safe.clamp_max(x.shape[1] - 1).unsqueeze(1)).squeeze(1)
    return torch.where(valid, lse - picked, 0.0).sum()


def _count_all_ignored(items: list[Item], valid: Tensor) -> Tensor:
    """Number of optimiser batches without a labelled target (runs of equally sized batches at once)."""
    sizes = [size for item in items for size in batch_sizes(item)]
    total = valid.new_zeros((), dtype=torch.long)
    start = i = 0
    while i < len(sizes):
        j = i
        while j + 1 < len(sizes) and sizes[j + 1] == sizes[i]:
            j += 1
        k, size = j - i + 1, sizes[i]
        if size:
            total = total + (~valid[start:start + k * size].view(k, size).any(dim=1)).sum()
        start += k * size
        i = j + 1
    return total


def train_statistics(items: list[Item], ignore_index: int, dtype: torch.dtype) -> tuple[Tensor, int, int] | None:
    """``[nll_sum, labelled, max_prob_sum, all_ignored_batches, counts (C)]`` of a chunk, its rows and its
    optimiser batches."""
    flat = _flatten_items(items)
    if flat is None:
        return None
    x, t, items = flat
    c = x.shape[1]
    lse, maxprob, _ = _log_partition(x)
    if t.is_floating_point() and t.shape == x.shape:
        nll_sum = _nll_sum(x, lse, t, None, None)
        n_valid = x.new_full((), float(t.shape[0]))
        counts = t.float().sum(dim=0)
        all_ignored = x.new_zeros(())
    else:
        valid, safe = _valid_targets(t, c, ignore_index)
        nll_sum = _nll_sum(x, lse, t, valid, safe)
        n_valid = valid.sum()
        counts = torch.bincount(safe, minlength=c + 1)[:c]
        all_ignored = _count_all_ignored(items, valid)
    head = torch.stack([nll_sum, n_valid.to(x.dtype), maxprob.sum(), all_ignored.to(x.dtype)])
    batches = sum(len(batch_sizes(item)) for item in items)
    return torch.cat([head, counts.to(x.dtype)]).to(dtype), x.shape[0], batches


def validation_statistics(items: list[Item], ignore_index: int, dtype: torch.dtype) -> tuple[Tensor, int, int] | None:
    """Validation statistics of a chunk as one vector (summed over chunks and ranks): ``[nll_sum, labelled,
    correct, confidence_sum]``, then per confidence bin count/confidence/correct, then per class TP,
    predictions and targets; with its rows and batches."""
    flat = _flatten_items(items)
    if flat is None:
        return None
    x, t, kept = flat
    c = x.shape[1]
    lse, conf, pred = _log_partition(x, with_argmax=True)
    assert pred is not None
    if t.is_floating_point() and t.shape == x.shape:
        safe = t.argmax(dim=1)
        valid = torch.ones_like(safe, dtype=torch.bool)
        nll_sum = _nll_sum(x, lse, t, None, None)
    else:
        valid, safe = _valid_targets(t, c, ignore_index)  # invalid targets are c: never equal to a prediction
        nll_sum = _nll_sum(x, lse, t, valid, safe)
    vf = valid.to(x.dtype)
    hit = pred == safe
    correct = hit.to(x.dtype)
    conf_v = conf * vf
    bins = (conf * N_BINS).long().clamp_max(N_BINS - 1)
    calib = x.new_zeros(3, N_BINS).index_add_(1, bins, torch.stack([vf, conf_v, correct]))
    spill = torch.full_like(safe, c)
    index = torch.stack([torch.where(hit, safe, spill), torch.where(valid, pred, spill) + (c + 1),
                         safe + 2 * (c + 1)])
    counts = torch.bincount(index.flatten(), minlength=3 * (c + 1)).view(3, c + 1)[:, :c]
    head = torch.stack([nll_sum, vf.sum(), correct.sum(), conf_v.sum()])
    return torch.cat([head, calib.flatten(), counts.flatten().to(x.dtype)]).to(dtype), x.shape[0], len(kept)
