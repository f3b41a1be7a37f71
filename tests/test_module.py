"""The LightningModule under a real Trainer: metrics against hand computations, exact accumulation, subclassing."""

from __future__ import annotations

import copy
import functools

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, recall_score
from torch import nn
from torch.utils.data import DataLoader

from xentlit import MLP, CrossEntropyLoss, TensorBatchDataset, XentModule
from xentlit.data import collate_batch

IGNORE = -100


def _trainer(**kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return pl.Trainer(**{**defaults, **kwargs})


def _loader(x, y, batch_size=8, shuffle=False):
    return DataLoader(TensorBatchDataset(x, y), batch_size=batch_size, shuffle=shuffle, collate_fn=collate_batch)


def _hand_ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return ece


def test_evaluation_metrics_match_hand_computation_and_honour_ignore_index():
    torch.manual_seed(0)
    x = torch.randn(50, 6)
    y = torch.randint(0, 4, (50,))
    y[[1, 5, 9, 30, 44]] = IGNORE
    weights = [1.0, 2.0, 0.5, 1.5]
    module = XentModule(MLP(6, 4, hidden_sizes=[8]), loss=CrossEntropyLoss(class_weights=weights, label_smoothing=0.1))
    [metrics] = _trainer().validate(module, dataloaders=_loader(x, y, batch_size=7), verbose=False)

    with torch.no_grad():
        logits = module(x)
    keep = y != IGNORE
    expected_loss = F.cross_entropy(logits, y, weight=torch.tensor(weights), label_smoothing=0.1)
    probs = logits[keep].softmax(1).numpy()
    labels = y[keep].numpy()
    preds = probs.argmax(1)
    assert metrics["val/loss"] == pytest.approx(expected_loss.item(), rel=1e-5)
    assert metrics["val/acc"] == pytest.approx((preds == labels).mean(), abs=1e-6)
    assert metrics["val/f1_macro"] == pytest.approx(f1_score(labels, preds, average="macro", labels=range(4)), abs=1e-5)
    assert metrics["val/balanced_acc"] == pytest.approx(
        recall_score(labels, preds, average="macro", labels=range(4), zero_division=0), abs=1e-5)
    assert metrics["val/ece"] == pytest.approx(_hand_ece(probs, labels), abs=1e-5)


def _accumulation_run(x, y, loss, normalization: str, accumulate: int, batch_size: int) -> nn.Module:
    torch.manual_seed(1)
    net = MLP(5, 4, hidden_sizes=[7]).double()
    module = XentModule(net, loss=copy.deepcopy(loss), optimizer=functools.partial(torch.optim.SGD, lr=0.5),
                        loss_normalization=normalization)
    trainer = _trainer(max_steps=1, accumulate_grad_batches=accumulate, precision="64-true", limit_val_batches=0)
    trainer.fit(module, train_dataloaders=_loader(x, y, batch_size=batch_size))
    return module.net


def test_gradient_accumulation_equals_one_big_batch_exactly():
    torch.manual_seed(0)
    x = torch.randn(32, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (32,))
    y[[0, 1, 2, 3, 4, 9, 17]] = IGNORE  # uneven: the first micro-batch loses 5 of 8 rows
    loss = CrossEntropyLoss(class_weights=[1.0, 3.0, 0.5, 2.0], label_smoothing=0.1)

    big = _accumulation_run(x, y, loss, "local", accumulate=1, batch_size=32)
    exact = _accumulation_run(x, y, loss, "auto", accumulate=4, batch_size=8)
    naive = _accumulation_run(x, y, loss, "local", accumulate=4, batch_size=8)
    for p_big, p_exact, p_naive in zip(big.parameters(), exact.parameters(), naive.parameters()):
        torch.testing.assert_close(p_exact, p_big, atol=1e-10, rtol=0)
    gap = max((a - b).abs().max().item() for a, b in zip(big.parameters(), naive.parameters()))
    assert gap > 1e-4, "the naive per-micro-batch mean should not match the big batch"


def test_hyperparameters_hold_no_modules_and_checkpoints_load_weights_only(tmp_path):
    module = XentModule(MLP(6, 3), optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    assert set(module.hparams) == {"num_classes", "loss_normalization", "ece_bins", "compile", "steps_per_execution",
                                   "calibration"}
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    trainer = _trainer(max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=_loader(x, y), val_dataloaders=_loader(x, y))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["hyper_parameters"]["num_classes"] == 3
    restored = XentModule.load_from_checkpoint(path, net=MLP(6, 3), weights_only=True)
    for a, b in zip(module.net.parameters(), restored.net.parameters()):
        torch.testing.assert_close(a, b)


def test_class_weight_strategy_is_fitted_from_the_datamodule_counts():
    from xentlit import TensorDataModule

    torch.manual_seed(0)
    x = torch.randn(120, 4)
    y = torch.cat([torch.zeros(90, dtype=torch.long), torch.ones(20, dtype=torch.long), torch.full((10,), 2)])
    dm = TensorDataModule(x, y, batch_size=16, val_fraction=0.2, test_fraction=0.0)
    module = XentModule(MLP(4, 3, hidden_sizes=[4]), loss=CrossEntropyLoss(class_weights="balanced"))
    _trainer(max_epochs=1).fit(module, datamodule=dm)
    counts = dm.class_counts
    expected = counts.sum() / (3 * counts)
    torch.testing.assert_close(module.loss.weight, expected.float())


def test_onecycle_total_steps_is_filled_from_the_trainer():
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    scheduler = {"scheduler": functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1), "interval": "step"}
    module = XentModule(MLP(6, 3), scheduler=scheduler)
    trainer = _trainer(max_epochs=3, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=_loader(x, y, batch_size=8))
    assert trainer.lr_scheduler_configs[0].scheduler.total_steps == 15


def test_bad_module_arguments_fail_clearly():
    with pytest.raises(ValueError, match="loss_normalization.*'everywhere'"):
        XentModule(MLP(4, 3), loss_normalization="everywhere")
    with pytest.raises(ValueError, match="num_classes"):
        XentModule(nn.Linear(4, 3))


class WiderModule(XentModule):
    """A subclass from outside the package: its own network, loss hook and an extra metric."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        net = nn.Sequential(nn.Linear(in_features, 32), nn.Tanh(), nn.Linear(32, num_classes))
        super().__init__(net, num_classes=num_classes, optimizer=functools.partial(torch.optim.Adam, lr=1e-2))
        self.loss_calls = 0

    def compute_loss(self, logits, target):
        self.loss_calls += 1
        return super().compute_loss(logits, target)


def test_subclass_outside_the_package_trains():
    from xentlit import DigitsDataModule

    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=64)
    module = WiderModule(dm.num_features, dm.num_classes)
    trainer = _trainer(max_epochs=5)
    trainer.fit(module, datamodule=dm)
    [metrics] = trainer.test(module, datamodule=dm, verbose=False)
    assert module.loss_calls > 0
    assert metrics["test/acc"] > 0.9


class DtypeRecorder(XentModule):
    def compute_loss(self, logits, target):
        loss_sum, denominator = super().compute_loss(logits, target)
        self.seen = (logits.dtype, loss_sum.dtype)
        return loss_sum, denominator


def test_bf16_mixed_precision_computes_the_loss_in_float32():
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    module = DtypeRecorder(MLP(6, 3, hidden_sizes=[16]))
    trainer = _trainer(max_epochs=2, precision="bf16-mixed", limit_val_batches=0)
    trainer.fit(module, train_dataloaders=_loader(x, y, batch_size=16))
    assert module.seen == (torch.bfloat16, torch.float32)
    assert all(p.dtype == torch.float32 for p in module.parameters())


@pytest.mark.parametrize("normalization", ["local", "global"])
def test_steps_per_execution_equals_one_optimiser_step_per_lightning_step(normalization):
    """4 optimiser steps per Lightning step on batches of 32 == 1 per step on batches of 8 (same order)."""
    torch.manual_seed(0)
    x, y = torch.randn(96, 5), torch.randint(0, 4, (96,))
    y[::5] = IGNORE

    def fit(steps: int, batch_size: int) -> tuple[XentModule, pl.Trainer]:
        torch.manual_seed(1)
        scheduler = {"scheduler": functools.partial(torch.optim.lr_scheduler.StepLR, step_size=5, gamma=0.5),
                     "interval": "step"}
        module = XentModule(MLP(5, 4, hidden_sizes=[7]), loss=CrossEntropyLoss(class_weights=[1.0, 2.0, 1.0, 0.5]),
                            optimizer=functools.partial(torch.optim.SGD, lr=0.3, momentum=0.9), scheduler=scheduler,
                            loss_normalization=normalization, steps_per_execution=steps)
        trainer = _trainer(max_epochs=2, limit_val_batches=0)
        trainer.fit(module, train_dataloaders=_loader(x, y, batch_size=batch_size))
        return module, trainer

    one, t1 = fit(1, 8)
    four, t4 = fit(4, 32)
    assert t1.global_step == t4.global_step == 24
    assert t4.lr_scheduler_configs[0].scheduler.get_last_lr() == t1.lr_scheduler_configs[0].scheduler.get_last_lr()
    for a, b in zip(one.net.parameters(), four.net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert t1.callback_metrics["train/loss"].item() == pytest.approx(t4.callback_metrics["train/loss"].item(), rel=1e-6)


@pytest.mark.slow
def test_compiled_network_trains_to_the_same_numbers():
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))

    def fit(compile_net: bool) -> XentModule:
        torch.manual_seed(0)
        module = XentModule(MLP(6, 3, hidden_sizes=[16]), compile=compile_net)
        _trainer(max_epochs=2, limit_val_batches=0).fit(module, train_dataloaders=_loader(x, y, batch_size=16))
        return module

    eager, compiled = fit(False), fit(True)
    assert "_orig_mod" not in "".join(compiled.state_dict())  # checkpoints keep plain keys
    for a, b in zip(eager.net.parameters(), compiled.net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ steps_per_execution=auto
def _dm(n: int = 203, batch_size: int = 8, drop_last: bool = False):
    from xentlit import TensorDataModule

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(n, 5, generator=g), torch.randint(0, 4, (n,), generator=g)
    y[::7] = IGNORE
    return TensorDataModule(x, y, batch_size=batch_size, val_fraction=0.2, test_fraction=0.0, drop_last=drop_last)


def _fit_steps(steps, dm, scheduler=None, **trainer_kwargs):
    torch.manual_seed(1)
    pl.seed_everything(3)
    module = XentModule(MLP(5, 4, hidden_sizes=[7]), loss=CrossEntropyLoss(class_weights=[1.0, 2.0, 1.0, 0.5]),
                        optimizer=functools.partial(torch.optim.Adam, lr=0.01), scheduler=scheduler,
                        steps_per_execution=steps)
    trainer = _trainer(**{"max_epochs": 3, **trainer_kwargs})
    trainer.fit(module, datamodule=dm)
    return module, trainer


@pytest.mark.parametrize("drop_last", [False, True])
def test_auto_steps_per_execution_trains_exactly_the_model_of_one_step_per_batch(drop_last):
    """auto runs 8 optimiser steps per Lightning step on a xentlit datamodule, over the very same batches."""
    scheduler = {"scheduler": functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.05), "interval": "step"}
    one, t1 = _fit_steps(1, _dm(drop_last=drop_last), scheduler)
    auto, ta = _fit_steps("auto", _dm(drop_last=drop_last), scheduler)
    assert one.steps_per_execution == 1 and auto.steps_per_execution == 8
    assert not auto.automatic_optimization and one.automatic_optimization
    n_train = 203 - round(0.2 * 203)
    per_epoch = n_train // 8 if drop_last else -(-n_train // 8)
    assert t1.global_step == ta.global_step == 3 * per_epoch
    assert ta.num_training_batches == -(-n_train // 64)  # Lightning steps: groups of 8 batches
    # OneCycle's total_steps counts optimiser steps, not Lightning steps
    assert ta.lr_scheduler_configs[0].scheduler.total_steps == t1.lr_scheduler_configs[0].scheduler.total_steps
    assert ta.lr_scheduler_configs[0].scheduler.get_last_lr() == t1.lr_scheduler_configs[0].scheduler.get_last_lr()
    for a, b in zip(one.net.parameters(), auto.net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert ta.callback_metrics[key].item() == pytest.approx(t1.callback_metrics[key].item(), rel=1e-5), key
    assert ta.datamodule.steps_per_execution == 1  # its loaders serve single batches again after the fit


def test_max_steps_inside_an_execution_stops_at_the_exact_step():
    module, trainer = _fit_steps("auto", _dm(), max_epochs=-1, max_steps=13)
    assert module.steps_per_execution == 8 and trainer.global_step == 13


@pytest.mark.parametrize("setting", [
    dict(accumulate_grad_batches=2), dict(gradient_clip_val=1.0), dict(limit_train_batches=3),
    dict(val_check_interval=0.5), dict(overfit_batches=2), "plain_dataloader",
])
def test_auto_keeps_one_step_per_batch_where_batches_are_counted(setting, caplog):
    if setting == "plain_dataloader":
        dm = _dm()
        dm.setup("fit")
        module = XentModule(MLP(5, 4, hidden_sizes=[7]))
        trainer = _trainer(max_epochs=1)
        with caplog.at_level("INFO"):
            trainer.fit(module, train_dataloaders=_loader(dm.train_dataset.x, dm.train_dataset.y))
        reason = "xentlit datamodule"
    else:
        with caplog.at_level("INFO"):
            module, trainer = _fit_steps("auto", _dm(), max_epochs=1, **setting)
        reason = next(iter(setting)).split("_")[0]
    assert module.steps_per_execution == 1 and module.automatic_optimization
    message = next(r.getMessage() for r in caplog.records if "steps_per_execution=auto" in r.getMessage())
    assert message.startswith("steps_per_execution=auto: 1 (") and reason in message


def test_explicit_steps_per_execution_with_accumulation_fails_clearly():
    with pytest.raises(ValueError, match=r"steps_per_execution=4 cannot be combined with accumulate_grad_batches=2"):
        _fit_steps(4, _dm(), accumulate_grad_batches=2)


@pytest.mark.parametrize("bad", [0, -1, 2.5, "fast", True])
def test_steps_per_execution_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=r"steps_per_execution must be 'auto' or an int >= 1, got"):
        XentModule(MLP(5, 4), steps_per_execution=bad)


def test_lean_training_metrics_equal_torchmetrics():
    from torchmetrics import MeanMetric
    from torchmetrics.classification import MulticlassAccuracy

    from xentlit.metrics import RunningAccuracy, WeightedMean

    g = torch.Generator().manual_seed(0)
    ours, ref = RunningAccuracy(ignore_index=IGNORE), MulticlassAccuracy(5, average="micro", ignore_index=IGNORE)
    mean, ref_mean = WeightedMean(), MeanMetric()
    for n in (7, 1, 30):
        logits = torch.randn(n, 5, 3, generator=g)  # spatial targets too
        target = torch.randint(0, 5, (n, 3), generator=g)
        target[0, 0] = IGNORE
        ours.update(logits, target)
        ref.update(logits.softmax(1), target)
        value, weight = torch.rand(n, generator=g), torch.rand(n, generator=g) * 5
        mean.update(value, weight=weight)
        ref_mean.update(value, weight=weight)
    assert ours.compute().item() == pytest.approx(ref.compute().item(), abs=1e-7)
    assert mean.compute().item() == pytest.approx(ref_mean.compute().item(), rel=1e-6)
    assert RunningAccuracy(ignore_index=IGNORE).compute().item() == 0.0  # nothing counted yet


def test_plateau_under_steps_per_execution_steps_on_the_monitored_metric():
    """ReduceLROnPlateau(mode=max) on a falling val/nll cuts the rate every epoch; replaying the logged values
    through a fresh scheduler gives the rate the fit ended with, and another metric would not."""
    from xentlit import DigitsDataModule

    history: dict[str, list[float]] = {"val/nll": [], "val/acc": []}

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):  # before the module steps its epoch schedulers
            for name in history:
                history[name].append(float(trainer.callback_metrics[name]))

    def replay(values: list[float]) -> float:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=0, factor=0.5)
        for v in values:
            plateau.step(v)
        return opt.param_groups[0]["lr"]

    scheduler = {"scheduler": functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, mode="max", patience=0,
                                                factor=0.5), "interval": "epoch", "monitor": "val/nll"}
    module = XentModule(MLP(64, 10, hidden_sizes=[32]), loss=CrossEntropyLoss(label_smoothing=0.2),
                        scheduler=scheduler)
    trainer = _trainer(max_epochs=5, callbacks=[Record()], limit_val_batches=1.0)
    pl.seed_everything(0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    assert module.steps_per_execution == 8
    final = trainer.optimizers[0].param_groups[0]["lr"]
    assert final == pytest.approx(replay(history["val/nll"]), rel=1e-12)
    assert replay(history["val/acc"]) != pytest.approx(final)  # the test tells the metrics apart


def test_deferred_reweighting_follows_the_trainers_epochs():
    """loss.reweight_from_epoch: the module tells the loss each epoch, so the class weights apply from that
    epoch on, in training and in the validation that follows it."""
    from xentlit.losses import LDAMLoss

    torch.manual_seed(0)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    loss = LDAMLoss(class_weights=[1.0, 3.0, 0.5], reweight_from_epoch=2)
    loss.set_class_counts([20.0, 15.0, 5.0])
    seen = []

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append((trainer.current_epoch, pl_module.loss._resolve_weight() is not None))

    module = XentModule(MLP(5, 3, hidden_sizes=[8]), loss=loss, steps_per_execution=1)
    _trainer(max_epochs=4, callbacks=[Record()]).fit(module, _loader(x, y), _loader(x, y))
    assert seen == [(0, False), (1, False), (2, True), (3, True)]
