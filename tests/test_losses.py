"""Tests for xentlit.losses: numbers against torch and against hand-written formulas."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from xentlit.losses import (
    WEIGHT_STRATEGIES,
    CrossEntropyLoss,
    class_weights,
    cross_entropy,
)

C = 5
WEIGHTS = [0.5, 1.0, 2.0, 0.25, 1.5]
IGNORE = -100
TOL64 = dict(rtol=1e-10, atol=1e-10)


class GenericCE(CrossEntropyLoss):
    """Overrides the extension point with the base formula: forces the generic path."""

    def per_sample_loss(self, log_probs, target, weight):
        return super().per_sample_loss(log_probs, target, weight)


def make_inputs(spatial: bool, soft: bool, ignore_some: bool, seed: int = 0, n: int = 7):
    g = torch.Generator().manual_seed(seed)
    extra = (3,) if spatial else ()
    logits = (torch.randn((n, C, *extra), generator=g, dtype=torch.float64) * 2).requires_grad_()
    if soft:
        target = torch.softmax(torch.randn((n, C, *extra), generator=g, dtype=torch.float64) * 2, 1)
    else:
        target = torch.randint(0, C, (n, *extra), generator=g)
        if ignore_some:
            target.view(-1)[::3] = IGNORE  # some, never all, targets ignored
    return logits, target


def hand_loss(logits, target, weight, ignore_index, reduction, eps):
    """Cross-entropy written out: log-softmax then explicit per-row sums (independent of torch's
    cross_entropy and of the package)."""
    num_classes = logits.shape[1]
    lp = logits.log_softmax(1).movedim(1, -1).reshape(-1, num_classes)
    w = weight if weight is not None else [1.0] * num_classes
    out_shape = (logits.shape[0], *logits.shape[2:])
    per, denom = [], 0.0
    if target.is_floating_point():
        y = target.movedim(1, -1).reshape(-1, num_classes)
        for i in range(lp.shape[0]):
            row = 0
            for c in range(num_classes):
                row = row - w[c] * ((1 - eps) * y[i, c] + eps / num_classes) * lp[i, c]
            per.append(row)
        denom = float(lp.shape[0])
    else:
        ys = target.reshape(-1).tolist()
        for i, yi in enumerate(ys):
            if yi == ignore_index:
                per.append(lp[i, 0] * 0.0)
                continue
            smooth = sum(w[c] * lp[i, c] for c in range(num_classes))
            per.append(-(1 - eps) * w[yi] * lp[i, yi] - eps / num_classes * smooth)
            denom += w[yi]
    per = torch.stack(per) if per else lp.sum(1)
    if reduction == "none":
        return per.reshape(out_shape)
    return per.sum() if reduction == "sum" else per.sum() / denom


def value_and_grad(loss, logits, seed=1):
    """Loss value and d(loss . v)/d logits for a fixed random v (v = 1 for scalars)."""
    v = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=loss.dtype)
    (grad,) = torch.autograd.grad(loss, logits, grad_outputs=v if loss.dim() else None)
    return loss.detach(), grad


COMBOS = [
    (w, ign, red, ls, soft, spatial)
    for w, ign, red, ls, soft, spatial in itertools.product(
        [False, True], [False, True], ["mean", "sum", "none"], [0.0, 0.1, 0.3],
        [False, True], [False, True],
    )
    if not (soft and ign)  # ignore_index does not apply to probability targets
]


def combo_id(combo):
    w, ign, red, ls, soft, spatial = combo
    return (
        f"{'w' if w else 'now'}-{'ign' if ign else 'noign'}-{red}-ls{ls}-"
        f"{'soft' if soft else 'idx'}-{'NCd' if spatial else 'NC'}"
    )


@pytest.mark.parametrize("combo", COMBOS, ids=[combo_id(c) for c in COMBOS])
def test_every_option_matches_torch_and_hand_formula(combo):
    use_w, ignore_some, reduction, ls, soft, spatial = combo
    logits, target = make_inputs(spatial, soft, ignore_some)
    weight = torch.tensor(WEIGHTS, dtype=torch.float64) if use_w else None
    if ignore_some:
        assert (target == IGNORE).any() and (target != IGNORE).any()

    ours = CrossEntropyLoss(weight, IGNORE, reduction, ls)(logits, target)
    ref = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE,
                          reduction=reduction, label_smoothing=ls)
    hand = hand_loss(logits, target, WEIGHTS if use_w else None, IGNORE, reduction, ls)
    assert ours.dtype == torch.float64 and ours.shape == ref.shape == hand.shape

    v_ours, g_ours = value_and_grad(ours, logits)
    v_ref, g_ref = value_and_grad(ref, logits)
    v_hand, g_hand = value_and_grad(hand, logits)
    torch.testing.assert_close(v_ours, v_ref, **TOL64)
    torch.testing.assert_close(g_ours, g_ref, **TOL64)
    torch.testing.assert_close(v_ours, v_hand, **TOL64)
    torch.testing.assert_close(g_ours, g_hand, **TOL64)
    assert g_ours.abs().sum() > 0


@pytest.mark.parametrize("combo", COMBOS, ids=[combo_id(c) for c in COMBOS])
def test_generic_path_equals_fast_path(combo):
    use_w, ignore_some, reduction, ls, soft, spatial = combo
    logits, target = make_inputs(spatial, soft, ignore_some, seed=3)
    weight = torch.tensor(WEIGHTS, dtype=torch.float64) if use_w else None
    fast = CrossEntropyLoss(weight, IGNORE, reduction, ls)
    generic = GenericCE(weight, IGNORE, reduction, ls)
    assert fast._uses_fast_path() and not generic._uses_fast_path()
    v_f, g_f = value_and_grad(fast(logits, target), logits)
    v_g, g_g = value_and_grad(generic(logits, target), logits)
    torch.testing.assert_close(v_g, v_f, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_g, g_f, rtol=1e-12, atol=1e-12)
    s_f, d_f = fast.loss_terms(logits, target)
    s_g, d_g = generic.loss_terms(logits, target)
    torch.testing.assert_close(s_g, s_f, rtol=1e-12, atol=1e-12)
    assert d_g.item() == d_f.item()


def test_subclass_hook_is_what_runs():
    class Doubled(CrossEntropyLoss):
        seen: list = []

        def per_sample_loss(self, log_probs, target, weight):
            self.seen.append((log_probs.dtype, target.dtype, tuple(log_probs.shape)))
            return 2 * super().per_sample_loss(log_probs, target, weight)

    logits, target = make_inputs(False, False, True)
    for ls in (0.0, 0.2):
        base = CrossEntropyLoss(label_smoothing=ls)(logits, target)
        doubled = Doubled(label_smoothing=ls)(logits, target)
        torch.testing.assert_close(doubled, 2 * base, **TOL64)
    # indices without smoothing, smoothed probabilities with it
    assert Doubled.seen == [(torch.float64, torch.int64, (7, C)), (torch.float64, torch.float64, (7, C))]
    Doubled.seen.clear()
    Doubled()(logits.detach().bfloat16(), target)
    assert Doubled.seen[0][0] == torch.float32  # low-precision logits arrive as float32


def test_default_config_float32_bitwise_or_one_ulp():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(256, 10, generator=g) * 3).requires_grad_()
    t = torch.randint(0, 10, (256,), generator=g)
    ours = CrossEntropyLoss()(x, t)
    ref = F.cross_entropy(x, t)
    (g_ours,) = torch.autograd.grad(ours, x)
    (g_ref,) = torch.autograd.grad(ref, x)
    eps = torch.finfo(torch.float32).eps
    assert ours.dtype == torch.float32
    assert (ours - ref).abs() <= eps * ref.abs()
    assert ((g_ours - g_ref).abs() <= eps * g_ref.abs()).all()
    torch.testing.assert_close(ours, ref, rtol=eps, atol=0)
    torch.testing.assert_close(g_ours, g_ref, rtol=eps, atol=1e-12)


@pytest.mark.parametrize("spatial", [False, True])
def test_weighted_mean_is_torchs_bitwise_and_exactly_sum_over_denominator(spatial):
    """float32, class weights, some targets ignored: the mean and its gradient are torch's, bit for bit, on (N, C)
    logits (torch's own weight sum is the denominator there), and the mean is exactly loss_terms' sum over its
    denominator either way."""
    g = torch.Generator().manual_seed(2)
    extra = (3,) if spatial else ()
    x = (torch.randn(300, 37, *extra, generator=g) * 3).requires_grad_()
    t = torch.randint(0, 37, (300, *extra), generator=g)
    t.view(-1)[::7] = IGNORE
    w = torch.rand(37, generator=g) + 0.5
    loss = CrossEntropyLoss(w)
    mean = loss(x, t)
    loss_sum, denominator = loss.loss_terms(x, t)
    assert torch.equal(mean, loss_sum / denominator.item())
    (g_ours,) = torch.autograd.grad(mean, x)
    ref = F.cross_entropy(x, t, weight=w)
    (g_ref,) = torch.autograd.grad(ref, x)
    if not spatial:
        assert torch.equal(mean, ref) and torch.equal(g_ours, g_ref)
    torch.testing.assert_close(mean, ref, rtol=2e-7, atol=0)
    torch.testing.assert_close(g_ours, g_ref, rtol=2e-7, atol=1e-12)


def test_mean_whose_targets_all_weigh_zero_is_zero_with_zero_grad():
    logits = torch.randn(3, 3, requires_grad=True)
    for target in (torch.zeros(3, dtype=torch.long), torch.tensor([0, IGNORE, 0])):
        loss = CrossEntropyLoss([0.0, 1.0, 1.0])(logits, target)
        assert torch.isnan(F.cross_entropy(logits, target, weight=torch.tensor([0.0, 1.0, 1.0])))
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("kwargs", [{}, dict(class_weights=WEIGHTS, label_smoothing=0.2), dict(z_loss=0.05)])
def test_probability_targets_twice_differentiable_retained_graph_and_target_gradient(kwargs):
    """The fused path of probability targets: double backward (create_graph), a second backward through a retained
    graph, no gradient work under no_grad; and targets that require grad get torch's gradient (torch's path)."""
    logits, target = make_inputs(False, True, False, seed=4, n=5)
    loss = CrossEntropyLoss(**kwargs, reduction="none")
    assert torch.autograd.gradgradcheck(lambda x: loss(x, target), (logits,))
    out = loss(logits, target).sum()
    (first,) = torch.autograd.grad(out, logits, retain_graph=True)
    (second,) = torch.autograd.grad(out, logits)
    torch.testing.assert_close(first, second, rtol=1e-14, atol=1e-14)
    with torch.no_grad():
        quiet = loss(logits, target)
    assert quiet.grad_fn is None
    torch.testing.assert_close(quiet, loss(logits, target).detach(), rtol=0, atol=0)
    if kwargs.get("z_loss"):
        return
    soft = target.clone().requires_grad_()
    weight = None if "class_weights" not in kwargs else torch.tensor(WEIGHTS, dtype=torch.float64)
    ref = F.cross_entropy(logits, soft, weight=weight, label_smoothing=kwargs.get("label_smoothing", 0.0))
    ours = CrossEntropyLoss(**kwargs)(logits, soft)
    torch.testing.assert_close(ours, ref, **TOL64)
    grads = torch.autograd.grad(ours, (logits, soft))
    for got, want in zip(grads, torch.autograd.grad(ref, (logits, soft))):
        torch.testing.assert_close(got, want, **TOL64)


def test_probability_targets_are_checked_in_every_row():
    logits, target = make_inputs(False, True, False, seed=5)
    for loss in (CrossEntropyLoss(), CrossEntropyLoss(WEIGHTS), cross_entropy):
        loss(logits, target)
        negative = target.clone()
        negative[6] = torch.tensor([0.5, 0.6, -0.1, 0.0, 0.0])
        with pytest.raises(ValueError, match=r"1 entries are negative \(most negative -0\.1\)"):
            loss(logits, negative)
        bad_sums = target.clone()
        bad_sums[4:] *= 1.5
        with pytest.raises(ValueError, match=r"3 of 7 rows do not; worst row sum is 1\.5"):
            loss(logits, bad_sums)
    # one row of many just past the tolerance (1e-3): the worst row is checked, not an average over rows
    many_logits, many = make_inputs(False, True, False, seed=6, n=40)
    many[17] *= 1.002
    for loss in (CrossEntropyLoss(), CrossEntropyLoss(WEIGHTS), GenericCE(), cross_entropy):
        with pytest.raises(ValueError, match=r"1 of 40 rows do not; worst row sum is 1\.002"):
            loss(many_logits, many)


def test_ignore_index_inside_class_range():
    logits, _ = make_inputs(False, False, False)
    target = torch.tensor([0, 2, 2, 1, 4, 3, 2])
    for red in ("mean", "sum", "none"):
        ours = CrossEntropyLoss(WEIGHTS, ignore_index=2, reduction=red, label_smoothing=0.1)
        ref = F.cross_entropy(logits, target, weight=torch.tensor(WEIGHTS, dtype=torch.float64),
                              ignore_index=2, reduction=red, label_smoothing=0.1)
        torch.testing.assert_close(ours(logits, target), ref, **TOL64)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_any_integer_target_dtype(dtype):
    logits, target = make_inputs(False, False, False)
    ref = F.cross_entropy(logits, target)
    torch.testing.assert_close(CrossEntropyLoss()(logits, target.to(dtype)), ref, **TOL64)


# ---- all ignored, loss_terms, denominators -------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weights", [None, WEIGHTS])
@pytest.mark.parametrize("ls", [0.0, 0.2])
@pytest.mark.parametrize("loss_cls", [CrossEntropyLoss, GenericCE])
@pytest.mark.parametrize("validate", [True, False])
def test_all_ignored_is_zero_with_zero_grad(reduction, weights, ls, loss_cls, validate):
    """With validation the sync's denominator decides; without, the safe mean (0 / 0 := 0) does."""
    logits = torch.randn(4, C, dtype=torch.float64, requires_grad=True)
    target = torch.full((4,), IGNORE)
    loss = loss_cls(weights, reduction=reduction, label_smoothing=ls, validate=validate)(logits, target)
    assert torch.isnan(F.cross_entropy(logits, target)) or reduction == "sum"  # torch: nan mean
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_empty_batch_is_zero():
    for target in (torch.zeros(0, dtype=torch.long), torch.zeros(0, C)):
        logits = torch.randn(0, C, requires_grad=True)
        loss = CrossEntropyLoss()(logits, target)
        assert loss.item() == 0.0
        assert CrossEntropyLoss().loss_terms(logits, target)[1].item() == 0.0


