"""Cross-entropy loss: a checked, class-weighted, distributed-friendly superset of torch's.

`CrossEntropyLoss` computes exactly what `torch.nn.functional.cross_entropy` computes (value and
gradient, every option), and adds:

* class weights computed from class counts (`class_weights`, `WEIGHT_STRATEGIES`), stored in a
  buffer so they travel with checkpoints;
* `loss_terms`, which returns the summed loss and the mean's denominator separately, so a
  distributed caller can divide by the *global* denominator instead of averaging local means;
* a mean over a batch whose targets are all ignored is 0 with zero gradient instead of NaN;
* input validation with messages that say what was wrong and what was expected, at the cost of at
  most one host synchronisation per call (`validate=False` turns it off entirely);
* float32 computation for bf16/fp16 logits;
* one extension point, `per_sample_loss`, for loss variants written as subclasses.

Pure PyTorch: nothing here imports Lightning.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "REDUCTIONS",
    "WEIGHT_STRATEGIES",
    "CrossEntropyLoss",
    "class_weights",
    "cross_entropy",
]

WEIGHT_STRATEGIES: tuple[str, ...] = ("balanced", "inverse_sqrt", "effective_number")
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
# Soft-target rows must sum to 1 within this (absolute) tolerance; for bf16/fp16 targets the
# tolerance is widened to the dtype's epsilon, since rounding alone can move a row sum that far.
SOFT_TARGET_TOLERANCE = 1e-3


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

    def __init__(
        self,
        class_weights: None | Sequence[float] | Tensor | str = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        beta: float = 0.999,
        validate: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(reduction, str) or reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        try:
            smoothing = float(label_smoothing)
        except (TypeError, ValueError):
            raise ValueError(
                f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}"
            ) from None
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        try:
            ignore = operator.index(ignore_index)
        except TypeError:
            raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}") from None
        if isinstance(ignore_index, bool):
            raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}")

        self.ignore_index: int = ignore
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
        incoming = state_dict.get(prefix + "weight")
        if (
            isinstance(incoming, Tensor)
            and self.weight is not None
            and incoming.shape != self.weight.shape
        ):
            dtype = incoming.dtype if incoming.is_floating_point() else self.weight.dtype
            self.weight = torch.empty(incoming.shape, dtype=dtype, device=self.weight.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply(self, fn: Any, recurse: bool = True) -> CrossEntropyLoss:
        # Module casts (.half(), .to(torch.bfloat16), Lightning's "bf16-true") move the weights
        # to the new device but keep their dtype: they are tiny, and rounding them to bf16 would
        # change the loss while the computation itself stays in float32.
        old = self.weight
        super()._apply(fn, recurse)
        new = self.weight
        if old is not None and new is not None and new.dtype != old.dtype:
            self.weight = old.to(device=new.device)
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

    # ---- computation ----------------------------------------------------------------------

    def _uses_fast_path(self) -> bool:
        return type(self).per_sample_loss is CrossEntropyLoss.per_sample_loss

    def _compute(
        self, logits: Tensor, target: Tensor, reduction: str, need_denominator: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Validate (if enabled), cast, and compute the "sum"/"none" loss and the denominator.

        Casts: logits to the compute dtype (float32, or float64 for float64 logits), indices to
        long, probabilities to the compute dtype, weights to the logits' device and dtype.
        Validation reads all its data checks with one host sync, after the loss kernels have
        run on sanitised targets (out-of-range indices replaced by ignore_index, so no kernel
        can hit a device-side assert); on failure the computed loss is discarded.
        """
        weight = self._resolve_weight()
        if self.validate:
            self._check_shapes(logits, target, weight)
        ctype = _compute_dtype(logits.dtype)
        x = logits.to(ctype)
        t = target.to(ctype) if target.is_floating_point() else target.long()
        w = None if weight is None else weight.to(device=x.device, dtype=ctype)
        valid = None if t.is_floating_point() else t != self.ignore_index
        if not self.validate:
            loss = self._loss(x, t, w, reduction)
            return loss, (self._denominator(x, t, w, valid) if need_denominator else None)

        flags: list[Tensor] = []
        if valid is None:
            tol = max(SOFT_TARGET_TOLERANCE, torch.finfo(target.dtype).eps)
            flags.append((t < 0).any())
            flags.append(~((t.sum(dim=1) - 1.0).abs() <= tol).all())  # NaN rows count as bad
            t_safe = t
        else:
            bad_target = valid & (t.clamp(0, x.shape[1] - 1) != t)
            flags.append(bad_target.any())
            t_safe = torch.where(bad_target, self.ignore_index, t)
            valid = valid ^ bad_target  # (bad targets are a subset of the valid ones)
        if w is not None:
            flags.append(~(torch.isfinite(w).all() & (w >= 0).all() & (w.sum() > 0)))
        loss = self._loss(x, t_safe, w, reduction)
        denominator = self._denominator(x, t_safe, w, valid) if need_denominator else None
        # Non-finite logits show up in the loss (NaN/+inf anywhere in a non-ignored row, -inf
        # where it enters the loss) without a second pass over the logits.
        flags.append(~torch.isfinite(loss.detach() if loss.dim() == 0 else loss.detach().sum()))
        if any(torch.stack(flags).tolist()):  # the single host sync
            self._raise_value_error(x, t, w, target.dtype, loss)
        return loss, denominator

    def _loss(self, x: Tensor, t: Tensor, w: Tensor | None, reduction: str) -> Tensor:
        """Loss with reduction "sum" or "none" (the mean is built from sum and denominator)."""
        if self._uses_fast_path():
            return F.cross_entropy(
                x,
                t,
                weight=w,
                ignore_index=self.ignore_index,
                reduction=reduction,
                label_smoothing=self.label_smoothing,
            )
        return self._generic_loss(x, t, w, reduction)

    def _generic_loss(self, x: Tensor, t: Tensor, w: Tensor | None, reduction: str) -> Tensor:
        """log_softmax + `per_sample_loss`, with smoothing and ignore handled here."""
        log_probs = F.log_softmax(x, dim=1)
        num_classes = x.shape[1]
        eps = self.label_smoothing
        if t.is_floating_point():
            soft = t if eps == 0.0 else t * (1.0 - eps) + eps / num_classes
            per = self.per_sample_loss(log_probs, soft, w)
        else:
            valid = t != self.ignore_index
            safe = torch.where(valid, t, 0)
            if eps == 0.0:
                per = self.per_sample_loss(log_probs, safe, w)
            else:
                one_hot = F.one_hot(safe, num_classes).movedim(-1, 1).to(log_probs.dtype)
                per = self.per_sample_loss(log_probs, one_hot * (1.0 - eps) + eps / num_classes, w)
            per = torch.where(valid, per, torch.zeros((), dtype=per.dtype, device=per.device))
        return per.sum() if reduction == "sum" else per

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
        loss_sum, denominator = self._compute(logits, target, "sum", need_denominator=True)
        assert denominator is not None
        return loss_sum, denominator

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Loss of ``logits`` (N, C[, d1, ...]) against class indices or probabilities."""
        if self.reduction != "mean":
            return self._compute(logits, target, self.reduction, need_denominator=False)[0]
        loss_sum, denominator = self._compute(logits, target, "sum", need_denominator=True)
        assert denominator is not None
        return _safe_mean(loss_sum, denominator)

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
            bad_target = (t != self.ignore_index) & ((t < 0) | (t >= num_classes))
            if bool(bad_target.any()):
                bad_values = t[bad_target]
                raise ValueError(
                    f"target contains {bad_values.numel()} class indices outside [0, "
                    f"{num_classes}): smallest bad value {bad_values.min().item()}, largest bad "
                    f"value {bad_values.max().item()}; class indices must be in [0, C) with "
                    f"C={num_classes} (logits.shape[1]) or equal ignore_index="
                    f"{self.ignore_index}"
                )
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
        return (
            f"{weights}, ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, validate={self.validate}"
        )


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
    loss = CrossEntropyLoss(None, ignore_index, reduction, label_smoothing, validate=validate)
    if class_weights is not None:
        loss.weight = _weights_tensor(class_weights, check_values=False)
    return loss(logits, target)


# Config name -> loss class: every entry gets a structured-config schema (xentlit/config.py) and a
# `conf/loss/<name>.yaml`; loss variants register themselves here.
LOSSES: dict[str, type[CrossEntropyLoss]] = {"cross_entropy": CrossEntropyLoss}
