"""ConvergenceDoctor's thresholds, pinned from both sides.

Each test runs a short real CPU fit of a classifier whose loss values the test writes (see
:class:`ScriptedClassifier`) and puts the quantity the doctor judges just inside, then just outside, the documented
threshold: the finding must appear on exactly one side, with the evidence numbers of the situation built.

* ``divergence``: a batch loss above ``divergence_factor`` (default 10) times the initial loss (at least the loss
  of uniform predictions).
* ``lr_too_low``: over ``window`` epochs the training loss moves by at most 1% of its mean (flat) and stays at or
  above 90% of the initial loss (stuck).
* ``majority_collapse``: macro-F1 no more than 0.05 above the macro-F1 of chance predictions with the same class
  frequencies (besides an imbalanced training split and the majority class taking >= 50% of the predictions).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from xentlit.callbacks import DIAGNOSIS_FILE, ConvergenceDoctor

from test_doctor import _finding, _one_thread  # noqa: F401  (one definition; the autouse fixture applies here too)


def _logits_with_nll(target: torch.Tensor, num_classes: int, nll: float) -> torch.Tensor:
    """Logits whose cross-entropy is exactly ``nll`` on every row: ``s`` on the target class, 0 elsewhere.

    The row's loss is ``log(1 + (C - 1) exp(-s))``; ``nll = ln C`` gives ``s = 0`` (uniform predictions).
    """
    s = -math.log(math.expm1(nll) / (num_classes - 1))
    return s * F.one_hot(target, num_classes).float()


class ScriptedClassifier(pl.LightningModule):
    """A classifier whose per-batch training loss is ``train_nll(epoch, step)`` exactly.

    A real linear layer carries the gradient: its output enters the logits as ``z - z.detach()`` (exactly 0 in
    value), so the optimiser, the gradient norms and the weight changes the doctor measures are real, while the loss
    values are the scripted ones.
    """

    def __init__(self, num_classes: int, features: int, train_nll: Callable[[int, int], float], lr: float):
        super().__init__()
        self.num_classes = num_classes
        self.train_nll = train_nll
        self.lr = lr
        self.layer = nn.Linear(features, num_classes, bias=False)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        z = self.layer(x)
        logits = (z - z.detach()) + _logits_with_nll(y, self.num_classes,
                                                     self.train_nll(self.current_epoch, self.global_step))
        return {"loss": F.cross_entropy(logits, y), "logits": logits.detach(), "target": y}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ScriptedPredictions(ScriptedClassifier):
    """Validation predicts, row by row, the class written in the batch's third column."""

    def validation_step(self, batch, batch_idx):
        _, y, predicted = batch
        logits = 8.0 * F.one_hot(predicted, self.num_classes).float()
        return {"loss": F.cross_entropy(logits, y), "logits": logits, "target": y}


def _loader(y: torch.Tensor, features: int, batch_size: int, predicted: torch.Tensor | None = None) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(y), features, generator=g)
    tensors = (x, y) if predicted is None else (x, y, predicted)
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=False)


def _fit(root: Path, module: pl.LightningModule, train: DataLoader, *, epochs: int, doctor: ConvergenceDoctor,
         val: DataLoader | None = None) -> tuple[ConvergenceDoctor, pl.Trainer, dict]:
    """A real CPU fit with the doctor; returns (doctor, trainer, report read back from disk)."""
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                         num_sanity_val_steps=0, callbacks=[doctor])
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    report = json.loads((root / DIAGNOSIS_FILE).read_text())
    return doctor, trainer, report


# ------------------------------------------------------------------------------------------------ divergence
C_DIV = 20  # ln 20 = 3.0: large enough that divergence_factor * reference exceeds the reference + 10 floor
RISE_STEP = 6  # past the first 5 steps (whose gradient norms are measured): the doctor's per-step fast path
STEPS = 10


def _divergence_run(tmp_path: Path, doctor: ConvergenceDoctor, initial: float, risen: float):
    """One epoch of 10 steps: the loss is ``initial`` for the first 6 steps, then ``risen``."""
    y = torch.arange(STEPS * 40) % C_DIV
    module = ScriptedClassifier(C_DIV, 8, lambda epoch, step: initial if step < RISE_STEP else risen, lr=0.01)
    return _fit(tmp_path, module, _loader(y, 8, 40), epochs=1, doctor=doctor)


