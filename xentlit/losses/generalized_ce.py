"""Generalised cross-entropy, the L_q loss (Zhang & Sabuncu 2018, "Generalized Cross Entropy Loss for Training
Deep Neural Networks with Noisy Labels")."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from xentlit.losses.base import CrossEntropyLoss
from xentlit.losses.checks import check_number


class GeneralizedCrossEntropyLoss(CrossEntropyLoss):
    """``(1 - p_y**q) / q`` (times the class weight ``w[y]``).

    Args:
        q: in (0, 1] (paper: 0.7). q -> 0 approaches cross-entropy, q = 1 is the MAE ``1 - p_y``.
        kwargs: `CrossEntropyLoss`'s options, by keyword; label_smoothing must be 0: the paper defines L_q for
            class indices only, so probability targets and label smoothing raise a ValueError.

    Stable: ``(1 - p**q) / q = -expm1(q log p) / q``, exact as q -> 0 or p -> 1, and 1/q where p underflows.
    (The paper's truncated variant is not implemented.)
    """

    supports_soft_targets = False

    def __init__(self, q: float = 0.7, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.q: float = check_number("q", q, low=0.0, high=1.0, low_open=True)

    def class_loss(self, log_p: Tensor) -> Tensor:
        return -torch.expm1(self.q * log_p) / self.q

    def _knobs(self) -> dict[str, Any]:
        return {"q": self.q}