def test_zero_weight_sum_with_smoothing_is_zero_not_inf():
    # every target's class has weight 0: torch gives nan; we treat the batch as empty
    logits = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    target = torch.zeros(3, dtype=torch.long)
    loss = CrossEntropyLoss([0.0, 1.0, 1.0], label_smoothing=0.1)(logits, target)
    assert not torch.isfinite(F.cross_entropy(logits, target, weight=torch.tensor(
        [0.0, 1.0, 1.0], dtype=torch.float64), label_smoothing=0.1))
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_loss_terms_denominators_against_hand_values():
    logits = torch.randn(5, C, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 2, IGNORE, 2, 4])

    loss_sum, denom = CrossEntropyLoss(WEIGHTS).loss_terms(logits, target)
    assert denom.item() == 0.5 + 2.0 + 2.0 + 1.5
    assert not denom.requires_grad and denom.dim() == 0 and denom.dtype == torch.float64
    w64 = torch.tensor(WEIGHTS, dtype=torch.float64)
    torch.testing.assert_close(
        loss_sum, F.cross_entropy(logits, target, weight=w64, reduction="sum"), **TOL64
    )
    assert loss_sum.requires_grad

    _, denom = CrossEntropyLoss().loss_terms(logits, target)
    assert denom.item() == 4.0
    _, denom = CrossEntropyLoss(WEIGHTS).loss_terms(logits, torch.full((5,), IGNORE))
    assert denom.item() == 0.0

    soft = torch.softmax(torch.randn(5, C, 3, dtype=torch.float64), 1)
    _, denom = CrossEntropyLoss(WEIGHTS).loss_terms(torch.randn(5, C, 3, dtype=torch.float64), soft)
    assert denom.item() == 15.0  # rows x spatial, whatever the weights

    seg_target = torch.tensor([[0, IGNORE], [4, 4]])
    _, denom = CrossEntropyLoss(WEIGHTS).loss_terms(torch.randn(2, C, 2), seg_target)
    assert denom.item() == 0.5 + 1.5 + 1.5 and denom.dtype == torch.float32


