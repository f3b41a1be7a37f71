"""xentlit: cross-entropy classifiers done right, on PyTorch Lightning + Hydra."""

from xentlit.callbacks import ConvergenceDoctor
from xentlit.data import DigitsDataModule, FileDataModule, SyntheticDataModule, TensorBatchDataset, TensorDataModule
from xentlit.losses import (
    ActivePassiveLoss,
    ConfidencePenaltyLoss,
    CrossEntropyLoss,
    FocalLoss,
    GeneralizedCrossEntropyLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    Poly1Loss,
    SymmetricCrossEntropyLoss,
    class_weights,
    cross_entropy,
)
from xentlit.module import XentModule
from xentlit.nets import MLP
from xentlit.plots import PlotCallback

__all__ = [
    "MLP",
    "PlotCallback",
    "ConvergenceDoctor",
    "ActivePassiveLoss",
    "ConfidencePenaltyLoss",
    "CrossEntropyLoss",
    "FocalLoss",
    "GeneralizedCrossEntropyLoss",
    "LDAMLoss",
    "LogitAdjustedLoss",
    "Poly1Loss",
    "SymmetricCrossEntropyLoss",
    "DigitsDataModule",
    "FileDataModule",
    "SyntheticDataModule",
    "TensorBatchDataset",
    "TensorDataModule",
    "XentModule",
    "class_weights",
    "cross_entropy",
]
