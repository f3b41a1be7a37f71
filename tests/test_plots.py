"""xentlit.plots: the numbers each figure displays against hand computations, and the callback in real runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from matplotlib.image import imread
from sklearn.metrics import confusion_matrix, precision_score, recall_score

from xentlit import MLP, DigitsDataModule, TensorDataModule, XentModule
from xentlit import plots
from xentlit.plots import (
    FIGURES,
    PlotCallback,
    figure_to_array,
    plot_confusion_matrix,
    plot_curves,
    plot_per_class,
    plot_reliability,
)

IGNORE = -100


def _bars(ax, label: str) -> np.ndarray:
    [container] = [c for c in ax.containers if c.get_label() == label]
    return np.array([patch.get_height() for patch in container])


def _trainer(root: Path, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(root))
    return pl.Trainer(**{**defaults, **kwargs})


def _predictions(module: XentModule, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        probs = module(x).softmax(dim=1)
    confidence, pred = probs.max(dim=1)
    return confidence.numpy(), pred.numpy()


# ------------------------------------------------------------------------------------ figure functions
def test_curves_draw_exactly_the_history_per_panel():
    history = {
        "train/loss": [2.0, 1.0, 0.5],
        "val/loss": [2.5, float("nan"), 0.7],
        "train/acc": [0.3, 0.6, 0.8],
        "val/acc": [0.2, 0.5],
        "other": [9.0],
    }
    fig = plot_curves(history, epochs={"val/acc": [1.5, 3.0]})
    loss_ax, acc_ax = fig.axes
    assert (loss_ax.get_title(), acc_ax.get_title()) == ("loss", "accuracy")
    loss = {line.get_label(): line for line in loss_ax.get_lines()}
    acc = {line.get_label(): line for line in acc_ax.get_lines()}
    assert set(loss) == {"train/loss", "val/loss"} and set(acc) == {"train/acc", "val/acc"}
    np.testing.assert_array_equal(loss["train/loss"].get_xdata(), [1, 2, 3])
    np.testing.assert_array_equal(loss["train/loss"].get_ydata(), [2.0, 1.0, 0.5])
    np.testing.assert_array_equal(loss["val/loss"].get_xdata(), [1, 3])  # the NaN point is skipped
    np.testing.assert_array_equal(loss["val/loss"].get_ydata(), [2.5, 0.7])
    np.testing.assert_array_equal(acc["val/acc"].get_xdata(), [1.5, 3.0])
    np.testing.assert_array_equal(acc["val/acc"].get_ydata(), [0.2, 0.5])

    custom = plot_curves(history, panels={"anything": ["other"]})
    [ax] = custom.axes
    np.testing.assert_array_equal(ax.get_lines()[0].get_ydata(), [9.0])
    with pytest.raises(ValueError, match="2 values but 3 epochs"):
        plot_curves({"val/acc": [0.1, 0.2]}, epochs={"val/acc": [1, 2, 3]})


def test_confusion_matrix_shows_the_row_normalised_matrix_with_names_and_cell_values():
    counts = np.array([[3, 1, 0], [1, 8, 1], [0, 0, 0]])  # the third class never occurs
    fig = plot_confusion_matrix(counts, ["cat", "dog", "eel"])
    ax = fig.axes[0]
    shown = ax.images[0].get_array()
    expected = np.array([[0.75, 0.25, 0.0], [0.1, 0.8, 0.1], [np.nan, np.nan, np.nan]])
    np.testing.assert_allclose(np.ma.filled(shown.astype(float), np.nan), expected)
    assert shown.mask[2].all() and not shown.mask[:2].any()
    assert sorted(t.get_text() for t in ax.texts) == sorted(["0.75", "0.25", "0.10", "0.80", "0.10"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog", "eel"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat", "dog", "eel"]
    assert "14 samples" in ax.get_title() and "accuracy 0.786" in ax.get_title()  # 11 / 14
    assert figure_to_array(fig, dpi=50).shape[2] == 3
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        plot_confusion_matrix(counts, ["cat", "dog"])


def test_confusion_matrix_of_100_classes_has_no_cell_text_and_thinned_labels():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 5, size=(100, 100)) + np.diag(rng.integers(20, 40, size=100))
    names = [f"class_{i:03d}" for i in range(100)]
    fig = plot_confusion_matrix(counts, names)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), counts / counts.sum(axis=1, keepdims=True))
    assert len(ax.texts) == 0
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert 10 <= len(labels) <= 50 and set(labels) <= set(names) and labels[0] == "class_000"
    height, width, _ = figure_to_array(fig, dpi=100).shape
    assert 1000 <= height <= 1600 and width <= 1800  # large enough to read, not a poster
    # the threshold is configurable both ways
    assert len(plot_confusion_matrix(counts[:30, :30], annotate_max=25).axes[0].texts) == 0
    assert len(plot_confusion_matrix(counts[:30, :30], annotate_max=30).axes[0].texts) == np.count_nonzero(
        counts[:30, :30])


def test_reliability_bars_histogram_and_ece_match_hand_computation():
    confidences = np.array([0.05, 0.15, 0.5, 0.55, 0.58, 0.62, 0.95, 0.98, 1.0])
    correct = np.array([0, 1, 1, 1, 0, 1, 1, 0, 1])
    fig = plot_reliability(confidences, correct, n_bins=10)
    top, bottom = fig.axes
    # bins [k/10, (k+1)/10) (0.5 opens bin 5), as torchmetrics bins them; a confidence of exactly 1 is drawn
    # in the last bar
    accuracy = np.array([0, 1, 0, 0, 0, 2 / 3, 1, 0, 0, 2 / 3])
    np.testing.assert_allclose(_bars(top, "accuracy in bin"), accuracy)
    mean_conf = np.array([0.05, 0.15, 0, 0, 0, (0.5 + 0.55 + 0.58) / 3, 0.62, 0, 0, (0.95 + 0.98 + 1.0) / 3])
    np.testing.assert_allclose(_bars(top, "gap to mean confidence"), np.abs(mean_conf - accuracy), atol=1e-12)
    np.testing.assert_array_equal([p.get_height() for p in bottom.containers[0]], [1, 1, 0, 0, 0, 3, 1, 0, 0, 3])
    # ECE as torchmetrics (and XentModule's test/ece) computes it: sum over bins of |acc - conf| * share,
    # with confidence 1.0 a bin of its own (|1 - 1| = 0 here)
    hand_ece = (0.05 + 0.85 + 3 * abs(2 / 3 - 1.63 / 3) + 0.38 + 2 * abs(0.5 - 0.965) + 0.0) / 9
    ece = float(re.search(r"ECE = ([0-9.]+)", top.get_title()).group(1))
    assert ece == pytest.approx(hand_ece, abs=6e-5)
    assert "9 samples" in top.get_title()

    default = plot_reliability(np.linspace(0.1, 0.9, 50), np.ones(50))
    assert len(_bars(default.axes[0], "accuracy in bin")) == 15


def test_per_class_bars_are_precision_and_recall_and_nan_draws_nothing():
    precision = [1.0, 0.5, float("nan")]
    recall = [0.25, 0.75, 1.0]
    fig = plot_per_class(precision, recall, ["a", "b", "c"])
    ax = fig.axes[0]
    np.testing.assert_array_equal(_bars(ax, "precision"), precision)
    np.testing.assert_array_equal(_bars(ax, "recall"), recall)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    macro = {line.get_label(): line.get_ydata()[0] for line in ax.get_lines()}
    assert macro == {"macro precision 0.750": pytest.approx(0.75), "macro recall 0.667": pytest.approx(2 / 3)}


def test_figures_leave_pyplot_state_alone(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    figures = [plot_curves({"train/loss": [1.0]}), plot_confusion_matrix(np.eye(3)),
               plot_reliability([0.5, 0.9], [1, 0]), plot_per_class([1.0, 0.5], [0.5, 1.0])]
    for i, fig in enumerate(figures):
        plots.save_figure(fig, tmp_path / f"{i}.png")
    assert plt.get_fignums() == before  # nothing registered with pyplot: no leak, no window in a notebook
    assert all(type(fig.canvas).__name__ == "FigureCanvasAgg" for fig in figures)


# --------------------------------------------------------------------------------------- callback
def _labelled_problem(kind: str = "ignore_index") -> tuple[TensorDataModule, torch.Tensor, torch.Tensor]:
    """120 rows, 4 classes; the test split's labels, with every fifth row unlabeled for ``"ignore_index"``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 5, generator=g)
    y = torch.randint(0, 4, (120,), generator=g)
    target = y.clone()
    if kind == "soft":
        target = torch.full((120, 4), 0.1)
        target[torch.arange(120), y] = 0.7
    elif kind == "ignore_index":
        target[::5] = IGNORE
    dm = TensorDataModule(x, target, class_names=["ant", "bee", "cow", "doe"], batch_size=16, val_fraction=0.2,
                          test_fraction=0.5, standardize=False)
    dm.setup()
    x_test, y_test = dm.test_dataset.x, dm.test_dataset.y
    return dm, x_test, y_test.argmax(dim=1) if kind == "soft" else y_test