def test_mean_is_sum_over_denominator_and_denominator_can_be_substituted():
    logits = torch.randn(6, C, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, IGNORE, 3, 4, 4])
    loss = CrossEntropyLoss(WEIGHTS, label_smoothing=0.1)
    loss_sum, denom = loss.loss_terms(logits, target)
    mean = loss(logits, target)
    torch.testing.assert_close(mean, loss_sum / denom, rtol=0, atol=0)
    # a distributed caller dividing by a global denominator (here: 3x the local one)
    global_denom = 3 * denom
    scaled = loss_sum / global_denom
    torch.testing.assert_close(scaled, mean / 3, **TOL64)
    (g_scaled,) = torch.autograd.grad(scaled, logits, retain_graph=True)
    (g_mean,) = torch.autograd.grad(mean, logits)
    torch.testing.assert_close(g_scaled, g_mean / 3, **TOL64)


# ---- class weights -------------------------------------------------------------------------


def test_class_weight_strategies_hand_values():
    counts = [10, 30, 60]
    torch.testing.assert_close(
        class_weights(counts, "balanced"),
        torch.tensor([100 / 30, 100 / 90, 100 / 180], dtype=torch.float32),
    )
    inv = [1 / math.sqrt(c) for c in counts]
    torch.testing.assert_close(
        class_weights(torch.tensor(counts), "inverse_sqrt"),
        torch.tensor([3 * v / sum(inv) for v in inv], dtype=torch.float32),
    )
    eff = [(1 - 0.9) / (1 - 0.9**c) for c in counts]
    got = class_weights(counts, "effective_number", beta=0.9)
    torch.testing.assert_close(got, torch.tensor([3 * v / sum(eff) for v in eff]))
    assert got.dtype == torch.float32 and got.shape == (3,)
    assert abs(got.sum().item() - 3.0) < 1e-6
    torch.testing.assert_close(class_weights(counts, "effective_number", beta=0.0), torch.ones(3))


