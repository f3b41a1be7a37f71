"""Cross-entropy loss: a checked, class-weighted, distributed-friendly superset of torch's.

`CrossEntropyLoss` computes exactly what `torch.nn.functional.cross_entropy` computes (value and
gradient, every option, to rounding), and adds:

* class weights computed from class counts (`class_weights`, `WEIGHT_STRATEGIES`), stored in a
  buffer so they travel with checkpoints;
* `loss_terms`, which returns the summed loss and the mean's denominator separately, so a
  distributed caller can divide by the *global* denominator instead of averaging local means;
* a mean over a batch whose targets are all ignored is 0 with zero gradient instead of NaN;
* input validation with messages that say what was wrong and what was expected, at the cost of at
  most one host synchronisation per call (`validate=False` turns it off entirely);
* float32 computation for bf16/fp16 logits;
* an optional z-loss term (``z_loss``, PaLM) on every loss, normalised like the loss itself;
* one extension point, `per_sample_loss`, for loss variants written as subclasses.

The variants registered in `LOSSES` (one ``conf/loss/<name>.yaml`` each) are such subclasses:
`FocalLoss`, `ConfidencePenaltyLoss`, `LogitAdjustedLoss`, `Poly1Loss`,
`SymmetricCrossEntropyLoss` and `GeneralizedCrossEntropyLoss`; ``class_balanced`` is a preset of
the base class (``class_weights="effective_number"``). Each keeps the base class's options and
its exact (sum, denominator) split, so every one of them is exact under DDP and accumulation.

Speed (``scripts/bench_losses.py``): class indices take torch's own kernels, and without smoothing
their mean is torch's own, bit for bit (with weights on (N, C) logits, `loss_terms` takes torch's
weight sum as its denominator, so that the two agree exactly). The losses that need
every class's probability (probability targets, label smoothing in the variants, the confidence
penalty, the z-loss with smoothing or probabilities) go through `_RowTerms`, which works on
cache-sized blocks of rows, straight from the logits, with one pass of exponentials, and writes
the gradient in the forward (closed forms, no autograd intermediates), so that it keeps one
(N, C) temporary; label smoothing of class indices is taken apart (`_Target`) instead of
materialising an (N, C) target, and validating probability targets reads each block while it is
in cache.

Pure PyTorch: nothing here imports Lightning.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LOSSES",
    "REDUCTIONS",
    "WEIGHT_STRATEGIES",
    "ConfidencePenaltyLoss",
    "CrossEntropyLoss",
    "FocalLoss",
    "GeneralizedCrossEntropyLoss",
    "LogitAdjustedLoss",
    "Poly1Loss",
    "SymmetricCrossEntropyLoss",
    "class_weights",
    "cross_entropy",
]

WEIGHT_STRATEGIES: tuple[str, ...] = ("balanced", "inverse_sqrt", "effective_number")
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
# Soft-target rows must sum to 1 within this (absolute) tolerance; for bf16/fp16 targets the
# tolerance is widened to the dtype's epsilon, since rounding alone can move a row sum that far.
SOFT_TARGET_TOLERANCE = 1e-3
_REDUCTION_SUM = 2  # at::Reduction::Sum, for torch.ops.aten.nll_loss_forward


# --------------------------------------------------------------------------------------------
# Class weights from class counts
# --------------------------------------------------------------------------------------------


def _check_beta(beta: float) -> float:
    """Return `beta` as a float, or raise if it is not in [0, 1) (the range Cui et al. allow)."""
    try:
        value = float(beta)
    except (TypeError, ValueError):
        raise ValueError(f"beta must be a number in [0, 1), got {beta!r}") from None
    if not 0.0 <= value < 1.0:  # also rejects NaN
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    return value


def _to_float64_vector(values: Any, what: str) -> Tensor:
    """Turn a tensor or a sequence of numbers into a checked 1-D float64 CPU tensor.

    Checked: 1-D, non-empty, finite, non-negative. Used for class counts and explicit weights,
    which are small and handled outside the training hot path, so the host syncs are harmless.
    """
    if isinstance(values, Tensor):
        if values.is_complex() or values.dtype == torch.bool:
            raise ValueError(f"{what} must be real numbers, got a tensor of dtype {values.dtype}")
        vec = values.detach().to(device="cpu", dtype=torch.float64)
    else:
        if isinstance(values, (str, bytes)):
            raise ValueError(f"{what} must be a 1-D sequence of numbers, got {values!r}")
        try:
            vec = torch.tensor([float(v) for v in values], dtype=torch.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be a 1-D sequence of numbers, got {values!r}") from None
    if vec.dim() != 1:
        raise ValueError(f"{what} must be 1-D (one entry per class), got shape {tuple(vec.shape)}")
    if vec.numel() == 0:
        raise ValueError(f"{what} must not be empty (one entry per class), got {values!r}")
    bad = ~torch.isfinite(vec) | (vec < 0)
    if bool(bad.any()):
        idx = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{what} must be finite and non-negative, got {vec[idx].item()} for class {idx}"
        )
    return vec


def class_weights(
    counts: Tensor | Sequence[float], strategy: str, beta: float = 0.999
) -> Tensor:
    """Per-class loss weights from per-class sample counts (float32, length C).

    Strategies (C = number of classes):

    * ``"balanced"``: ``w_c = n / (C * count_c)`` with ``n = sum(counts)``, as scikit-learn's
      ``class_weight="balanced"``: every class contributes the same total weight.
    * ``"inverse_sqrt"``: ``w_c ∝ 1 / sqrt(count_c)``, normalised so ``sum(w) = C``; a milder
      correction than "balanced" for heavy imbalance.
    * ``"effective_number"``: ``w_c ∝ (1 - beta) / (1 - beta**count_c)``, normalised so
      ``sum(w) = C`` (Cui et al. 2019, "Class-Balanced Loss Based on Effective Number of
      Samples"). ``beta`` in [0, 1); beta=0 gives uniform weights, beta -> 1 approaches
      inverse frequency.

    Counts are clamped to at least 1 *before* every formula (including the ``n`` of "balanced"),
    so a class absent from the training data gets the weight of a class seen once, the largest
    finite weight, rather than inf/NaN. Counts may be fractional (e.g. weighted counts).

    Raises:
        ValueError: unknown strategy, beta outside [0, 1), or counts that are not a non-empty
            1-D sequence of finite non-negative numbers.
    """
    if not isinstance(strategy, str) or strategy not in WEIGHT_STRATEGIES:
        raise ValueError(
            f"unknown class weight strategy {strategy!r}; expected one of {WEIGHT_STRATEGIES}"
        )
    beta = _check_beta(beta)
    n = _to_float64_vector(counts, "class counts").clamp_min(1.0)
    num_classes = n.numel()
    if strategy == "balanced":
        w = n.sum() / (num_classes * n)
    else:
        if strategy == "inverse_sqrt":
            w = n.rsqrt()
        else:  # effective_number
            w = (1.0 - beta) / (1.0 - torch.pow(beta, n))
        w = w * (num_classes / w.sum())
    return w.to(torch.float32)


def _weights_tensor(values: Sequence[float] | Tensor, check_values: bool = True) -> Tensor:
    """Explicit class weights as a 1-D float tensor, checked finite, non-negative, not all zero.

    A floating-point tensor keeps its dtype and device (float64 weights stay exact); anything
    else becomes float32. With ``check_values=False`` a tensor is only shape-checked (no host
    sync); its values are then checked by the loss's forward validation instead.
    """
    if isinstance(values, Tensor) and not check_values:
        if values.dim() != 1 or values.numel() == 0:
            raise ValueError(
                "class_weights must be a non-empty 1-D tensor (one weight per class), "
                f"got shape {tuple(values.shape)}"
            )
        return values.detach() if values.is_floating_point() else values.detach().float()
    vec = _to_float64_vector(values, "class_weights")
    if not bool(vec.sum() > 0):
        raise ValueError(f"class_weights must not be all zero, got {vec.tolist()}")
    if isinstance(values, Tensor) and values.is_floating_point():
        return values.detach().clone()
    return vec.to(torch.float32)


def _check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float within [low, high] (``*_open``: excluded), else ValueError
    naming the knob, the value and the allowed range."""
    left = "-inf" if low is None else f"{low:g}"
    right = "inf" if high is None else f"{high:g}"
    opening = "(" if low_open or low is None else "["
    closing = ")" if high_open or high is None else "]"
    interval = f"{opening}{left}, {right}{closing}"
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}") from None
    ok = math.isfinite(number)
    if ok and low is not None:
        ok = number > low if low_open else number >= low
    if ok and high is not None:
        ok = number < high if high_open else number <= high
    if not ok:
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return number


def _class_view(vec: Tensor, like: Tensor) -> Tensor:
    """A (C,) vector viewed to broadcast along dim 1 of ``like`` (N, C[, d1, ...])."""
    shape = [1] * like.dim()
    shape[1] = -1
    return vec.view(shape)


def _row_weight(target: Tensor, weight: Tensor | None) -> Tensor | None:
    """Each row's class weight: ``w[y]`` for class indices, ``sum_c w_c t_c`` for probabilities
    (which is ``w[y]`` again for a one-hot row, and how torch weights label smoothing); None
    without weights (every row weighs 1)."""
    if weight is None:
        return None
    if target.is_floating_point():
        return (target * _class_view(weight, target)).sum(dim=1)
    return weight.take(target)


def _p_one_plus_log_p(log_p: Tensor, p: Tensor) -> Tensor:
    """``p (1 + log p)``, the derivative of ``p log p`` with respect to ``log p``."""
    return torch.addcmul(p, p, log_p)


def _one_minus_exp(log_p: Tensor) -> Tensor:
    """``1 - exp(log_p)`` without cancellation (``-expm1``): exact for p near 1, 1 for p = 0."""
    return -torch.expm1(log_p)


def _log_partition(x: Tensor, log_probs: Tensor, k: Tensor) -> Tensor:
    """``log Z = logsumexp(x, dim=1)`` from the already computed ``log_softmax(x)``: the
    identity ``log Z = x_k - log p_k`` at one class ``k`` per row (N[, d1, ...]).

    Two gathers instead of a second pass of exponentials over the logits; autograd gives the
    exact gradient ``softmax(x)``. Rounding: ``eps * (|x_k| + |log p_k|)``, i.e. float precision
    relative to the logits' range (k is the target, usually the top class, for class indices).
    """
    k = k.unsqueeze(1)
    return (x.gather(1, k) - log_probs.gather(1, k)).squeeze(1)


# --------------------------------------------------------------------------------------------
# Fused per-class terms: the losses that need every class's probability
# --------------------------------------------------------------------------------------------

# Rows per block of `_RowTerms`: about this many elements, so that a block's temporaries stay
# in the CPU cache (a pass over an (N, C) temporary in memory costs several in-cache passes).
_BLOCK_ELEMENTS = 1 << 18

# An elementwise function g of (log p, p) with its slope d g / d log p (p taken as exp(log p)):
# ``g(log_p, p, slope) -> (value, slope or None)``. It must not modify its arguments, and what
# it returns is either one of them, a number, or a fresh tensor of its own (which `_block_terms`
# reuses in place); g is also run on (N, 1) gathers and, with autograd, for double backward.
Elementwise = Callable[[Tensor, Tensor, bool], tuple[Tensor, "Tensor | float | None"]]


def _g_log_p(log_p: Tensor, p: Tensor, slope: bool) -> tuple[Tensor, float]:
    """g = log p (cross-entropy terms), slope 1."""
    return log_p, 1.0


