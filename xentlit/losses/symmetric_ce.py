"""Symmetric cross-entropy (Wang et al. 2019, "Symmetric Cross Entropy for Robust Learning with Noisy Labels")."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from xentlit.losses.base import CrossEntropyLoss, gather_class
from xentlit.losses.checks import check_number


def reverse_cross_entropy(log_probs: Tensor, target: Tensor, log_zero: float) -> Tensor:
    """``RCE = -sum_c p_c log q_c`` of the prediction p against the label distribution q, ``log 0 := log_zero``:
    ``-log_zero (1 - p_y)`` for class indices y (``1 - p_y = -expm1(log p_y)``)."""
    if target.is_floating_point():
        return -(torch.exp(log_probs) * target.clamp_min(math.exp(log_zero)).log()).sum(dim=1)
    return log_zero * torch.expm1(gather_class(log_probs, target))


class SymmetricCrossEntropyLoss(CrossEntropyLoss):
    """``sce_alpha * CE + sce_beta * RCE``, with the reverse cross-entropy ``RCE = -sum_c p_c log q_c`` of the
    prediction p against the label distribution q, where ``log 0`` is replaced by ``log_zero`` (the paper's A):
    for a one-hot label ``RCE = -A (1 - p_y)``.

    Args:
        sce_alpha: weight of the CE term, >= 0 (paper, CIFAR-10: 0.1).
        sce_beta: weight of the RCE term, >= 0 (paper, CIFAR-10: 1.0). Not both 0. (``sce_`` prefixes: ``beta``
            is the effective-number strategy's.)
        log_zero: the paper's A, < 0 (paper: -4; the authors' code clamps q at 1e-4, i.e. A ~ -9.21).
        kwargs: `CrossEntropyLoss`'s options, by keyword.

    sce_alpha=1, sce_beta=0 gives cross-entropy. Probability targets (and label smoothing) use
    ``log q_c = max(log t_c, A)``. The RCE of a row is multiplied by the row's class weight.
    """

    def __init__(self, sce_alpha: float = 0.1, sce_beta: float = 1.0, log_zero: float = -4.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sce_alpha: float = check_number("sce_alpha", sce_alpha, low=0.0)
        self.sce_beta: float = check_number("sce_beta", sce_beta, low=0.0)
        if self.sce_alpha == 0.0 and self.sce_beta == 0.0:
            raise ValueError("sce_alpha and sce_beta must not both be 0 (the loss would be 0)")
        self.log_zero: float = check_number("log_zero", log_zero, high=0.0, high_open=True)

    def class_loss(self, log_p: Tensor) -> Tensor:
        return -self.sce_alpha * log_p

    def row_loss(self, log_probs: Tensor, target: Tensor) -> Tensor | None:
        if self.sce_beta == 0.0:
            return None
        return self.sce_beta * reverse_cross_entropy(log_probs, target, self.log_zero)

    def _knobs(self) -> dict[str, Any]:
        return {"sce_alpha": self.sce_alpha, "sce_beta": self.sce_beta, "log_zero": self.log_zero}
