"""LDAM loss (Cao et al. 2019, "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from xentlit.losses.base import CrossEntropyLoss, gather_class
from xentlit.losses.checks import check_number, to_float64_vector


class LDAMLoss(CrossEntropyLoss):
    """``-log softmax(s * (z - margin_y e_y))_y``: the label's logit lowered by a per-class margin
    ``margin_c = max_margin * (n_min / n_c)**(1/4)`` (rare classes get larger margins), logits scaled by ``s``.

    Args:
        max_margin: the largest margin, > 0 (paper: 0.5).
        scale: s, > 0. The paper uses 30 with a cosine (normalised) classifier; for a plain linear head, as
            xentlit's MLP, logits already have their scale: 1 (default).
        kwargs: `CrossEntropyLoss`'s options, by keyword. Deferred re-weighting (the paper's LDAM-DRW) is
            ``class_weights="effective_number", beta=0.9999, reweight_from_epoch=<epoch>``.

    The margins come from `set_class_counts` (counts clamped to at least 1) into the persistent ``margin``
    buffer. Defined for class indices only. Computed from log-probabilities: with ``a = log softmax(s z)`` and
    ``m = s margin_y``, ``loss = -a_y + m + log(1 - p_y (1 - e^-m))`` (``log1p``, ``expm1``).
    """

    margin: Tensor
    supports_soft_targets = False
    _class_buffers = ("weight", "margin")

    def __init__(self, max_margin: float = 0.5, scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_margin: float = check_number("max_margin", max_margin, low=0.0, low_open=True)
        self.scale: float = check_number("scale", scale, low=0.0, low_open=True)
        self.register_buffer("margin", torch.empty(0), persistent=True)

    @property
    def needs_class_counts(self) -> bool:
        return self.margin.numel() == 0 or super().needs_class_counts

    def set_class_counts(self, counts: Tensor | Sequence[float]) -> None:
        """Set the margins (and a weight strategy's weights) from per-class train counts."""
        inv_root = to_float64_vector(counts, "class counts").clamp_min(1.0).pow(-0.25)
        margin = self.max_margin * inv_root / inv_root.max()
        self.margin = margin.to(dtype=torch.float32, device=self.margin.device)
        if self.weight_strategy is not None:
            super().set_class_counts(counts)

    def _resolve_weight(self) -> Tensor | None:
        if self.margin.numel() == 0:
            raise RuntimeError("LDAMLoss needs the class counts before the first forward: call "
                               "set_class_counts(counts) with the per-class number of labelled training rows")
        return super()._resolve_weight()

    def per_sample_loss(self, log_probs: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
        if self.margin.numel() != log_probs.shape[1]:
            raise ValueError(f"the margins have {self.margin.numel()} entries (from set_class_counts) but logits "
                             f"have C={log_probs.shape[1]} classes")
        scaled = log_probs if self.scale == 1.0 else F.log_softmax(self.scale * log_probs, dim=1)
        log_p = gather_class(scaled, target)
        m = self.scale * self.margin.to(device=log_p.device, dtype=log_p.dtype).take(target)
        rows = m - log_p + torch.log1p(torch.exp(log_p) * torch.expm1(-m))
        return rows if weight is None else rows * weight.take(target)

    def _knobs(self) -> dict[str, Any]:
        return {"max_margin": self.max_margin, "scale": self.scale}