def _g_p(log_p: Tensor, p: Tensor, slope: bool) -> tuple[Tensor, Tensor]:
    """g = p, slope p."""
    return p, p


def _g_p_log_p(log_p: Tensor, p: Tensor, slope: bool) -> tuple[Tensor, Tensor | None]:
    """g = p log p (minus the entropy), slope p (1 + log p)."""
    return torch.mul(p, log_p), _p_one_plus_log_p(log_p, p) if slope else None


class _Lazy(NamedTuple):
    """A `_Term` factor computed block by block, ``fn(tensor[lo:hi])`` (a fresh tensor), so that
    it is a cache-sized temporary rather than an (N, C) one."""

    fn: Callable[[Tensor], Tensor]
    tensor: Tensor


Factor = Tensor | float | _Lazy


class _Term(NamedTuple):
    """``sum_c coef_c g(log p_c, p_c) + at_target * g(log p_y, p_y)`` for each row.

    ``coef`` is the product of ``factors``: numbers, and tensors (or `_Lazy` ones) broadcasting
    against the (N, C, ...) logits: per class (1, C, ...), per row (N, 1, ...) or per entry; no
    factors, no sum over the classes. ``at_target`` (a number or (N, ...)) weighs g at the
    target class y.
    """

    g: Elementwise
    factors: tuple[Factor, ...] = ()
    at_target: Tensor | float | None = None


class _Part(NamedTuple):
    """A `_Term` ready for the block loop: its number factors multiplied out (``scale``), its
    tensor factors kept (``tensors``: per block, they are sliced and multiplied)."""

    g: Elementwise
    dense: bool
    scale: float
    tensors: tuple[Tensor | _Lazy, ...]
    at_target: Tensor | float | None


def _parts(terms: Sequence[_Term]) -> list[_Part]:
    """The terms, each split into its number and its tensor factors."""
    parts = []
    for g, factors, at in terms:
        tensors = tuple(f for f in factors if isinstance(f, (Tensor, _Lazy)))
        scale = math.prod(f for f in factors if not isinstance(f, (Tensor, _Lazy)))
        parts.append(_Part(g, bool(factors), scale, tensors, at))
    return parts


def _row_slice(value: Any, lo: int, hi: int, n: int) -> Any:
    """Rows lo:hi of a tensor with n rows; anything else (numbers, broadcast dims) unchanged."""
    if isinstance(value, Tensor) and value.dim() and value.shape[0] == n:
        return value[lo:hi]
    return value


def _block_coefficient(
    tensors: Sequence[Tensor | _Lazy], lo: int, hi: int, n: int
) -> tuple[Tensor | None, bool]:
    """The product of the tensor factors for rows lo:hi (None without any), and whether it is
    a fresh tensor, which the caller may modify."""
    coef: Tensor | None = None
    fresh = False
    for f in tensors:
        if isinstance(f, _Lazy):
            block, lazy = f.fn(_row_slice(f.tensor, lo, hi, n)), True
        else:
            block, lazy = _row_slice(f, lo, hi, n), False
        if coef is None:
            coef, fresh = block, lazy
        else:
            coef, fresh = coef * block, True
    return coef, fresh


def _class_sum(value: Tensor, coef: Tensor | float) -> Tensor:
    """``sum_c coef_c value_c`` over dim 1, without an (N, C) product where ``coef`` is constant
    along the classes (a sum) or along the rows (a matrix-vector product)."""
    if not isinstance(coef, Tensor) or coef.dim() == 0:
        return value.sum(dim=1) * coef
    if coef.shape[1] == 1:
        return value.sum(dim=1) * coef.squeeze(1)
    if value.dim() == 2 and coef.shape[0] == 1:
        return torch.mv(value, coef[0])
    return (value * coef).sum(dim=1)


def _unit(parts: Sequence[_Part]) -> float:
    """The scale the gradient is kept divided by: the first sum's (nonzero) number factor, so
    that multiplying by it is left to the backward's single pass."""
    return next((part.scale for part in parts if part.dense and part.scale != 0.0), 1.0)


def _sum_rows(rows: Tensor | None, part: Tensor) -> Tensor:
    return part if rows is None else rows + part


def _scaled(part: Tensor, scale: float) -> Tensor:
    return part * scale if scale != 1.0 else part


def _add_scaled(acc: Tensor | None, fresh: Tensor, scale: float) -> Tensor:
    """``acc + scale * fresh`` in place, or ``fresh`` itself scaled in place."""
    if acc is None:
        return fresh.mul_(scale) if scale != 1.0 else fresh
    return acc.add_(fresh, alpha=scale)


def _block_terms(
    log_p: Tensor, p: Tensor, parts: Sequence[_Part], rows_of: tuple[int, int, int],
    index: Tensor | None, project: bool, out: Tensor | None, unit: float,
    z: tuple[Tensor | float, Tensor] | None = None, own_log_p: bool = False,
) -> Tensor:
    """The rows ``rows_of`` = (lo, hi, n)'s sums of ``parts``; with ``out``, also writes there
    their gradient divided by ``unit``, with respect to the logits whose log_softmax ``log_p``
    is (``project``) or to ``log_p`` itself. ``g``'s results other than ``log_p`` and ``p``
    themselves are fresh, so they are reused in place, and so is ``log_p`` after its last use
    if it is a temporary (``own_log_p``). ``z`` = (coefficient c, log Z) adds the z-loss
    ``c log Z**2``, whose gradient ``2 c log Z p`` joins the projection."""
    lo, hi, n = rows_of
    slope = out is not None
    k = None if index is None else index.unsqueeze(1)
    rows: Tensor | None = None
    grad: Tensor | None = None
    at_y: Tensor | float = 0.0
    last_log_p = -1  # the last part that reads log_p
    if own_log_p:
        readers = [i for i, q in enumerate(parts) if q.g is not _g_p or q.at_target is not None]
        last_log_p = max(readers, default=-1)
    for i, (g, dense, scale, tensors, at_target) in enumerate(parts):
        if dense:
            value, deriv = g(log_p, p, slope)
        if at_target is not None:  # (first: the sum below may reuse value and deriv)
            assert k is not None
            if dense:
                value_y = value.gather(1, k)
                deriv_y = deriv.gather(1, k) if isinstance(deriv, Tensor) else deriv
            else:
                value_y, deriv_y = g(log_p.gather(1, k), p.gather(1, k), slope)
            at = _row_slice(at_target, lo, hi, n)
            at = at.unsqueeze(1) if isinstance(at, Tensor) else at
            part = (value_y * at).squeeze(1)
            rows = _sum_rows(rows, part)
            if slope:
                assert deriv_y is not None
                at_y = at_y + at * deriv_y
        if not dense:
            continue
        coef, fresh = _block_coefficient(tensors, lo, hi, n)
        full = coef is not None and coef.shape == log_p.shape
        rel = scale / unit
        if slope and fresh and full and deriv is value:  # (g = p) coef p: the sum's and slope's
            assert coef is not None
            prod = coef.mul_(value)
            rows = _sum_rows(rows, _scaled(prod.sum(dim=1), scale))
            grad = _add_scaled(grad, prod, rel)
            continue
        own_value = value is not p and (value is not log_p or i == last_log_p)
        if coef is None:
            part = value.sum(dim=1)
        elif full and own_value:  # (g's own result, or log_p after its last use: reusable)
            part = value.mul_(coef).sum(dim=1)
        else:
            part = _class_sum(value, coef)
        rows = _sum_rows(rows, _scaled(part, scale))
        if not slope:
            continue
        assert deriv is not None
        if isinstance(deriv, Tensor) and deriv is not p and deriv is not log_p and (
            grad is None or coef is None
        ):  # g's own, full-sized slope
            grad = _add_scaled(grad, deriv if coef is None else deriv.mul_(coef), rel)
        elif grad is None and full:
            assert coef is not None
            grad = _add_scaled(None, coef.mul_(deriv) if fresh else torch.mul(coef, deriv), rel)
        else:
            if grad is None and coef is None and isinstance(deriv, Tensor):
                grad = deriv * rel
                continue
            if grad is None:
                grad = torch.zeros_like(log_p)
            if coef is None and isinstance(deriv, Tensor):
                grad.add_(deriv, alpha=rel)
            elif coef is None:
                grad.add_(deriv * rel)
            elif isinstance(deriv, Tensor):
                grad.addcmul_(coef, deriv, value=rel)
            else:
                grad.add_(coef, alpha=deriv * rel)
    assert rows is not None
    if z is not None:
        z_coef, log_z = z
        rows = rows + z_coef * log_z.square()
    if out is None:
        return rows
    if grad is None:
        grad = torch.zeros_like(log_p)
    if k is not None and (isinstance(at_y, Tensor) or at_y != 0.0):
        at_y = torch.as_tensor(at_y, dtype=grad.dtype, device=grad.device) / unit
        grad.scatter_add_(1, k, at_y.expand(k.shape))
    if project:  # through log_softmax: g_x = g - p sum(g) (+ the z-loss's 2 c log Z p)
        total = grad.sum(dim=1)
        if z is not None:
            total = total - (2.0 / unit) * z_coef * log_z
        torch.addcmul(grad, p, total.unsqueeze(1), value=-1.0, out=out)
    else:
        out.copy_(grad)
    return rows