@pytest.mark.parametrize("side", ["below", "above"])
@pytest.mark.parametrize("factor", [5.0, 10.0, 20.0])
def test_divergence_fires_just_above_the_factor_times_the_initial_loss(tmp_path, factor, side):
    """From uniform predictions (loss ln 20) the loss rises to 0.9x or 1.1x ``divergence_factor`` times that."""
    doctor = ConvergenceDoctor() if factor == 10.0 else ConvergenceDoctor(divergence_factor=factor)
    initial = math.log(C_DIV)
    multiple = 0.9 * factor if side == "below" else 1.1 * factor
    assert factor * initial > initial + 10.0  # the limit is the factor's, not the absolute floor (reference + 10)
    doctor, trainer, report = _divergence_run(tmp_path, doctor, initial, multiple * initial)
    if side == "below":
        assert report["codes"] == [], report["findings"]
        assert report["stopped_on_divergence"] is False and not doctor.stopped_on_divergence
        assert report["steps_seen"] == STEPS and trainer.global_step == STEPS
        return
    finding = _finding(report, "divergence")
    evidence = finding["evidence"]
    assert report["codes"] == ["divergence"]
    assert evidence["at_step"] == RISE_STEP and finding["step"] == RISE_STEP
    assert evidence["initial_loss"] == pytest.approx(initial, rel=1e-3)
    assert evidence["batch_loss"] == pytest.approx(multiple * initial, rel=1e-3)
    assert evidence["batch_loss"] / evidence["initial_loss"] == pytest.approx(1.1 * factor, rel=2e-3)
    assert evidence["lr"] == 0.01 and evidence["restored_weights_from_step"] == 0
    assert f"rose above {factor:g}x its initial value" in finding["message"]
    assert report["stopped_on_divergence"] is True and trainer.should_stop
    assert report["steps_seen"] == RISE_STEP + 1  # stopped at the first step over the limit


@pytest.mark.parametrize("side", ["below", "above"])
def test_divergence_reference_is_an_initial_loss_above_uniform(tmp_path, side):
    """An untrained model 1.3x worse than uniform: the factor applies to its own initial loss, not to ln C."""
    initial = 1.3 * math.log(C_DIV)  # (below the initial_loss finding's tolerance)
    multiple = 9.5 if side == "below" else 10.5
    _, _, report = _divergence_run(tmp_path, ConvergenceDoctor(), initial, multiple * initial)
    if side == "below":  # 9.5 * 1.3 = 12.35 times ln C: above 10x uniform, below 10x the initial loss
        assert report["codes"] == [], report["findings"]
        return
    evidence = _finding(report, "divergence")["evidence"]
    assert evidence["initial_loss"] == pytest.approx(initial, rel=1e-3)
    assert evidence["batch_loss"] == pytest.approx(10.5 * initial, rel=1e-3)


@pytest.mark.parametrize("side", ["below", "above"])
def test_divergence_reference_is_at_least_the_uniform_loss(tmp_path, side):
    """A model starting well below uniform (0.5 ln C): the limit is 10x ln C, so 10.5x its initial loss is not
    divergence while 10.5x ln C is."""
    uniform = math.log(C_DIV)
    risen = 10.5 * 0.5 * uniform if side == "below" else 10.5 * uniform
    _, _, report = _divergence_run(tmp_path, ConvergenceDoctor(), 0.5 * uniform, risen)
    if side == "below":
        assert report["codes"] == [], report["findings"]
        return
    evidence = _finding(report, "divergence")["evidence"]
    assert evidence["initial_loss"] == pytest.approx(uniform, rel=1e-3)  # the reference, not the first loss
    assert evidence["batch_loss"] == pytest.approx(risen, rel=1e-3)


# ------------------------------------------------------------------------------------- learning rate too low
C_LR = 10
LR_TINY = 1e-6


