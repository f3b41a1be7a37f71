"""Confidence penalty (Pereyra et al. 2017, "Regularizing Neural Networks by Penalizing Confident Output
Distributions")."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from xentlit.losses.base import CrossEntropyLoss
from xentlit.losses.checks import check_number


class ConfidencePenaltyLoss(CrossEntropyLoss):
    """``CE - penalty * H(p)``, with the entropy ``H(p) = -sum_c p_c log p_c`` of the prediction.

    Args:
        penalty: the paper's beta, >= 0 (named ``penalty``: ``beta`` is the effective-number strategy's);
            0 gives cross-entropy. The paper tunes it per task; the default here is 0.1.
        kwargs: `CrossEntropyLoss`'s options, by keyword.

    The entropy of a row is multiplied by the row's class weight (``w[y]``, ``sum_c w_c t_c`` for
    probabilities), so under "mean" both terms are averaged alike. The loss can be negative (``H <= log C``).
    Stable: ``p log p`` is ``exp(log p) * log p`` from log_softmax, 0 (not NaN) where p underflows.
    """

    def __init__(self, penalty: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.penalty: float = check_number("penalty", penalty, low=0.0)

    def row_loss(self, log_probs: Tensor, target: Tensor) -> Tensor | None:
        if self.penalty == 0.0:
            return None
        entropy = -(torch.exp(log_probs) * log_probs).sum(dim=1)
        return -self.penalty * entropy

    def _knobs(self) -> dict[str, Any]:
        return {"penalty": self.penalty}
