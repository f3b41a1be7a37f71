"""Active-passive losses (Ma et al. 2020, "Normalized Loss Functions for Deep Learning with Noisy Labels"):
a normalised active loss (NCE, NFL) plus the reverse cross-entropy as the passive one."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from xentlit.losses.base import CrossEntropyLoss, expectation, row_weight
from xentlit.losses.checks import check_number
from xentlit.losses.symmetric_ce import reverse_cross_entropy


class ActivePassiveLoss(CrossEntropyLoss):
    """``apl_alpha * L_norm + apl_beta * RCE`` with the normalised active loss
    ``L_norm(p, y) = L(p, y) / sum_j L(p, j)`` — ``NCE = log p_y / sum_j log p_j`` (gamma = 0) or normalised
    focal ``NFL = (1 - p_y)**gamma log p_y / sum_j (1 - p_j)**gamma log p_j`` — and the reverse cross-entropy
    ``RCE = -sum_c p_c log q_c`` with ``log 0 := log_zero`` (``-log_zero (1 - p_y)`` for a label y).

    Args:
        apl_alpha: weight of the normalised active loss, >= 0 (paper, CIFAR-10: 1).
        apl_beta: weight of the RCE, >= 0 (paper, CIFAR-10: 1). Not both 0.
        gamma: 0 for NCE+RCE (default), > 0 for NFL+RCE (paper: 0.5).
        log_zero: the RCE's ``log 0`` (the authors' code clamps q at 1e-4: log 1e-4).
        kwargs: `CrossEntropyLoss`'s options, by keyword.

    Both terms are bounded, which is what makes the pair robust to label noise (a normalised loss sums to 1
    over the classes). Probability targets and label smoothing take ``sum_c t_c L(p, c) / sum_j L(p, j)`` and
    the RCE of the distribution. Class weights multiply a row's loss by ``w[y]`` (``sum_c w_c t_c``).
    """

    def __init__(self, apl_alpha: float = 1.0, apl_beta: float = 1.0, gamma: float = 0.0,
                 log_zero: float = -9.210340371976182, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.apl_alpha: float = check_number("apl_alpha", apl_alpha, low=0.0)
        self.apl_beta: float = check_number("apl_beta", apl_beta, low=0.0)
        if self.apl_alpha == 0.0 and self.apl_beta == 0.0:
            raise ValueError("apl_alpha and apl_beta must not both be 0 (the loss would be 0)")
        self.gamma: float = check_number("gamma", gamma, low=0.0)
        self.log_zero: float = check_number("log_zero", log_zero, high=0.0, high_open=True)

    def per_sample_loss(self, log_probs: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
        active = -log_probs  # the loss L(p, c) of each class c as the label
        if self.gamma > 0.0:
            one_minus_p = (-torch.expm1(log_probs)).clamp_min(torch.finfo(log_probs.dtype).tiny)
            active = active * one_minus_p.pow(self.gamma)
        total = active.sum(dim=1)  # > 0 unless C = 1, where every L(p, c) is 0: 0 / 1, not 0 / 0 (a NaN gradient)
        normalised = expectation(active, target) / torch.where(total > 0, total, 1.0)
        rows = self.apl_alpha * normalised + self.apl_beta * reverse_cross_entropy(log_probs, target, self.log_zero)
        row_w = row_weight(target, weight)
        return rows if row_w is None else rows * row_w

    def _knobs(self) -> dict[str, Any]:
        return {"apl_alpha": self.apl_alpha, "apl_beta": self.apl_beta, "gamma": self.gamma,
                "log_zero": self.log_zero}