@pytest.mark.parametrize("strategy", WEIGHT_STRATEGIES)
def test_zero_count_gets_weight_of_count_one(strategy):
    with_zero = class_weights([0, 5, 20], strategy)
    with_one = class_weights([1, 5, 20], strategy)
    assert torch.isfinite(with_zero).all()
    torch.testing.assert_close(with_zero, with_one, rtol=0, atol=0)
    assert with_zero[0] == with_zero.max()
    assert torch.isfinite(class_weights([0, 0], strategy)).all()


def test_balanced_zero_count_hand_value():
    # counts clamped to [1, 5] first: n = 6, C = 2
    torch.testing.assert_close(class_weights([0, 5], "balanced"), torch.tensor([3.0, 0.6]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(counts=[1, 2], strategy="bogus"), r"'bogus'.*balanced"),
        (dict(counts=[1, 2], strategy="effective_number", beta=1.0), r"beta.*1\.0"),
        (dict(counts=[1, 2], strategy="effective_number", beta=-0.5), r"-0\.5"),
        (dict(counts=[4, -3, 2], strategy="balanced"), r"-3"),
        (dict(counts=[[1, 2], [3, 4]], strategy="balanced"), r"\[\[1, 2\], \[3, 4\]\]"),
        (dict(counts=torch.ones(2, 2), strategy="balanced"), r"\(2, 2\)"),
        (dict(counts=[], strategy="balanced"), r"empty"),
        (dict(counts=[1.0, float("nan")], strategy="balanced"), r"nan"),
    ],
)
def test_class_weights_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        class_weights(**kwargs)