@pytest.mark.parametrize(("kind", "ignored"), [("ignore_index", IGNORE), ("soft", None), ("plain", 3)])
def test_callback_test_figures_use_every_labelled_test_row(tmp_path, monkeypatch, recwarn, kind, ignored):
    dm, x_test, hard = _labelled_problem(kind)
    torch.manual_seed(0)
    module = XentModule(MLP(5, 4, hidden_sizes=[16]))
    seen = {}
    original = plots.plot_confusion_matrix

    def spy(matrix, class_names=None, **kwargs):
        seen["names"] = class_names
        return original(matrix, class_names, **kwargs)

    monkeypatch.setattr(plots, "plot_confusion_matrix", spy)
    # "plain": the callback's own ignore index (3, a real class here) overrides the module's
    callback = PlotCallback(ignore_index=3) if kind == "plain" else PlotCallback()
    [metrics] = _trainer(tmp_path, callbacks=[callback]).test(module, datamodule=dm, verbose=False)

    keep = (hard != ignored).numpy() if ignored is not None else np.ones(len(hard), dtype=bool)
    assert 0 < keep.sum() < len(keep) or kind == "soft"
    confidence, pred = _predictions(module, x_test)
    labels, pred, confidence = hard.numpy()[keep], pred[keep], confidence[keep]
    results = callback.test_results
    np.testing.assert_array_equal(results["confusion_matrix"], confusion_matrix(labels, pred, labels=range(4)))
    np.testing.assert_allclose(results["confidences"], confidence, rtol=1e-6)
    present = np.isin(np.arange(4), pred)
    np.testing.assert_allclose(results["precision"][present],
                               precision_score(labels, pred, labels=range(4), average=None, zero_division=0)[present])
    assert np.isnan(results["precision"][~present]).all()  # never predicted: undefined, not 0
    has_support = np.isin(np.arange(4), labels)
    np.testing.assert_allclose(results["recall"][has_support],
                               recall_score(labels, pred, labels=range(4), average=None, zero_division=0)[has_support])
    assert np.isnan(results["recall"][~has_support]).all()
    if kind != "plain":
        assert results["ece"] == pytest.approx(metrics["test/ece"], abs=1e-5)
    assert seen["names"] == ["ant", "bee", "cow", "doe"]  # from the datamodule
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(
        f"{n}.png" for n in FIGURES if n != "curves")  # no fit: no curves
    assert not [w for w in recwarn if "PlotCallback" in str(w.message)]


