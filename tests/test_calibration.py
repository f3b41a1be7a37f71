"""Post-hoc tools (xentlit.calibration): temperature and vector scaling, logit adjustment and the calibration
metrics, against hand formulas in float64."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from xentlit.calibration import (
    Calibrator,
    adjust_logits,
    calibration_metrics,
    fit_temperature,
    fit_vector_scaling,
    log_priors,
)


def sampled(n=20000, c=6, seed=0):
    """Logits and labels drawn from softmax(logits): temperature 1 is the truth."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    y = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    return z, y


@pytest.mark.parametrize("true_t", [0.5, 3.0])
def test_temperature_recovers_a_known_temperature_and_is_the_nll_minimum(true_t):
    z, y = sampled()
    logits = z * true_t  # the model is overconfident (3.0) or underconfident (0.5) by this factor
    t = fit_temperature(logits, y)
    assert t == pytest.approx(true_t, rel=0.03)
    nll = lambda temp: float(F.cross_entropy(logits / temp, y))  # noqa: E731
    assert nll(t) <= min(nll(t * 1.01), nll(t / 1.01))
    # first-order condition by hand: d NLL / d(1/T) = mean(E_p[z] - z_y) = 0 at the optimum
    p = (logits / t).softmax(1)
    gradient = ((p * logits).sum(1) - logits.gather(1, y[:, None]).squeeze(1)).mean()
    assert abs(float(gradient)) < 1e-6


def test_calibration_keeps_the_predicted_classes_and_lowers_nll_and_ece():
    z, y = sampled(seed=1)
    logits = z * 3.0
    calibrator = Calibrator("temperature").fit(logits, y)
    calibrated = calibrator(logits)
    assert torch.equal(calibrated.argmax(1), logits.argmax(1))
    before, after = calibration_metrics(logits, y), calibration_metrics(calibrated, y)
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"] / 5 and after["brier"] < before["brier"]


def test_vector_scaling_fits_per_class_scales_at_least_as_well_as_one_temperature():
    z, y = sampled(seed=2, c=4)
    logits = z * torch.tensor([3.0, 1.0, 0.5, 2.0], dtype=torch.float64)
    scale, bias = fit_vector_scaling(logits, y)
    torch.testing.assert_close(scale, torch.tensor([1 / 3, 1.0, 2.0, 0.5], dtype=torch.float64), rtol=0.1, atol=0.05)
    t = fit_temperature(logits, y)
    assert F.cross_entropy(logits * scale + bias, y) < F.cross_entropy(logits / t, y)
    calibrator = Calibrator("vector").fit(logits, y)
    torch.testing.assert_close(calibrator(logits), logits * scale + bias)


def test_ignored_rows_are_left_out_and_no_labelled_rows_is_an_error():
    z, y = sampled(n=2000, seed=3)
    y_ignored = y.clone()
    y_ignored[::3] = -100
    keep = y_ignored != -100
    assert fit_temperature(z * 2, y_ignored) == pytest.approx(fit_temperature(z[keep] * 2, y[keep]), rel=1e-9)
    assert calibration_metrics(z, y_ignored) == pytest.approx(calibration_metrics(z[keep], y[keep]))
    with pytest.raises(ValueError, match="needs labelled validation rows"):
        fit_temperature(z[:3], torch.full((3,), -100))
    with pytest.raises(ValueError, match="calibration method must be one of"):
        Calibrator("platt")


def test_an_ignore_index_inside_the_class_range_is_left_out_of_every_fit_and_metric():
    """ignore_index=1 is also a class: its rows are dropped (not rows with negative labels, not only -100)."""
    z, y = sampled(n=2000, seed=6)
    logits, keep = z * 2, y != 1
    assert fit_temperature(logits, y, ignore_index=1) == pytest.approx(fit_temperature(logits[keep], y[keep]),
                                                                       rel=1e-9)
    torch.testing.assert_close(fit_vector_scaling(logits, y, ignore_index=1), fit_vector_scaling(logits[keep], y[keep]))
    assert calibration_metrics(logits, y, ignore_index=1) == pytest.approx(calibration_metrics(logits[keep], y[keep]))
    for method in ("temperature", "vector"):
        fitted = Calibrator(method).fit(logits, y, ignore_index=1)
        reference = Calibrator(method).fit(logits[keep], y[keep])
        torch.testing.assert_close(fitted(z), reference(z), msg=method)


