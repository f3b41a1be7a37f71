"""Using xentlit from your own project: your tensors, your network, xentlit's loss, metrics and exact scaling.

Run: `python examples/own_project.py` (a few seconds on a CPU). Prints the test metrics.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn

from xentlit import CrossEntropyLoss, TensorDataModule, XentModule


class ResidualNet(nn.Module):
    """Your own network: any module mapping (N, features) to logits (N, classes)."""

    def __init__(self, in_features: int, num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.block = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(h + self.block(h))


class MyClassifier(XentModule):
    """Subclass the LightningModule: a different network, and a confidence report added to the test metrics."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__(
            ResidualNet(in_features, num_classes),
            loss=CrossEntropyLoss(class_weights="balanced", label_smoothing=0.05),
            num_classes=num_classes,
        )

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self.log("test/mean_confidence", self._confidence.mean())

    def test_step(self, batch, batch_idx):
        out = super().test_step(batch, batch_idx)
        confidence = out["logits"].softmax(1).amax(1)
        self._confidence = confidence if batch_idx == 0 else torch.cat([self._confidence, confidence])
        return out


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Your own tensors: three Gaussian classes in 8 dimensions, the last one rare, 10% rows unlabeled."""
    g = torch.Generator().manual_seed(seed)
    sizes = [600, 300, 60]
    x = torch.cat([torch.randn(n, 8, generator=g) + 1.0 * k for k, n in enumerate(sizes)])
    y = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    y[torch.rand(len(y), generator=g) < 0.1] = -100  # unlabeled rows: ignored by the loss and the metrics
    return x, y


def main() -> dict[str, float]:
    pl.seed_everything(0, verbose=False)
    x, y = make_data()
    datamodule = TensorDataModule(x, y, batch_size=64, class_names=["common", "medium", "rare"])
    module = MyClassifier(datamodule.num_features, datamodule.num_classes)
    trainer = pl.Trainer(max_epochs=15, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule)
    [metrics] = trainer.test(module, datamodule=datamodule, verbose=False)
    for name, value in sorted(metrics.items()):
        print(f"{name:24s} {value:.4f}")
    return metrics


if __name__ == "__main__":
    main()
