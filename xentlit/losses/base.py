"""`CrossEntropyLoss`: torch's cross-entropy, checked, class-weighted and split for exact distributed means.

It computes what `torch.nn.functional.cross_entropy` computes (value and gradient, every option, to rounding;
the plain formula *is* torch's kernel) and adds class weights computed from class counts, `loss_terms` (the summed
loss and the mean's denominator, so that DDP and gradient accumulation can divide by the global denominator), a
mean of 0 instead of NaN when every target is ignored, float32 compute for low-precision logits, a z-loss, readable
input errors for one host synchronisation per call, and ``compile=True`` to run the loss through `torch.compile`.

Loss variants are subclasses that change the formula through small hooks, all on log-probabilities:

* `class_loss` ``l(log p)``: the loss when a class with log-probability ``log p`` is the label (``-log p`` here).
  A row's loss is its expectation over the target: ``w_y l(log p_y)`` for class indices,
  ``sum_c w_c t_c l(log p_c)`` for probabilities (label smoothing turns indices into probabilities);
* `row_loss`: a term of the whole distribution (an entropy, a reverse cross-entropy), times the row's weight;
* `class_factor`: a per-class factor of the formula that, unlike class weights, is not in the mean's denominator;
* `logit_offset`: a per-class shift of the logits before the softmax (logit adjustment);
* `per_sample_loss`: the whole per-row formula, for anything the hooks above cannot say.

Gradients come from autograd; speed from torch's kernels, or from the compiler (``compile=True``).
Pure PyTorch: nothing here imports Lightning.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from xentlit.losses.checks import check_number
from xentlit.losses.validation import check_class_indices, check_shapes, raise_value_error, soft_target_tolerance
from xentlit.losses.weights import ClassWeightedLoss

__all__ = ["REDUCTIONS", "CrossEntropyLoss", "class_view", "expectation", "gather_class", "row_weight", "safe_mean"]

REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
_REDUCTION_SUM = 2  # at::Reduction::Sum, for torch.ops.aten.nll_loss_forward


def class_view(vec: Tensor, like: Tensor) -> Tensor:
    """A (C,) vector viewed to broadcast along dim 1 of ``like`` (N, C[, d1, ...])."""
    shape = [1] * like.dim()
    shape[1] = -1
    return vec.view(shape)


def gather_class(values: Tensor, index: Tensor) -> Tensor:
    """``values[i, index[i]]`` for (N, C[, d1, ...]) values and (N[, d1, ...]) class indices."""
    return values.gather(1, index.unsqueeze(1)).squeeze(1)


def expectation(per_class: Tensor, target: Tensor, factor: Tensor | None = None) -> Tensor:
    """A per-class quantity (N, C[, ...]) taken over the target: ``factor_y v_y`` for class indices y,
    ``sum_c factor_c t_c v_c`` for probabilities t (no factor: 1)."""
    if target.is_floating_point():
        weighted = target * per_class
        return (weighted if factor is None else weighted * class_view(factor, weighted)).sum(dim=1)
    rows = gather_class(per_class, target)
    return rows if factor is None else rows * factor.take(target)


def row_weight(target: Tensor, weight: Tensor | None) -> Tensor | None:
    """Each row's class weight: ``w[y]`` for class indices, ``sum_c w_c t_c`` for probabilities (``w[y]`` again
    for a one-hot row, and how torch weights label smoothing); None without weights (every row weighs 1)."""
    if weight is None:
        return None
    if target.is_floating_point():
        return (target * class_view(weight, target)).sum(dim=1)
    return weight.take(target)


def safe_mean(loss_sum: Tensor, denominator: Tensor) -> Tensor:
    """``loss_sum / denominator``, but 0 with zero gradient where the denominator is 0 (every target ignored, or
    every target's class weight 0): dividing by +inf keeps a NaN/inf loss propagating, unlike a clamp."""
    return loss_sum / denominator.where(denominator > 0, math.inf)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, bf16, fp16) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class CrossEntropyLoss(ClassWeightedLoss):
    """Drop-in superset of `torch.nn.CrossEntropyLoss`: same numbers, plus class-weight strategies, a
    (sum, denominator) split for exact distributed means, safe all-ignored batches, float32 compute for
    low-precision logits, a z-loss, readable input errors and an optional `torch.compile`.

    Args:
        class_weights: None; explicit per-class weights (1-D, finite, non-negative, not all zero); or a strategy
            from `WEIGHT_STRATEGIES`, computed when `set_class_counts` gets the training set's class counts.
        ignore_index: class-index targets equal to this are skipped (as in torch).
        reduction: "mean", "sum" or "none" (as in torch).
        label_smoothing: in [0, 1) (as in torch).
        beta: the "effective_number" strategy's beta, in [0, 1).
        validate: check inputs on every call (one host sync); False skips all checks.
        z_loss: coefficient of the z-loss (PaLM, Chowdhery et al. 2022), >= 0. Each row adds
            ``z_loss * logsumexp(logits)**2`` times its class weight (``w[y]``, ``sum_c w_c t_c`` for
            probabilities), nothing for ignored rows, so under "mean" it shares the loss's denominator.
        reweight_from_epoch: apply the class weights from this epoch on, unweighted before (deferred
            re-weighting, Cao et al. 2019); 0: from the start.
        compile: run the loss computation through `torch.compile` (validation stays eager). Pays off for the
            variants on large batches once compiled (see the README's table); no double backward then.

    Validation raises ValueError for: non-float logits or fewer than 2 dims; a batch or shape mismatch; class
    indices outside [0, C) other than ignore_index; probability targets with negative entries or rows not
    summing to 1; weights of the wrong length, negative, non-finite or all zero; non-finite logits (seen through
    the loss value: -inf used as a mask on non-target classes is fine, as in torch).

    Mean semantics (as torch): for class indices the denominator is the sum of ``w[y_i]`` over non-ignored
    targets (their count without weights); for probabilities, the number of rows (times spatial dims). A mean
    whose denominator is 0 is 0 with zero gradient instead of NaN/inf.
    """

    _compiled: Callable[..., tuple[Tensor, Tensor | None]] | None = None
    # False for losses defined for class indices only: probability targets and label smoothing are refused.
    supports_soft_targets: ClassVar[bool] = True
    # Devices whose kernels reject out-of-range class indices synchronously with an exception, so validation
    # need not sanitise the targets first (elsewhere a bad index could hit a device-side assert).
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
        compile: bool = False,
        reweight_from_epoch: int = 0,
    ) -> None:
        super().__init__(class_weights, beta, reweight_from_epoch)
        if not isinstance(reduction, str) or reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        smoothing = check_number("label_smoothing", label_smoothing, low=0.0, high=1.0, high_open=True)
        if isinstance(ignore_index, bool):
            raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}")
        try:
            self.ignore_index: int = operator.index(ignore_index)
        except TypeError:
            raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}") from None
        if smoothing > 0.0 and not self.supports_soft_targets:
            raise ValueError(
                f"{type(self).__name__} is defined for class-index targets only, so it has no label smoothing; "
                f"got label_smoothing={label_smoothing}"
            )
        self.z_loss: float = check_number("z_loss", z_loss, low=0.0)
        self.reduction: str = reduction
        self.label_smoothing: float = smoothing
        self.validate: bool = bool(validate)
        self.compile: bool = bool(compile)

    # ---- the formula: what variants override ----------------------------------------------------------------

    def class_loss(self, log_p: Tensor) -> Tensor:
        """The loss when a class of log-probability ``log_p`` is the label, elementwise: ``-log p`` here."""
        return -log_p

    def row_loss(self, log_probs: Tensor, target: Tensor) -> Tensor | None:
        """A per-row term of the whole predicted distribution (N, C[, ...]) -> (N[, ...]), multiplied by the row's
        class weight; None (here) for none. ``target`` as in `per_sample_loss`."""
        return None

    def class_factor(self, like: Tensor) -> Tensor | None:
        """A per-class factor (C,) of the formula on ``like``'s device and dtype, or None (here). Unlike class
        weights it does not enter the mean's denominator (focal loss's alpha)."""
        return None

    def logit_offset(self, logits: Tensor) -> Tensor | None:
        """A per-class offset (C,) added to the logits before the loss's softmax (not the z-loss's), or None."""
        return None

    def per_sample_loss(self, log_probs: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
        """Per-row loss from log-probabilities (N, C[, d1, ...]) in the compute dtype (float32, or float64).

        ``target``: long class indices (N[, d1, ...]) whose ignored entries were replaced by 0 (masked out
        afterwards), or probabilities shaped like ``log_probs`` (label-smoothed indices arrive smoothed).
        ``weight``: the class weights (C,) or None. Returns (N[, d1, ...]), unreduced: the expectation of
        `class_loss` over the target, weighted by `class_factor` and the class weights, plus `row_loss` times
        the row's weight.
        """
        factor = self.class_factor(log_probs)
        if weight is not None:
            factor = weight if factor is None else factor * weight
        if target.is_floating_point():
            rows = expectation(self.class_loss(log_probs), target, factor)
        else:  # (the loss of the target class only)
            rows = self.class_loss(gather_class(log_probs, target))
            rows = rows if factor is None else rows * factor.take(target)
        extra = self.row_loss(log_probs, target)
        if extra is not None:
            row_w = row_weight(target, weight)
            rows = rows + (extra if row_w is None else extra * row_w)
        return rows

    def _uses_fast_path(self) -> bool:
        """Whether the formula is plain cross-entropy, which torch's fused kernel computes."""
        hooks = ("per_sample_loss", "class_loss", "row_loss", "class_factor")
        return all(getattr(type(self), h) is getattr(CrossEntropyLoss, h) for h in hooks)

    # ---- computation ----------------------------------------------------------------------------------------

    def _loss(self, x: Tensor, t: Tensor, w: Tensor | None, reduction: str) -> tuple[Tensor, Tensor | None]:
        """The "sum"/"none" loss (or torch's own "mean", see `_direct_mean`), and the mean's denominator where
        torch's kernel provides it (else None). No host sync: this is what ``compile=True`` compiles."""
        offset = self.logit_offset(x)
        shifted = x if offset is None else x + class_view(offset.to(x.dtype), x)
        eps, denominator = self.label_smoothing, None
        if self._uses_fast_path():
            if w is not None and x.dim() == 2 and not t.is_floating_point() and eps == 0.0 and reduction == "sum":
                # the sum and torch's own weight sum, over which torch's mean is bitwise this
                loss, denominator = torch.ops.aten.nll_loss_forward(
                    F.log_softmax(shifted, dim=1), t, w, _REDUCTION_SUM, self.ignore_index
                )
            else:
                loss = F.cross_entropy(shifted, t, weight=w, ignore_index=self.ignore_index,
                                       reduction=reduction, label_smoothing=eps)
            if self.z_loss > 0.0:
                loss = loss + self._reduce(self._masked(self._z_rows(x, t, w), t), reduction)
            return loss, denominator
        log_probs = F.log_softmax(shifted, dim=1)
        num_classes = x.shape[1]
        if t.is_floating_point():
            target = t if eps == 0.0 else t * (1.0 - eps) + eps / num_classes
        elif eps > 0.0:  # (1 - eps) one_hot + eps / C
            target = torch.full_like(log_probs, eps / num_classes)
            target.scatter_(1, self._safe(t).unsqueeze(1), 1.0 - eps + eps / num_classes)
        else:
            target = self._safe(t)
        rows = self.per_sample_loss(log_probs, target, w)
        if self.z_loss > 0.0:
            rows = rows + self._z_rows(x, t, w)
        return self._reduce(self._masked(rows, t), reduction), None

    def _z_rows(self, x: Tensor, t: Tensor, w: Tensor | None) -> Tensor:
        """Per-row z-loss ``z_loss * logsumexp(x)**2`` of the raw logits, times the row's class weight (``w[y]``,
        with label smoothing too; ``sum_c w_c t_c`` for probabilities)."""
        z = self.z_loss * torch.logsumexp(x, dim=1).square()
        return z if w is None else z * row_weight(t if t.is_floating_point() else self._safe(t), w)

    def _safe(self, t: Tensor) -> Tensor:
        """Class indices with the ignored ones replaced by class 0 (their rows are masked out afterwards)."""
        return torch.where(t != self.ignore_index, t, 0)

    def _masked(self, rows: Tensor, t: Tensor) -> Tensor:
        """Per-row values with ignored rows set to 0 (probability targets: unchanged)."""
        if t.is_floating_point():
            return rows
        return torch.where(t != self.ignore_index, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))

    @staticmethod
    def _reduce(rows: Tensor, reduction: str) -> Tensor:
        return rows.sum() if reduction == "sum" else rows

    def _denominator(self, x: Tensor, t: Tensor, w: Tensor | None) -> Tensor:
        """The mean's denominator, detached: the weight sum (count) of non-ignored class indices, or the number
        of rows times spatial dims for probability targets."""
        if t.is_floating_point():
            return x.new_full((), float(x.numel() // x.shape[1] if x.shape[1] else 0))
        valid = t != self.ignore_index
        if w is None:
            return valid.sum().to(x.dtype)
        return torch.where(valid, w.take(self._safe(t)), 0.0).sum().detach()

    def _run(self, x: Tensor, t: Tensor, w: Tensor | None, reduction: str) -> tuple[Tensor, Tensor | None]:
        if not self.compile:
            return self._loss(x, t, w, reduction)
        if self._compiled is None:
            self._compiled = torch.compile(self._loss, dynamic=None)
        return self._compiled(x, t, w, reduction)

    def _compute(
        self, logits: Tensor, target: Tensor, reduction: str, need_denominator: bool
    ) -> tuple[Tensor | None, Tensor | None, float | None]:
        """Validate (if enabled), cast, compute: ``(loss, denominator, denominator's value)``.

        Casts: logits to the compute dtype, indices to long, probabilities to the compute dtype, weights to the
        logits' device and dtype. Validation folds every data check into the values it reads in one host sync,
        after the loss has run (on failure the loss is discarded and `raise_value_error` says what was wrong).
        Off the CPU, out-of-range class indices are first replaced by ignore_index so no kernel can hit a
        device-side assert; CPU kernels raise on them, and that error is reworded. The denominator's value is
        read in the same sync (None without validation); a loss is None only for torch's own mean of a batch
        whose every target is ignored (the caller then takes the safe mean).
        """
        weight = self._resolve_weight()
        if not self.supports_soft_targets and isinstance(target, Tensor) and target.is_floating_point():
            raise ValueError(
                f"{type(self).__name__} is defined for class-index targets only, got float (probability) targets "
                f"of dtype {target.dtype}; pass integer class indices"
            )
        if self.validate:
            check_shapes(logits, target, weight, self.ignore_index)
        ctype = _compute_dtype(logits.dtype)
        x = logits.to(ctype)
        t = target.to(ctype) if target.is_floating_point() else target.long()
        w = None if weight is None else weight.to(device=x.device, dtype=ctype)
        if not self.validate:
            loss, denominator = self._run(x, t, w, reduction)
            if need_denominator and denominator is None:
                denominator = self._denominator(x, t, w)
            return loss, denominator, None

        soft = t.is_floating_point()
        checks: list[Tensor] = []  # boolean scalars, True where a check failed
        t_run = t
        if not soft and x.device.type not in self._index_checking_devices:
            bad = (t != self.ignore_index) & (t.clamp(0, x.shape[1] - 1) != t)
            checks.append(bad.any())
            t_run = torch.where(bad, self.ignore_index, t)
        check_weight = w is not None and not self._weight_known_good(weight)
        if check_weight:
            assert w is not None
            checks.append(~(torch.isfinite(w).all() & (w >= 0).all() & (w.sum() > 0)))
        try:
            loss, denominator = self._run(x, t_run, w, reduction)
            if need_denominator and denominator is None:
                denominator = self._denominator(x, t_run, w)
        except (IndexError, RuntimeError):
            if not soft and t_run is t:  # a CPU kernel met a bad class index
                check_class_indices(t, x.shape[1], self.ignore_index)
            raise
        # Non-finite logits show up in the loss (NaN/+inf in a non-ignored row, -inf where it enters the loss).
        status = loss.detach() if loss.dim() == 0 else loss.detach().sum()
        for failed in checks:
            status = torch.where(failed, math.nan, status)
        reads = [status]
        if denominator is not None:
            reads.append(denominator.to(status.dtype))
        if soft:  # probabilities: the smallest entry and the worst row sum (NaN fails both)
            deviation = (t.sum(dim=1) - 1.0).abs()
            reads += [t.amin() if t.numel() else status.new_zeros(()),
                      deviation.amax() if deviation.numel() else status.new_zeros(())]
        values = [reads[0].item()] if len(reads) == 1 else torch.stack(reads).tolist()
        targets_ok = not soft or (values[-2] >= 0.0 and values[-1] <= soft_target_tolerance(target.dtype))
        if not (targets_ok and math.isfinite(values[0])):
            if targets_ok and reduction == "mean" and not any(bool(c) for c in checks):
                if float(self._denominator(x, t_run, w)) == 0.0:
                    return None, None, None  # every target ignored: torch's mean is nan
            raise_value_error(x, t, w, target.dtype, loss, self.ignore_index)
        if check_weight:  # passed: skip the check until the weights change
            assert weight is not None
            self._checked_weight = (weakref.ref(weight), weight._version)
        return loss, denominator, values[1] if denominator is not None else None

    def __getstate__(self) -> dict[str, Any]:
        # Pickling and deepcopy leave out the per-call caches (a weak reference, a compiled function).
        state = self.__dict__.copy()
        state.pop("_checked_weight", None)
        state.pop("_compiled", None)
        return state

    def loss_terms(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss_sum, denominator)``: the "sum" loss (keeps the graph) and the mean's denominator (detached, 0
        if every target is ignored). Summing each over ranks and dividing gives the exact global mean."""
        loss_sum, denominator, _ = self._compute(logits, target, "sum", need_denominator=True)
        assert loss_sum is not None and denominator is not None
        return loss_sum, denominator

    def _direct_mean(self, logits: Tensor, target: Tensor) -> bool:
        """Whether the mean can be torch's own (bitwise): plain cross-entropy of class indices without
        smoothing or z-loss, without weights or on (N, C) logits, and with validation (whose sync tells an
        all-ignored batch, torch's nan, from the rest)."""
        return (
            self.validate and self.label_smoothing == 0.0 and self.z_loss == 0.0 and self._uses_fast_path()
            and isinstance(target, Tensor) and isinstance(logits, Tensor) and not target.is_floating_point()
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
            return safe_mean(loss_sum, denominator)
        return loss_sum / (value if value > 0 else math.inf)  # the same float as the tensor, one node fewer

    def extra_repr(self) -> str:
        weights = self._weights_repr()
        knobs = "".join(f"{name}={value!r}, " for name, value in self._knobs().items())
        z = f", z_loss={self.z_loss}" if self.z_loss else ""
        compiled = ", compile=True" if self.compile else ""
        return (
            f"{knobs}{weights}, ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, validate={self.validate}{z}{compiled}"
        )

    def _knobs(self) -> dict[str, Any]:
        """A variant's own options, shown first by ``repr``."""
        return {}
