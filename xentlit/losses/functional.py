"""`cross_entropy`: the functional twin of `CrossEntropyLoss`, for plain PyTorch loops."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from xentlit.losses.base import CrossEntropyLoss
from xentlit.losses.checks import weights_tensor


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    class_weights: None | Sequence[float] | Tensor = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    validate: bool = True,
    z_loss: float = 0.0,
) -> Tensor:
    """`CrossEntropyLoss` as a function (same checks and numbers).

    ``class_weights`` must be explicit weights (or None): strategies need class counts, so compute them once with
    `class_weights(counts, strategy)` and pass the result. A weights tensor is checked in the call's single
    validation sync rather than separately.
    """
    if isinstance(class_weights, str):
        raise ValueError(
            f"cross_entropy() needs explicit class_weights, got strategy {class_weights!r}; compute them with "
            f"class_weights(counts, {class_weights!r}) or use CrossEntropyLoss({class_weights!r}) and "
            "set_class_counts(counts)"
        )
    loss = CrossEntropyLoss(None, ignore_index, reduction, label_smoothing, validate=validate, z_loss=z_loss)
    if class_weights is not None:
        loss.weight = weights_tensor(class_weights, check_values=False)
    return loss(logits, target)