def test_pending_strategy_then_set_class_counts():
    logits = torch.randn(6, 3, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 2, 1, 2])
    loss = CrossEntropyLoss("balanced", label_smoothing=0.1)
    assert loss.needs_class_counts and loss.class_weights == "balanced"
    assert loss.weight is not None and loss.weight.shape == (0,)
    with pytest.raises(RuntimeError, match="set_class_counts"):
        loss(logits, target)
    counts = [5, 20, 75]
    loss.set_class_counts(counts)
    assert not loss.needs_class_counts
    expected_w = class_weights(counts, "balanced")
    assert torch.equal(loss.weight, expected_w)
    explicit = CrossEntropyLoss(expected_w, label_smoothing=0.1)
    torch.testing.assert_close(loss(logits, target), explicit(logits, target), rtol=0, atol=0)
    torch.testing.assert_close(
        loss(logits, target),
        F.cross_entropy(logits, target, weight=expected_w.double(), label_smoothing=0.1),
        **TOL64,
    )
    assert loss.class_weights == "balanced"  # the option, not the computed weights
    assert not CrossEntropyLoss().needs_class_counts and CrossEntropyLoss().class_weights is None
    assert CrossEntropyLoss([1.0, 2.0]).class_weights.tolist() == [1.0, 2.0]
    with pytest.raises(RuntimeError, match="strategy"):
        CrossEntropyLoss().set_class_counts(counts)


def test_state_dict_round_trip_into_fresh_pending_loss():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.loss = CrossEntropyLoss("effective_number", beta=0.99)

    trained = Model()
    trained.loss.set_class_counts([3, 50, 400])
    state = trained.state_dict()
    assert state["loss.weight"].shape == (3,)

    fresh = Model()
    assert fresh.loss.needs_class_counts
    fresh.load_state_dict(state)
    assert not fresh.loss.needs_class_counts
    assert torch.equal(fresh.loss.weight, trained.loss.weight)
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert torch.equal(fresh.loss(logits, target), trained.loss(logits, target))

    # explicit weights round trip too, and a weightless loss has no weight entry
    explicit = CrossEntropyLoss([1.0, 2.0, 3.0])
    other = CrossEntropyLoss([0.0, 0.0, 1.0])
    other.load_state_dict(explicit.state_dict())
    assert other.weight.tolist() == [1.0, 2.0, 3.0]
    assert "weight" not in CrossEntropyLoss().state_dict()


def test_module_dtype_cast_keeps_weights_exact():
    weights = [1 / 3, 2 / 3, 1.0]
    loss = CrossEntropyLoss(weights).to(torch.bfloat16)
    assert loss.weight.dtype == torch.float32
    torch.testing.assert_close(loss.weight, torch.tensor(weights), rtol=0, atol=0)
    assert CrossEntropyLoss(weights).half().weight.dtype == torch.float32