def test_metrics_match_hand_formulas():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.3, 0.2], [-1.0, 3.0, 0.0], [0.0, 0.0, 4.0]], dtype=torch.float64)
    y = torch.tensor([0, 2, 0, 2])
    p = logits.softmax(1)
    nll = -sum(math.log(float(p[i, y[i]])) for i in range(4)) / 4
    brier = sum(float(((p[i] - F.one_hot(y[i], 3)) ** 2).sum()) for i in range(4)) / 4
    conf, pred = p.max(1)
    correct = (pred == y).double()
    ece = 0.0  # 2 bins: [0, 0.5], (0.5, 1]
    for lo, hi in [(0.0, 0.5), (0.5, 1.0)]:
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += float(in_bin.double().mean()) * abs(float(conf[in_bin].mean() - correct[in_bin].mean()))
    got = calibration_metrics(logits, y, n_bins=2)
    assert got == pytest.approx({"nll": nll, "ece": ece, "brier": brier}, rel=1e-6)


def test_metrics_of_logits_that_all_lie_in_zero_one_are_still_of_their_softmax():
    """torchmetrics reads inputs inside [0, 1] as probabilities: the ECE must be of softmax(logits) even when every
    logit happens to lie there (a barely trained model). Softmax ignores a shift, so the shifted logits agree."""
    g = torch.Generator().manual_seed(7)
    logits = torch.rand(300, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (300,), generator=g)
    assert calibration_metrics(logits, y, n_bins=5) == pytest.approx(calibration_metrics(logits + 5.0, y, n_bins=5),
                                                                     rel=1e-9)


def test_post_hoc_logit_adjustment_equals_the_hand_formula():
    counts = [50.0, 20.0, 0.0, 7.0]  # a zero count is clamped to 1, as for the training-time losses
    logits = torch.randn(5, 4, dtype=torch.float64)
    total = 50 + 20 + 1 + 7
    expected = logits - 1.5 * torch.log(torch.tensor([50 / total, 20 / total, 1 / total, 7 / total], dtype=torch.float64))
    torch.testing.assert_close(adjust_logits(logits, log_priors(counts), 1.5), expected)
    assert adjust_logits(logits, log_priors(counts), 0.0) is logits


@pytest.mark.parametrize("method", ["temperature", "vector"])
def test_a_fitted_calibrator_round_trips_through_a_plain_state_dict(method):
    z, y = sampled(n=3000, seed=4)
    fitted = Calibrator(method).fit(z * 2, y)
    buffer = io.BytesIO()
    torch.save(fitted.state_dict(), buffer)
    buffer.seek(0)
    fresh = Calibrator(method)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(fresh(z), fitted(z), rtol=0, atol=0)
    assert fresh.fitted and not torch.equal(fresh(z), z)


@pytest.mark.parametrize("method", ["none", "vector"])
def test_an_unfitted_calibrators_state_loads_unfitted(method):
    z, _ = sampled(n=50, seed=8)
    fresh = Calibrator(method)
    fresh.load_state_dict(Calibrator(method).state_dict())
    assert not fresh.fitted and torch.equal(fresh(z), z)


def test_a_checkpoint_from_before_calibration_loads_unfitted_and_casts_keep_float64():
    from xentlit import MLP, XentModule

    old = XentModule(MLP(4, 3, hidden_sizes=[8]))
    state = {k: v for k, v in old.state_dict().items() if not k.startswith("calibrator.")}
    fresh = XentModule(MLP(4, 3, hidden_sizes=[8]), calibration="temperature")
    fresh.load_state_dict(state)  # strict: the calibrator's keys may be missing
    assert not fresh.calibrator.fitted and float(fresh.calibrator.temperature) == 1.0
    z, y = sampled(n=500, c=3, seed=5)
    fresh.calibrator.fit(z * 2, y)
    fresh.to(torch.bfloat16)
    assert fresh.calibrator.temperature.dtype == torch.float64
    again = XentModule(MLP(4, 3, hidden_sizes=[8]), calibration="temperature")
    again.load_state_dict(fresh.state_dict())
    assert again.calibrator.fitted and float(again.calibrator.temperature) == float(fresh.calibrator.temperature)


def test_calibration_without_a_validation_split_is_refused_before_training(compose, tmp_path):
    from xentlit.cli import build

    cfg = compose("data.val_fraction=0")
    with pytest.raises(ValueError, match=r"calibration=temperature is fitted on the validation split, but "
                                         r"data.val_fraction=0 leaves none.*calibration=none"):
        build(cfg)
    ok = compose("data.val_fraction=0", "calibration=none", f"paths.output_dir={tmp_path}")
    assert build(ok)[1].calibrator.method == "none"  # without calibration the run may start


def test_an_unfitted_temperature_saved_and_reloaded_stays_unfitted():
    """A checkpoint written during training (before the post-hoc step) holds T = 1 unfitted: eval must not
    report it as a calibration."""
    saved = Calibrator("temperature").state_dict()
    fresh = Calibrator("temperature")
    fresh.load_state_dict(saved)
    assert not fresh.fitted
    z, y = sampled(n=500, c=3, seed=6)
    fitted = Calibrator("temperature").fit(z, y)
    fresh.load_state_dict(fitted.state_dict())
    assert fresh.fitted
