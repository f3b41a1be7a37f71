"""Focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from xentlit.losses.base import CrossEntropyLoss
from xentlit.losses.checks import check_number, to_float64_vector


class FocalLoss(CrossEntropyLoss):
    """``FL = -alpha_y (1 - p_y)**gamma log p_y`` (times the class weight ``w[y]``), multi-class softmax form.

    Args:
        gamma: focusing parameter, >= 0 (paper: 2); 0 gives cross-entropy.
        alpha: None or per-class balancing factors (C non-negative numbers, not all 0). Part of the formula, as
            in the paper: unlike ``class_weights`` it does not enter the mean's denominator.
        kwargs: `CrossEntropyLoss`'s options, by keyword.

    Probability targets and label smoothing take the expectation ``-sum_c alpha_c w_c t_c (1 - p_c)**gamma
    log p_c``, the paper's for one-hot ``t``. Stable: ``1 - p = -expm1(log p)`` (exact as p -> 1), clamped at the
    smallest normal number so that gamma < 1 has a zero, not NaN, gradient where p rounds to 1.
    """

    alpha: Tensor | None
    _class_buffers = ("weight", "alpha")

    def __init__(self, gamma: float = 2.0, alpha: None | Sequence[float] | Tensor = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gamma: float = check_number("gamma", gamma, low=0.0)
        if alpha is not None:
            if isinstance(alpha, (int, float)):
                raise ValueError(
                    f"alpha must be None or one balancing factor per class (a list of C numbers), got the scalar "
                    f"{alpha!r}; in the multi-class form a scalar only rescales the loss"
                )
            alpha = to_float64_vector(alpha, "alpha")
            if not bool(alpha.sum() > 0):
                raise ValueError(f"alpha must not be all zero, got {alpha.tolist()}")
            alpha = alpha.to(torch.float32)
        self.register_buffer("alpha", alpha, persistent=False)

    def class_loss(self, log_p: Tensor) -> Tensor:
        if self.gamma == 0.0:
            return -log_p
        one_minus_p = (-torch.expm1(log_p)).clamp_min(torch.finfo(log_p.dtype).tiny)
        return -one_minus_p.pow(self.gamma) * log_p

    def class_factor(self, like: Tensor) -> Tensor | None:
        if self.alpha is None:
            return None
        if self.alpha.numel() != like.shape[1]:
            raise ValueError(f"alpha has {self.alpha.numel()} entries but logits have C={like.shape[1]} classes")
        return self.alpha.to(device=like.device, dtype=like.dtype)

    def _knobs(self) -> dict[str, Any]:
        alpha = None if self.alpha is None else [round(v, 4) for v in self.alpha.tolist()]
        return {"gamma": self.gamma, "alpha": alpha}