# ---- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(label_smoothing=1.5), r"label_smoothing must be in \[0, 1\), got 1\.5"),
        (dict(label_smoothing=-0.1), r"-0\.1"),
        (dict(label_smoothing="lots"), r"'lots'"),
        (dict(reduction="avg"), r"one of \('mean', 'sum', 'none'\), got 'avg'"),
        (dict(beta=1.0), r"beta must be in \[0, 1\), got 1\.0"),
        (dict(class_weights="bogus"), r"'bogus'.*effective_number"),
        (dict(class_weights=[1.0, -2.0, 3.0]), r"-2\.0"),
        (dict(class_weights=[0.0, 0.0]), r"all zero.*\[0\.0, 0\.0\]"),
        (dict(class_weights=[1.0, float("inf")]), r"inf"),
        (dict(class_weights=torch.ones(2, 3)), r"\(2, 3\)"),
        (dict(class_weights=[]), r"empty"),
        (dict(class_weights=3), r"3"),
        (dict(ignore_index=1.5), r"1\.5"),
    ],
)
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CrossEntropyLoss(**kwargs)


def _nan_logits():
    x = torch.randn(4, C)
    x[1, 2] = float("nan")
    x[3, 0] = float("inf")
    return x


@pytest.mark.parametrize(
    ("logits", "target", "kwargs", "match"),
    [
        (torch.zeros(4, C, dtype=torch.long), torch.zeros(4, dtype=torch.long), {}, r"torch\.int64"),
        (torch.randn(C), torch.tensor(1), {}, r"\(5,\)"),
        (torch.randn(4, 0), torch.zeros(4, dtype=torch.long), {}, r"C >= 1.*\(4, 0\)"),
        (torch.randn(4, C), torch.zeros(3, dtype=torch.long), {}, r"N=4.*has 3"),
        (torch.randn(4, C), torch.rand(3, C).softmax(1), {}, r"N=4.*has 3"),
        (torch.randn(4, C, 2), torch.zeros(4, dtype=torch.long), {}, r"\(4, 2\).*got \(4,\)"),
        (torch.randn(4, C), torch.zeros(4, C, dtype=torch.long), {}, r"\(4,\).*one-hot"),
        (torch.randn(4, C), torch.tensor([0.0, 1.0, 2.0, 3.0]),
         {}, r"float targets must be probabilities.*\(4, 5\).*integer dtype"),
        (torch.randn(4, C), torch.zeros(4, dtype=torch.bool), {}, r"torch\.bool"),
        (torch.randn(4, C), torch.tensor([0, 7, -3, 1]), {}, r"smallest bad value -3.*largest bad value 7.*C=5"),
        (torch.randn(4, C), torch.tensor([0, 5, IGNORE, 1]), {}, r"1 class indices.*value 5.*C=5"),
        (torch.randn(4, C), torch.tensor([[0.2, 0.5, 0.5, 0.0, 0.0]] * 4) - torch.tensor([[0, 0, 0, 0.2, 0]]),
         {}, r"negative \(most negative -0\.2\)"),
        (torch.randn(4, C), torch.tensor([[0.1, 0.1, 0.1, 0.1, 0.1]] * 4),
         {}, r"worst row sum is 0\.5"),
        (torch.randn(4, C), torch.full((4, C), float("nan")), {}, r"worst row sum is nan"),
        (torch.randn(4, C), torch.rand(4, C).softmax(1), dict(ignore_index=3), r"ignore_index=3"),
        (torch.randn(4, C), torch.rand(4, C).softmax(1), dict(ignore_index=0), r"ignore_index=0 is not supported"),
        (torch.randn(4, C), torch.zeros(4, dtype=torch.long), dict(class_weights=[1.0, 2.0, 3.0]),
         r"3 entries.*C=5"),
        (_nan_logits(), torch.zeros(4, dtype=torch.long), {}, r"2 non-finite.*learning rate"),
        ([[1.0, 2.0]], torch.zeros(1, dtype=torch.long), {}, r"list"),
    ],
)
def test_bad_forward_inputs(logits, target, kwargs, match):
    with pytest.raises(ValueError, match=match):
        CrossEntropyLoss(**kwargs)(logits, target)
    if isinstance(logits, torch.Tensor) and "class_weights" not in kwargs:
        with pytest.raises(ValueError, match=match):
            cross_entropy(logits, target, **kwargs)
        with pytest.raises(ValueError, match=match):
            GenericCE(**kwargs)(logits, target)