def test_callback_warns_and_draws_nothing_when_test_step_returns_no_logits(tmp_path):
    class LossOnly(XentModule):
        def test_step(self, batch, batch_idx):
            return super().test_step(batch, batch_idx)["mean"]

    dm, _, _ = _labelled_problem()
    callback = PlotCallback()
    with pytest.warns(UserWarning, match="must return a mapping with 'logits'"):
        _trainer(tmp_path, callbacks=[callback]).test(LossOnly(MLP(5, 4)), datamodule=dm, verbose=False)
    assert callback.test_results is None
    assert not (tmp_path / "plots").exists()


def _png_shape(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    height, width, _ = imread(path).shape  # a full decode: the file is complete
    return height, width


def test_real_training_run_writes_four_pngs_and_tensorboard_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64)
    module = XentModule(MLP(dm.num_features, dm.num_classes, hidden_sizes=[32]))
    callback = PlotCallback()
    loggers = [TensorBoardLogger(tmp_path, name="tensorboard", version=""),
               CSVLogger(tmp_path, name="csv", version="")]
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[callback], logger=loggers, log_every_n_steps=5)
    trainer.fit(module, datamodule=dm)
    assert (tmp_path / "plots" / "curves.png").exists()  # written at the end of fit already
    [metrics] = trainer.test(module, datamodule=dm, verbose=False)

    for name in FIGURES:
        height, width = _png_shape(tmp_path / "plots" / f"{name}.png")
        assert 400 <= height <= 2000 and 600 <= width <= 2500, (name, height, width)

    # the curves are the epoch metrics the CSV logger wrote
    import pandas as pd

    log = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        per_epoch = log.dropna(subset=[key]).groupby("epoch")[key].last()
        np.testing.assert_allclose(callback.history[key], per_epoch.to_numpy(), rtol=1e-6)
        assert callback.epochs[key] == [1.0, 2.0]

    # the test figures cover the whole test split, and their ECE is the logged one
    results = callback.test_results
    assert results["confusion_matrix"].sum() == len(dm.test_dataset) == 270
    _, pred = _predictions(module, dm.test_dataset.x)
    np.testing.assert_array_equal(results["confusion_matrix"],
                                  confusion_matrix(dm.test_dataset.y.numpy(), pred, labels=range(10)))
    assert results["ece"] == pytest.approx(metrics["test/ece"], abs=1e-5)

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {f"plots/{name}" for name in FIGURES} <= set(events.Tags()["images"])
    for name in FIGURES:
        image = events.Images(f"plots/{name}")[-1]
        assert image.width >= 600 and image.height >= 400
        assert image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"