def _softmax_pair(x: Tensor, log_z: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(p, x - max, log p_max, log Z)`` along dim 1: softmax with one pass of exponentials,
    and what gives its log, ``log p = (x - max) + log p_max`` (``p_max >= 1/C``, so its log is
    exact to rounding), and ``log Z = max - log p_max`` if asked for (the last two of shape
    (N, ...))."""
    p = F.softmax(x, dim=1)
    top = x.amax(dim=1, keepdim=True)
    log_p_max = p.amax(dim=1).log_()
    return p, x - top, log_p_max, top.squeeze(1) - log_p_max if log_z else None


def _block_cross_entropy(
    x: Tensor, scale: float, coef: Tensor | None, rows: Tensor, out: Tensor | None,
    z_coef: Tensor | float | None = None,
) -> Tensor:
    """``scale * sum_c T_c log_softmax(x)_c`` for each row of a block of logits (``T`` =
    ``coef``, or 1; plus the z-loss ``z_coef log Z**2``) into ``rows`` and, into ``out``, its
    gradient divided by ``scale``, ``T - p (sum_c T_c - 2 z_coef log Z / scale)``. Returns
    ``sum_c T_c``. log p is never materialised: the rows are ``sum_c T_c (x - max)_c +
    log p_max sum_c T_c``."""
    t = x.new_ones(()) if coef is None else coef
    p, shifted, log_p_max, log_z = _softmax_pair(x, z_coef is not None)
    total = t.sum(dim=1) if t.shape == x.shape else t.expand_as(x).sum(dim=1)
    shifted = shifted.mul_(t) if shifted.shape == t.shape else shifted * t
    part = torch.addcmul(shifted.sum(dim=1), log_p_max, total)
    slope = total
    if z_coef is None:
        torch.mul(part, scale, out=rows)
    else:
        assert log_z is not None
        torch.add(z_coef * log_z.square(), part, alpha=scale, out=rows)
        slope = total - (2.0 / scale) * z_coef * log_z
    if out is not None:
        torch.addcmul(t, p, slope.unsqueeze(1), value=-1.0, out=out)
    return total


class _TargetStats:
    """The smallest entry and the row sums of a target, gathered by `_RowTerms` block by block
    while the blocks are in cache (for validation, without two more passes over memory)."""

    def __init__(self, target: Tensor) -> None:
        self.target = target
        self.minima: list[Tensor] = []
        self.sums: list[Tensor] = []

    def add(self, lo: int, hi: int, sums: Tensor | None = None) -> None:
        """Rows lo:hi; ``sums`` are their row sums if already known."""
        block = self.target[lo:hi]
        self.minima.append(block.amin())
        self.sums.append(block.sum(dim=1) if sums is None else sums)

    def result(self) -> tuple[Tensor, Tensor] | None:
        """``(minimum, row sums)``, or None if no block was seen (no rows)."""
        if not self.minima:
            return None
        return torch.stack(self.minima).amin(), torch.cat(self.sums)


def _terms_by_block(
    source: Tensor, log_probs: Tensor | None, terms: Sequence[_Term], index: Tensor | None,
    project: bool, slope: bool, stats: _TargetStats | None = None,
    z_coef: Tensor | float | None = None,
) -> tuple[Tensor, Tensor | None, float]:
    """`_block_terms` over blocks of rows: (rows, their gradient divided by the returned
    scale). p = softmax(log p) for the given ``log_probs``; without them, both come from the
    logits ``source`` (`_softmax_pair`), and a lone cross-entropy term (a sum over the classes
    of ``coef log p``) takes `_block_cross_entropy`, which needs no log p. ``stats`` gathers
    its target's statistics. ``z_coef`` (from the logits only) adds the z-loss, ``z_coef log
    Z**2`` for each row (a number or (N, ...))."""
    assert z_coef is None or log_probs is None
    base = source if log_probs is None else log_probs
    n = base.shape[0]
    rows = base.new_empty((n, *base.shape[2:]))
    grad = torch.empty_like(base) if slope else None
    parts = _parts(terms)
    unit = _unit(parts)
    step = max(1, _BLOCK_ELEMENTS // max(1, base.numel() // max(1, n)))
    cross_entropy = (
        log_probs is None and len(parts) == 1 and parts[0].g is _g_log_p and parts[0].dense
        and parts[0].scale != 0.0 and parts[0].at_target is None
        and not any(isinstance(f, _Lazy) for f in parts[0].tensors)
    )
    # (a lone cross-entropy term whose only tensor factor is the target: its sums are the rows')
    same = cross_entropy and stats is not None and len(parts[0].tensors) == 1 and (
        parts[0].tensors[0] is stats.target
    )
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        if stats is not None and not same:  # first, so that the block is in cache for the terms
            stats.add(lo, hi)
        out = None if grad is None else grad[lo:hi]
        z_rows = _row_slice(z_coef, lo, hi, n)
        if cross_entropy:
            coef = _block_coefficient(parts[0].tensors, lo, hi, n)[0]
            sums = _block_cross_entropy(source[lo:hi], unit, coef, rows[lo:hi], out, z_rows)
            if same:
                assert stats is not None
                stats.add(lo, hi, sums)
            continue
        z = None
        if log_probs is None:
            p, log_p, log_p_max, log_z = _softmax_pair(source[lo:hi], z_rows is not None)
            log_p = log_p.add_(log_p_max.unsqueeze(1))
            z = None if z_rows is None or log_z is None else (z_rows, log_z)
        else:
            log_p = log_probs[lo:hi]
            p = F.softmax(log_p, dim=1)
        index_rows = _row_slice(index, lo, hi, n)
        rows[lo:hi] = _block_terms(
            log_p, p, parts, (lo, hi, n), index_rows, project, out, unit, z, log_probs is None
        )
    return rows, grad, unit


class _RowTerms(torch.autograd.Function):
    """Per-row sums of `_Term` s, hand-differentiated, for the losses that need the
    probabilities of every class (soft targets, label smoothing, the confidence penalty).

    The forward works through blocks of rows (`_BLOCK_ELEMENTS`), so that p, the terms and their
    slopes are cache-sized temporaries, and it also writes each row's gradient, since ``d row /
    d logits`` does not depend on the incoming gradient: the backward only scales it, in place.
    ``source`` is what the gradient is for: the logits (``project=True``: their log_softmax is
    ``log_probs``, or is computed block by block when that is None), whose gradient is
    ``g - p sum(g)`` for the gradient ``g`` with respect to ``log p``, with no log_softmax
    backward; or ``log_probs`` itself (``project=False``). No gradient flows to the tensors the
    terms hold (targets, weights). ``stats`` gathers its target's statistics on the way. A
    second backward through a retained graph recomputes the gradient; a backward with
    ``create_graph=True`` differentiates a plain autograd rerun, so higher derivatives work.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        source: Tensor,
        log_probs: Tensor | None,
        terms: Sequence[_Term],
        index: Tensor | None,
        project: bool,
        stats: _TargetStats | None = None,
        z_coef: Tensor | float | None = None,
    ) -> Tensor:
        slope = bool(ctx.needs_input_grad[0])
        rows, grad, scale = _terms_by_block(
            source, log_probs, terms, index, project, slope, stats, z_coef
        )
        ctx.save_for_backward(source)
        ctx.log_probs, ctx.terms, ctx.index, ctx.project = log_probs, terms, index, project
        ctx.grad, ctx.scale, ctx.z_coef = grad, scale, z_coef
        return rows

    @staticmethod
    def backward(ctx: Any, grad_rows: Tensor) -> tuple[Tensor | None, ...]:
        (source,) = ctx.saved_tensors
        nones = (None,) * 6
        if torch.is_grad_enabled():  # create_graph=True: differentiate an autograd rerun
            log_p = F.log_softmax(source, dim=1) if ctx.project else source
            n = len(source)
            z = None
            if ctx.z_coef is not None:
                z = (ctx.z_coef, torch.logsumexp(source, dim=1))
            rows = _block_terms(
                log_p, log_p.exp(), _parts(ctx.terms), (0, n, n), ctx.index, False, None, 1.0, z
            )
            (grad,) = torch.autograd.grad(rows, source, grad_rows, create_graph=True)
            return grad, *nones
        grad, ctx.grad = ctx.grad, None  # the gradient tensor is handed on, scaled in place
        scale = ctx.scale
        if grad is None:  # a second backward through a retained graph
            _, grad, scale = _terms_by_block(
                source, ctx.log_probs, ctx.terms, ctx.index, ctx.project, True, None, ctx.z_coef
            )
        assert grad is not None
        return grad.mul_((grad_rows * scale).unsqueeze(1)), *nones


def _focal_powers(u: Tensor, gamma: float) -> tuple[Tensor | None, Tensor]:
    """``(u**(gamma - 1), u**gamma)`` for ``u = 1 - p`` already clamped below at the smallest
    normal number (`_focal_base`); None stands for ``u**0``, and ``u**1`` is ``u`` itself;
    integer gammas avoid ``pow``. Out of place."""
    if gamma == 1.0:
        return None, u
    if gamma == 2.0:
        return u, u * u
    lower = u.pow(gamma - 1.0)
    return lower, lower * u


def _focal_base(u: Tensor) -> Tensor:
    """``u = 1 - p`` clamped below at the smallest normal number, so that ``u**(gamma - 1)``
    stays finite for gamma < 1 (it multiplies ``log p = 0`` there). Out of place."""
    return u.clamp_min(torch.finfo(u.dtype).tiny)


class _FocalTerm:
    """g = (1 - p)**gamma log p (focal loss), with slope ``u**(gamma - 1) (u - gamma p log p)``,
    u = 1 - p (not -expm1: only the absolute error matters in these products)."""

    def __init__(self, gamma: float) -> None:
        self.gamma = gamma

    def __call__(self, log_p: Tensor, p: Tensor, slope: bool) -> tuple[Tensor, Tensor | None]:
        u = torch.rsub(p, 1.0).clamp_min_(torch.finfo(p.dtype).tiny)  # (`_focal_base`)
        lower, power = _focal_powers(u, self.gamma)
        deriv = None
        if slope:
            deriv = torch.addcmul(u, p, log_p, value=-self.gamma)
            deriv = deriv if lower is None else deriv.mul_(lower)
        if torch.is_grad_enabled():  # (an autograd rerun: out of place)
            return power * log_p, deriv
        return power.mul_(log_p), deriv  # (power: fresh, or u after its last use)


def _apply_row_terms(
    source: Tensor, log_probs: Tensor | None, terms: Sequence[_Term], index: Tensor | None,
    project: bool, stats: _TargetStats | None = None, z_coef: Tensor | float | None = None,
) -> Tensor:
    """`_RowTerms` where a gradient will be wanted; else its rows alone (no gradient work)."""
    if torch.is_grad_enabled() and source.requires_grad:
        return _RowTerms.apply(source, log_probs, terms, index, project, stats, z_coef)
    return _terms_by_block(source, log_probs, terms, index, project, False, stats, z_coef)[0]


class _Target(NamedTuple):
    """A target distribution ``t = dense + index_weight * one_hot(index)``, for the built-in
    variants: probabilities (``dense`` (N, C, ...), no index), class indices under label
    smoothing (``dense`` = eps / C, ``index_weight`` = 1 - eps), so that smoothing never
    materialises an (N, C) target, or plain class indices (``dense`` None)."""

    dense: Tensor | float | None
    index: Tensor | None = None
    index_weight: float = 1.0

    def term(self, g: Elementwise, vec: Tensor | None, scale: float, like: Tensor) -> _Term:
        """``scale * sum_c vec_c t_c g_c`` (``vec``: per-class factors (C,), or None) as a
        `_Term`."""
        view = None if vec is None else _class_view(vec, like)
        factors: tuple[Tensor | float, ...] = ()
        if self.dense is not None:
            factors = tuple(f for f in (scale, self.dense, view) if f is not None)
        at: Tensor | float | None = None
        if self.index is not None:
            at = scale * self.index_weight
            if vec is not None:
                at = vec.take(self.index) * at
        return _Term(g, factors, at)

    def total(self, vec: Tensor | None, like: Tensor) -> Tensor | float:
        """Each row's ``sum_c vec_c t_c`` (``sum_c t_c`` without ``vec``)."""
        out: Tensor | float = 0.0
        if isinstance(self.dense, Tensor):
            out = _class_sum(self.dense, 1.0 if vec is None else _class_view(vec, like))
        elif self.dense is not None:
            out = self.dense * (like.shape[1] if vec is None else vec.sum())
        if self.index is not None:
            out = out + self.index_weight * (1.0 if vec is None else vec.take(self.index))
        return out


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, bf16, fp16) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


