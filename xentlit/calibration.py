"""Post-hoc fixes of a trained classifier's outputs: temperature / vector scaling and logit adjustment.

* Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"): ``softmax(z / T)`` with one
  scalar ``T`` fitted on the validation split by minimising the NLL (LBFGS, float64). Predicted classes do not
  change (a positive scale keeps the argmax); overconfidence does.
* Vector scaling (same paper): ``softmax(a * z + b)`` with per-class ``a``, ``b``; more freedom, may change
  predictions.
* Post-hoc logit adjustment (Menon et al. 2021, "Long-Tail Learning via Logit Adjustment"): ``z - tau * log pi``
  with the training class priors ``pi``: predictions for balanced error, without retraining.

`Calibrator` holds the fitted parameters as buffers (plain tensors in a checkpoint) and applies them to logits;
`calibration_metrics` gives NLL, ECE and Brier score of logits against labels. Pure PyTorch and torchmetrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_calibration_error

__all__ = ["CALIBRATION_METHODS", "Calibrator", "adjust_logits", "calibration_metrics", "fit_temperature",
           "fit_vector_scaling", "log_priors"]

CALIBRATION_METHODS: tuple[str, ...] = ("none", "temperature", "vector")


def _labelled(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """The (N, C) float64 logits and long targets of the rows whose label is not ``ignore_index``."""
    keep = target != ignore_index
    return logits.detach()[keep].to(torch.float64), target[keep].long()


def _minimise(params: list[Tensor], loss_fn: object) -> None:
    """Minimise ``loss_fn()`` over ``params`` with LBFGS (strong Wolfe line search), as Guo et al. do."""
    optimiser = torch.optim.LBFGS(params, lr=1.0, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimiser.zero_grad()
        loss = loss_fn()  # type: ignore[operator]
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)


def fit_temperature(logits: Tensor, target: Tensor, ignore_index: int = -100) -> float:
    """The temperature T > 0 minimising ``NLL(softmax(logits / T), target)`` over the labelled rows.

    Fitted as ``log T`` (so T stays positive) in float64 from T = 1. Raises ValueError without labelled rows.
    """
    x, y = _labelled(logits, target, ignore_index)
    if y.numel() == 0:
        raise ValueError("temperature scaling needs labelled validation rows, got none")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    _minimise([log_t], lambda: F.cross_entropy(x / log_t.exp(), y))
    return float(log_t.detach().exp())


def fit_vector_scaling(logits: Tensor, target: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Per-class ``(scale, bias)`` minimising ``NLL(softmax(scale * logits + bias), target)`` (float64, from the
    identity). Raises ValueError without labelled rows."""
    x, y = _labelled(logits, target, ignore_index)
    if y.numel() == 0:
        raise ValueError("vector scaling needs labelled validation rows, got none")
    scale = torch.ones(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    _minimise([scale, bias], lambda: F.cross_entropy(x * scale + bias, y))
    return scale.detach(), bias.detach()


def log_priors(class_counts: Sequence[float] | Tensor) -> Tensor:
    """``log pi_c`` of the class priors ``pi_c = n_c / sum(n)``, counts clamped to at least 1 (float64)."""
    n = torch.as_tensor(class_counts, dtype=torch.float64).clamp_min(1.0)
    return (n / n.sum()).log()


def adjust_logits(logits: Tensor, log_prior: Tensor, tau: float) -> Tensor:
    """Post-hoc logit adjustment: ``logits - tau * log pi`` (tau = 0: unchanged)."""
    if tau == 0.0:
        return logits
    return logits - tau * log_prior.to(device=logits.device, dtype=logits.dtype)


def calibration_metrics(logits: Tensor, target: Tensor, ignore_index: int = -100, n_bins: int = 15) -> dict[str, float]:
    """NLL, ECE (``n_bins`` equal-width confidence bins, L1) and Brier score (``sum_c (p_c - y_c)^2``, averaged)
    of ``logits`` (N, C) against class indices, over the labelled rows; NaN for each without labelled rows."""
    x, y = _labelled(logits, target, ignore_index)
    if y.numel() == 0:
        return {"nll": float("nan"), "ece": float("nan"), "brier": float("nan")}
    probs = x.softmax(dim=1)
    return {
        "nll": float(F.cross_entropy(x, y)),
        "ece": float(multiclass_calibration_error(probs, y, num_classes=x.shape[1], n_bins=n_bins, norm="l1")),
        "brier": float((probs - F.one_hot(y, x.shape[1]).to(probs.dtype)).square().sum(dim=1).mean()),
    }


class Calibrator(nn.Module):
    """Fitted post-hoc scaling of logits (see the module docstring): ``method`` "none", "temperature" (the
    ``temperature`` buffer, a scalar) or "vector" (``scale`` and ``bias`` buffers, one entry per class).

    `fit` sets the parameters from validation logits and labels; `forward` applies them. Buffers are plain
    float64 tensors, so a checkpoint stores them as data; `load_state_dict` adopts their saved shapes.
    """

    temperature: Tensor
    scale: Tensor
    bias: Tensor
    is_fitted: Tensor

    def __init__(self, method: str = "none") -> None:
        super().__init__()
        if method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
        self.method = method
        self.register_buffer("temperature", torch.ones((), dtype=torch.float64))
        self.register_buffer("scale", torch.empty(0, dtype=torch.float64))
        self.register_buffer("bias", torch.empty(0, dtype=torch.float64))
        self.register_buffer("is_fitted", torch.zeros((), dtype=torch.bool))  # in the checkpoint with the values

    @property
    def fitted(self) -> bool:
        """Whether `fit` set the parameters (here or in the run that saved them)."""
        return bool(self.is_fitted)

    def fit(self, logits: Tensor, target: Tensor, ignore_index: int = -100) -> Calibrator:
        """Fit the method's parameters on validation ``logits`` (N, C) and labels (never the training split)."""
        if self.method == "temperature":
            self.temperature = torch.tensor(fit_temperature(logits, target, ignore_index), dtype=torch.float64)
        elif self.method == "vector":
            self.scale, self.bias = fit_vector_scaling(logits, target, ignore_index)
        self.is_fitted = torch.tensor(self.method != "none", device=self.is_fitted.device)
        return self

    def forward(self, logits: Tensor) -> Tensor:
        """Calibrated logits (their softmax is the calibrated probabilities), in the logits' dtype."""
        if self.method == "temperature":
            return logits / self.temperature.to(device=logits.device, dtype=logits.dtype)
        if self.method == "vector" and self.scale.numel():
            scale = self.scale.to(device=logits.device, dtype=logits.dtype)
            return logits * scale + self.bias.to(device=logits.device, dtype=logits.dtype)
        return logits

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        if prefix + "temperature" not in state_dict:  # a checkpoint from before calibration: stays unfitted
            return
        for name in ("scale", "bias"):  # fitted vectors replace the empty placeholders
            incoming = state_dict.get(prefix + name)
            if isinstance(incoming, Tensor) and incoming.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(incoming, dtype=torch.float64))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn: object, recurse: bool = True) -> Calibrator:
        # Module casts (.half(), Lightning's "bf16-true") move the fitted parameters but keep them float64.
        before = {name: getattr(self, name) for name in ("temperature", "scale", "bias", "is_fitted")}
        super()._apply(fn, recurse)  # type: ignore[arg-type]
        for name, old in before.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(device=new.device))
        return self

    def extra_repr(self) -> str:
        if self.method == "temperature":
            return f"method='temperature', temperature={float(self.temperature):.4g}"
        return f"method={self.method!r}"
