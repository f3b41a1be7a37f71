"""ConvergenceDoctor: every diagnosis reproduced for real with a short Lightning run, no false alarms when healthy."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader

from conftest import CONF, read_metrics, run_dirs, run_script
from xentlit import MLP, CrossEntropyLoss, DigitsDataModule, SyntheticDataModule, TensorBatchDataset, TensorDataModule
from xentlit import XentModule
from xentlit.callbacks import CODES, DIAGNOSIS_FILE, ConvergenceDoctor
from xentlit.data import collate_batch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _adam(lr: float = 1e-3):
    return functools.partial(torch.optim.Adam, lr=lr)


def _fit(root: Path, module: pl.LightningModule, datamodule=None, *, epochs: int = 3, doctor=None,
         callbacks=(), raises: type[BaseException] | None = None, train_dataloaders=None, **trainer_kwargs):
    """A real CPU fit with the doctor; returns (doctor, trainer, report read back from disk)."""
    pl.seed_everything(0, verbose=False)
    doctor = doctor or ConvergenceDoctor()
    trainer = pl.Trainer(**{
        "accelerator": "cpu", "devices": 1, "max_epochs": epochs, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(root),
        "callbacks": [doctor, *callbacks], **trainer_kwargs})
    if raises is None:
        trainer.fit(module, datamodule=datamodule, train_dataloaders=train_dataloaders)
    else:
        with pytest.raises(raises):
            trainer.fit(module, datamodule=datamodule, train_dataloaders=train_dataloaders)
    report = json.loads((root / DIAGNOSIS_FILE).read_text())
    return doctor, trainer, report


def _finding(report: dict, code: str) -> dict:
    matches = [f for f in report["findings"] if f["code"] == code]
    assert len(matches) == 1, f"expected exactly one {code!r} finding, got codes {report['codes']}"
    finding = matches[0]
    assert finding["severity"] == CODES[code][0]
    assert finding["message"] and "Fix:" in finding["message"]
    assert isinstance(finding["epoch"], int) and isinstance(finding["step"], int)
    return finding


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    bunch = load_digits()
    return torch.tensor(bunch.data, dtype=torch.float32), torch.tensor(bunch.target)


class SoftmaxModule(XentModule):
    """The classic bug: forward returns probabilities, and the loss applies log-softmax again."""

    def forward(self, x):
        return self.net(x).softmax(dim=1)


class OneBasedDigits(DigitsDataModule):
    """Labels 1..10 instead of 0..9."""

    def load(self):
        x, y, _ = super().load()
        return x, y + 1, None


class UnscaledDigits(DigitsDataModule):
    """Raw pixel intensities times 1000 (e.g. a unit conversion gone wrong)."""

    def load(self):
        x, y, names = super().load()
        return x * 1000, y, names


# --------------------------------------------------------------------------------------------- healthy runs
def test_healthy_default_configuration_raises_no_finding(compose, tmp_path, capsys):
    """The default training run (digits, MLP, Adam 1e-3, batch 64, the default epochs and callbacks)."""
    from xentlit.cli import train

    cfg = compose("++callbacks.doctor._target_=xentlit.callbacks.ConvergenceDoctor", f"paths.output_dir={tmp_path}")
    assert cfg.trainer.max_epochs == 30 and cfg.data.batch_size == 64 and cfg.optimizer.lr == 1e-3
    train(cfg)

    report = json.loads((tmp_path / DIAGNOSIS_FILE).read_text())
    assert report["status"] == "ok" and report["findings"] == [] and report["codes"] == []
    assert report["epochs_seen"] >= 10 and not report["stopped_on_divergence"]
    assert read_metrics(tmp_path)["metrics"]["test/acc"] >= 0.95  # the doctor did not disturb training
    assert "ConvergenceDoctor: no problems found" in capsys.readouterr().out
    # doctor/grad_norm and doctor/max_prob are logged once per epoch, with sensible values
    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    grad = [float(r.split(",")[header.index("doctor/grad_norm")]) for r in rows[1:]
            if r.split(",")[header.index("doctor/grad_norm")]]
    prob = [float(r.split(",")[header.index("doctor/max_prob")]) for r in rows[1:]
            if r.split(",")[header.index("doctor/max_prob")]]
    assert len(grad) == len(prob) == report["epochs_seen"]
    assert all(0 < g < 100 for g in grad)
    assert 0.1 <= prob[0] < prob[-1] <= 1.0  # the model grows confident as it learns


@pytest.mark.parametrize("setup", ["adam_balanced", "sgd_smoothing_weights_noise_unlabeled", "binary", "raw_digits"])
def test_other_healthy_runs_raise_no_finding(tmp_path, setup):
    if setup == "raw_digits":  # unstandardised but moderate pixel values (0..16): not an input-scale problem
        dm, net, opt, loss = DigitsDataModule(batch_size=64, standardize=False), MLP(64, 10), _adam(), None
    else:
        kwargs = {"num_samples": 2000, "batch_size": 128}
        if setup == "binary":
            kwargs["num_classes"] = 2
        if setup.startswith("sgd"):
            kwargs.update(label_noise=0.1, unlabeled_fraction=0.1)
        dm = SyntheticDataModule(**kwargs)
        net = MLP(20, dm.num_classes)
        opt = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True) if setup.startswith("sgd") \
            else _adam()
        loss = CrossEntropyLoss(label_smoothing=0.1, class_weights="balanced") if setup.startswith("sgd") else None
    doctor, trainer, report = _fit(tmp_path, XentModule(net, loss=loss, optimizer=opt), dm, epochs=8)
    assert report["codes"] == [], report["findings"]
    history = doctor.history
    assert len(history["train"]) == len(history["val"]) == 8
    assert history["train"][-1]["train_nll"] < 0.8 * history["train"][0]["train_nll"]
    # the doctor's own validation NLL is the module's val/loss when the loss is plain cross-entropy
    if loss is None:
        assert history["val"][-1]["val_nll"] == pytest.approx(float(trainer.callback_metrics["val/loss"]), rel=1e-4)


# ------------------------------------------------------------------------------------------ 1. softmax
def test_softmax_before_the_loss_is_diagnosed(tmp_path):
    module = SoftmaxModule(MLP(64, 10), optimizer=_adam())
    doctor, _, report = _fit(tmp_path, module, DigitsDataModule(batch_size=64), epochs=4)
    finding = _finding(report, "softmax_before_loss")
    assert (finding["epoch"], finding["step"], finding["stage"]) == (0, 0, "train")
    assert 0 <= finding["evidence"]["output_min"] <= finding["evidence"]["output_max"] <= 1
    assert finding["evidence"]["max_row_sum_deviation"] < 1e-5
    assert "remove the final softmax" in finding["message"]
    # the root cause is named once; the flat loss it causes is not blamed on the learning rate
    assert report["codes"] == ["softmax_before_loss"]
    floor = math.log(9 + math.e) - 1  # softmax of one-hot "logits": the best the loss can do
    assert finding["evidence"]["loss_floor"] == pytest.approx(floor, rel=1e-3)
    assert doctor.history["train"][-1]["train_nll"] > floor


# ------------------------------------------------------------------------------------- 2. initial loss
def test_initial_loss_far_from_uniform_is_diagnosed_with_the_loss_options(tmp_path):
    net = MLP(64, 10)
    with torch.no_grad():  # a broken output layer: weights 100x too large
        net.head.weight.mul_(100.0)
    weights = torch.tensor([1.0, 4.0] * 5)
    loss = CrossEntropyLoss(label_smoothing=0.2, class_weights=weights)
    x, y = _digits()
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    loader = DataLoader(TensorBatchDataset(x[:640], y[:640]), batch_size=64, collate_fn=collate_batch)
    _, _, report = _fit(tmp_path, XentModule(net, loss=loss, optimizer=_adam()), train_dataloaders=loader, epochs=1)
    finding = _finding(report, "initial_loss")
    evidence = finding["evidence"]
    # The reference is the module's own loss at uniform logits on the first batch: with class weights and label
    # smoothing that is not exactly ln C (torch normalises the smoothing term by the targets' weight sum).
    uniform = F.cross_entropy(torch.zeros(64, 10), y[:64], weight=weights, label_smoothing=0.2).item()
    assert evidence["expected_loss"] == pytest.approx(uniform, rel=1e-3)
    assert evidence["ln_num_classes"] == pytest.approx(math.log(10), rel=1e-3)
    assert evidence["initial_loss"] > evidence["expected_loss"] + 1.0
    assert evidence["logit_std"] > 3.0
    assert finding["step"] == 0 and "output layer" in finding["message"]


def test_normal_initialisation_is_not_flagged(tmp_path):
    _, _, report = _fit(tmp_path, XentModule(MLP(64, 10), optimizer=_adam()), DigitsDataModule(batch_size=64),
                        epochs=1, limit_train_batches=3, limit_val_batches=1)
    assert "initial_loss" not in report["codes"]


# -------------------------------------------------------------------------------------------- 3. targets
def test_out_of_range_targets_are_diagnosed_before_the_loss_fails(tmp_path):
    """1-based labels with a 10-output model: the loss raises; the doctor explains why and how to fix it."""
    module = XentModule(MLP(64, 10), optimizer=_adam(), num_classes=10)
    _, _, report = _fit(tmp_path, module, OneBasedDigits(batch_size=64), raises=ValueError,
                        num_sanity_val_steps=0)
    finding = _finding(report, "target_out_of_range")
    assert finding["stage"] == "train" and finding["step"] == 0
    assert finding["evidence"]["min"] == 1 and finding["evidence"]["max"] == 10
    assert finding["evidence"]["bad_targets"] > 0 and finding["evidence"]["num_classes"] == 10
    assert "1-based" in finding["message"] and "subtract 1" in finding["message"]
    assert report["exception"].startswith("ValueError")


def test_float_one_hot_targets_are_diagnosed(tmp_path):
    x, y = _digits()
    dm = TensorDataModule(x, F.one_hot(y, 10).float(), batch_size=64)
    _, _, report = _fit(tmp_path, XentModule(MLP(64, 10), optimizer=_adam()), dm, epochs=1)
    finding = _finding(report, "float_one_hot_targets")
    assert finding["evidence"]["shape"] == [64, 10] and finding["evidence"]["dtype"] == "torch.float32"
    assert "argmax" in finding["message"]


def test_float_class_indices_are_diagnosed_through_the_exception(tmp_path):
    x, y = _digits()
    loader = DataLoader(TensorBatchDataset(x[:512], y[:512].float()), batch_size=64, collate_fn=collate_batch)
    _, _, report = _fit(tmp_path, XentModule(MLP(64, 10), optimizer=_adam()), train_dataloaders=loader,
                        raises=ValueError)
    finding = _finding(report, "float_class_indices")
    assert finding["evidence"]["min"] == 0 and finding["evidence"]["max"] == 9
    assert "y.long()" in finding["message"]


def test_integer_one_hot_targets_are_diagnosed(tmp_path):
    x, y = _digits()
    loader = DataLoader(TensorBatchDataset(x[:256], F.one_hot(y[:256], 10)), batch_size=64, collate_fn=collate_batch)
    _, _, report = _fit(tmp_path, XentModule(MLP(64, 10), optimizer=_adam()), train_dataloaders=loader,
                        raises=ValueError)
    finding = _finding(report, "integer_one_hot_targets")
    assert finding["evidence"]["shape"] == [64, 10] and "argmax" in finding["message"]


def test_a_class_never_seen_in_training_is_diagnosed(tmp_path):
    x, y = _digits()
    keep = y != 3  # the 3s were lost on the way
    _, _, report = _fit(tmp_path, XentModule(MLP(64, 10), optimizer=_adam()),
                        TensorDataModule(x[keep], y[keep], batch_size=64), epochs=1)
    finding = _finding(report, "unseen_class")
    assert finding["evidence"]["unseen_classes"] == [3]
    assert finding["evidence"]["class_counts"][3] == 0 and min(
        c for i, c in enumerate(finding["evidence"]["class_counts"]) if i != 3) > 100


def test_batches_with_every_target_ignored_are_counted_once(tmp_path, caplog):
    dm = SyntheticDataModule(num_samples=1000, unlabeled_fraction=0.9, batch_size=8)
    with caplog.at_level("WARNING", logger="xentlit.callbacks"):
        _, trainer, report = _fit(tmp_path, XentModule(MLP(20, 10), optimizer=_adam()), dm, epochs=2)
    finding = _finding(report, "all_ignored_batch")
    n_batches = math.ceil(len(dm.train_dataset) / 8)
    assert finding["evidence"]["batches"] == n_batches
    # with 90% unlabeled rows a batch of 8 is all-ignored with probability 0.9**8 = 0.43
    assert 0.25 * n_batches < finding["evidence"]["batches_all_ignored"] < 0.6 * n_batches
    assert finding["evidence"]["labelled_fraction"] == pytest.approx(0.1, abs=0.01)
    assert sum("all_ignored_batch" in r.getMessage() for r in caplog.records) == 1  # reported once, not per epoch


# --------------------------------------------------------------------------------------------- 4. inputs
@pytest.mark.parametrize("batch", [0, 3])
def test_non_finite_inputs_are_not_mistaken_for_divergence(tmp_path, batch):
    x, y = _digits()
    x, y = x[:640], y[:640]
    x[64 * batch + 8:64 * batch + 13, 7] = float("nan")  # the loss reports "non-finite logits ... diverged"
    loader = DataLoader(TensorBatchDataset(x, y), batch_size=64, collate_fn=collate_batch)
    _, trainer, report = _fit(tmp_path, XentModule(MLP(64, 10), optimizer=_adam()), train_dataloaders=loader,
                              raises=ValueError)
    finding = _finding(report, "non_finite_inputs")
    assert finding["evidence"]["non_finite_values"] == 5 and finding["step"] == batch
    assert report["codes"] == ["non_finite_inputs"]


def test_unscaled_inputs_are_diagnosed(tmp_path):
    dm = UnscaledDigits(batch_size=64, standardize=False)
    _, _, report = _fit(tmp_path, XentModule(MLP(64, 10), optimizer=_adam()), dm, epochs=1)
    finding = _finding(report, "unscaled_inputs")
    evidence = finding["evidence"]
    assert evidence["input_abs_max"] == 16000 and evidence["input_feature_rms_max"] > 1000
    assert evidence["first_layer"] == "net.body.0" and evidence["first_layer_output_rms"] > 1000
    assert "standardize=True" in finding["message"]
    assert "initial_loss" in report["codes"]  # the huge first-layer outputs give a huge initial loss too


# ----------------------------------------------------------------------------------------- 5. divergence
@pytest.mark.parametrize("when", ["from_the_start", "after_two_epochs"])
def test_divergence_stops_cleanly_and_the_checkpoints_hold_finite_weights(tmp_path, when):
    if when == "from_the_start":
        optimizer, scheduler = functools.partial(torch.optim.SGD, lr=100.0), None
    else:  # a schedule that multiplies a good learning rate by 1000 at epoch 2
        optimizer = functools.partial(torch.optim.SGD, lr=0.1)
        scheduler = {"scheduler": functools.partial(torch.optim.lr_scheduler.LambdaLR,
                                                    lr_lambda=lambda epoch: 1.0 if epoch < 2 else 1000.0),
                     "interval": "epoch"}
    module = XentModule(MLP(64, 10), optimizer=optimizer, scheduler=scheduler)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss", save_last=True)
    doctor, trainer, report = _fit(tmp_path, module, DigitsDataModule(batch_size=64), epochs=8,
                                   callbacks=[checkpoint], enable_checkpointing=True)
    finding = _finding(report, "divergence")
    assert report["stopped_on_divergence"] is True
    assert trainer.should_stop and trainer.current_epoch < trainer.max_epochs
    assert "learning rate" in finding["message"] and "gradient_clip_val" in finding["message"]
    assert finding["evidence"]["lr"] == 100.0
    assert finding["evidence"]["batch_loss"] > 10 * math.log(10)
    assert all(torch.isfinite(p).all() for p in module.parameters())  # the healthy weights were restored

    saved = {p.name: torch.load(p, map_location="cpu", weights_only=True) for p in (tmp_path / "ckpt").glob("*.ckpt")}
    assert "last.ckpt" in saved and len(saved) >= 2
    for name, ckpt in saved.items():
        for key, value in ckpt["state_dict"].items():
            assert torch.isfinite(value).all() if value.is_floating_point() else True, (name, key)
        assert math.isfinite(float(ckpt["callbacks"][next(k for k in ckpt["callbacks"] if "ModelCheckpoint" in k)]
                                   ["best_model_score"]))
    best = torch.load(checkpoint.best_model_path, weights_only=True)["state_dict"]
    loadable = XentModule(MLP(64, 10))
    loadable.load_state_dict(best)  # the best checkpoint loads and predicts
    with torch.no_grad():
        assert torch.isfinite(loadable(torch.randn(4, 64))).all()
    if when == "after_two_epochs":
        # the weights restored (and written to last.ckpt) are those of the end of epoch 1, the best epoch
        assert finding["epoch"] == 2
        steps_per_epoch = math.ceil(len(trainer.datamodule.train_dataset) / 64)
        assert finding["evidence"]["restored_weights_from_step"] == 2 * steps_per_epoch
        last = saved["last.ckpt"]["state_dict"]
        assert all(torch.equal(last[k], best[k]) for k in best)


def test_divergence_faster_than_one_step_is_diagnosed_from_the_exception(tmp_path):
    """lr=1e30: the second forward pass already overflows and the loss raises before any check can stop training;
    the doctor still names the cause and puts finite weights back before the checkpoint written on exception."""
    module = XentModule(MLP(64, 10), optimizer=functools.partial(torch.optim.SGD, lr=1e30))
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_on_exception=True)
    _, trainer, report = _fit(tmp_path, module, DigitsDataModule(batch_size=64), callbacks=[checkpoint],
                              enable_checkpointing=True, raises=ValueError)
    finding = _finding(report, "divergence")
    assert "non-finite" in finding["message"] and "learning rate (now 1e+30" in finding["message"]
    assert finding["evidence"]["restored_weights_from_step"] == 0
    assert all(torch.isfinite(p).all() for p in module.parameters())
    [saved] = list((tmp_path / "ckpt").glob("*.ckpt"))
    state = torch.load(saved, weights_only=True)["state_dict"]
    weights = [name for name, _ in module.named_parameters()]  # (metric states such as a max start at -inf)
    assert len(weights) == 6 and all(torch.isfinite(state[name]).all() for name in weights)


# ------------------------------------------------------------------------------------ 6. learning rate too low
def test_learning_rate_too_low_is_diagnosed(tmp_path):
    _, _, report = _fit(tmp_path, XentModule(MLP(64, 10), optimizer=_adam(1e-7)), DigitsDataModule(batch_size=64),
                        epochs=5)
    finding = _finding(report, "lr_too_low")
    evidence = finding["evidence"]
    assert evidence["lr"] == 1e-7
    losses = evidence["train_loss_last_epochs"]
    assert max(losses) - min(losses) < 0.01 and min(losses) > 0.9 * evidence["initial_loss"]
    assert all(g > 0.1 for g in evidence["grad_norm_last_epochs"])  # gradients are healthy
    assert evidence["weight_change_per_epoch"][0] < 1e-4
    assert "raise it" in finding["message"]


# ------------------------------------------------------------------------------------- 7. majority collapse
@pytest.mark.parametrize("class_weights", [None, "balanced"])
def test_majority_collapse_on_imbalanced_data(tmp_path, class_weights):
    dm = SyntheticDataModule(num_samples=2000, imbalance_factor=100, class_sep=0.5, batch_size=64)
    module = XentModule(MLP(20, 10), loss=CrossEntropyLoss(class_weights=class_weights), optimizer=_adam())
    _, _, report = _fit(tmp_path, module, dm, epochs=5)
    if class_weights is not None:  # the suggested fix removes the collapse
        assert "majority_collapse" not in report["codes"]
        return
    finding = _finding(report, "majority_collapse")
    evidence = finding["evidence"]
    assert evidence["majority_class"] == 0 and evidence["train_imbalance_ratio"] == 100
    assert evidence["predicted_share"] >= 0.5 and evidence["true_share"] == pytest.approx(0.1)
    assert evidence["macro_f1"] < 0.15  # chance level for 10 balanced validation classes is 0.1
    assert "class_weights" in finding["message"] and "logit adjustment" in finding["message"]


# ---------------------------------------------------------------------------------------- 8. overconfidence
def test_overfitting_a_small_noisy_dataset_is_diagnosed_as_overconfidence(tmp_path):
    dm = SyntheticDataModule(num_samples=300, label_noise=0.3, batch_size=32)
    module = XentModule(MLP(20, 10, hidden_sizes=[256, 256]), optimizer=_adam(3e-3))
    doctor, _, report = _fit(tmp_path, module, dm, epochs=15)
    finding = _finding(report, "overconfidence")
    evidence = finding["evidence"]
    assert evidence["val_loss_now"] >= 1.2 * evidence["val_loss_best"]
    assert evidence["train_loss_now"] <= 0.8 * evidence["train_loss_at_best"]
    assert evidence["val_overconfidence_error_now"] > evidence["val_overconfidence_error_best"]
    assert evidence["val_confidence_now"] > evidence["val_accuracy_now"]
    assert finding["epoch"] > evidence["best_epoch"] >= 1
    assert "label_smoothing" in finding["message"] and "EarlyStopping" in finding["message"]
    assert report["codes"] == ["overconfidence"]


# ---------------------------------------------------------------------- any LightningModule: the contract
class PlainClassifier(pl.LightningModule):
    """Not an XentModule: dict batches, its own key names, torch's loss."""

    def __init__(self, net: nn.Module, num_classes: int, lr: float = 1e-3, return_dict: bool = True):
        super().__init__()
        self.net, self.num_classes, self.lr, self.return_dict = net, num_classes, lr, return_dict
        self.criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

    def training_step(self, batch, batch_idx):
        scores = self.net(batch["features"])
        loss = self.criterion(scores, batch["label"])
        return {"loss": loss, "scores": scores.detach(), "labels": batch["label"]} if self.return_dict else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _dict_loader(labels_offset: int = 0, n: int = 256):
    x, y = _digits()
    x = (x[:n] - x.mean(0)) / (x.std(0) + 1e-6)
    rows = [{"features": x[i], "label": y[i] + labels_offset} for i in range(n)]
    return DataLoader(rows, batch_size=32)


