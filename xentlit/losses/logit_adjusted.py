"""Logit-adjusted cross-entropy (Menon et al. 2021, "Long-Tail Learning via Logit Adjustment")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from xentlit.losses.base import CrossEntropyLoss
from xentlit.losses.checks import check_number, to_float64_vector


class LogitAdjustedLoss(CrossEntropyLoss):
    """``-log softmax(f + tau * log pi)_y`` with class priors ``pi`` from the training labels.

    Args:
        tau: adjustment strength, >= 0 (paper: 1); 0 gives cross-entropy (and needs no counts). With tau = 1
            this is also the balanced softmax (Ren et al. 2020), whose ``n_c exp(f_c)`` is ``exp(f_c + log pi_c)``
            up to a constant.
        kwargs: `CrossEntropyLoss`'s options, by keyword.

    The priors ``pi_c = n_c / sum(n)`` come from `set_class_counts` (counts clamped to at least 1, so an unseen
    class gets a finite prior) into the persistent ``log_prior`` buffer: checkpoints keep them. The adjustment is
    a training-time loss: predictions stay ``argmax f``, which is what makes them balanced. It is the base
    cross-entropy, fused kernel included, on shifted logits (`logit_offset`); the z-loss sees the raw logits.
    """

    log_prior: Tensor
    _class_buffers = ("weight", "log_prior")

    def __init__(self, tau: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tau: float = check_number("tau", tau, low=0.0)
        self.register_buffer("log_prior", torch.empty(0), persistent=True)

    @property
    def rebalances_classes(self) -> bool:
        """Logit adjustment with tau > 0 targets balanced error."""
        return self.tau > 0.0 or super().rebalances_classes

    @property
    def needs_class_counts(self) -> bool:
        """True while the priors (tau > 0) or a weight strategy's weights are not computed yet."""
        return (self.tau > 0.0 and self.log_prior.numel() == 0) or super().needs_class_counts

    def set_class_counts(self, counts: Tensor | Sequence[float]) -> None:
        """Set the class priors (and a weight strategy's weights) from per-class train counts."""
        n = to_float64_vector(counts, "class counts").clamp_min(1.0)
        self.log_prior = (n / n.sum()).log().to(dtype=torch.float32, device=self.log_prior.device)
        if self.weight_strategy is not None:
            super().set_class_counts(counts)

    def _resolve_weight(self) -> Tensor | None:
        if self.tau > 0.0 and self.log_prior.numel() == 0:
            raise RuntimeError(
                f"LogitAdjustedLoss(tau={self.tau}) needs the class priors before the first forward: call "
                "set_class_counts(counts) with the per-class number of labelled training rows (or use a "
                "datamodule that exposes class counts)"
            )
        return super()._resolve_weight()

    def logit_offset(self, logits: Tensor) -> Tensor | None:
        """``tau * log(prior)``, added to the logits before the softmax (None when tau = 0)."""
        if self.tau == 0.0:
            return None
        if self.log_prior.numel() != logits.shape[1]:
            raise ValueError(
                f"the class priors have {self.log_prior.numel()} entries (from set_class_counts) but logits have "
                f"C={logits.shape[1]} classes"
            )
        return self.log_prior.to(device=logits.device, dtype=logits.dtype) * self.tau

    def _knobs(self) -> dict[str, Any]:
        return {"tau": self.tau}