@pytest.mark.parametrize("sanitise", [False, True], ids=["cpu-kernels-check", "sanitised-as-off-cpu"])
@pytest.mark.parametrize("loss_cls", [CrossEntropyLoss, GenericCE])
def test_bad_class_indices_both_validation_paths(monkeypatch, sanitise, loss_cls):
    """On the CPU the kernels' own index errors are reworded; elsewhere targets are sanitised and checked in
    the sync. Forcing the second path on the CPU checks it gives the same errors and the same numbers."""
    if sanitise:
        monkeypatch.setattr(CrossEntropyLoss, "_index_checking_devices", ())
    logits, target = make_inputs(False, False, True)
    for kwargs in ({}, dict(class_weights=WEIGHTS, label_smoothing=0.1)):
        loss = loss_cls(**kwargs)
        for bad in (torch.tensor([0, 7, IGNORE, 1, 2, 3, 4]), torch.tensor([0, -3, IGNORE, 1, 2, 3, 4]),
                    torch.tensor([0, 5, IGNORE, 1, 2, 3, 4])):  # 5 = C: the first index past the end
            with pytest.raises(ValueError, match=r"1 class indices outside \[0, 5\).*value (7|-3|5)"):
                loss(logits, bad)
        ref = F.cross_entropy(logits, target, weight=None if not kwargs else torch.tensor(WEIGHTS).double(),
                              label_smoothing=kwargs.get("label_smoothing", 0.0))
        torch.testing.assert_close(loss(logits, target), ref, **TOL64)


def test_weights_are_checked_again_whenever_they_change_and_the_loss_still_pickles():
    import copy
    import pickle

    loss = CrossEntropyLoss([1.0, 1.0, 1.0])
    logits, target = torch.randn(2, 3), torch.tensor([0, 1])
    loss(logits, target)  # checked once, then remembered
    assert loss._weight_known_good(loss.weight)
    loss.weight.mul_(-1.0)  # in place: the version counter moves
    with pytest.raises(ValueError, match=r"-1\.0 for class 0"):
        loss(logits, target)
    loss.weight = torch.tensor([2.0, 1.0, 1.0])
    assert not loss._weight_known_good(loss.weight)
    expected = F.cross_entropy(logits, target, weight=torch.tensor([2.0, 1.0, 1.0]))
    torch.testing.assert_close(loss(logits, target), expected)
    for clone in (copy.deepcopy(loss), pickle.loads(pickle.dumps(loss))):
        torch.testing.assert_close(clone(logits, target), expected)


def test_bad_weights_reaching_forward_are_caught():
    loss = CrossEntropyLoss([1.0, 1.0, 1.0])
    loss.weight = torch.tensor([1.0, -1.0, 1.0])  # e.g. a tampered checkpoint
    with pytest.raises(ValueError, match=r"-1\.0 for class 1"):
        loss(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"nan for class 2"):
        cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]),
                      class_weights=torch.tensor([1.0, 1.0, float("nan")]))


def test_minus_inf_mask_allowed_unless_it_enters_the_loss():
    logits = torch.randn(3, 4)
    logits[:, 3] = float("-inf")  # class 3 masked out
    target = torch.tensor([0, 1, 2])
    torch.testing.assert_close(CrossEntropyLoss()(logits, target), F.cross_entropy(logits, target))
    with pytest.raises(ValueError, match=r"3 non-finite"):
        CrossEntropyLoss(label_smoothing=0.1)(logits, target)


def test_validate_false_skips_checks():
    out = CrossEntropyLoss(validate=False)(_nan_logits(), torch.zeros(4, dtype=torch.long))
    assert torch.isnan(out)
    # out-of-range targets reach torch, which raises its own (non-ValueError) error
    with pytest.raises((IndexError, RuntimeError)):
        CrossEntropyLoss(validate=False)(torch.randn(2, 3), torch.tensor([0, 9]))