def test_plain_lightning_module_with_its_own_keys(tmp_path):
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10), nn.Softmax(dim=1))
    doctor = ConvergenceDoctor(logits_key="scores", target_key="labels", batch_input_key="features",
                               batch_target_key="label")
    _, _, report = _fit(tmp_path, PlainClassifier(net, 10, lr=0.1), train_dataloaders=_dict_loader(), epochs=2,
                        doctor=doctor)
    assert report["codes"] == ["softmax_before_loss"]
    # and without the softmax the same module trains without a finding
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    _, _, report = _fit(tmp_path / "fixed", PlainClassifier(net, 10, lr=0.1), train_dataloaders=_dict_loader(),
                        epochs=2, doctor=ConvergenceDoctor(logits_key="scores", target_key="labels",
                                                           batch_input_key="features", batch_target_key="label"))
    assert report["codes"] == []


def test_plain_module_out_of_range_labels_and_torch_index_error(tmp_path):
    net = nn.Sequential(nn.Linear(64, 10))
    doctor = ConvergenceDoctor(logits_key="scores", target_key="labels", batch_input_key="features",
                               batch_target_key="label")
    _, _, report = _fit(tmp_path, PlainClassifier(net, 10), train_dataloaders=_dict_loader(labels_offset=1),
                        doctor=doctor, raises=IndexError)  # torch: "Target 10 is out of bounds"
    finding = _finding(report, "target_out_of_range")
    assert finding["evidence"]["num_classes"] == 10 and "1-based" in finding["message"]


