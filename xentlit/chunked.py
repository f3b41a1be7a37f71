"""Fused, chunked linear + cross-entropy for large-class heads.

For a head with C classes on a batch of N rows, the plain path ``F.cross_entropy(F.linear(h, W, b), y)``
materialises the (N, C) logits, keeps the (N, C) log-softmax for backward, and builds two more (N, C)
tensors in backward (the gradient of the log-probabilities and of the logits). At C = 50k, N = 8192 that is
1.6 GB per tensor in float32: the loss head, not the network, sets the peak memory.

`linear_cross_entropy` computes exactly the same loss (value and gradients of ``hidden``, ``weight`` and
``bias``; every option of `F.cross_entropy` for class-index targets: ``ignore_index``, class weights,
``label_smoothing``, reductions) without ever holding more than one (chunk_size, C) block:

* forward, per block of rows: logits in float32 (float64 for float64 inputs), the row max, the loss terms
  from the shifted logits, then ``exp`` in place for the log-sum-exp. It saves only the inputs (``hidden``,
  ``weight``, ``bias`` — references, no copies), the target and O(N) row vectors (log-sum-exp and the two
  per-row coefficients below), never the logits;
* backward, per block: recompute the logits (one extra GEMM), turn them in place into
  ``dL/dlogits = g * (a * softmax - b * onehot(y) - s * w)`` and accumulate ``grad_hidden[block] = G @ W``,
  ``grad_weight += G.T @ h[block]``, ``grad_bias += G.sum(0)``.

Extra memory is O(chunk_size * C) instead of O(N * C) for the logits and their gradient.

Why row blocks rather than class blocks: a row block holds every class of its rows, so the log-sum-exp and
the softmax are exact in one pass (class blocks need an online log-sum-exp and a second pass, or rescaling of
partial sums), ``grad_hidden`` of a block is final after one GEMM (class blocks accumulate it across every
block), and the target/ignore/smoothing terms are row-local. Class blocks only win when N is small and C is
so large that even a handful of rows times C does not fit, which is not the training regime of a classifier.

Per row i with target y, class weights w (1 without weights), W = sum_c w_c, smoothing eps, and
``valid_i = (y_i != ignore_index)``, torch's loss is::

    loss_i = b_i * (lse_i - z_iy) + s_i * sum_c w_c (lse_i - z_ic)
    b_i = (1 - eps) * w_y * valid_i,  s_i = eps / C * valid_i

so ``dloss_i / dz_ic = (b_i + s_i W) p_ic - b_i [c = y] - s_i w_c``. The mean divides the summed loss by
``sum_i w_{y_i} valid_i`` (the count of non-ignored rows without weights), as torch does for both the nll and
the smoothing parts; like `xentlit.losses.CrossEntropyLoss`, a mean with denominator 0 (every row ignored, or
every target of weight 0) is 0 with zero gradient instead of torch's NaN.

Numerics: with the row max m subtracted, ``lse - z_y = log(sum exp(z - m)) - (z_y - m)`` and
``sum_c w_c (lse - z_c) = W * log(sum exp(z - m)) + sum_c w_c (m - z_c)`` are sums of non-negative terms (no
cancellation), so the value matches torch's log_softmax route to float rounding (tested to 1e-5 in float32
and 1e-10 in float64). bf16/fp16 inputs are computed in float32 (autocast is disabled inside), and gradients
come back in each input's dtype.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xentlit.losses.base import safe_mean as _safe_mean
from xentlit.losses.checks import check_number as _check_number

__all__ = [
    "ChunkedLinearCrossEntropy",
    "linear_cross_entropy",
    "linear_cross_entropy_terms",
    "peak_allocated_bytes",
]

_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_int(name: str, value: Any, low: int | None = None) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if low is not None and number < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return number


def _check_class_weights_values(weights: Tensor) -> None:
    """Finite, non-negative, not all zero (one host sync; used where weights are stored)."""
    w = weights.detach()
    if not bool(torch.isfinite(w).all() & (w >= 0).all()):
        raise ValueError(f"class_weights must be finite and non-negative, got {w.tolist()[:20]}")
    if not bool(w.sum() > 0):
        raise ValueError("class_weights must not be all zero")


def _check_inputs(
    hidden: Any,
    weight: Any,
    bias: Any,
    target: Any,
    class_weights: Any,
    chunk_size: Any,
    reduction: Any,
) -> None:
    """Checks that need no data (no host sync)."""
    for name, value in (("hidden", hidden), ("weight", weight), ("target", target)):
        if not isinstance(value, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    for name, value in (("bias", bias), ("class_weights", class_weights)):
        if value is not None and not isinstance(value, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    _check_int("chunk_size", chunk_size, low=1)
    if hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(
            f"hidden must be a 2-D floating point tensor (N, D), got shape {_shape(hidden)} and dtype "
            f"{hidden.dtype}"
        )
    n, d = hidden.shape
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"weight must be a 2-D floating point tensor (C, D), got shape {_shape(weight)} and dtype "
            f"{weight.dtype}"
        )
    num_classes = weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(
            f"weight must have shape (C, D) with D = hidden.shape[1] = {d}, got weight shape "
            f"{_shape(weight)} (hidden shape {_shape(hidden)})"
        )
    if num_classes < 1:
        raise ValueError(f"weight must have at least one class (C >= 1), got shape {_shape(weight)}")
    if bias is not None and (_shape(bias) != (num_classes,) or not bias.is_floating_point()):
        raise ValueError(
            f"bias must be a floating point tensor of shape (C,) = ({num_classes},), got shape "
            f"{_shape(bias)} and dtype {bias.dtype}"
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(
            f"target must be integer class indices of shape (N,), got dtype {target.dtype} (probability "
            "targets are not supported by the chunked path)"
        )
    if _shape(target) != (n,):
        raise ValueError(
            f"target must have shape (N,) = ({n},) to match hidden of shape {_shape(hidden)}, got "
            f"{_shape(target)}"
        )
    if class_weights is not None and (
        _shape(class_weights) != (num_classes,) or not class_weights.is_floating_point()
    ):
        raise ValueError(
            f"class_weights must be a floating point tensor of shape (C,) = ({num_classes},), got shape "
            f"{_shape(class_weights)} and dtype {class_weights.dtype}"
        )
    devices = {t.device for t in (hidden, weight, bias, target, class_weights) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")


def _check_target_values(
    target: Tensor, num_classes: int, ignore_index: int, class_weights: Tensor | None
) -> None:
    """Data checks, read with one host sync: indices in [0, C) or ignore_index; weights finite, >= 0."""
    bad_target = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    flags = [bad_target.any()]
    if class_weights is not None:
        flags.append(~(torch.isfinite(class_weights).all() & (class_weights >= 0).all()))
    bad = torch.stack(flags).tolist()
    if bad[0]:
        values = target[bad_target]
        raise ValueError(
            f"target contains {values.numel()} class indices outside [0, {num_classes}): smallest bad "
            f"value {values.min().item()}, largest bad value {values.max().item()}; class indices must be "
            f"in [0, C) with C = weight.shape[0] = {num_classes}, or equal ignore_index={ignore_index}"
        )
    if len(bad) > 1 and bad[1]:
        raise ValueError("class_weights must be finite and non-negative")


# --------------------------------------------------------------------------------------------
# The autograd function
# --------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs are computed in float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


@contextlib.contextmanager
def _no_autocast(device: torch.device) -> Iterator[None]:
    """Disable autocast for ``device`` (the GEMMs must run in the compute dtype, not bf16/fp16)."""
    try:
        ctx = torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # a device type without autocast support
        ctx = contextlib.nullcontext()
    with ctx:
        yield


def _row_blocks(n: int, chunk_size: int) -> range:
    return range(0, n, chunk_size)


def _block_logits(h: Tensor, w: Tensor, b: Tensor | None, out: Tensor) -> Tensor:
    """``h @ w.T + b`` into ``out`` (a (rows, C) prefix view of the block buffer), in the compute dtype."""
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-row losses of ``cross_entropy(hidden @ weight.T + bias, target)`` computed in row blocks.

    Inputs are already validated and prepared: ``target`` is long with ignored rows replaced by 0,
    ``nll_coef`` (b_i) and ``smooth_coef`` (s_i) are per-row coefficients in the compute dtype (zero for
    ignored rows), ``cw`` the class weights in the compute dtype or None, ``has_smoothing`` whether
    label_smoothing > 0 (known on the host: no sync is needed to skip the smoothing terms). Returns (N,)
    losses in the compute dtype. Differentiable once, with respect to hidden, weight and bias.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target: Tensor,
        nll_coef: Tensor,
        smooth_coef: Tensor,
        cw: Tensor | None,
        chunk_size: int,
        has_smoothing: bool,
    ) -> Tensor:
        ctype = nll_coef.dtype
        n, num_classes = hidden.shape[0], weight.shape[0]
        rows_out = torch.zeros(n, dtype=ctype, device=hidden.device)
        lse = torch.empty(n, dtype=ctype, device=hidden.device)
        w = weight.to(ctype)
        b = None if bias is None else bias.to(ctype)
        total_weight = float(num_classes) if cw is None else cw.sum()
        with _no_autocast(hidden.device):
            buf = torch.empty(min(chunk_size, n), num_classes, dtype=ctype, device=hidden.device)
            for start in _row_blocks(n, chunk_size):
                stop = min(start + chunk_size, n)
                z = _block_logits(hidden[start:stop].to(ctype), w, b, buf[: stop - start])
                m = z.amax(dim=1, keepdim=True)
                z.sub_(m)  # z - m <= 0
                neg_zy = z.gather(1, target[start:stop].unsqueeze(1)).squeeze(1).neg_()  # m - z_y >= 0
                smooth_dot = None
                if has_smoothing:  # sum_c w_c (z_c - m) <= 0
                    smooth_dot = z.sum(dim=1) if cw is None else torch.mv(z, cw)
                log_s = z.exp_().sum(dim=1).log_()  # log sum exp(z - m) >= 0
                lse[start:stop] = log_s + m.squeeze(1)
                # b (lse - z_y) + s sum_c w_c (lse - z_c), each a sum of non-negative terms
                row = nll_coef[start:stop] * (log_s + neg_zy)
                if smooth_dot is not None:
                    row = row + smooth_coef[start:stop] * (total_weight * log_s - smooth_dot)
                # Ignored rows are 0 even where their logits are not finite.
                rows_out[start:stop] = torch.where(nll_coef[start:stop] + smooth_coef[start:stop] != 0, row, 0.0)
        ctx.save_for_backward(hidden, weight, bias, target, nll_coef, smooth_coef, cw, lse)
        ctx.chunk_size, ctx.has_smoothing = chunk_size, has_smoothing
        return rows_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_rows: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, target, nll_coef, smooth_coef, cw, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        none_rest = (None,) * 6
        if not (need_h or need_w or need_b):
            return (None, None, None, *none_rest)
        chunk_size = ctx.chunk_size
        ctype = nll_coef.dtype
        n, num_classes = hidden.shape[0], weight.shape[0]
        w = weight.to(ctype)
        b = None if bias is None else bias.to(ctype)
        g = grad_rows.to(ctype)
        total_weight = float(num_classes) if cw is None else cw.sum()
        # dloss_i/dz_ic = g_i ((b_i + s_i W) p_ic - b_i [c = y_i] - s_i w_c)
        p_coef = g * (nll_coef + smooth_coef * total_weight)
        onehot_coef = (g * nll_coef).neg_().unsqueeze(1)
        smooth_g = g * smooth_coef

        grad_h = torch.empty(n, hidden.shape[1], dtype=ctype, device=hidden.device) if need_h else None
        grad_w = torch.zeros_like(w) if need_w else None
        grad_b = torch.zeros(num_classes, dtype=ctype, device=hidden.device) if need_b else None
        ones = torch.ones(min(chunk_size, n), dtype=ctype, device=hidden.device) if need_b else None
        with _no_autocast(hidden.device):
            buf = torch.empty(min(chunk_size, n), num_classes, dtype=ctype, device=hidden.device)
            for start in _row_blocks(n, chunk_size):
                stop = min(start + chunk_size, n)
                h = hidden[start:stop].to(ctype)
                z = _block_logits(h, w, b, buf[: stop - start])
                z.sub_(lse[start:stop].unsqueeze(1)).exp_().mul_(p_coef[start:stop].unsqueeze(1))  # softmax
                z.scatter_add_(1, target[start:stop].unsqueeze(1), onehot_coef[start:stop])
                if ctx.has_smoothing:
                    if cw is None:
                        z.sub_(smooth_g[start:stop].unsqueeze(1))
                    else:
                        z.addr_(smooth_g[start:stop], cw, alpha=-1.0)
                if grad_h is not None:
                    torch.mm(z, w, out=grad_h[start:stop])
                if grad_w is not None:
                    grad_w.addmm_(z.t(), h)
                if grad_b is not None:  # column sums as a GEMV (faster than a dim-0 reduction on CPU)
                    grad_b.addmv_(z.t(), ones[: stop - start])
        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            *none_rest,
        )


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------


def _rows_and_denominator(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    ignore_index: int,
    class_weights: Tensor | None,
    label_smoothing: float,
    chunk_size: int,
    reduction: str,
    validate: bool,
) -> tuple[Tensor, Tensor]:
    """Validated per-row losses (N,) and the mean's denominator (detached scalar)."""
    ignore_index = _check_int("ignore_index", ignore_index)
    eps = _check_number("label_smoothing", label_smoothing, low=0.0, high=1.0, high_open=True)
    _check_inputs(hidden, weight, bias, target, class_weights, chunk_size, reduction)
    chunk_size = operator.index(chunk_size)
    num_classes = weight.shape[0]
    t = target.long()
    if validate:
        _check_target_values(t, num_classes, ignore_index, class_weights)
    ctype = _compute_dtype(hidden, weight, bias)
    valid = t != ignore_index
    safe = torch.where(valid, t, 0)
    cw = None if class_weights is None else class_weights.detach().to(ctype)
    # w_y of non-ignored rows (1 without weights), 0 for ignored rows: the mean's row weights.
    row_w = valid.to(ctype) if cw is None else torch.where(valid, cw.take(safe), 0.0)
    denominator = row_w.sum()
    nll_coef = row_w * (1.0 - eps)
    smooth_coef = valid.to(ctype) * (eps / num_classes)
    rows = _LinearCrossEntropy.apply(
        hidden, weight, bias, safe, nll_coef, smooth_coef, cw, chunk_size, eps > 0.0
    )
    return rows, denominator


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    *,
    ignore_index: int = -100,
    class_weights: Tensor | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    chunk_size: int = 4096,
    validate: bool = True,
) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), target, weight=class_weights, ...)`` without
    materialising the (N, C) logits or their gradient: at most one (chunk_size, C) block at a time.

    Args:
        hidden: (N, D) floating point features (the head's input).
        weight: (C, D) head weight (like `nn.Linear.weight`).
        bias: (C,) head bias or None.
        target: (N,) integer class indices in [0, C), or ``ignore_index``.
        ignore_index: targets equal to it contribute nothing (loss, gradient, denominator).
        class_weights: (C,) non-negative per-class weights (as torch's ``weight=``), or None. Not
            differentiated.
        label_smoothing: in [0, 1), as torch's.
        reduction: "mean" (divides by the sum of the class weights of the non-ignored targets; 0 with zero
            gradient when that is 0, where torch gives NaN), "sum" or "none" ((N,) per-row losses, 0 for
            ignored rows).
        chunk_size: rows per block, >= 1; peak extra memory is about ``chunk_size * C`` compute-dtype
            elements. ``chunk_size >= N`` is one block.
        validate: check target values and class weights (one host sync); shapes are always checked.

    The loss is computed in float32 (float64 if any of hidden/weight/bias is float64) and returned in that
    dtype; gradients come back in each input's dtype. Raises ValueError for bad shapes, dtypes, target
    values, class weights, chunk_size, label_smoothing or reduction.
    """
    rows, denominator = _rows_and_denominator(
        hidden, weight, bias, target, ignore_index, class_weights, label_smoothing, chunk_size, reduction,
        validate,
    )
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return _safe_mean(rows.sum(), denominator)


def linear_cross_entropy_terms(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    *,
    ignore_index: int = -100,
    class_weights: Tensor | None = None,
    label_smoothing: float = 0.0,
    chunk_size: int = 4096,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """``(loss_sum, denominator)`` of `linear_cross_entropy`, with the denominators of
    `xentlit.losses.CrossEntropyLoss.loss_terms`: the summed loss (keeps the graph) and the sum of the class
    weights of the non-ignored targets (their count without weights; detached; 0 if all are ignored).
    Summing both over ranks / micro-batches and dividing gives the exact global mean."""
    rows, denominator = _rows_and_denominator(
        hidden, weight, bias, target, ignore_index, class_weights, label_smoothing, chunk_size, "sum",
        validate,
    )
    return rows.sum(), denominator.detach()


# --------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------


class ChunkedLinearCrossEntropy(nn.Module):
    """A classification head and its cross-entropy loss in one module, for large class counts.

    Holds ``weight`` (num_classes, in_features) and ``bias`` (num_classes,) initialised like `nn.Linear`
    (so a state dict moves between the two with the same keys). `forward` gives the mean loss without
    materialising the (N, C) logits (see `linear_cross_entropy`); `loss_terms` gives the ``(sum,
    denominator)`` pair for exact distributed / accumulated means; `logits` gives the plain logits for
    inference.

    Args:
        in_features: D, >= 1.
        num_classes: C, >= 1.
        bias: whether the head has a bias.
        chunk_size: rows per block, >= 1 (peak extra memory about chunk_size * C floats).
        ignore_index: targets equal to it are skipped.
        label_smoothing: in [0, 1).
        class_weights: None or C finite non-negative weights, not all zero (a persistent buffer ``class_weights``
            that keeps its dtype under module casts).
    """

    weight: Tensor
    bias: Tensor | None
    class_weights: Tensor | None

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        bias: bool = True,
        chunk_size: int = 4096,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        class_weights: Tensor | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.in_features = _check_int("in_features", in_features, low=1)
        self.num_classes = _check_int("num_classes", num_classes, low=1)
        self.chunk_size = _check_int("chunk_size", chunk_size, low=1)
        self.ignore_index = _check_int("ignore_index", ignore_index)
        self.label_smoothing = _check_number("label_smoothing", label_smoothing, low=0.0, high=1.0, high_open=True)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.in_features))
        self.bias = nn.Parameter(torch.empty(self.num_classes)) if bias else None
        if class_weights is None:
            weights = None
        else:
            if isinstance(class_weights, Tensor):
                weights = class_weights.detach().clone()
                if not weights.is_floating_point():
                    weights = weights.float()
            else:
                try:
                    weights = torch.tensor([float(v) for v in class_weights], dtype=torch.float32)
                except (TypeError, ValueError):
                    raise ValueError(
                        f"class_weights must be a 1-D sequence of numbers, got {class_weights!r}"
                    ) from None
            if _shape(weights) != (self.num_classes,):
                raise ValueError(
                    f"class_weights must have one entry per class, shape ({self.num_classes},), got "
                    f"shape {_shape(weights)}"
                )
            _check_class_weights_values(weights)
        self.register_buffer("class_weights", weights, persistent=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """`nn.Linear`'s initialisation."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def _apply(self, fn: Any, recurse: bool = True) -> ChunkedLinearCrossEntropy:
        # Like xentlit.losses.CrossEntropyLoss: dtype casts move the class weights but keep their dtype.
        before = self.class_weights
        super()._apply(fn, recurse)
        after = self.class_weights
        if before is not None and after is not None and after.dtype != before.dtype:
            self.class_weights = before.to(device=after.device)
        return self

    def logits(self, hidden: Tensor) -> Tensor:
        """The plain (N, C) logits ``hidden @ weight.T + bias`` (inference, metrics)."""
        return F.linear(hidden, self.weight, self.bias)

    def loss_terms(self, hidden: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss_sum, denominator)``, see `linear_cross_entropy_terms`."""
        return linear_cross_entropy_terms(
            hidden, self.weight, self.bias, target, ignore_index=self.ignore_index,
            class_weights=self.class_weights, label_smoothing=self.label_smoothing,
            chunk_size=self.chunk_size,
        )

    def forward(self, hidden: Tensor, target: Tensor) -> Tensor:
        """Mean cross-entropy of the head's logits for ``hidden`` (N, in_features) against ``target`` (N,)."""
        loss_sum, denominator = self.loss_terms(hidden, target)
        return _safe_mean(loss_sum, denominator)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, bias={self.bias is not None}, "
            f"chunk_size={self.chunk_size}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, class_weights={self.class_weights is not None}"
        )


# --------------------------------------------------------------------------------------------
# Measuring peak memory
# --------------------------------------------------------------------------------------------


def peak_allocated_bytes(fn: Any, device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensor memory allocated by torch while ``fn()`` runs, above the level at its start.

    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak. CPU (which keeps no peak
    statistic): ``fn`` runs under ``torch.profiler`` with ``profile_memory=True``, and the peak is the
    maximum of the running sum of the profiler's allocation records (+size on allocation, -size on free),
    in time order. Both count what torch's allocator hands out (no allocator caching or OS effects), so
    the result is deterministic for a deterministic ``fn``. Tensors that ``fn`` allocates and keeps (e.g.
    ``.grad``) count too.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - start)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        records = [
            (event.start_ns(), event.nbytes())
            for event in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
            if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
        ]
    except AttributeError as err:  # pragma: no cover - a torch without the kineto results API
        raise RuntimeError(f"this torch ({torch.__version__}) exposes no profiler memory records") from err
    current = peak = 0
    for _, nbytes in sorted(records, key=lambda r: r[0]):
        current += nbytes
        peak = max(peak, current)
    return peak