class _SyncCounter:
    """Counts host-sync style reads of tensors (item, tolist, bool, int, float)."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def wrapper(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, wrapper)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_happy_path_reads_the_host_at_most_once(monkeypatch, soft, reduction):
    logits, target = make_inputs(True, soft, not soft)
    kwargs = dict(class_weights=WEIGHTS, reduction=reduction, label_smoothing=0.1)
    validated, unvalidated = CrossEntropyLoss(**kwargs), CrossEntropyLoss(**kwargs, validate=False)
    counter = _SyncCounter(monkeypatch)
    a = validated(logits, target)
    assert counter.count == 1
    b = unvalidated(logits, target)
    validated.loss_terms(logits, target)
    assert counter.count == 2
    monkeypatch.undo()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- dtypes, functional, repr --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("soft", [False, True])
def test_low_precision_logits_computed_in_float32(dtype, soft):
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(32, C, 2, generator=g) * 3
    target = (torch.randn(32, C, 2, generator=g).softmax(1) if soft
              else torch.randint(0, C, (32, 2), generator=g))
    xl = x32.to(dtype).requires_grad_()
    target_l = target.to(dtype) if soft else target
    loss = CrossEntropyLoss(WEIGHTS, label_smoothing=0.1)
    out = loss(xl, target_l)
    assert out.dtype == torch.float32
    # exactly the float32 computation on the rounded inputs ...
    # (validate=False: bf16-rounded rows sum to 1 only within bf16's epsilon, not float32's)
    plain = CrossEntropyLoss(WEIGHTS, label_smoothing=0.1, validate=False)
    rounded_target = target_l.float() if soft else target
    torch.testing.assert_close(out, plain(xl.detach().float(), rounded_target), rtol=0, atol=0)
    # ... and close to the float32 computation on the unrounded ones
    torch.testing.assert_close(out, loss(x32, target), rtol=2e-2, atol=1e-3)
    (grad,) = torch.autograd.grad(out, xl)
    assert grad.dtype == dtype and torch.isfinite(grad.float()).all()


def test_functional_matches_module_and_rejects_strategies():
    logits, target = make_inputs(True, False, True)
    w = torch.tensor(WEIGHTS, dtype=torch.float64)
    for red in ("mean", "sum", "none"):
        torch.testing.assert_close(
            cross_entropy(logits, target, w, IGNORE, red, 0.2),
            F.cross_entropy(logits, target, weight=w, reduction=red, label_smoothing=0.2),
            **TOL64,
        )
    assert cross_entropy(logits, torch.full_like(target, IGNORE), WEIGHTS).item() == 0.0
    with_z = cross_entropy(logits, target, w, IGNORE, "mean", 0.2, z_loss=0.05)
    torch.testing.assert_close(with_z, CrossEntropyLoss(w, IGNORE, "mean", 0.2, z_loss=0.05)(logits, target), **TOL64)
    assert not torch.allclose(with_z, cross_entropy(logits, target, w, IGNORE, "mean", 0.2))
    assert torch.isnan(cross_entropy(_nan_logits(), torch.zeros(4, dtype=torch.long), validate=False))
    with pytest.raises(ValueError, match=r"'balanced'"):
        cross_entropy(logits, target, "balanced")


def test_extra_repr_shows_options():
    text = repr(CrossEntropyLoss("effective_number", ignore_index=3, reduction="sum",
                                 label_smoothing=0.1, beta=0.9))
    for part in ("'effective_number' (pending)", "beta=0.9", "ignore_index=3",
                 "reduction='sum'", "label_smoothing=0.1", "validate=True"):
        assert part in text
    assert "class_weights=[0.5, 1.0, 2.0, 0.25, 1.5]" in repr(CrossEntropyLoss(WEIGHTS))
    assert "class_weights=None" in repr(CrossEntropyLoss(validate=False))
    assert "validate=False" in repr(CrossEntropyLoss(validate=False))


# ---- property test -------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 8),
    num_classes=st.integers(2, 6),
    smoothing=st.floats(0.0, 0.9),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    use_weights=st.booleans(),
    ignore_index=st.sampled_from([-100, -1, 0]),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.1, 20.0),
)
def test_property_matches_torch(data, n, num_classes, smoothing, reduction, use_weights,
                                ignore_index, seed, scale):
    classes = list(range(num_classes)) + [ignore_index]
    target = torch.tensor(data.draw(st.lists(st.sampled_from(classes), min_size=n, max_size=n)))
    weights = (
        data.draw(st.lists(st.floats(0.05, 5.0), min_size=num_classes, max_size=num_classes))
        if use_weights else None
    )
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, num_classes, generator=g, dtype=torch.float64) * scale)
    logits.requires_grad_()
    ours = CrossEntropyLoss(weights, ignore_index, reduction, smoothing)(logits, target)
    assert torch.isfinite(ours).all()
    if (target != ignore_index).any():
        # weights given as a list are stored as float32 (like class_weights' output)
        w = None if weights is None else torch.tensor(weights).double()
        ref = F.cross_entropy(logits, target, weight=w, ignore_index=ignore_index,
                              reduction=reduction, label_smoothing=smoothing)
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
        v_o, g_o = value_and_grad(ours, logits)
        v_r, g_r = value_and_grad(ref, logits)
        torch.testing.assert_close(g_o, g_r, rtol=1e-9, atol=1e-9)
    elif reduction != "none":
        assert ours.item() == 0.0