def test_module_returning_only_a_loss_still_gets_divergence_checks(tmp_path, caplog):
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    module = PlainClassifier(net, 10, lr=100.0, return_dict=False)
    doctor = ConvergenceDoctor(batch_input_key="features", batch_target_key="label")
    with caplog.at_level("WARNING", logger="xentlit.callbacks"):
        _, trainer, report = _fit(tmp_path, module, train_dataloaders=_dict_loader(), epochs=5, doctor=doctor)
    assert any("no 'logits'/'target'" in r.getMessage() for r in caplog.records)
    _finding(report, "divergence")
    assert trainer.current_epoch < 5 and all(torch.isfinite(p).all() for p in module.parameters())


# -------------------------------------------------------------------------------------- report and config
def test_report_is_json_with_one_entry_per_code_and_a_printed_summary(tmp_path, capsys):
    _fit(tmp_path, SoftmaxModule(MLP(64, 10), optimizer=_adam()), DigitsDataModule(batch_size=64), epochs=1)
    report = json.loads((tmp_path / DIAGNOSIS_FILE).read_text())
    assert report["status"] == "problems_found" and report["codes"] == ["softmax_before_loss"]
    [finding] = report["findings"]
    assert set(finding) == {"code", "severity", "stage", "epoch", "step", "message", "evidence"}
    out = capsys.readouterr().out
    assert "ConvergenceDoctor: 1 problem(s) found" in out and "[error] softmax_before_loss" in out
    assert str(tmp_path / DIAGNOSIS_FILE) in out


