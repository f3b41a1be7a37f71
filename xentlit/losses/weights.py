"""Class weights: the strategies that compute them from class counts, and the module part of a loss that holds them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from xentlit.losses.checks import check_beta, to_float64_vector, weights_tensor

__all__ = ["WEIGHT_STRATEGIES", "ClassWeightedLoss", "class_weights"]

WEIGHT_STRATEGIES: tuple[str, ...] = ("balanced", "inverse_sqrt", "effective_number")


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
    beta = check_beta(beta)
    n = to_float64_vector(counts, "class counts").clamp_min(1.0)
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


class ClassWeightedLoss(nn.Module):
    """The part of a loss that holds its class weights: given, or computed by a strategy from the training set's
    class counts (`set_class_counts`), in the persistent ``weight`` buffer, so checkpoints carry them.

    Args:
        class_weights: None; explicit per-class weights (1-D, finite, non-negative, not all zero); or a strategy
            from `WEIGHT_STRATEGIES`, computed when `set_class_counts` gets the class counts.
        beta: the "effective_number" strategy's beta, in [0, 1).
        reweight_from_epoch: apply the class weights from this epoch on (`set_epoch`), unweighted before:
            deferred re-weighting (Cao et al. 2019, "DRW"), which learns features on the natural distribution
            first. 0 (default): from the start.
    """

    weight: Tensor | None
    # Small per-class buffers that dtype casts leave alone and a checkpoint may resize; subclasses add theirs.
    _class_buffers: ClassVar[tuple[str, ...]] = ("weight",)
    # (weak reference, version) of the weights that last passed a loss's validation.
    _checked_weight: tuple[Any, int] | None = None

    def __init__(self, class_weights: None | Sequence[float] | Tensor | str = None, beta: float = 0.999,
                 reweight_from_epoch: int = 0) -> None:
        super().__init__()
        self.beta: float = check_beta(beta)
        if isinstance(reweight_from_epoch, bool) or not isinstance(reweight_from_epoch, int) or reweight_from_epoch < 0:
            raise ValueError(f"reweight_from_epoch must be an integer >= 0, got {reweight_from_epoch!r}")
        self.reweight_from_epoch: int = reweight_from_epoch
        self.epoch: int = 0
        self.weight_strategy: str | None = None
        weight: Tensor | None = None
        if isinstance(class_weights, str):
            if class_weights not in WEIGHT_STRATEGIES:
                raise ValueError(
                    f"unknown class weight strategy {class_weights!r}; expected one of {WEIGHT_STRATEGIES} or "
                    "explicit per-class weights"
                )
            self.weight_strategy = class_weights
            weight = torch.empty(0)  # placeholder until set_class_counts
        elif class_weights is not None:
            weight = weights_tensor(class_weights)
        self.register_buffer("weight", weight, persistent=True)

    @property
    def class_weights(self) -> str | Tensor | None:
        """The class_weights option as configured: the strategy name, the explicit weights, or None."""
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
        """Compute the strategy's weights from per-class counts of labelled training rows (again if called again)."""
        if self.weight_strategy is None:
            raise RuntimeError(
                "set_class_counts needs a class weight strategy, but this loss was built with "
                f"class_weights={'None' if self.weight is None else 'explicit weights'}; "
                f"pass one of {WEIGHT_STRATEGIES} as class_weights"
            )
        w = class_weights(counts, self.weight_strategy, self.beta)
        self.weight = w.to(device=self.weight.device if self.weight is not None else None)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # A checkpoint saved after set_class_counts holds a (C,) buffer where a fresh loss with a pending strategy
        # holds an empty placeholder: adopt the saved shape.
        for name in self._class_buffers:
            incoming, current = state_dict.get(prefix + name), getattr(self, name)
            if isinstance(incoming, Tensor) and current is not None and incoming.shape != current.shape:
                dtype = incoming.dtype if incoming.is_floating_point() else current.dtype
                setattr(self, name, torch.empty(incoming.shape, dtype=dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _apply(self, fn: Any, recurse: bool = True) -> ClassWeightedLoss:
        # Module casts (.half(), Lightning's "bf16-true") move the per-class buffers but keep their dtype: they
        # are tiny, and rounding them to bf16 would change the loss while the computation stays in float32.
        old = {name: getattr(self, name) for name in self._class_buffers}
        super()._apply(fn, recurse)
        for name, before in old.items():
            after = getattr(self, name)
            if before is not None and after is not None and after.dtype != before.dtype:
                setattr(self, name, before.to(device=after.device))
        return self

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss the training epoch (the LightningModule does, at each epoch start), for
        ``reweight_from_epoch``."""
        self.epoch = int(epoch)

    def _resolve_weight(self) -> Tensor | None:
        if self.needs_class_counts:
            raise RuntimeError(
                f"class_weights={self.weight_strategy!r} needs the class counts before the first forward: call "
                "set_class_counts(counts) with the per-class number of labelled training rows (or use a "
                "datamodule that exposes class counts)"
            )
        return None if self.epoch < self.reweight_from_epoch else self.weight

    def _weight_known_good(self, weight: Tensor | None) -> bool:
        """Whether these very weights (same tensor, unmodified since: its version counter) passed validation."""
        checked = self._checked_weight
        return (weight is not None and checked is not None and checked[0]() is weight
                and checked[1] == weight._version)

    def _weights_repr(self) -> str:
        if self.weight_strategy is not None:
            state = "pending" if self.needs_class_counts else f"{self.weight.numel()} classes"
            text = f"class_weights={self.weight_strategy!r} ({state})"
            text += f", beta={self.beta}" if self.weight_strategy == "effective_number" else ""
            return text + (f", reweight_from_epoch={self.reweight_from_epoch}" if self.reweight_from_epoch else "")
        if self.weight is None:
            return "class_weights=None"
        if self.weight.numel() <= 8:
            return f"class_weights={[round(v, 4) for v in self.weight.tolist()]}"
        return f"class_weights=<{self.weight.numel()} values>"
