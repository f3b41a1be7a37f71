"""Evaluate and predict from a checkpoint alone, through the real scripts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import load_digits

from conftest import read_metrics, run_dirs, run_script

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    run_script("train.py", "trainer.max_epochs=3", cwd=root)
    [run] = run_dirs(root / "outputs")
    return run


def test_eval_reproduces_the_training_runs_test_metrics(trained_run, tmp_path):
    summary = read_metrics(trained_run)
    result = run_script("eval.py", f"ckpt_path={summary['best_checkpoint']}", cwd=tmp_path)
    [eval_run] = run_dirs(tmp_path / "outputs")
    evaluated = read_metrics(eval_run)["metrics"]
    for name in ("test/acc", "test/loss", "test/f1_macro", "test/ece", "test/balanced_acc"):
        assert evaluated[name] == pytest.approx(summary["metrics"][name], abs=1e-6), name
    assert "test/acc" in result.stdout


def test_predict_writes_classes_and_probabilities_matching_the_model(trained_run, tmp_path):
    digits = load_digits()
    rows = digits.data[:50]
    pd.DataFrame(rows, columns=[f"pixel{i}" for i in range(64)]).to_csv(tmp_path / "new.csv", index=False)
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    run_script("predict.py", f"ckpt_path={ckpt}", "input=new.csv", "output=preds.csv", cwd=tmp_path)
    preds = pd.read_csv(tmp_path / "preds.csv")
    assert len(preds) == 50
    prob_columns = [f"prob_{k}" for k in range(10)]
    assert list(preds.columns) == ["prediction", "class_index", *prob_columns]
    np.testing.assert_allclose(preds[prob_columns].sum(axis=1), 1.0, atol=1e-5)

    # the same numbers from the checkpoint by hand: train-split standardisation, then the network
    from xentlit import MLP, DigitsDataModule, XentModule

    dm = DigitsDataModule()
    dm.setup()
    module = XentModule.load_from_checkpoint(ckpt, net=MLP(64, 10), weights_only=True).eval()
    with torch.no_grad():
        expected = module(dm.transform(torch.tensor(rows, dtype=torch.float32))).softmax(1).numpy()
    np.testing.assert_allclose(preds[prob_columns].to_numpy(), expected, atol=1e-5)
    assert (preds["class_index"].to_numpy() == expected.argmax(1)).all()
    assert (preds["class_index"].to_numpy() == digits.target[:50]).mean() > 0.8


def test_predict_rejects_a_file_with_the_wrong_number_of_features(trained_run, tmp_path):
    pd.DataFrame(np.zeros((3, 5))).to_csv(tmp_path / "bad.csv", index=False)
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    result = run_script("predict.py", f"ckpt_path={ckpt}", "input=bad.csv", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "has 5 feature columns but the model" in result.stderr and "trained on 64" in result.stderr


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_checkpoint_fails_with_a_clear_message(trained_run, tmp_path, damage):
    good = (trained_run / "checkpoints" / "last.ckpt").read_bytes()
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good[: len(good) // 2] if damage == "truncated" else b"not a checkpoint" * 10)
    result = run_script("eval.py", f"ckpt_path={bad}", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert f"checkpoint {bad} is corrupt or truncated" in result.stderr
    assert "site-packages/torch" not in result.stderr and "site-packages/lightning" not in result.stderr


def test_predict_keeps_the_class_order_with_more_than_ten_classes(tmp_path):
    """12 classes named class_0..class_11: a string sort anywhere (class_10 before class_2) would shuffle columns."""
    run_script("train.py", "data=synthetic", "data.num_classes=12", "data.num_samples=1200", "trainer.max_epochs=2",
               cwd=tmp_path)
    [run] = run_dirs(tmp_path / "outputs")
    ckpt = run / "checkpoints" / "last.ckpt"
    from xentlit import MLP, SyntheticDataModule, XentModule

    dm = SyntheticDataModule(num_samples=1200, num_classes=12)
    dm.setup()
    raw = dm.test_dataset.x * dm.feature_std + dm.feature_mean
    pd.DataFrame(raw.numpy(), columns=[f"f{i}" for i in range(20)]).to_csv(tmp_path / "rows.csv", index=False)
    run_script("predict.py", f"ckpt_path={ckpt}", "input=rows.csv", "output=preds.csv", cwd=tmp_path)
    preds = pd.read_csv(tmp_path / "preds.csv")
    names = [f"class_{i}" for i in range(12)]
    assert list(preds.columns) == ["prediction", "class_index", *[f"prob_{n}" for n in names]]
    module = XentModule.load_from_checkpoint(ckpt, net=MLP(20, 12), weights_only=True).eval()
    with torch.no_grad():
        expected = module(dm.test_dataset.x).softmax(1).numpy()
    np.testing.assert_allclose(preds[[f"prob_{n}" for n in names]].to_numpy(), expected, atol=1e-5)
    assert (preds["class_index"].to_numpy() == expected.argmax(1)).all()
    assert preds["prediction"].tolist() == [names[i] for i in expected.argmax(1)]


def test_calibration_is_fitted_on_validation_stored_in_the_best_checkpoint_and_applied(trained_run, tmp_path):
    """The default calibration=temperature: T fitted on the validation split after training (val NLL not worse),
    written into the best checkpoint, reported before/after by eval, and applied by predict (with post-hoc logit
    adjustment by the training priors on top when asked)."""
    summary = read_metrics(trained_run)
    metrics = summary["metrics"]
    t = metrics["calibration/temperature"]
    assert metrics["calibration/val_nll_after"] <= metrics["calibration/val_nll_before"] + 1e-9
    best = summary["best_checkpoint"]
    state = torch.load(best, map_location="cpu", weights_only=True)
    assert float(state["state_dict"]["calibrator.temperature"]) == pytest.approx(t, rel=1e-12)
    counts = state["xentlit"]["class_counts"]

    run_script("eval.py", f"ckpt_path={best}", "logit_adjustment=1.0", cwd=tmp_path)
    [eval_run] = run_dirs(tmp_path / "outputs")
    evaluated = read_metrics(eval_run)["metrics"]
    for name in ("test_nll_before", "test_nll_after", "test_ece_after", "test_brier_after"):
        assert evaluated[f"calibration/{name}"] == pytest.approx(metrics[f"calibration/{name}"], abs=1e-6), name
    assert 0 < evaluated["test/balanced_acc_adjusted_tau1"] <= 1
    assert evaluated["test/balanced_acc"] == pytest.approx(metrics["test/balanced_acc"], abs=1e-6)

    digits = load_digits()
    rows = digits.data[:40]
    pd.DataFrame(rows, columns=[f"pixel{i}" for i in range(64)]).to_csv(tmp_path / "new.csv", index=False)
    from xentlit import MLP, DigitsDataModule, XentModule

    dm = DigitsDataModule()
    dm.setup()
    assert counts == dm.class_counts.tolist()
    module = XentModule.load_from_checkpoint(best, net=MLP(64, 10), weights_only=True).eval()
    with torch.no_grad():
        logits = module(dm.transform(torch.tensor(rows, dtype=torch.float32))).double()
    log_prior = torch.log(torch.tensor(counts, dtype=torch.float64).clamp_min(1) / sum(counts))
    prob_columns = [f"prob_{k}" for k in range(10)]
    for tau, expected in ((0.0, (logits / t).softmax(1)), (1.0, ((logits - log_prior) / t).softmax(1))):
        run_script("predict.py", f"ckpt_path={best}", "input=new.csv", f"output=p{tau}.csv", f"logit_adjustment={tau}",
                   cwd=tmp_path)
        preds = pd.read_csv(tmp_path / f"p{tau}.csv")
        np.testing.assert_allclose(preds[prob_columns].to_numpy(), expected.numpy(), atol=1e-5)
    assert (trained_run / "plots" / "reliability.png").is_file()
