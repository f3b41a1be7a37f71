"""Networks. Plain PyTorch: nothing here knows about Lightning, so the MLP can be reused anywhere."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
}
NORMS: dict[str, type[nn.Module]] = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}


def embedding_size(cardinality: int) -> int:
    """fastai's rule of thumb for a categorical column's embedding width: ``min(600, round(1.6 * K ** 0.56))``."""
    return int(min(600, round(1.6 * cardinality**0.56)))


class MLP(nn.Module):
    """A multilayer perceptron mapping ``(N, in_features)`` to logits ``(N, num_classes)``.

    Each hidden block is ``Linear -> [norm] -> activation -> [dropout]``; the head is a plain ``Linear``
    whose outputs are raw logits (never softmax them before a cross-entropy loss).

    Categorical inputs: with ``categorical_cardinalities = [K1, K2, ...]`` the last ``len(...)`` input columns hold
    integer codes in ``[0, K)`` (as xentlit's tabular pipeline makes them: 0 is missing or unseen); each goes
    through its own learned ``nn.Embedding`` (width ``embedding_sizes`` or :func:`embedding_size`), concatenated
    with the numeric columns before the first layer.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden_sizes: Sequence[int] = (256, 256),
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str | None = None,
        categorical_cardinalities: Sequence[int] = (),
        embedding_sizes: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("num_classes", num_classes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 for a classifier, got {num_classes}")
        hidden = list(hidden_sizes)
        if any(not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden_sizes must be positive ints, got {hidden!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if norm is not None and norm not in NORMS:
            raise ValueError(f"norm must be None or one of {sorted(NORMS)}, got {norm!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        cards = [int(k) for k in categorical_cardinalities]
        if any(k < 1 for k in cards) or len(cards) > in_features:
            raise ValueError(f"categorical_cardinalities must be <= in_features={in_features} positive ints, got {cards}")
        sizes = [embedding_size(k) for k in cards] if embedding_sizes is None else [int(e) for e in embedding_sizes]
        if len(sizes) != len(cards) or any(e < 1 for e in sizes):
            raise ValueError(f"embedding_sizes must give one positive width per categorical column ({len(cards)}), "
                             f"got {list(embedding_sizes or [])}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.num_numeric = in_features - len(cards)
        self.embeddings = nn.ModuleList(nn.Embedding(k, e) for k, e in zip(cards, sizes))

        layers: list[nn.Module] = []
        width = self.num_numeric + sum(sizes)
        for size in hidden:
            layers.append(nn.Linear(width, size))
            if norm is not None:
                layers.append(NORMS[norm](size))
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.embeddings:
            codes = x[:, self.num_numeric :].long()
            x = torch.cat([x[:, : self.num_numeric], *(emb(codes[:, i]) for i, emb in enumerate(self.embeddings))], 1)
        return self.head(self.body(x))
