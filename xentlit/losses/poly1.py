"""Poly-1 loss (Leng et al. 2022, "PolyLoss: A Polynomial Expansion Perspective of Classification Loss
Functions")."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from xentlit.losses.base import CrossEntropyLoss
from xentlit.losses.checks import check_number


class Poly1Loss(CrossEntropyLoss):
    """``CE + epsilon * (1 - p_y)``.

    Args:
        epsilon: coefficient of the first polynomial term, >= -1 (below, the loss would fall as p_y falls near
            p_y = 1); the paper tunes it per task, positive for classification; default 1. 0 gives CE.
        kwargs: `CrossEntropyLoss`'s options, by keyword.

    Probability targets and label smoothing take the expectation ``sum_c w_c t_c (-log p_c + epsilon (1 - p_c))``
    (``CE + epsilon (1 - p_t)`` with the paper's ``p_t = sum_c t_c p_c``, without weights). Stable:
    ``1 - p = -expm1(log p)``.
    """

    def __init__(self, epsilon: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epsilon: float = check_number("epsilon", epsilon, low=-1.0)

    def class_loss(self, log_p: Tensor) -> Tensor:
        return -log_p - self.epsilon * torch.expm1(log_p)

    def _knobs(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon}