def test_doctor_yaml_matches_the_signature(tmp_path):
    cfg = OmegaConf.load(CONF / "callbacks" / "doctor.yaml")
    node = OmegaConf.to_container(cfg.doctor, resolve=False)
    assert node.pop("_target_") == "xentlit.callbacks.ConvergenceDoctor"
    assert node.pop("ignore_index") == "${ignore_index}"
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(ConvergenceDoctor).parameters.items()}
    assert node == {k: v for k, v in defaults.items() if k != "ignore_index"}


@pytest.mark.slow
def test_ddp_two_processes_no_deadlock_one_report(tmp_path):
    result = run_script("train.py", "trainer=ddp_cpu", "trainer.max_epochs=2", "callbacks.rich_progress_bar=null",
                        "++callbacks.doctor._target_=xentlit.callbacks.ConvergenceDoctor", cwd=tmp_path, timeout=240)
    [run] = run_dirs(tmp_path / "outputs")
    report = json.loads((run / DIAGNOSIS_FILE).read_text())
    assert report["codes"] == [] and report["epochs_seen"] == 2
    assert result.stdout.count("ConvergenceDoctor: no problems found") == 1  # rank 0 only
    assert read_metrics(run)["metrics"]["test/acc"] > 0.5


# ------------------------------------------------------------------------------- the checks' registry
def test_every_code_has_exactly_one_registered_check_and_every_check_a_code():
    from xentlit.callbacks.doctor.checks import CHECKS
    from xentlit.callbacks.doctor.checks.base import EVENTS, Check

    codes = [check.code for check in CHECKS]
    assert sorted(codes) == sorted(CODES) and len(set(codes)) == len(codes) == 14
    for check in CHECKS:
        assert CODES[check.code] == (check.severity, check.title) and check.severity in ("error", "warning")
        assert any(getattr(check, event) is not getattr(Check, event) for event in EVENTS), check  # judges something