def _geometric_ratio(relative_range: float) -> float:
    """``q`` such that any three consecutive terms of ``L0 * q**e`` span ``relative_range`` times their mean:
    ``(1 - q**2) / ((1 + q + q**2) / 3) = relative_range``."""
    r = relative_range
    return (-r + math.sqrt(r * r + 4 * (3 + r) * (3 - r))) / (2 * (3 + r))


def _lr_run(tmp_path: Path, nll_of_epoch: Callable[[int], float], epochs: int):
    y = torch.arange(10 * 50) % C_LR
    module = ScriptedClassifier(C_LR, 8, lambda epoch, step: nll_of_epoch(epoch), lr=LR_TINY)
    return _fit(tmp_path, module, _loader(y, 8, 50), epochs=epochs, doctor=ConvergenceDoctor())


@pytest.mark.parametrize("relative_range", [0.009, 0.011])
def test_lr_too_low_needs_a_loss_within_one_percent_of_its_mean(tmp_path, relative_range):
    """A loss decaying geometrically from ln C: every 3-epoch window moves by 0.9% (flat) or 1.1% (learning,
    slowly) of its mean, while the loss stays near its initial value and the weights barely move."""
    q = _geometric_ratio(relative_range)
    initial = math.log(C_LR)
    doctor, _, report = _lr_run(tmp_path, lambda epoch: initial * q ** epoch, epochs=5)
    train = doctor.history["train"]
    nll = [h["train_nll"] for h in train]
    assert nll == pytest.approx([initial * q ** e for e in range(5)], rel=1e-5)
    for i in range(3):  # the situation built: the same relative range in every window, all near the initial loss
        window = nll[i:i + 3]
        assert (max(window) - min(window)) / (sum(window) / 3) == pytest.approx(relative_range, rel=1e-3)
    assert nll[-1] > 0.95 * initial
    assert all(h["grad_norm"] > 0.1 for h in train)  # healthy gradients
    if relative_range > 0.01:
        assert report["codes"] == [], report["findings"]
        return
    finding = _finding(report, "lr_too_low")
    evidence = finding["evidence"]
    assert report["codes"] == ["lr_too_low"]
    # flat at epochs 0-2, the weight change measured over epoch 3, judged on epochs 1-3
    assert finding["epoch"] == 3
    assert evidence["train_loss_last_epochs"] == pytest.approx(nll[1:4], abs=1e-3)
    assert evidence["initial_loss"] == pytest.approx(initial, rel=1e-3)
    assert evidence["lr"] == LR_TINY
    assert evidence["weight_change_per_epoch"][0] < 1e-3
    assert evidence["grad_norm_last_epochs"] == pytest.approx([h["grad_norm"] for h in train[1:4]], rel=1e-3)


@pytest.mark.parametrize("fraction", [0.88, 0.92])
def test_lr_too_low_needs_the_flat_loss_at_or_above_90_percent_of_the_initial(tmp_path, fraction):
    """Epoch 0 at ln C, then exactly flat at 88% (it did learn, then plateaued) or 92% (stuck) of it."""
    initial = math.log(C_LR)
    doctor, _, report = _lr_run(tmp_path, lambda epoch: initial if epoch == 0 else fraction * initial, epochs=5)
    nll = [h["train_nll"] for h in doctor.history["train"]]
    assert nll == pytest.approx([initial] + [fraction * initial] * 4, rel=1e-5)
    if fraction < 0.9:
        assert report["codes"] == [], report["findings"]
        return
    finding = _finding(report, "lr_too_low")
    evidence = finding["evidence"]
    assert report["codes"] == ["lr_too_low"]
    assert finding["epoch"] == 4  # flat from epochs 1-3 on, weight change measured over epoch 4
    assert evidence["initial_loss"] == pytest.approx(initial, rel=1e-3)
    assert evidence["train_loss_last_epochs"] == pytest.approx([fraction * initial] * 3, rel=1e-3)
    assert evidence["weight_change_per_epoch"][0] < 1e-3


# ---------------------------------------------------------------------------------------- majority collapse
C_COL = 4
TRAIN_COUNTS = [280, 40, 40, 40]  # imbalance 7:1, class 0 the majority


