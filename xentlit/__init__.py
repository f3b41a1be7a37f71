"""xentlit: cross-entropy classifiers done right, on PyTorch Lightning + Hydra."""