def test_resumed_run_keeps_the_whole_curve_history(tmp_path):
    dm, _, _ = _labelled_problem()
    kwargs = dict(callbacks=[PlotCallback()], enable_checkpointing=True, num_sanity_val_steps=0)
    torch.manual_seed(0)
    _trainer(tmp_path, max_epochs=2, **kwargs).fit(XentModule(MLP(5, 4)), datamodule=dm)
    [checkpoint] = tmp_path.rglob("*.ckpt")

    resumed = PlotCallback()
    trainer = _trainer(tmp_path, max_epochs=3, **{**kwargs, "callbacks": [resumed]})
    trainer.fit(XentModule(MLP(5, 4)), datamodule=dm, ckpt_path=checkpoint)
    for key in ("train/loss", "val/loss", "train/acc", "val/acc"):
        assert resumed.epochs[key] == [1.0, 2.0, 3.0], key
        assert len(resumed.history[key]) == 3


def test_curves_place_validation_points_at_the_epochs_they_ran(tmp_path):
    dm, _, _ = _labelled_problem()  # 36 training rows: 3 batches of 16
    every_other = PlotCallback()
    _trainer(tmp_path, max_epochs=4, check_val_every_n_epoch=2, callbacks=[every_other]).fit(
        XentModule(MLP(5, 4)), datamodule=dm)
    assert every_other.epochs["train/loss"] == [1.0, 2.0, 3.0, 4.0]
    assert every_other.epochs["val/loss"] == [2.0, 4.0]  # no stale repeats in between

    within = PlotCallback()
    _trainer(tmp_path, max_epochs=2, val_check_interval=0.5, callbacks=[within]).fit(  # every int(3 * 0.5) batch
        XentModule(MLP(5, 4)), datamodule=dm)
    assert within.epochs["val/acc"] == pytest.approx([1 / 3, 2 / 3, 1.0, 4 / 3, 5 / 3, 2.0])
    assert within.epochs["train/acc"] == [1.0, 2.0]


# -------------------------------------------------------------------------------------------- DDP
DDP_SCRIPT = textwrap.dedent('''
    """Rank r runs trainer.test under 2-process DDP and writes rank{r}.json; Lightning re-runs this for rank 1."""
    import json, sys
    import lightning.pytorch as pl
    import torch
    from xentlit import MLP, TensorDataModule, XentModule
    from xentlit.plots import PlotCallback

    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(103, 5, generator=g)
        y = torch.randint(0, 4, (103,), generator=g)
        y[torch.arange(0, 40, 3)] = -100  # unlabeled rows, unevenly spread over the ranks
        dm = TensorDataModule(x, y, batch_size=8, val_fraction=0.0, test_fraction=0.5, standardize=False)
        torch.manual_seed(1)
        return dm, XentModule(MLP(5, 4, hidden_sizes=[16]))

    if __name__ == "__main__":
        out = sys.argv[1]
        dm, module = make()
        callback = PlotCallback()
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
                             callbacks=[callback])
        [metrics] = trainer.test(module, datamodule=dm, verbose=False)
        r = callback.test_results
        summary = {"world_size": trainer.world_size, "has_results": r is not None, "ece_logged": metrics["test/ece"]}
        if r is not None:
            summary.update(matrix=r["confusion_matrix"].tolist(), ece=r["ece"])
        with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
            json.dump(summary, f)
''')


@pytest.mark.slow
def test_ddp_gathers_test_predictions_from_all_ranks_and_only_rank_zero_draws(tmp_path):
    script = tmp_path / "ddp_plots.py"
    script.write_text(DDP_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0["world_size"] == 2 and rank0["has_results"] and not rank1["has_results"]

    sys.path.insert(0, str(tmp_path))
    try:
        import ddp_plots
    finally:
        sys.path.remove(str(tmp_path))
    dm, module = ddp_plots.make()
    dm.setup()
    keep = dm.test_dataset.y != IGNORE
    _, pred = _predictions(module, dm.test_dataset.x[keep])
    expected = confusion_matrix(dm.test_dataset.y[keep].numpy(), pred, labels=range(4))
    assert expected.sum() > 40
    np.testing.assert_array_equal(rank0["matrix"], expected)  # every labelled row once, from both ranks
    assert rank0["ece"] == pytest.approx(rank0["ece_logged"], abs=1e-5)
    for name in ("confusion_matrix", "reliability", "per_class"):
        _png_shape(tmp_path / "plots" / f"{name}.png")