def _confusion(correct: int) -> list[list[int]]:
    """300 validation rows per class (prior 0.25). Every class sends 180 rows to class 0 (its predicted share
    is 0.6); class 0 spreads the rest evenly; class k > 0 gets ``correct`` of its remaining 120 right and spreads
    the rest over the two other minority classes. ``correct=40`` is exactly chance."""
    rest = (120 - correct) // 2
    rows = [[180, 40, 40, 40]]
    for k in range(1, C_COL):
        rows.append([180] + [correct if p == k else rest for p in range(1, C_COL)])
    return rows


def _f1s(confusion: list[list[int]]) -> tuple[float, float, float, float]:
    """(predicted share of class 0, its true share, macro-F1, macro-F1 of chance predictions with the same
    class frequencies), from the confusion matrix (rows: truth, columns: prediction)."""
    c = len(confusion)
    tgt = [sum(row) for row in confusion]
    pred = [sum(confusion[t][p] for t in range(c)) for p in range(c)]
    n = sum(tgt)
    macro = sum(2 * confusion[i][i] / (tgt[i] + pred[i]) for i in range(c)) / c
    chance = sum(2 * (tgt[i] / n) * (pred[i] / n) / (tgt[i] / n + pred[i] / n) for i in range(c)) / c
    return pred[0] / n, tgt[0] / n, macro, chance


@pytest.mark.parametrize("correct", [54, 56])
def test_majority_collapse_needs_macro_f1_within_0_05_of_chance(tmp_path, correct):
    """Class 0 takes 60% of the validation predictions every epoch; the minority classes are slightly better than
    chance: macro-F1 0.0457 (inside the 0.05 margin: collapsed) or 0.0522 (outside: not collapsed) above it."""
    confusion = _confusion(correct)
    share, true_share, macro, chance = _f1s(confusion)
    assert share == 0.6 and true_share == 0.25
    assert macro - chance == pytest.approx(0.0457 if correct == 54 else 0.0522, abs=1e-4)
    y_val = torch.tensor([t for t in range(C_COL) for p in range(C_COL) for _ in range(confusion[t][p])])
    predicted = torch.tensor([p for t in range(C_COL) for p in range(C_COL) for _ in range(confusion[t][p])])
    y_train = torch.cat([torch.full((n,), k) for k, n in enumerate(TRAIN_COUNTS)])[torch.randperm(
        sum(TRAIN_COUNTS), generator=torch.Generator().manual_seed(1))]
    initial = math.log(C_COL)  # the training loss halves every epoch: a model that learns, no lr_too_low
    module = ScriptedPredictions(C_COL, 8, lambda epoch, step: initial * 0.5 ** epoch, lr=0.01)
    doctor, _, report = _fit(tmp_path, module, _loader(y_train, 8, 100), epochs=3, doctor=ConvergenceDoctor(),
                             val=_loader(y_val, 8, 300, predicted))
    assert len(doctor.history["val"]) == 3
    assert [h["val_acc"] for h in doctor.history["val"]] == pytest.approx([(180 + 3 * correct) / 1200] * 3)
    if macro > chance + 0.05:
        assert report["codes"] == [], report["findings"]
        return
    finding = _finding(report, "majority_collapse")
    evidence = finding["evidence"]
    assert report["codes"] == ["majority_collapse"]
    assert (finding["stage"], finding["epoch"]) == ("val", 2)  # the third collapsed epoch (window=3)
    assert evidence["consecutive_epochs"] == 3
    assert evidence["majority_class"] == 0 and evidence["train_imbalance_ratio"] == 7
    assert evidence["train_majority_share"] == pytest.approx(0.7)
    assert evidence["predicted_share"] == pytest.approx(0.6) and evidence["true_share"] == pytest.approx(0.25)
    assert evidence["macro_f1"] == pytest.approx(macro, rel=1e-3)
    assert evidence["chance_macro_f1"] == pytest.approx(chance, rel=1e-3)
    assert evidence["macro_f1"] - evidence["chance_macro_f1"] == pytest.approx(0.0457, abs=2e-4)
