"""Real 2-process DDP runs (gloo, CPU) for tests/test_distributed.py: `python ddp_scenarios.py OUT.json MODE`.

Lightning's launcher re-runs this script for rank 1; rank 0 writes what it measured to OUT.json.
"""

from __future__ import annotations

import functools
import json
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from xentlit import MLP, CrossEntropyLoss, TensorBatchDataset, TensorDataModule, XentModule
from xentlit.data import collate_batch

IGNORE = -100
WEIGHTS = [1.0, 3.0, 0.5, 2.0]


def make_problem() -> tuple[torch.Tensor, torch.Tensor]:
    """32 rows, 4 classes, ignored rows placed unevenly: rank 0 (even rows) loses 6 of 16, rank 1 loses 1."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (32,), generator=g)
    y[[0, 2, 4, 6, 8, 10, 13]] = IGNORE
    return x, y


def make_module(normalization: str, steps_per_execution: int = 1) -> XentModule:
    torch.manual_seed(1)
    return XentModule(
        MLP(5, 4, hidden_sizes=[7]).double(),
        loss=CrossEntropyLoss(class_weights=WEIGHTS, label_smoothing=0.1),
        optimizer=functools.partial(torch.optim.SGD, lr=0.5),
        loss_normalization=normalization,
        steps_per_execution=steps_per_execution,
    )


def make_eval_data() -> TensorDataModule:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(101, 5, generator=g)
    y = torch.randint(0, 4, (101,), generator=g)
    y[::7] = IGNORE
    # 33 validation rows: an odd count, which a padding sampler would double count
    return TensorDataModule(x, y, batch_size=8, val_fraction=33 / 101, test_fraction=0.0, standardize=False)


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0)
    return pl.Trainer(**{**defaults, **kwargs})


def main(out: str, mode: str) -> None:
    x, y = make_problem()
    if mode == "steps_per_execution":
        # each rank's 16 rows split into 2 optimiser steps: step k sees rows 16k..16k+15 across the two ranks
        module = make_module("auto", steps_per_execution=2)
        loader = DataLoader(TensorBatchDataset(x, y), batch_size=16, shuffle=False, collate_fn=collate_batch)
        fit = trainer(accelerator="cpu", devices=2, strategy="ddp", precision="64-true", max_steps=2,
                      limit_val_batches=0)
    else:
        module = make_module(mode)
        loader = DataLoader(TensorBatchDataset(x, y), batch_size=8, shuffle=False, collate_fn=collate_batch)
        fit = trainer(accelerator="cpu", devices=2, strategy="ddp", precision="64-true", max_steps=1,
                      accumulate_grad_batches=2, limit_val_batches=0)
    fit.fit(module, train_dataloaders=loader)
    params = [p.detach().tolist() for p in module.net.parameters()]

    torch.manual_seed(3)
    eval_module = XentModule(MLP(5, 4, hidden_sizes=[6]), loss=CrossEntropyLoss(class_weights=WEIGHTS))
    [metrics] = trainer(accelerator="cpu", devices=2, strategy="ddp").validate(
        eval_module, datamodule=make_eval_data(), verbose=False)
    if fit.global_rank == 0:
        with open(out, "w") as f:
            json.dump({"params": params, "world_size": fit.world_size, "metrics": metrics}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