class CrossEntropyLoss(nn.Module):
    """Drop-in superset of `torch.nn.CrossEntropyLoss`: same numbers, plus class-weight
    strategies, a (sum, denominator) split for exact distributed means, safe all-ignored
    batches, float32 compute for low-precision logits, and readable input errors.

    Args:
        class_weights: None; explicit per-class weights (1-D, finite, non-negative, not all
            zero); or a strategy name from `WEIGHT_STRATEGIES`, whose weights are computed when
            `set_class_counts` is called with the training set's class counts.
        ignore_index: class-index targets equal to this are skipped (as in torch).
        reduction: "mean", "sum" or "none" (as in torch).
        label_smoothing: in [0, 1) (as in torch).
        beta: the "effective_number" strategy's beta, in [0, 1).
        validate: check inputs on every call (one host sync); False skips all checks.
        z_loss: coefficient of the z-loss (PaLM, Chowdhery et al. 2022), >= 0; 0 (default)
            disables it. Each row adds ``z_loss * logsumexp(logits)**2`` times the row's class
            weight (``w[y]`` for indices, ``sum_c w_c t_c`` for probabilities, 1 without
            weights) and nothing for ignored rows, so under "mean" it is the same weighted
            average as the cross-entropy term and shares its denominator: exact under DDP and
            gradient accumulation. It penalises the drift of the softmax normaliser (the logits'
            free shift), which keeps large-vocabulary / low-precision training stable.

    Validation raises ValueError for: non-float logits or fewer than 2 dims; a batch or shape
    mismatch; class indices outside [0, C) other than ignore_index; probability targets with
    negative entries or rows not summing to 1; weights of the wrong length, negative,
    non-finite or all zero; and non-finite logits. Targets and weights are checked in full;
    logits are checked through the loss value (a second pass over the logits would cost about
    as much as a tenth of the loss itself), so the error fires for NaN/+inf anywhere in a
    non-ignored row and for -inf wherever it makes the loss infinite, but not for -inf used as
    a mask on non-target classes (fine, as in torch) nor for logits of ignored rows only.

    Mean semantics (as torch): for class-index targets the denominator is the sum of
    ``w[y_i]`` over non-ignored targets (their count without weights), for both the nll and the
    label-smoothing part; for probability targets it is the number of rows (times spatial dims),
    whatever the weights. Differences from torch: a mean whose denominator is 0 (every target
    ignored, or every target's class weight 0) is 0 with zero gradient instead of NaN/inf.

    Subclasses implement loss variants by overriding only `per_sample_loss`; see its docstring.
    """

    weight: Tensor | None
    # During a generic-path call, for `_row_terms`: (log_softmax output, or None where the
    # log-probabilities are left to `_RowTerms`; its input; target statistics waiting to be
    # gathered, or None; the z-loss coefficient of each row waiting to be added, or None).
    _softmax_input: (
        tuple[Tensor | None, Tensor, _TargetStats | None, Tensor | float | None] | None
    ) = None
    # (weak reference, version) of the weights that last passed validation.
    _checked_weight: tuple[Any, int] | None = None
    # False for losses that are defined for class indices only: probability targets and label
    # smoothing (which turns indices into probabilities) are then rejected with a ValueError.
    supports_soft_targets: ClassVar[bool] = True
    # Whether probabilities and smoothing go to `_soft_loss` (see there); set for each subclass.
    _fused_soft: ClassVar[bool] = False
    # Whether the formula needs every class's probability for class indices as well (then
    # those go to `_soft_loss` too, from the logits).
    _index_needs_probs: ClassVar[bool] = False
    # Small per-class buffers that module dtype casts leave alone and that a checkpoint may
    # resize (they are empty placeholders until set_class_counts); subclasses add theirs.
    _class_buffers: ClassVar[tuple[str, ...]] = ("weight",)
    # Devices whose kernels reject out-of-range class indices synchronously with an exception,
    # so validation need not sanitise the targets before the loss kernels (see `_compute`).
    _index_checking_devices: ClassVar[tuple[str, ...]] = ("cpu",)

    def __init__(
        self,
        class_weights: None | Sequence[float] | Tensor | str = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        beta: float = 0.999,
        validate: bool = True,
        z_loss: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(reduction, str) or reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        smoothing = _check_number("label_smoothing", label_smoothing, low=0.0, high=1.0, high_open=True)
        try:
            ignore = operator.index(ignore_index)
        except TypeError:
            raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}") from None
        if isinstance(ignore_index, bool):
            raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}")
        if smoothing > 0.0 and not self.supports_soft_targets:
            raise ValueError(
                f"{type(self).__name__} is defined for class-index targets only, so it has no "
                f"label smoothing; got label_smoothing={label_smoothing}"
            )

        self.ignore_index: int = ignore
        self.z_loss: float = _check_number("z_loss", z_loss, low=0.0)
        self.reduction: str = reduction
        self.label_smoothing: float = smoothing
        self.beta: float = _check_beta(beta)
        self.validate: bool = bool(validate)
        self.weight_strategy: str | None = None

        weight: Tensor | None
        if class_weights is None:
            weight = None
        elif isinstance(class_weights, str):
            if class_weights not in WEIGHT_STRATEGIES:
                raise ValueError(
                    f"unknown class weight strategy {class_weights!r}; expected one of "
                    f"{WEIGHT_STRATEGIES} or explicit per-class weights"
                )
            self.weight_strategy = class_weights
            weight = torch.empty(0)  # placeholder until set_class_counts
        else:
            weight = _weights_tensor(class_weights)
        self.register_buffer("weight", weight, persistent=True)

    # ---- class weights ------------------------------------------------------------------

    @property
    def class_weights(self) -> str | Tensor | None:
        """The class_weights option as configured: the strategy name, the explicit weights, or
        None (the weights in use, once computed, are the ``weight`` buffer)."""
        return self.weight_strategy if self.weight_strategy is not None else self.weight

    @property
    def rebalances_classes(self) -> bool:
        """Whether this loss trades the frequent classes' fit for the rare ones' (class weights): its value then
        rewards that trade, and model selection should look at balanced accuracy instead (``monitor=auto``)."""
        return self.weight is not None or self.weight_strategy is not None

    @property
    def needs_class_counts(self) -> bool:
        """True while a weight strategy is configured but its weights are not computed yet."""
        pending = self.weight is None or self.weight.numel() == 0
        return self.weight_strategy is not None and pending

    def set_class_counts(self, counts: Tensor | Sequence[float]) -> None:
        """Compute the strategy's weights from per-class counts of labelled training rows.

        ``counts[c]`` is the number of training targets of class c, ignored targets excluded.
        Calling it again recomputes the weights.
        """
        if self.weight_strategy is None:
            raise RuntimeError(
                "set_class_counts needs a class weight strategy, but this loss was built with "
                f"class_weights={'None' if self.weight is None else 'explicit weights'}; "
                f"pass one of {WEIGHT_STRATEGIES} as class_weights"
            )
        w = class_weights(counts, self.weight_strategy, self.beta)
        device = self.weight.device if self.weight is not None else None
        self.weight = w.to(device=device)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A checkpoint saved after set_class_counts holds a (C,) weight while a freshly built
        # loss with a pending strategy holds an empty placeholder: adopt the saved shape.
        for name in self._class_buffers:
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if (
                isinstance(incoming, Tensor)
                and current is not None
                and incoming.shape != current.shape
            ):
                dtype = incoming.dtype if incoming.is_floating_point() else current.dtype
                setattr(self, name, torch.empty(incoming.shape, dtype=dtype, device=current.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply(self, fn: Any, recurse: bool = True) -> CrossEntropyLoss:
        # Module casts (.half(), .to(torch.bfloat16), Lightning's "bf16-true") move the weights
        # to the new device but keep their dtype: they are tiny, and rounding them to bf16 would
        # change the loss while the computation itself stays in float32.
        old = {name: getattr(self, name) for name in self._class_buffers}
        super()._apply(fn, recurse)
        for name, before in old.items():
            after = getattr(self, name)
            if before is not None and after is not None and after.dtype != before.dtype:
                setattr(self, name, before.to(device=after.device))
        return self

    def _resolve_weight(self) -> Tensor | None:
        if self.needs_class_counts:
            raise RuntimeError(
                f"class_weights={self.weight_strategy!r} needs the class counts before the first "
                "forward: call set_class_counts(counts) with the per-class number of labelled "
                "training rows (or use a datamodule that exposes class counts)"
            )
        return self.weight

    # ---- extension point ----------------------------------------------------------------

    def per_sample_loss(self, log_probs: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
        """Per-sample loss from log-probabilities: the one method loss variants override.

        Args:
            log_probs: ``log_softmax(logits, dim=1)`` in float32 (float64 for float64 logits),
                shape (N, C) or (N, C, d1, ...).
            target: either long class indices of shape (N,) / (N, d1, ...) whose ignored
                entries have been replaced by a valid index (0) and whose results are masked
                out afterwards; or probabilities shaped like ``log_probs`` (soft targets, and
                class indices under label smoothing, which arrive already smoothed:
                ``(1 - eps) * one_hot + eps / C``; smoothed rows of ignored targets are masked
                out afterwards too).
            weight: per-class weights (C,) in the compute dtype, or None.

        Returns:
            Per-sample losses of shape (N,) / (N, d1, ...), unreduced. The base class applies
            the ignore mask, reduction and (sum, denominator) split.

        The base implementation is weighted cross-entropy: ``-w[y] log p_y`` for indices and
        ``-sum_c w_c y_c log p_c`` for probabilities. Only the base class uses the fused
        ``F.cross_entropy`` fast path; any override goes through this method.
        """
        if target.is_floating_point():
            prod = log_probs * target
            if weight is not None:
                shape = [1] * log_probs.dim()
                shape[1] = -1
                prod = prod * weight.view(shape)
            return -prod.sum(dim=1)
        nll = -log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
        if weight is not None:
            nll = nll * weight.take(target)
        return nll

    def _soft_loss(self, log_probs: Tensor, target: _Target, weight: Tensor | None) -> Tensor:
        """Per-sample loss against a `_Target`, with the `per_sample_loss` formula, by way of
        `_row_terms` (a `_RowTerms`): label smoothing of class indices is taken apart (eps / C
        on every class plus 1 - eps on the target) instead of materialising an (N, C) target,
        and ``log_probs`` may be the logits themselves (see `_row_terms`). Used only where the
        class that defines the `per_sample_loss` in use also defines this method
        (``_fused_soft``), so that a subclass's own `per_sample_loss` is what runs. The base
        class's (cross-entropy) serves the base formula with a z-loss (see `_generic_loss`)."""
        term = target.term(_g_log_p, weight, -1.0, log_probs)  # -sum_c w_c t_c log p_c
        return self._row_terms(log_probs, [term], target.index)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        owner = next(k for k in cls.__mro__ if "per_sample_loss" in vars(k))
        cls._fused_soft = owner is not CrossEntropyLoss and "_soft_loss" in vars(owner)

    # ---- computation ----------------------------------------------------------------------

    def _uses_fast_path(self) -> bool:
        return type(self).per_sample_loss is CrossEntropyLoss.per_sample_loss

    def _compute(
        self, logits: Tensor, target: Tensor, reduction: str, need_denominator: bool
    ) -> tuple[Tensor | None, Tensor | None, float | None]:
        """Validate (if enabled), cast, and compute the "sum"/"none" loss and the denominator
        (or torch's own "mean", see `_direct_mean`: None then if every target is ignored).

        Returns ``(loss, denominator, denominator value)``; the value (a Python float) is read
        in validation's host sync when a denominator is needed, and is None without validation.

        Casts: logits to the compute dtype (float32, or float64 for float64 logits), indices to
        long, probabilities to the compute dtype, weights to the logits' device and dtype.
        Validation reads all its data checks with one host sync, after the loss kernels have
        run; on failure the computed loss is discarded. Off the CPU, class indices are first
        sanitised (out-of-range ones replaced by ignore_index, so no kernel can hit a
        device-side assert) and range-checked in that sync; CPU kernels check indices
        themselves, synchronously, so there their error is caught and reworded instead, which
        saves the sanitising pass. Every other check folds into one scalar (NaN on failure).
        """
        weight = self._resolve_weight()
        if (
            not self.supports_soft_targets
            and isinstance(target, Tensor)
            and target.is_floating_point()
        ):
            raise ValueError(
                f"{type(self).__name__} is defined for class-index targets only, got float "
                f"(probability) targets of dtype {target.dtype}; pass integer class indices"
            )
        if self.validate:
            self._check_shapes(logits, target, weight)
        ctype = _compute_dtype(logits.dtype)
        x = logits.to(ctype)
        t = target.to(ctype) if target.is_floating_point() else target.long()
        w = None if weight is None else weight.to(device=x.device, dtype=ctype)
        soft = t.is_floating_point()
        off_cpu = x.device.type not in self._index_checking_devices
        # the non-ignored targets, where they are needed (not for torch's mean on the CPU)
        valid = None if soft or not (need_denominator or off_cpu) else t != self.ignore_index
        if not self.validate:
            loss, denominator = self._loss(x, t, w, reduction)
            if need_denominator and denominator is None:
                denominator = self._denominator(x, t, w, valid)
            return loss, denominator, None

        checks: list[Tensor] = []  # boolean scalars, True where a check failed
        t_safe = t
        stats = None
        if soft:  # the fused path gathers the targets' statistics as it reads them
            stats = _TargetStats(t)
        elif off_cpu:
            assert valid is not None
            bad_target = valid & (t.clamp(0, x.shape[1] - 1) != t)
            checks.append(bad_target.any())
            t_safe = torch.where(bad_target, self.ignore_index, t)
            valid = valid ^ bad_target  # (bad targets are a subset of the valid ones)
        check_weight = w is not None and not self._weight_known_good(weight)
        if check_weight:
            assert w is not None
            checks.append(~(torch.isfinite(w).all() & (w >= 0).all() & (w.sum() > 0)))
        try:
            loss, denominator = self._loss(x, t_safe, w, reduction, stats)
            if need_denominator and denominator is None:
                denominator = self._denominator(x, t_safe, w, valid)
        except (IndexError, RuntimeError):
            if not soft and t_safe is t:  # a CPU kernel met a bad class index
                self._check_class_indices(t, x.shape[1])
            raise
        # Non-finite logits show up in the loss (NaN/+inf anywhere in a non-ignored row, -inf
        # where it enters the loss) without a second pass over the logits.
        status = loss.detach() if loss.dim() == 0 else loss.detach().sum()
        for failed in checks:
            status = torch.where(failed, math.nan, status)
        reads = [status]  # what the single host sync reads
        if denominator is not None:  # (for the mean)
            reads.append(denominator.to(status.dtype))
        if stats is not None:  # probability targets: their smallest entry, worst row sum
            seen = stats.result()
            minimum, row_sums = seen if seen is not None else (None, t.sum(dim=1))
            if minimum is None:
                minimum = t.amin() if t.numel() else status.new_zeros(())
            deviation = (row_sums - 1.0).abs()
            reads += [minimum, deviation.amax() if deviation.numel() else minimum.new_zeros(())]
        values = [reads[0].item()] if len(reads) == 1 else torch.stack(reads).tolist()
        status_value = values[0]
        denominator_value = values[1] if denominator is not None else None
        targets_ok = True
        if stats is not None:  # non-negative, rows summing to 1 (NaN fails both)
            tol = max(SOFT_TARGET_TOLERANCE, torch.finfo(target.dtype).eps)
            targets_ok = values[-2] >= 0.0 and values[-1] <= tol
        if not (targets_ok and math.isfinite(status_value)):
            if targets_ok and reduction == "mean" and not any(bool(c) for c in checks):
                if valid is None:
                    valid = t_safe != self.ignore_index
                if float(self._denominator(x, t_safe, w, valid)) == 0.0:
                    return None, None, None  # every target ignored: torch's mean is nan
            self._raise_value_error(x, t, w, target.dtype, loss)
        if check_weight:  # passed: skip the check until the weights change
            self._checked_weight = (weakref.ref(weight), weight._version)
        return loss, denominator, denominator_value

    def __getstate__(self) -> dict[str, Any]:
        # Pickling and deepcopy leave out the per-call caches (a weak reference cannot be pickled).
        state = self.__dict__.copy()
        state.pop("_checked_weight", None)
        state.pop("_softmax_input", None)
        return state

    def _weight_known_good(self, weight: Tensor | None) -> bool:
        """Whether these very weights (same tensor, unmodified since: its version counter) have
        passed validation before, so their check can be skipped."""
        checked = self._checked_weight
        return (
            weight is not None
            and checked is not None
            and checked[0]() is weight
            and checked[1] == weight._version
        )

    def _loss(
        self, x: Tensor, t: Tensor, w: Tensor | None, reduction: str,
        stats: _TargetStats | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Loss with reduction "sum" or "none" (the mean is built from sum and denominator;
        see `_direct_mean` for the exception), and the mean's denominator where torch's kernel
        provides it (else None). ``stats`` (probability targets) is filled in where the fused
        path reads the targets."""
        offset = self.logit_offset(x)
        adjusted = x if offset is None else x + _class_view(offset.to(x.dtype), x)
        denominator = None
        # Without a logit offset the z-loss takes the generic path, where its log Z costs no
        # logsumexp pass (two gathers from the log-softmax, or a by-product of `_RowTerms`).
        if self._uses_fast_path() and not (self.z_loss > 0.0 and offset is None):
            if t.is_floating_point() and not t.requires_grad and x.shape[1] > 0:
                rows = self._probability_cross_entropy(adjusted, t, w, stats)
                loss = rows.sum() if reduction == "sum" else rows
            elif self._torch_weight_sum(x, t, w) and reduction == "sum":
                # the sum and torch's own weight sum, over which torch's mean is bitwise this
                loss, denominator = torch.ops.aten.nll_loss_forward(
                    F.log_softmax(adjusted, dim=1), t, w, _REDUCTION_SUM, self.ignore_index
                )
            else:
                loss = F.cross_entropy(
                    adjusted,
                    t,
                    weight=w,
                    ignore_index=self.ignore_index,
                    reduction=reduction,
                    label_smoothing=self.label_smoothing,
                )
            if self.z_loss > 0.0:
                z = self._masked(self._z_rows(torch.logsumexp(x, dim=1), t, w), t)
                loss = loss + (z.sum() if reduction == "sum" else z)
            return loss, denominator
        return self._generic_loss(x, adjusted, t, w, reduction, stats), None

    def _torch_weight_sum(self, x: Tensor, t: Tensor, w: Tensor | None) -> bool:
        """Whether the mean's denominator is torch's own sum of the targets' class weights
        (the fast path on (N, C) logits, class indices, weights and no smoothing), so that
        the mean is torch's, bitwise, whether it is computed by torch (`_direct_mean`) or as
        `loss_terms`' sum over denominator (which rounds the same way only so)."""
        return (
            w is not None and x.dim() == 2 and not t.is_floating_point()
            and self.label_smoothing == 0.0
        )

    def _probability_cross_entropy(
        self, x: Tensor, t: Tensor, w: Tensor | None, stats: _TargetStats | None = None
    ) -> Tensor:
        """``F.cross_entropy(x, t, reduction="none")`` for probability targets ``t``, fused:
        `_RowTerms` from the logits, block by block, so it keeps one (N, C) tensor (the
        gradient) where torch's keeps four, and has one pass of exponentials where torch's has
        two; that leaves room for validating the targets within torch's time. Gradients
        flow to the logits only (targets that require grad take ``F.cross_entropy``)."""
        eps = self.label_smoothing
        soft = t if eps == 0.0 else t * (1.0 - eps) + eps / x.shape[1]
        term = _Target(soft).term(_g_log_p, w, -1.0, x)
        return _apply_row_terms(x, None, [term], None, True, stats)

    def _generic_loss(
        self, x: Tensor, adjusted: Tensor, t: Tensor, w: Tensor | None, reduction: str,
        stats: _TargetStats | None = None,
    ) -> Tensor:
        """log_softmax + `per_sample_loss` (+ z-loss), with smoothing and ignore handled here.
        ``adjusted`` is ``x`` plus the `logit_offset` (or ``x`` itself).

        Where a `_soft_loss` computes the whole loss (`_fused_target`), the log-probabilities
        are never materialised: its `_RowTerms` work from the logits, block by block, and add
        the z-loss as well (without a logit offset: the z-loss is of the raw logits). That is
        also the path of the base formula with a z-loss, whose log Z then costs nothing."""
        safe = None if t.is_floating_point() else torch.where(t != self.ignore_index, t, 0)
        z_in_rows = self.z_loss > 0.0 and adjusted is x
        base_with_z = z_in_rows and self._uses_fast_path()
        target = None
        if self._fused_soft or base_with_z:
            target = self._fused_target(t, safe, x.shape[1])
        from_logits = target is not None and (self.z_loss == 0.0 or z_in_rows)
        log_probs = None if from_logits else F.log_softmax(adjusted, dim=1)
        z_coef = self.z_loss * self._z_weight(t, safe, w) if from_logits and z_in_rows else None
        self._softmax_input = (log_probs, adjusted, stats, z_coef)
        try:
            return self._generic_terms(x, adjusted, log_probs, target, t, safe, w, reduction)
        finally:
            self._softmax_input = None

    def _fused_target(self, t: Tensor, safe: Tensor | None, num_classes: int) -> _Target | None:
        """The target for `_soft_loss`, where it computes the whole loss: probabilities (unless
        they require grad, which `_RowTerms` drops), label-smoothed class indices, and class
        indices where the formula needs every class's probability anyway
        (``_index_needs_probs``); None elsewhere."""
        eps = self.label_smoothing
        if safe is None:
            if t.requires_grad:
                return None
            return _Target(t if eps == 0.0 else t * (1.0 - eps) + eps / num_classes)
        if eps > 0.0:  # eps / C + (1 - eps) one_hot, taken apart by the formula
            return _Target(eps / num_classes, safe, 1.0 - eps)
        return _Target(None, safe) if self._index_needs_probs else None

    def _generic_terms(
        self,
        x: Tensor,
        adjusted: Tensor,
        log_probs: Tensor | None,
        target: _Target | None,
        t: Tensor,
        safe: Tensor | None,
        w: Tensor | None,
        reduction: str,
    ) -> Tensor:
        num_classes = x.shape[1]
        eps = self.label_smoothing
        if target is not None:
            per = self._soft_loss(adjusted if log_probs is None else log_probs, target, w)
        else:
            assert log_probs is not None
            if safe is None:
                soft = t if eps == 0.0 else t * (1.0 - eps) + eps / num_classes
                per = self.per_sample_loss(log_probs, soft, w)
            elif eps == 0.0 and self.z_loss > 0.0 and adjusted is x and self._uses_fast_path():
                # cross-entropy + z-loss: -log p_y and log Z = x_y - log p_y share one gather
                log_p = log_probs.gather(1, safe.unsqueeze(1)).squeeze(1)
                log_z = x.gather(1, safe.unsqueeze(1)).squeeze(1) - log_p
                per = -log_p if w is None else -log_p * w.take(safe)
                per = self._masked(per + self._z_rows(log_z, t, w), t)
                return per.sum() if reduction == "sum" else per
            elif eps == 0.0:
                per = self.per_sample_loss(log_probs, safe, w)
            else:  # (1 - eps) * one_hot + eps / C, without materialising the one-hot
                smoothed = torch.full_like(log_probs, eps / num_classes)
                smoothed.scatter_(1, safe.unsqueeze(1), 1.0 - eps + eps / num_classes)
                per = self.per_sample_loss(log_probs, smoothed, w)
        pending = self._softmax_input  # (a z-loss taken by `_RowTerms` is already in per)
        z_added = log_probs is None and pending is not None and pending[3] is None
        if self.z_loss > 0.0 and not z_added:
            if adjusted is not x or log_probs is None:  # log Z of the raw logits from scratch
                log_z = torch.logsumexp(x, dim=1)
            else:  # (probability targets: column 0, for want of a target index)
                k = safe if safe is not None else torch.zeros_like(per, dtype=torch.long)
                log_z = _log_partition(x, log_probs, k)
            per = per + self._z_rows(log_z, t, w)
        per = self._masked(per, t)
        return per.sum() if reduction == "sum" else per

    def _masked(self, per: Tensor, t: Tensor) -> Tensor:
        """Per-sample values with ignored rows set to 0 (probability targets: unchanged)."""
        if t.is_floating_point():
            return per
        zero = torch.zeros((), dtype=per.dtype, device=per.device)
        return torch.where(t != self.ignore_index, per, zero)

    def _z_rows(self, log_z: Tensor, t: Tensor, w: Tensor | None) -> Tensor:
        """Per-row ``z_loss * log_z**2 * row weight`` (ignored rows are masked by the caller).

        The row weight (`_z_weight`) is the class weight of the row's target, ``w[y]`` (with
        label smoothing too, so that under "mean" the z term is the average weighted exactly
        like the mean's denominator), or ``sum_c w_c t_c`` for probability targets; 1 without
        weights. ``log_z`` is finite for finite logits (it is computed after subtracting the
        row maximum): at logits of +-1e4, log Z ~ 1e4 and its square 1e8, far from overflow.
        """
        safe = None
        if w is not None and not t.is_floating_point():
            safe = torch.where(t != self.ignore_index, t, 0)
        return self._z_weight(t, safe, w) * self.z_loss * log_z.square()

    def _z_weight(self, t: Tensor, safe: Tensor | None, w: Tensor | None) -> Tensor | float:
        """The z-loss's row weight (see `_z_rows`); ``safe``: the class indices with the
        ignored ones replaced by 0 (None for probabilities)."""
        if w is None:
            return 1.0
        if safe is None:
            row_w = _row_weight(t, w)
            assert row_w is not None
            return row_w
        return w.take(safe)

    def _row_terms(
        self, like: Tensor, terms: Sequence[_Term], index: Tensor | None = None
    ) -> Tensor:
        """`_RowTerms` for `_soft_loss`, whose ``like`` is what `_generic_terms` handed it: this
        call's logits (the log-probabilities are then computed block by block, and the z-loss
        waiting in `_softmax_input` is added) or their log_softmax, whose gradient then goes
        straight to the logits; anything else is taken as log-probabilities of the caller's
        own making. The targets' statistics waiting for validation are gathered on the way if
        a term holds the target."""
        current = self._softmax_input
        if current is None:
            return _apply_row_terms(like, like.detach(), terms, index, False)
        log_probs, logits, stats, z_coef = current
        held = (
            (f.tensor if isinstance(f, _Lazy) else f) for term in terms for f in term.factors
        )
        if stats is None or not any(f is stats.target for f in held):
            stats = None
        if log_probs is None and like is logits:
            self._softmax_input = (log_probs, logits, None, None)  # (each taken once)
            return _apply_row_terms(logits, None, terms, index, True, stats, z_coef)
        if stats is not None:
            self._softmax_input = (log_probs, logits, None, z_coef)
        if like is log_probs and logits.requires_grad:
            return _apply_row_terms(logits, like.detach(), terms, index, True, stats)
        return _apply_row_terms(like, like.detach(), terms, index, False, stats)

    def logit_offset(self, logits: Tensor) -> Tensor | None:
        """Extension point: a per-class offset (C,) added to the logits before the softmax of
        the loss (not of the z-loss, which always sees the raw logits), or None for none.

        The base class and most variants return None; `LogitAdjustedLoss` returns
        ``tau * log(prior)``. With an offset the base formula keeps its fused
        ``F.cross_entropy`` fast path (on the shifted logits).
        """
        return None

    def _denominator(self, x: Tensor, t: Tensor, w: Tensor | None, valid: Tensor | None) -> Tensor:
        """The mean's denominator, detached: weight sum / count of non-ignored targets
        (``valid``), or the number of rows times spatial dims for probability targets."""
        if valid is None:
            rows = x.numel() // x.shape[1] if x.shape[1] else 0
            return x.new_full((), float(rows))
        if w is None:
            return valid.sum().to(x.dtype)
        return torch.where(valid, w.take(torch.where(valid, t, 0)), 0.0).sum().detach()

    def loss_terms(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss_sum, denominator)``: the "sum" loss (a scalar keeping the graph) and the
        mean's denominator (detached scalar, 0 if every target is ignored).

        ``forward`` with reduction="mean" is ``loss_sum / denominator``; under data parallelism,
        summing each term over ranks and dividing gives the exact global mean.
        """
        loss_sum, denominator, _ = self._compute(logits, target, "sum", need_denominator=True)
        assert loss_sum is not None and denominator is not None
        return loss_sum, denominator

    def _direct_mean(self, logits: Tensor, target: Tensor) -> bool:
        """Whether the mean can be torch's own, which saves the denominator and a graph node:
        the fast path on class indices without smoothing or z-loss, and without weights or on
        (N, C) logits (torch's mean is then bitwise the sum over the denominator, see
        `_torch_weight_sum`), and with validation, whose host sync tells an all-ignored batch
        (torch's mean: nan; ours, from the sum: 0)."""
        return (
            self.validate and self.label_smoothing == 0.0 and self.z_loss == 0.0
            and self._uses_fast_path() and isinstance(target, Tensor)
            and isinstance(logits, Tensor) and not target.is_floating_point()
            and (self.weight is None or logits.dim() == 2)
        )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Loss of ``logits`` (N, C[, d1, ...]) against class indices or probabilities."""
        if self.reduction != "mean":
            loss = self._compute(logits, target, self.reduction, need_denominator=False)[0]
            assert loss is not None
            return loss
        if self._direct_mean(logits, target):
            loss = self._compute(logits, target, "mean", need_denominator=False)[0]
            if loss is not None:
                return loss
        loss_sum, denominator, value = self._compute(logits, target, "sum", need_denominator=True)
        assert loss_sum is not None and denominator is not None
        if value is None:
            return _safe_mean(loss_sum, denominator)
        # The denominator was read in validation's sync: divide by the number (the same float,
        # so the same result as dividing by the tensor), one graph node fewer.
        return loss_sum / (value if value > 0 else math.inf)

    # ---- validation -----------------------------------------------------------------------

    def _check_shapes(self, logits: Tensor, target: Tensor, weight: Tensor | None) -> None:
        """Checks that need no data (no host sync)."""
        if not isinstance(logits, Tensor):
            raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
        if not isinstance(target, Tensor):
            raise ValueError(f"target must be a torch.Tensor, got {type(target).__name__}")
        if not logits.is_floating_point():
            raise ValueError(
                f"logits must be a floating point tensor (N, C[, d1, ...]), got dtype "
                f"{logits.dtype}"
            )
        if logits.dim() < 2:
            raise ValueError(
                f"logits must have shape (N, C) or (N, C, d1, ...), got shape {_shape(logits)}; "
                "for a single sample use logits.unsqueeze(0)"
            )
        n, num_classes = logits.shape[0], logits.shape[1]
        if num_classes == 0:
            raise ValueError(
                f"logits must have at least one class (C >= 1), got shape {_shape(logits)}"
            )
        if target.is_floating_point():
            if target.shape != logits.shape:
                if target.dim() == logits.dim() and target.shape[1:] == logits.shape[1:]:
                    raise ValueError(
                        f"batch size mismatch: logits have N={n} rows but target has "
                        f"{target.shape[0]} (logits shape {_shape(logits)}, target shape "
                        f"{_shape(target)})"
                    )
                raise ValueError(
                    "float targets must be probabilities shaped like the logits (N, C) = "
                    f"{_shape(logits)}, got target of shape {_shape(target)} and dtype "
                    f"{target.dtype}; class indices must be an integer dtype (use target.long())"
                )
            if self.ignore_index >= 0:
                raise ValueError(
                    f"ignore_index={self.ignore_index} is not supported for probability "
                    "targets (as in torch); use a negative ignore_index such as the default -100"
                )
        elif target.is_complex() or target.dtype == torch.bool:
            raise ValueError(
                "target must be integer class indices or floating point probabilities, got "
                f"dtype {target.dtype}"
            )
        else:
            expected = (n, *logits.shape[2:])
            if target.dim() >= 1 and target.shape[0] != n:
                raise ValueError(
                    f"batch size mismatch: logits have N={n} rows but target has "
                    f"{target.shape[0]} (logits shape {_shape(logits)}, target shape "
                    f"{_shape(target)})"
                )
            if _shape(target) != expected:
                hint = (
                    "; one-hot targets must be float probabilities shaped like the logits"
                    if target.shape == logits.shape
                    else ""
                )
                raise ValueError(
                    f"class-index target must have shape {expected} for logits of shape "
                    f"{_shape(logits)}, got {_shape(target)}{hint}"
                )
        if weight is not None and _shape(weight) != (num_classes,):
            raise ValueError(
                f"class_weights has {weight.numel()} entries (shape {_shape(weight)}) but logits "
                f"have C={num_classes} classes (logits shape {_shape(logits)})"
            )

    def _check_class_indices(self, t: Tensor, num_classes: int) -> None:
        """Raise the ValueError for class indices outside [0, C) other than ignore_index."""
        bad_target = (t != self.ignore_index) & ((t < 0) | (t >= num_classes))
        if bool(bad_target.any()):
            bad_values = t[bad_target]
            raise ValueError(
                f"target contains {bad_values.numel()} class indices outside [0, "
                f"{num_classes}): smallest bad value {bad_values.min().item()}, largest bad "
                f"value {bad_values.max().item()}; class indices must be in [0, C) with "
                f"C={num_classes} (logits.shape[1]) or equal ignore_index={self.ignore_index}"
            )

    def _raise_value_error(
        self, x: Tensor, t: Tensor, w: Tensor | None, target_dtype: torch.dtype, loss: Tensor
    ) -> None:
        """Work out which data check failed and raise a ValueError that says so (error path
        only, so the extra host syncs here do not matter)."""
        num_classes = x.shape[1]
        if t.is_floating_point():
            negative = t < 0
            if bool(negative.any()):
                raise ValueError(
                    f"soft targets must be probabilities, but {int(negative.sum())} entries are "
                    f"negative (most negative {t[negative].min().item():.6g})"
                )
            tol = max(SOFT_TARGET_TOLERANCE, torch.finfo(target_dtype).eps)
            row_sums = t.sum(dim=1)
            deviation = (row_sums - 1.0).abs().nan_to_num(nan=math.inf)
            bad_rows = ~(deviation <= tol)
            if bool(bad_rows.any()):
                worst = row_sums.flatten()[deviation.flatten().argmax()].item()
                raise ValueError(
                    f"soft targets must be probabilities whose class dim sums to 1 (tolerance "
                    f"{tol:g}), but {int(bad_rows.sum())} of {bad_rows.numel()} rows do not; "
                    f"worst row sum is {worst:.6g}"
                )
        else:
            self._check_class_indices(t, num_classes)
        if w is not None:
            bad_w = ~torch.isfinite(w) | (w < 0)
            if bool(bad_w.any()):
                idx = int(bad_w.nonzero()[0, 0])
                raise ValueError(
                    f"class_weights must be finite and non-negative, got {w[idx].item()} for "
                    f"class {idx}"
                )
            if not bool(w.sum() > 0):
                raise ValueError(f"class_weights must not be all zero, got {w.tolist()}")
        non_finite = int((~torch.isfinite(x)).sum())
        if non_finite:
            raise ValueError(
                f"logits contain {non_finite} non-finite values (NaN or inf) out of "
                f"{x.numel()}; this usually means training diverged: lower the learning rate "
                "or clip gradients"
            )
        if not bool(torch.isfinite(loss).all()):  # finite inputs, yet the loss overflowed
            raise ValueError(
                "the loss is non-finite although logits, targets and weights are finite; the "
                f"logits span [{x.min().item():.6g}, {x.max().item():.6g}], too wide to "
                "normalise: lower the learning rate or clip gradients"
            )
        # Otherwise only the sum of a finite "none" loss overflowed: nothing is wrong.

    def extra_repr(self) -> str:
        if self.weight_strategy is not None:
            state = "pending" if self.needs_class_counts else f"{self.weight.numel()} classes"
            weights = f"class_weights={self.weight_strategy!r} ({state})"
            if self.weight_strategy == "effective_number":
                weights += f", beta={self.beta}"
        elif self.weight is None:
            weights = "class_weights=None"
        elif self.weight.numel() <= 8:
            weights = f"class_weights={[round(v, 4) for v in self.weight.tolist()]}"
        else:
            weights = f"class_weights=<{self.weight.numel()} values>"
        knobs = "".join(f"{name}={value!r}, " for name, value in self._knobs().items())
        z = f", z_loss={self.z_loss}" if self.z_loss else ""
        return (
            f"{knobs}{weights}, ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, validate={self.validate}{z}"
        )

    def _knobs(self) -> dict[str, Any]:
        """A variant's own options, shown first by ``repr``."""
        return {}


def _safe_mean(loss_sum: Tensor, denominator: Tensor) -> Tensor:
    """``loss_sum / denominator``, but 0 with zero gradient where the denominator is 0.

    Dividing by +inf instead of 0 (rather than by a clamped tiny value) keeps the result 0 when
    every target is ignored and also when only the label-smoothing part is non-zero (all
    targets have class weight 0), while a NaN/inf loss still propagates. The detached
    denominator is prepared outside autograd, so the graph gains a single division node.
    """
    return loss_sum / denominator.where(denominator > 0, math.inf)


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    class_weights: None | Sequence[float] | Tensor = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    validate: bool = True,
    z_loss: float = 0.0,
) -> Tensor:
    """Functional `CrossEntropyLoss` (same checks and numbers), for plain PyTorch loops.

    ``class_weights`` must be explicit weights (or None): strategies need class counts, so
    compute them once with `class_weights(counts, strategy)` and pass the result. A weights
    tensor is checked during the call's single validation sync rather than separately.
    """
    if isinstance(class_weights, str):
        raise ValueError(
            f"cross_entropy() needs explicit class_weights, got strategy {class_weights!r}; "
            f"compute them with class_weights(counts, {class_weights!r}) or use "
            f"CrossEntropyLoss({class_weights!r}) and set_class_counts(counts)"
        )
    loss = CrossEntropyLoss(
        None, ignore_index, reduction, label_smoothing, validate=validate, z_loss=z_loss
    )
    if class_weights is not None:
        loss.weight = _weights_tensor(class_weights, check_values=False)
    return loss(logits, target)


# --------------------------------------------------------------------------------------------
# Loss variants
# --------------------------------------------------------------------------------------------
#
# Each variant overrides `per_sample_loss`, so it inherits, unchanged: class weights (and
# weight strategies), ignore_index, label smoothing (delivered as smoothed probabilities), the
# reductions, the (sum, denominator) split with the base class's denominators, validation, the
# float32 compute for low-precision logits, and the z-loss option. Everything is computed from
# ``log_softmax`` (finite for finite logits): probabilities are ``exp(log p)``, ``1 - p`` is
# ``-expm1(log p)``, and no formula takes the log of a probability. Class weights multiply each
# row's whole loss by the row weight (``w[y]``; ``sum_c w_c t_c`` for probabilities, via the
# elementwise form ``sum_c w_c t_c l_c`` where a method is a sum over classes). The formulas that
# need every class's probability also define `_soft_loss`: the same formula as `_Term` s for
# `_RowTerms`, against a `_Target`, which is how label smoothing avoids an (N, C) target; their
# `per_sample_loss` calls it for probabilities, so that both paths are one formula.


class FocalLoss(CrossEntropyLoss):
    """Focal loss, multi-class softmax form (Lin et al. 2017, "Focal Loss for Dense Object
    Detection"): ``FL = -alpha_y * (1 - p_y)**gamma * log p_y`` (times ``w[y]``).

    Args:
        gamma: focusing parameter, >= 0 (paper: 2). 0 gives cross-entropy.
        alpha: None or per-class balancing factors (C non-negative finite numbers, not all 0).
            Part of the per-sample formula, as in the paper: unlike ``class_weights`` it does not
            enter the mean's denominator.
        kwargs: `CrossEntropyLoss`'s options (class_weights, ignore_index, reduction,
            label_smoothing, beta, validate, z_loss), by keyword.

    Probability targets (and label smoothing) use the elementwise form
    ``-sum_c alpha_c w_c t_c (1 - p_c)**gamma log p_c``, which is the paper's for one-hot ``t``
    (computed by a fused, hand-differentiated function). alpha is stored as float32, like
    class weights. Stable path: ``log p`` comes from log_softmax (finite where p_y underflows:
    the row's loss is then ``-log p_y``, as for CE); ``1 - p_y = -expm1(log p_y)`` (exact as
    p_y -> 1; the elementwise soft form uses ``1 - p``, whose absolute error is what matters
    there) is clamped below at the smallest normal number before the power, so that
    ``(1 - p)**gamma`` with gamma < 1 has a finite (zero) gradient where p rounds to 1.
    """

    alpha: Tensor | None
    _class_buffers = ("weight", "alpha")

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: None | Sequence[float] | Tensor = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.gamma: float = _check_number("gamma", gamma, low=0.0)
        if alpha is not None:
            if isinstance(alpha, (int, float)):
                raise ValueError(
                    f"alpha must be None or one balancing factor per class (a list of C numbers), "
                    f"got the scalar {alpha!r}; in the multi-class form a scalar only rescales "
                    "the loss"
                )
            alpha = _to_float64_vector(alpha, "alpha")
            if not bool(alpha.sum() > 0):
                raise ValueError(f"alpha must not be all zero, got {alpha.tolist()}")
            alpha = alpha.to(torch.float32)
        self.register_buffer("alpha", alpha, persistent=False)

    def _knobs(self) -> dict[str, Any]:
        alpha = None if self.alpha is None else [round(v, 4) for v in self.alpha.tolist()]
        return {"gamma": self.gamma, "alpha": alpha}

    def _class_factor(self, weight: Tensor | None, like: Tensor) -> Tensor | None:
        """Per-class factor ``w_c alpha_c`` (either may be missing) on ``like``'s device and
        dtype; alpha's length is checked against the number of classes."""
        alpha = self.alpha
        if alpha is None:
            return weight
        if alpha.numel() != like.shape[1]:
            raise ValueError(
                f"alpha has {alpha.numel()} entries but logits have C={like.shape[1]} classes"
            )
        alpha = alpha.to(device=like.device, dtype=like.dtype)
        return alpha if weight is None else weight * alpha

    def per_sample_loss(self, log_probs: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
        if target.is_floating_point():
            return self._soft_loss(log_probs, _Target(target), weight)
        factor = self._class_factor(weight, log_probs)
        log_p = log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
        loss = -log_p
        if self.gamma != 0.0:
            loss = loss * _focal_powers(_focal_base(_one_minus_exp(log_p)), self.gamma)[1]
        return loss if factor is None else loss * factor.take(target)

    def _soft_loss(self, log_probs: Tensor, target: _Target, weight: Tensor | None) -> Tensor:
        # -sum_c alpha_c w_c t_c (1 - p_c)^gamma log p_c
        g = _g_log_p if self.gamma == 0.0 else _FocalTerm(self.gamma)
        term = target.term(g, self._class_factor(weight, log_probs), -1.0, log_probs)
        return self._row_terms(log_probs, [term], target.index)


class ConfidencePenaltyLoss(CrossEntropyLoss):
    """Cross-entropy minus an entropy bonus (Pereyra et al. 2017, "Regularizing Neural Networks
    by Penalizing Confident Output Distributions"): ``CE - penalty * H(p)`` with
    ``H(p) = -sum_c p_c log p_c``.

    Args:
        penalty: the paper's beta, >= 0 (named ``penalty`` because ``beta`` is the
            effective-number strategy's); 0 gives cross-entropy.
        kwargs: `CrossEntropyLoss`'s options (class_weights, ignore_index, reduction,
            label_smoothing, beta, validate, z_loss), by keyword.

    The entropy term of a row is multiplied by the row weight (``w[y]``, ``sum_c w_c t_c`` for
    probabilities), so under "mean" both terms are averaged with the same weights. Defined for
    probability targets (the CE part takes them; the entropy does not depend on the target).
    Stable path: ``p log p`` is computed as ``softmax(log p) * log p`` from log_softmax, which
    is 0, not NaN, where p underflows; value and gradient (``d(p log p)/d log p = p (1 +
    log p)``) come from one fused, hand-differentiated function. The loss can be negative
    (``H <= log C``). The paper tunes beta per task; the default here is 0.1.
    """

    _index_needs_probs = True  # the entropy needs every class's probability

    def __init__(
        self,
        penalty: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.penalty: float = _check_number("penalty", penalty, low=0.0)

    def _knobs(self) -> dict[str, Any]:
        return {"penalty": self.penalty}

    def per_sample_loss(self, log_probs: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
        if self.penalty == 0.0:
            return super().per_sample_loss(log_probs, target, weight)
        if target.is_floating_point():
            return self._soft_loss(log_probs, _Target(target), weight)
        return self._soft_loss(log_probs, _Target(None, target), weight)

    def _soft_loss(self, log_probs: Tensor, target: _Target, weight: Tensor | None) -> Tensor:
        # -sum_c w_c t_c log p_c + penalty * row weight * sum_c p_c log p_c (= -H)
        terms = [target.term(_g_log_p, weight, -1.0, log_probs)]
        if self.penalty != 0.0:
            coef: Tensor | float = self.penalty
            if weight is not None:
                coef = (target.total(weight, log_probs) * self.penalty).unsqueeze(1)
            terms.append(_Term(_g_p_log_p, (coef,)))
        return self._row_terms(log_probs, terms, target.index)


class LogitAdjustedLoss(CrossEntropyLoss):
    """Logit-adjusted softmax cross-entropy (Menon et al. 2021, "Long-Tail Learning via Logit
    Adjustment"): ``-log softmax(f + tau * log pi)_y`` with class priors ``pi`` from the
    training labels.

    Args:
        tau: adjustment strength, >= 0 (paper: 1); 0 gives cross-entropy (and needs no counts).
        kwargs: `CrossEntropyLoss`'s options (class_weights, ignore_index, reduction,
            label_smoothing, beta, validate, z_loss), by keyword.

    The priors are ``pi_c = n_c / sum(n)`` from `set_class_counts` (which the LightningModule
    calls with the datamodule's train-split counts before training); counts are clamped to at
    least 1 first, as for class weights, so an unseen class gets a finite prior. They live in
    the persistent ``log_prior`` buffer (float32), so checkpoints keep them. The adjustment is a
    training-time loss only: predictions are ``argmax f``, unadjusted, which is what makes them
    balanced. Probability targets use ``-sum_c t_c log softmax(f + tau log pi)_c``.

    Implementation: the one variant that does not override `per_sample_loss`. It supplies the
    offset ``tau * log pi`` through the `logit_offset` hook, so it is exactly the base
    cross-entropy (fused fast path included) on the shifted logits, with the base class's
    denominators, weights, ignore_index, smoothing and soft targets. (Shifting log p inside
    `per_sample_loss` would need a second log_softmax, twice the cost.) The z-loss, if enabled,
    sees the raw logits. Stable path: log_softmax of the shifted logits; ``log pi`` is finite
    (counts clamped to >= 1), so finite logits give a finite loss.
    """

    log_prior: Tensor
    _class_buffers = ("weight", "log_prior")

    def __init__(
        self,
        tau: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.tau: float = _check_number("tau", tau, low=0.0)
        self.register_buffer("log_prior", torch.empty(0), persistent=True)

    def _knobs(self) -> dict[str, Any]:
        return {"tau": self.tau}

    @property
    def rebalances_classes(self) -> bool:
        """Logit adjustment with tau > 0 targets balanced error."""
        return self.tau > 0.0 or super().rebalances_classes

    @property
    def needs_class_counts(self) -> bool:
        """True while the priors (tau > 0) or a weight strategy's weights are not computed yet."""
        return (self.tau > 0.0 and self.log_prior.numel() == 0) or super().needs_class_counts

    def set_class_counts(self, counts: Tensor | Sequence[float]) -> None:
        """Set the class priors (and a weight strategy's weights) from per-class train counts."""
        n = _to_float64_vector(counts, "class counts").clamp_min(1.0)
        self.log_prior = (n / n.sum()).log().to(dtype=torch.float32, device=self.log_prior.device)
        if self.weight_strategy is not None:
            super().set_class_counts(counts)

    def _resolve_weight(self) -> Tensor | None:
        if self.tau > 0.0 and self.log_prior.numel() == 0:
            raise RuntimeError(
                f"LogitAdjustedLoss(tau={self.tau}) needs the class priors before the first "
                "forward: call set_class_counts(counts) with the per-class number of labelled "
                "training rows (or use a datamodule that exposes class counts)"
            )
        return super()._resolve_weight()

    def logit_offset(self, logits: Tensor) -> Tensor | None:
        """``tau * log(prior)``, added to the logits before the softmax (None when tau = 0)."""
        if self.tau == 0.0:
            return None
        if self.log_prior.numel() != logits.shape[1]:
            raise ValueError(
                f"the class priors have {self.log_prior.numel()} entries (from set_class_counts) "
                f"but logits have C={logits.shape[1]} classes"
            )
        return self.log_prior.to(device=logits.device, dtype=logits.dtype) * self.tau


class Poly1Loss(CrossEntropyLoss):
    """Poly-1 loss (Leng et al. 2022, "PolyLoss: A Polynomial Expansion Perspective of
    Classification Loss Functions"): ``CE + epsilon * (1 - p_y)``.

    Args:
        epsilon: coefficient of the first polynomial term, >= -1 (below -1 the loss would
            decrease as p_y falls near p_y = 1: its leading coefficient 1 + epsilon turns
            negative); the paper tunes it per task, positive for classification; default 1.
            0 gives cross-entropy.
        kwargs: `CrossEntropyLoss`'s options (class_weights, ignore_index, reduction,
            label_smoothing, beta, validate, z_loss), by keyword.

    Probability targets (and label smoothing) use the paper's ``p_t = sum_c t_c p_c``, written
    elementwise so that class weights apply like torch's: ``sum_c w_c t_c (-log p_c +
    epsilon (1 - p_c))`` (equal to ``CE + epsilon (1 - p_t)`` without weights). Stable path:
    ``1 - p = -expm1(log p)`` from log_softmax.
    """

    def __init__(
        self,
        epsilon: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.epsilon: float = _check_number("epsilon", epsilon, low=-1.0)

    def _knobs(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon}

    def per_sample_loss(self, log_probs: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
        if target.is_floating_point():
            return self._soft_loss(log_probs, _Target(target), weight)
        eps = self.epsilon
        log_p = log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
        loss = -log_p if eps == 0.0 else eps * _one_minus_exp(log_p) - log_p
        return loss if weight is None else loss * weight.take(target)

    def _soft_loss(self, log_probs: Tensor, target: _Target, weight: Tensor | None) -> Tensor:
        # sum_c w_c t_c (eps (1 - p_c) - log p_c): eps sum_c w_c t_c, less two linear terms
        eps = self.epsilon
        terms = [target.term(_g_log_p, weight, -1.0, log_probs)]
        if eps == 0.0:
            return self._row_terms(log_probs, terms, target.index)
        terms.append(target.term(_g_p, weight, -eps, log_probs))
        rows = self._row_terms(log_probs, terms, target.index)
        return rows + eps * target.total(weight, log_probs)


class SymmetricCrossEntropyLoss(CrossEntropyLoss):
    """Symmetric cross-entropy (Wang et al. 2019, "Symmetric Cross Entropy for Robust Learning
    with Noisy Labels"): ``sce_alpha * CE + sce_beta * RCE`` with the reverse cross-entropy
    ``RCE = -sum_c p_c log q_c`` of the prediction p against the label distribution q, where
    ``log 0`` is replaced by ``log_zero`` (the paper's A). For a one-hot label
    ``RCE = -log_zero * (1 - p_y)``.

    Args:
        sce_alpha: weight of the CE term, >= 0 (paper, CIFAR-10: 0.1).
        sce_beta: weight of the RCE term, >= 0 (paper, CIFAR-10: 1.0). Not both 0.
            (``sce_`` prefixes: ``beta`` is the effective-number strategy's.)
        log_zero: the paper's A, the value of ``log 0``, < 0 (paper: -4; the authors' code
            clamps q at 1e-4, i.e. A = log 1e-4 ~ -9.21).
        kwargs: `CrossEntropyLoss`'s options (class_weights, ignore_index, reduction,
            label_smoothing, beta, validate, z_loss), by keyword.

    sce_alpha=1, sce_beta=0 gives cross-entropy. Probability targets use
    ``log q_c = max(log t_c, log_zero)``. The RCE term of a row is multiplied by the row weight
    (``w[y]``; ``sum_c w_c t_c`` for probabilities). Stable path: ``1 - p_y = -expm1(log p_y)``
    and p from log_softmax; the only log is of the (constant) target, clamped at
    ``exp(log_zero)``.
    """

    def __init__(
        self,
        sce_alpha: float = 0.1,
        sce_beta: float = 1.0,
        log_zero: float = -4.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.sce_alpha: float = _check_number("sce_alpha", sce_alpha, low=0.0)
        self.sce_beta: float = _check_number("sce_beta", sce_beta, low=0.0)
        if self.sce_alpha == 0.0 and self.sce_beta == 0.0:
            raise ValueError("sce_alpha and sce_beta must not both be 0 (the loss would be 0)")
        self.log_zero: float = _check_number("log_zero", log_zero, high=0.0, high_open=True)

    def _knobs(self) -> dict[str, Any]:
        return {"sce_alpha": self.sce_alpha, "sce_beta": self.sce_beta, "log_zero": self.log_zero}

    def per_sample_loss(self, log_probs: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
        alpha, beta = self.sce_alpha, self.sce_beta
        if beta == 0.0:
            return alpha * super().per_sample_loss(log_probs, target, weight)
        if target.is_floating_point():
            return self._soft_loss(log_probs, _Target(target), weight)
        row_w = _row_weight(target, weight)
        log_p = log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
        ce = -log_p if weight is None else -log_p * row_w
        rce = (-self.log_zero * beta) * _one_minus_exp(log_p)
        return alpha * ce + (rce if row_w is None else rce * row_w)

    def _soft_loss(self, log_probs: Tensor, target: _Target, weight: Tensor | None) -> Tensor:
        # -alpha sum_c w_c t_c log p_c - beta rw sum_c p_c log q_c, rw the row weight and
        # log q = log max(t, e^log_zero)
        alpha, beta = self.sce_alpha, self.sce_beta
        rce: Tensor | float = -beta
        if weight is not None:
            rce = target.total(weight, log_probs) * -beta
        terms = [target.term(_g_log_p, weight, -alpha, log_probs)] if alpha != 0.0 else []
        floor = math.exp(self.log_zero)
        if isinstance(target.dense, Tensor):  # log q computed block by block
            log_q = _Lazy(lambda t: t.clamp_min(floor).log_(), target.dense)
            coef = rce.unsqueeze(1) if isinstance(rce, Tensor) else rce
            terms.insert(0, _Term(_g_p, (log_q, coef)))  # (first: its product is reused)
            return self._row_terms(log_probs, terms, target.index)
        # (smoothed) class indices: q is d = eps / C off the target and d + 1 - eps on it, so
        # sum_c p_c log q_c = log q_off + (log q_on - log q_off) p_y, as sum_c p_c = 1
        off = 0.0 if target.dense is None else float(target.dense)
        log_off = math.log(max(off, floor))
        log_on = math.log(max(off + target.index_weight, floor))
        terms.append(_Term(_g_p, (), rce * (log_on - log_off)))
        return self._row_terms(log_probs, terms, target.index) + rce * log_off


class GeneralizedCrossEntropyLoss(CrossEntropyLoss):
    """Generalised cross-entropy, the L_q loss (Zhang & Sabuncu 2018, "Generalized Cross Entropy
    Loss for Training Deep Neural Networks with Noisy Labels"): ``(1 - p_y**q) / q``.

    Args:
        q: in (0, 1] (paper: 0.7). q -> 0 approaches cross-entropy, q = 1 is the MAE
            ``1 - p_y``.
        kwargs: `CrossEntropyLoss`'s options (class_weights, ignore_index, reduction, beta,
            validate, z_loss), by keyword.
        label_smoothing: must be 0: the paper defines L_q for class indices only, so
            probability targets and label smoothing raise a ValueError.

    Stable path: ``(1 - p_y**q) / q = -expm1(q * log p_y) / q`` from log_softmax, exact as q -> 0
    or p_y -> 1, and 1/q (not NaN) where p_y underflows. (The paper's truncated variant is not
    implemented.)
    """

    supports_soft_targets = False

    def __init__(
        self,
        q: float = 0.7,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.q: float = _check_number("q", q, low=0.0, high=1.0, low_open=True)

    def _knobs(self) -> dict[str, Any]:
        return {"q": self.q}

    def per_sample_loss(self, log_probs: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
        log_p = log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
        loss = -torch.expm1(self.q * log_p) / self.q
        return loss if weight is None else loss * weight.take(target)


# Config name -> loss class: every entry gets a structured-config schema (xentlit/config.py) and a
# `conf/loss/<name>.yaml`; loss variants register themselves here. "class_balanced" is the base
# class preset with class_weights="effective_number" (Cui et al. 2019).
LOSSES: dict[str, type[CrossEntropyLoss]] = {
    "cross_entropy": CrossEntropyLoss,
    "class_balanced": CrossEntropyLoss,
    "focal": FocalLoss,
    "confidence_penalty": ConfidencePenaltyLoss,
    "logit_adjusted": LogitAdjustedLoss,
    "poly1": Poly1Loss,
    "symmetric_ce": SymmetricCrossEntropyLoss,
    "generalized_ce": GeneralizedCrossEntropyLoss,
}
