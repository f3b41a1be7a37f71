"""Class weights from class counts: the strategies a loss's ``class_weights`` option may name."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from xentlit.losses.checks import check_beta, to_float64_vector

__all__ = ["WEIGHT_STRATEGIES", "class_weights"]

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