def test_a_new_check_is_one_class_registered_in_one_place(tmp_path, monkeypatch):
    """A check appended to CHECKS (and nowhere else) is called by a real fit and reported like the others."""
    from xentlit.callbacks.doctor import checks, diagnosis
    from xentlit.callbacks.doctor.checks.base import Check
    from xentlit.callbacks.doctor.findings import Verdict

    class WideOutputs(Check):
        code, severity, title = "wide_outputs", "warning", "more than 5 classes"

        def on_first_step(self, doctor, first):
            if first.num_classes > 5:
                return Verdict(step=first.step, evidence={"classes": first.num_classes},
                               message=f"{first.num_classes} classes. Fix: none needed.")

    monkeypatch.setattr(diagnosis, "CHECKS", (*checks.CHECKS, WideOutputs))
    x, y = _digits()
    loader = DataLoader(TensorBatchDataset(x[:128], y[:128]), batch_size=64, collate_fn=collate_batch)
    _, _, report = _fit(tmp_path, XentModule(MLP(64, 10), optimizer=_adam()), train_dataloaders=loader, epochs=1)
    [finding] = report["findings"]
    assert finding["code"] == "wide_outputs" and finding["severity"] == "warning"
    assert finding["evidence"] == {"classes": 10} and finding["step"] == 0
