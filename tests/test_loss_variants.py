"""Loss variants (focal, confidence penalty, logit adjustment, Poly-1, SCE, GCE, z-loss) against their papers'
formulas written out by hand in float64, their reductions to cross-entropy, their stable paths, their knobs, their
configs, the benchmark script and the comparison."""

from __future__ import annotations

import csv
import inspect
import math
import re

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import CONF, run_script
from xentlit import compare
from xentlit.losses import (
    LOSSES,
    ActivePassiveLoss,
    ConfidencePenaltyLoss,
    CrossEntropyLoss,
    FocalLoss,
    GeneralizedCrossEntropyLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    Poly1Loss,
    SymmetricCrossEntropyLoss,
    class_weights,
)

C = 5
WEIGHTS = [0.5, 1.0, 2.0, 0.25, 1.5]
ALPHA = [0.25, 1.0, 0.5, 2.0, 0.75]
COUNTS = [50.0, 20.0, 0.0, 7.0, 3.0]  # a zero count: priors clamp it to 1
IGNORE = -100
TOL = dict(rtol=1e-10, atol=1e-10)
VARIANTS = {
    "focal": FocalLoss,
    "confidence_penalty": ConfidencePenaltyLoss,
    "logit_adjusted": LogitAdjustedLoss,
    "poly1": Poly1Loss,
    "symmetric_ce": SymmetricCrossEntropyLoss,
    "generalized_ce": GeneralizedCrossEntropyLoss,
    "nce_rce": ActivePassiveLoss,
    "nfl_rce": ActivePassiveLoss,
    "ldam": LDAMLoss,
}


# ---- the papers' formulas, by hand ----------------------------------------------------------------------


def softmax_parts(z):
    """p, log p and log Z of one row of logits, written out (max-shifted)."""
    m = z.max()
    e = torch.exp(z - m)
    s = e.sum()
    return e / s, (z - m) - torch.log(s), m + torch.log(s)


def hand_row(name, knobs, z, t, w, z_weight):
    """One row's loss. z: (C,) logits; t: (C,) target distribution (one-hot, smoothed or soft); w: (C,) class
    weights (ones without); z_weight: the row weight the z-loss uses (w[y] for indices, sum w t for soft)."""
    p, lp, log_z = softmax_parts(z)
    row_w = (w * t).sum()
    ce = -(w * t * lp).sum()
    if name == "cross_entropy":
        loss = ce
    elif name == "focal":  # Lin et al.: -alpha_y (1 - p_y)^gamma log p_y
        a = torch.tensor(knobs["alpha"], dtype=z.dtype) if knobs.get("alpha") is not None else torch.ones_like(z)
        loss = -(a * w * t * (1 - p) ** knobs["gamma"] * lp).sum()
    elif name == "confidence_penalty":  # Pereyra et al.: CE - beta H(p)
        entropy = -(p * lp).sum()
        loss = ce - knobs["penalty"] * row_w * entropy
    elif name == "logit_adjusted":  # Menon et al.: CE of f + tau log pi
        counts = torch.tensor(COUNTS, dtype=torch.float64).clamp_min(1.0)
        log_prior = torch.log(counts / counts.sum()).float().to(z.dtype)  # stored as float32, as documented
        _, lp_adj, _ = softmax_parts(z + knobs["tau"] * log_prior)
        loss = -(w * t * lp_adj).sum()
    elif name == "poly1":  # Leng et al.: CE + epsilon (1 - p_t)
        loss = (w * t * (-lp + knobs["epsilon"] * (1 - p))).sum()
    elif name == "symmetric_ce":  # Wang et al.: alpha CE + beta RCE, RCE = -sum p log q, log 0 := A
        log_q = torch.log(torch.clamp(t, min=math.exp(knobs.get("log_zero", -4.0))))
        rce = -(p * log_q).sum()
        loss = knobs["sce_alpha"] * ce + knobs["sce_beta"] * row_w * rce
    elif name == "generalized_ce":  # Zhang & Sabuncu: (1 - p_y^q) / q
        y = int(t.argmax())
        loss = w[y] * (1 - p[y] ** knobs["q"]) / knobs["q"]
    elif name in ("nce_rce", "nfl_rce"):  # Ma et al.: alpha L(t) / sum_j L(j) + beta RCE, L(j) = -(1-p_j)^g log p_j
        active = -((1 - p) ** knobs.get("gamma", 0.0)) * lp
        log_q = torch.log(torch.clamp(t, min=1e-4))  # the authors' clamp: log 0 := log 1e-4
        rce = -(p * log_q).sum()
        loss = row_w * (knobs.get("apl_alpha", 1.0) * (t * active).sum() / active.sum()
                        + knobs.get("apl_beta", 1.0) * rce)
    elif name == "ldam":  # Cao et al.: -log softmax(s (z - m_y e_y))_y, m_c = max_m (n_min / n_c)^(1/4)
        counts = torch.tensor(COUNTS, dtype=torch.float64).clamp_min(1.0)
        margins = knobs.get("max_margin", 0.5) * counts ** -0.25 / (counts ** -0.25).max()
        margins = margins.float().to(z.dtype)  # stored as float32, as documented
        y = int(t.argmax())
        shifted = z - margins[y] * F.one_hot(torch.tensor(y), C).to(z.dtype)
        _, lp_m, _ = softmax_parts(knobs.get("scale", 1.0) * shifted)
        loss = -w[y] * lp_m[y]
    else:
        raise AssertionError(name)
    return loss + knobs.get("z_loss", 0.0) * z_weight * log_z**2


def hand_loss(name, knobs, logits, target, weights, reduction, smoothing):
    """The whole loss from hand_row: ignore, smoothing, reduction and the base class's mean denominators."""
    num_classes = logits.shape[1]
    z_rows = logits.movedim(1, -1).reshape(-1, num_classes)
    w = torch.tensor(weights if weights is not None else [1.0] * num_classes, dtype=logits.dtype)
    per, denominator = [], 0.0
    if target.is_floating_point():
        t_rows = target.movedim(1, -1).reshape(-1, num_classes)
        for z, t in zip(z_rows, t_rows):
            per.append(hand_row(name, knobs, z, t, w, (w * t).sum()))
        denominator = float(len(per))
    else:
        for z, y in zip(z_rows, target.reshape(-1).tolist()):
            if y == IGNORE:
                per.append(z.sum() * 0.0)
                continue
            t = torch.zeros(num_classes, dtype=logits.dtype)
            t[y] = 1.0
            t = t * (1 - smoothing) + smoothing / num_classes
            per.append(hand_row(name, knobs, z, t, w, w[y]))
            denominator += float(w[y])
    per = torch.stack(per)
    if reduction == "none":
        return per.reshape(logits.shape[0], *logits.shape[2:])
    return per.sum() if reduction == "sum" else per.sum() / denominator


def build(name, knobs, weights=None, reduction="mean", smoothing=0.0, **extra):
    cls = CrossEntropyLoss if name == "cross_entropy" else VARIANTS[name]
    loss = cls(class_weights=weights, reduction=reduction, label_smoothing=smoothing, **knobs, **extra)
    if isinstance(loss, (LogitAdjustedLoss, LDAMLoss)):
        loss.set_class_counts(COUNTS)
    return loss


def make_inputs(kind, ignore_some, spatial=False, seed=0, n=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    extra = (3,) if spatial else ()
    logits = (torch.randn((n, C, *extra), generator=g, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    if kind == "soft":
        target = torch.softmax(torch.randn((n, C, *extra), generator=g, dtype=torch.float64) * 2, 1).to(dtype)
        target[0] = 0.0  # one one-hot row: exercises log q = log 0 := A and p_c for t_c = 0
        target[0, 2] = 1.0
    else:
        target = torch.randint(0, C, (n, *extra), generator=g)
        if ignore_some:
            target.view(-1)[::3] = IGNORE
    return logits, target


def value_and_grad(loss, logits, seed=1):
    v = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=loss.dtype)
    (grad,) = torch.autograd.grad(loss, logits, grad_outputs=v if loss.dim() else None)
    return loss.detach(), grad


CASES = [
    ("focal", dict(gamma=2.0)),
    ("focal", dict(gamma=0.5, alpha=ALPHA)),
    ("focal", dict(gamma=3.0, alpha=ALPHA)),
    ("confidence_penalty", dict(penalty=0.3)),
    ("logit_adjusted", dict(tau=1.5)),
    ("poly1", dict(epsilon=2.0)),
    ("poly1", dict(epsilon=-0.5)),
    ("symmetric_ce", dict(sce_alpha=0.5, sce_beta=1.0)),
    ("symmetric_ce", dict(sce_alpha=0.1, sce_beta=2.0, log_zero=-9.21)),
    ("generalized_ce", dict(q=0.7)),
    ("generalized_ce", dict(q=0.2)),
    ("nce_rce", dict(apl_alpha=1.0, apl_beta=1.0)),
    ("nfl_rce", dict(gamma=0.5, apl_alpha=2.0, apl_beta=0.5)),
    ("ldam", dict(max_margin=0.5)),
    ("ldam", dict(max_margin=0.8, scale=3.0)),
    ("cross_entropy", dict(z_loss=0.05)),
]
COMBOS = [
    (use_w, ign, red, kind, z)
    for use_w in (False, True)
    for ign in (False, True)
    for red in ("mean", "sum", "none")
    for kind in ("index", "smoothed", "soft")
    for z in (0.0, 0.05)
    if not (kind == "soft" and ign)
]


def case_id(case):
    name, knobs = case
    return name + "-" + "-".join(f"{k}{'A' if k == 'alpha' else v}" for k, v in knobs.items())


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_value_and_gradient_match_the_paper_formula(case):
    """Every option (weights, ignore, reductions, indices / smoothed / probabilities, z-loss) against the paper's
    formula written out in float64: value and autograd's gradient."""
    name, knobs = case
    supports_soft = LOSSES[name].supports_soft_targets
    checked = 0
    for use_w, ignore_some, reduction, kind, z in COMBOS:
        if kind != "index" and not supports_soft:
            continue
        knobs_z = {**knobs, "z_loss": knobs.get("z_loss", z)}
        smoothing = 0.1 if kind == "smoothed" else 0.0
        logits, target = make_inputs("soft" if kind == "soft" else "index", ignore_some, seed=checked)
        weights = WEIGHTS if use_w else None
        loss = build(name, knobs_z, weights, reduction, smoothing)
        ours = loss(logits, target)
        hand = hand_loss(name, knobs_z, logits, target, weights, reduction, smoothing)
        assert ours.dtype == torch.float64 and ours.shape == hand.shape
        v_ours, g_ours = value_and_grad(ours, logits)
        v_hand, g_hand = value_and_grad(hand, logits)
        where = f"{name} {knobs_z} weights={use_w} ignore={ignore_some} {reduction} {kind}"
        torch.testing.assert_close(v_ours, v_hand, **TOL, msg=where)
        torch.testing.assert_close(g_ours, g_hand, **TOL, msg=where)
        assert g_ours.abs().sum() > 0
        checked += 1
    assert checked == (len(COMBOS) if supports_soft else len([c for c in COMBOS if c[3] == "index"]))


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_spatial_dims_and_loss_terms_split_exactly(case):
    """(N, C, d) inputs, and the (sum, denominator) split: summing the terms of two halves of a batch gives the
    full batch's mean and gradient exactly, as a DDP / gradient-accumulation caller does."""
    name, knobs = case
    knobs = {**knobs, "z_loss": knobs.get("z_loss", 0.02)}
    logits, target = make_inputs("index", True, spatial=True, seed=5, n=8)
    loss = build(name, knobs, WEIGHTS)
    hand = hand_loss(name, knobs, logits, target, WEIGHTS, "mean", 0.0)
    mean = loss(logits, target)
    torch.testing.assert_close(mean, hand, **TOL)
    s1, d1 = loss.loss_terms(logits[:3], target[:3])
    s2, d2 = loss.loss_terms(logits[3:], target[3:])
    _, d_ce = CrossEntropyLoss(WEIGHTS).loss_terms(logits, target)
    assert (d1 + d2).item() == d_ce.item() == pytest.approx(sum(WEIGHTS[y] for y in target.view(-1).tolist()
                                                               if y != IGNORE))
    split = (s1 + s2) / (d1 + d2)
    torch.testing.assert_close(split, mean, **TOL)
    torch.testing.assert_close(value_and_grad(split, logits)[1], value_and_grad(mean, logits)[1], **TOL)
    none = build(name, knobs, WEIGHTS, reduction="none")(logits, target)
    assert none.shape == (8, 3)
    assert (none[target == IGNORE] == 0).all()


# ---- reductions to cross-entropy ---------------------------------------------------------------------------

CE_PARAMETERS = inspect.signature(CrossEntropyLoss.__init__).parameters
CE_LIMITS = [
    ("focal", dict(gamma=0.0)),
    ("confidence_penalty", dict(penalty=0.0)),
    ("logit_adjusted", dict(tau=0.0)),
    ("poly1", dict(epsilon=0.0)),
    ("symmetric_ce", dict(sce_alpha=1.0, sce_beta=0.0)),
]


@pytest.mark.parametrize("case", CE_LIMITS, ids=[case_id(c) for c in CE_LIMITS])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_knob_at_zero_is_cross_entropy(case, reduction):
    name, knobs = case
    for kind, ignore_some, smoothing, use_w in [("index", True, 0.0, True), ("index", False, 0.2, False),
                                                ("index", True, 0.1, True), ("soft", False, 0.0, True)]:
        logits, target = make_inputs(kind, ignore_some, seed=11)
        weights = WEIGHTS if use_w else None
        loss = LOSSES[name](**knobs, class_weights=weights, reduction=reduction, label_smoothing=smoothing)
        assert not loss.needs_class_counts  # tau = 0 needs no priors
        ref = F.cross_entropy(logits, target, weight=None if weights is None else torch.tensor(weights).double(),
                              ignore_index=IGNORE, reduction=reduction, label_smoothing=smoothing)
        v, g = value_and_grad(loss(logits, target), logits)
        v_ref, g_ref = value_and_grad(ref, logits)
        torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_nfl_at_gamma_zero_is_nce_and_a_vanishing_ldam_margin_is_cross_entropy():
    logits, target = make_inputs("index", True, seed=12)
    nce = ActivePassiveLoss(apl_beta=0.0, class_weights=WEIGHTS, reduction="none")
    nfl = ActivePassiveLoss(gamma=1e-12, apl_beta=0.0, class_weights=WEIGHTS, reduction="none")
    torch.testing.assert_close(nfl(logits, target), nce(logits, target), rtol=1e-9, atol=1e-9)
    lp = logits.log_softmax(1)  # NCE = log p_y / sum_j log p_j, by hand
    by_hand = lp.gather(1, target.clamp_min(0)[:, None]).squeeze(1) / lp.sum(1)
    by_hand = torch.where(target != IGNORE, by_hand * torch.tensor(WEIGHTS, dtype=torch.float64)[target.clamp_min(0)], 0)
    torch.testing.assert_close(nce(logits, target), by_hand, **TOL)
    ldam = LDAMLoss(max_margin=1e-12, class_weights=WEIGHTS)
    ldam.set_class_counts(COUNTS)
    ce = F.cross_entropy(logits, target, weight=torch.tensor(WEIGHTS, dtype=torch.float64))
    torch.testing.assert_close(ldam(logits, target), ce, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_one_class_is_a_zero_loss_with_zero_gradient_labelled_or_ignored(name):
    """C = 1: every loss is 0 (NCE's normaliser sum_j L(p, j) is 0 there: 0 / 0 must not become a NaN value or a
    NaN gradient through a masked-out ignored row)."""
    for target in (torch.tensor([IGNORE]), torch.tensor([0, IGNORE]), torch.tensor([0, 0])):
        logits = torch.randn(len(target), 1, dtype=torch.float64, requires_grad=True)
        loss = LOSSES[name](ignore_index=IGNORE)
        if loss.needs_class_counts:
            loss.set_class_counts([3.0])
        value = loss(logits, target)
        (grad,) = torch.autograd.grad(value, logits)
        assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad)), (name, target)


def test_deferred_reweighting_switches_the_class_weights_on_at_its_epoch():
    logits, target = make_inputs("index", True, seed=13)
    loss = LDAMLoss(class_weights="effective_number", beta=0.9999, reweight_from_epoch=2)
    loss.set_class_counts(COUNTS)
    unweighted = LDAMLoss()
    unweighted.set_class_counts(COUNTS)
    weighted = LDAMLoss(class_weights=class_weights(COUNTS, "effective_number", 0.9999))
    weighted.set_class_counts(COUNTS)
    for epoch, reference in [(0, unweighted), (1, unweighted), (2, weighted), (5, weighted)]:
        loss.set_epoch(epoch)
        torch.testing.assert_close(loss(logits, target), reference(logits, target), rtol=0, atol=0)
    assert not torch.equal(unweighted(logits, target), weighted(logits, target))
    assert "reweight_from_epoch=2" in repr(loss) and loss.rebalances_classes
    with pytest.raises(ValueError, match=r"reweight_from_epoch must be an integer >= 0, got -1"):
        CrossEntropyLoss(reweight_from_epoch=-1)


def test_balanced_softmax_is_logit_adjustment_with_tau_one():
    """Balanced softmax (Ren et al. 2020): -log(n_y e^{z_y} / sum_j n_j e^{z_j}), as documented."""
    logits, target = make_inputs("index", False, seed=14)
    counts = torch.tensor(COUNTS, dtype=torch.float64).clamp_min(1.0)
    balanced = -(torch.log(counts) + logits).log_softmax(1).gather(1, target[:, None]).mean()
    loss = LogitAdjustedLoss(tau=1.0)
    loss.set_class_counts(COUNTS)
    torch.testing.assert_close(loss(logits, target), balanced, rtol=1e-6, atol=1e-6)  # (priors stored in float32)


def test_z_loss_zero_is_the_fast_path_and_positive_adds_the_term():
    logits, target = make_inputs("index", True)
    plain, with_zero = CrossEntropyLoss(WEIGHTS), CrossEntropyLoss(WEIGHTS, z_loss=0.0)
    assert with_zero._uses_fast_path()
    assert torch.equal(plain(logits, target), with_zero(logits, target))
    # the z term under "mean": the w[y]-weighted mean of log Z^2, over the same denominator
    log_z = torch.logsumexp(logits.detach(), 1)
    valid = target != IGNORE
    w_y = torch.tensor(WEIGHTS, dtype=torch.float64)[target.clamp_min(0)] * valid
    expected = plain(logits, target) + 1e-2 * (w_y * log_z**2).sum() / w_y.sum()
    torch.testing.assert_close(CrossEntropyLoss(WEIGHTS, z_loss=1e-2)(logits, target), expected, **TOL)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_focal_with_alpha_and_gamma_zero_is_alpha_weighted_ce_over_the_unweighted_denominator(reduction):
    logits, target = make_inputs("index", True)
    ours = FocalLoss(gamma=0.0, alpha=ALPHA, reduction=reduction)(logits, target)
    a = torch.tensor(ALPHA, dtype=torch.float64)
    per = F.cross_entropy(logits, target, weight=a, reduction="none")
    expected = {"none": per, "sum": per.sum(), "mean": per.sum() / (target != IGNORE).sum()}[reduction]
    torch.testing.assert_close(ours, expected, **TOL)


def test_generalized_ce_tends_to_ce_as_q_goes_to_zero_and_is_mae_at_one():
    logits, target = make_inputs("index", True)
    ce = F.cross_entropy(logits, target, reduction="none")
    gaps = [(GeneralizedCrossEntropyLoss(q=q, reduction="none")(logits, target) - ce).abs().max().item()
            for q in (1e-1, 1e-3, 1e-6)]
    first_order = (ce**2 / 2).max().item()  # (1 - p^q) / q = -log p - q (log p)^2 / 2 + O(q^2)
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[1] == pytest.approx(1e-3 * first_order, rel=0.05)
    assert gaps[2] == pytest.approx(1e-6 * first_order, rel=1e-3)
    g_small = value_and_grad(GeneralizedCrossEntropyLoss(q=1e-7)(logits, target), logits)[1]
    torch.testing.assert_close(g_small, value_and_grad(F.cross_entropy(logits, target), logits)[1],
                               rtol=1e-5, atol=1e-6)
    p_y = logits.softmax(1).gather(1, target.clamp_min(0)[:, None]).squeeze(1)
    mae = torch.where(target != IGNORE, 1 - p_y, 0.0)
    torch.testing.assert_close(GeneralizedCrossEntropyLoss(q=1.0, reduction="none")(logits, target), mae, **TOL)


def test_symmetric_ce_index_form_is_minus_a_times_one_minus_p():
    logits, target = make_inputs("index", False)
    ours = SymmetricCrossEntropyLoss(sce_alpha=0.0 + 1e-300, sce_beta=1.0, reduction="none")(logits, target)
    p_y = logits.softmax(1).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(ours, 4.0 * (1 - p_y), rtol=1e-10, atol=1e-10)


def test_logit_adjustment_through_the_generic_path_keeps_the_z_loss_on_the_raw_logits():
    """A subclass overriding per_sample_loss takes the generic path: its logits are shifted by tau log pi for the
    loss, and the z-loss still sees the raw logits, as on the fused path and in the hand formula."""

    class Generic(LogitAdjustedLoss):
        def per_sample_loss(self, log_probs, target, weight):
            return super().per_sample_loss(log_probs, target, weight)

    knobs = dict(tau=1.5, z_loss=0.05)
    logits, target = make_inputs("index", True, seed=15)
    for smoothing in (0.0, 0.1):
        fused = build("logit_adjusted", knobs, WEIGHTS, "mean", smoothing)
        generic = Generic(**knobs, class_weights=WEIGHTS, label_smoothing=smoothing)
        generic.set_class_counts(COUNTS)
        assert fused._uses_fast_path() and not generic._uses_fast_path()
        hand = hand_loss("logit_adjusted", knobs, logits, target, WEIGHTS, "mean", smoothing)
        v_hand, g_hand = value_and_grad(hand, logits)
        for loss in (fused, generic):
            v, g = value_and_grad(loss(logits, target), logits)
            torch.testing.assert_close(v, v_hand, **TOL)
            torch.testing.assert_close(g, g_hand, **TOL)


def test_generalized_ce_at_a_small_q_keeps_float32_precision():
    """``-expm1(q log p) / q``: at small q the float32 loss is the paper's ``(1 - p**q) / q`` in float64 on the same
    logits to float32 precision (``1 - exp(q log p)`` would lose digits to cancellation: ~1e-3 at q = 1e-4)."""
    g = torch.Generator().manual_seed(16)
    logits = torch.randn(64, C, generator=g) * 2
    target = torch.randint(0, C, (64,), generator=g)
    p_y = logits.double().softmax(1).gather(1, target[:, None]).squeeze(1)
    for q in (1e-2, 1e-4):
        ours = GeneralizedCrossEntropyLoss(q=q, reduction="none")(logits, target)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours.double(), (1 - p_y**q) / q, rtol=2e-6, atol=0)


def test_one_minus_p_terms_are_exact_as_p_goes_to_one():
    """The class_loss hook on given log-probabilities near 0 (a caller's exact log p): ``1 - p = -expm1(log p)``
    keeps every digit where ``1 - exp(log p)`` keeps a few. Reference: the formulas in 40-digit decimals."""
    from decimal import Decimal, getcontext

    getcontext().prec = 40
    log_p = [-1e-12, -1e-9, -1e-6, -1e-3, -1.0, -30.0]
    one_minus_p = [1 - Decimal(v).exp() for v in log_p]
    cases = [(FocalLoss(gamma=2.0), [d**2 * -Decimal(v) for v, d in zip(log_p, one_minus_p)]),
             (Poly1Loss(epsilon=1.0), [-Decimal(v) + d for v, d in zip(log_p, one_minus_p)]),
             (GeneralizedCrossEntropyLoss(q=0.5), [(1 - (Decimal(v) / 2).exp()) * 2 for v in log_p])]
    for loss, expected in cases:
        got = loss.class_loss(torch.tensor(log_p, dtype=torch.float64))
        torch.testing.assert_close(got, torch.tensor([float(e) for e in expected], dtype=torch.float64),
                                   rtol=1e-14, atol=0, msg=type(loss).__name__)


# ---- stable paths ------------------------------------------------------------------------------------------

STABLE_CASES = [
    ("cross_entropy", dict()),
    ("cross_entropy", dict(z_loss=1e-4)),
    ("focal", dict(gamma=2.0)),
    ("focal", dict(gamma=0.5, alpha=ALPHA)),
    ("confidence_penalty", dict(penalty=0.5)),
    ("logit_adjusted", dict(tau=1.0)),
    ("poly1", dict(epsilon=1.0)),
    ("symmetric_ce", dict(sce_alpha=0.1, sce_beta=1.0)),
    ("generalized_ce", dict(q=0.3)),
    ("nce_rce", dict(apl_alpha=1.0, apl_beta=1.0)),
    ("nfl_rce", dict(gamma=0.5, apl_alpha=2.0, apl_beta=0.5)),
    ("ldam", dict(max_margin=0.5)),
]


def extreme_inputs(dtype):
    """Row 0: the target's probability is exactly 1; row 1: it underflows to 0 (log p_y = -2e4); row 2: its
    logit is -1e4 among zeros; row 3: moderate. Logits of +-1e4."""
    x = torch.zeros(4, C, dtype=dtype)
    x[0] = -1e4
    x[0, 1] = 1e4
    x[1] = -1e4
    x[1, 3] = 1e4
    x[2, 0] = -1e4
    x[3] = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0])
    return x.requires_grad_(), torch.tensor([1, 0, 0, 2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", STABLE_CASES, ids=[case_id(c) for c in STABLE_CASES])
def test_extreme_logits_give_finite_exact_values_and_gradients(case, dtype):
    name, knobs = case
    logits, target = extreme_inputs(dtype)
    loss = build(name, knobs, reduction="none")
    per = loss(logits, target)
    assert per.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    (grad,) = torch.autograd.grad(per.sum(), logits)
    assert torch.isfinite(per).all() and torch.isfinite(grad.float()).all()
    # expected rows at the extremes, from the formulas: p_y = 1 (row 0) and p_y = 0, log p_y = -2 big (row 1)
    big = float(logits.detach()[1, 3])  # 1e4, or its bfloat16 rounding 9984
    z0 = knobs.get("z_loss", 0.0) * big**2  # log Z = big in both rows
    la_shift = 0.0
    if name == "logit_adjusted":
        log_prior = torch.tensor(COUNTS, dtype=torch.float64).clamp_min(1).div(sum(max(c, 1) for c in COUNTS)).log()
        la_shift = knobs["tau"] * float(log_prior[3] - log_prior[0])  # the shifts move the winner's margin
    gap = 2 * big  # -log p_y of row 1
    expected_underflow = {
        "cross_entropy": gap, "focal": gap * (ALPHA[0] if knobs.get("alpha") else 1.0),
        "confidence_penalty": gap, "logit_adjusted": gap + la_shift, "poly1": gap + 1.0,
        "symmetric_ce": 0.1 * gap + 1.0 * 4.0, "generalized_ce": 1 / 0.3,
        # log p_y / sum_j log p_j = 1/4 (four classes at -gap, the winner at 0); RCE = -log 1e-4
        "nce_rce": 0.25 + math.log(1e4), "nfl_rce": 2.0 * 0.25 + 0.5 * math.log(1e4),
        "ldam": gap + 0.5 * COUNTS[0] ** -0.25,  # the label's logit lowered by its margin
    }[name] + z0
    assert per[0].item() == pytest.approx(z0, abs=1e-3 + 1e-6 * z0)  # p_y = 1: nothing left but the z term
    assert per[1].item() == pytest.approx(expected_underflow, rel=1e-6)
    assert torch.isfinite(per[2:]).all()
    if loss.supports_soft_targets:  # the same rows as probability targets, plus label smoothing
        soft = F.one_hot(target, C).to(dtype)
        soft[3] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
        for variant in (build(name, knobs, reduction="none"), build(name, knobs, reduction="sum", smoothing=0.1)):
            out = variant(logits, soft if variant.label_smoothing == 0 else target)
            (grad,) = torch.autograd.grad(out.sum(), logits)
            assert torch.isfinite(out).all() and torch.isfinite(grad.float()).all()
        out = build(name, knobs, reduction="none")(logits, soft)
        assert out[1].item() == pytest.approx(expected_underflow, rel=1e-6)


def test_focal_gamma_below_one_has_zero_not_nan_gradient_where_p_is_one():
    logits, target = extreme_inputs(torch.float32)
    (grad,) = torch.autograd.grad(FocalLoss(gamma=0.25, reduction="sum")(logits[:1], target[:1]), logits)
    assert torch.equal(grad[0], torch.zeros(C))


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in {"focal", "confidence_penalty", "poly1",
                                                                "symmetric_ce"}], ids=case_id)
def test_retained_graph_and_per_sample_loss_on_given_log_probs_give_the_paper_gradient(case):
    """A retained graph's second backward, and `per_sample_loss` called on log-probabilities of the caller's
    making (the extension point a subclass uses), give the gradient of the paper's formula."""
    name, knobs = case
    for kind in ("index", "soft"):
        logits, target = make_inputs(kind, False, seed=3)
        loss = build(name, knobs, WEIGHTS, reduction="sum")
        out = loss(logits, target)
        (first,) = torch.autograd.grad(out, logits, retain_graph=True)
        (second,) = torch.autograd.grad(out, logits)
        torch.testing.assert_close(first, second, rtol=1e-14, atol=1e-14)  # (rounding may differ)
        hand = hand_loss(name, knobs, logits, target, WEIGHTS, "sum", 0.0)
        torch.testing.assert_close(first, value_and_grad(hand, logits)[1], **TOL)
        log_probs = logits.log_softmax(1)  # not the loss's own: the gradient goes to log p, then autograd
        per = loss.per_sample_loss(log_probs, target, torch.tensor(WEIGHTS, dtype=torch.float64))
        (via_log_probs,) = torch.autograd.grad(per.sum(), logits)
        torch.testing.assert_close(via_log_probs, first, **TOL)


FULL_DISTRIBUTION_CASES = [c for c in CASES if c[0] in {"focal", "confidence_penalty", "poly1", "symmetric_ce"}]


@pytest.mark.parametrize("case", FULL_DISTRIBUTION_CASES, ids=case_id)
def test_spatial_probabilities_and_smoothing_match_the_paper_formula(case):
    """(N, C, d) logits with probabilities and label smoothing, z-loss included."""
    name, knobs = case
    knobs = {**knobs, "z_loss": 0.02}
    for kind, smoothing, use_w in [("soft", 0.0, True), ("index", 0.2, True), ("index", 0.1, False)]:
        logits, target = make_inputs(kind, kind == "index", spatial=True, seed=6, n=5)
        weights = WEIGHTS if use_w else None
        for reduction in ("mean", "none"):
            ours = build(name, knobs, weights, reduction, smoothing)(logits, target)
            hand = hand_loss(name, knobs, logits, target, weights, reduction, smoothing)
            v, g = value_and_grad(ours, logits)
            v_hand, g_hand = value_and_grad(hand, logits)
            torch.testing.assert_close(v, v_hand, **TOL)
            torch.testing.assert_close(g, g_hand, **TOL)


@pytest.mark.parametrize("case", FULL_DISTRIBUTION_CASES, ids=case_id)
def test_smoothing_taken_apart_equals_the_smoothed_probabilities_a_subclass_sees(case):
    """A subclass that overrides per_sample_loss gets label-smoothed indices as smoothed probabilities, and
    gives the built-in formula's numbers."""
    name, knobs = case
    seen = []

    class Override(LOSSES[name]):
        def per_sample_loss(self, log_probs, target, weight):
            seen.append(target.is_floating_point())
            return super().per_sample_loss(log_probs, target, weight)

    logits, target = make_inputs("index", True, seed=8)
    for reduction in ("mean", "none"):
        fused = build(name, knobs, WEIGHTS, reduction, 0.3)
        plain = Override(**knobs, class_weights=WEIGHTS, reduction=reduction, label_smoothing=0.3)
        v, g = value_and_grad(fused(logits, target), logits)
        v_plain, g_plain = value_and_grad(plain(logits, target), logits)
        torch.testing.assert_close(v, v_plain, **TOL)
        torch.testing.assert_close(g, g_plain, **TOL)
    assert seen == [True, True]  # the override ran, on smoothed probabilities


@pytest.mark.parametrize("case", FULL_DISTRIBUTION_CASES + [("cross_entropy", dict(z_loss=0.05))], ids=case_id)
def test_variants_are_twice_differentiable_and_need_no_graph_without_grad(case):
    """Double backward (gradgradcheck, create_graph=True), and a forward under no_grad that gives the same
    values without a graph."""
    name, knobs = case
    for kind, smoothing in [("soft", 0.0), ("index", 0.2), ("index", 0.0)]:
        logits, target = make_inputs(kind, False, seed=9, n=4)
        loss = build(name, knobs, WEIGHTS, "none", smoothing)
        assert torch.autograd.gradcheck(lambda x: loss(x, target), (logits,))
        assert torch.autograd.gradgradcheck(lambda x: loss(x, target), (logits,))
        with torch.no_grad():
            quiet = loss(logits, target)
        assert quiet.grad_fn is None
        torch.testing.assert_close(quiet, loss(logits, target).detach(), rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n, cls in VARIANTS.items() if cls.supports_soft_targets])
def test_variants_check_probability_targets_in_every_row(name):
    loss = build(name, {})
    logits, target = make_inputs("soft", False, seed=10)
    loss(logits, target)
    negative = target.clone()
    negative[6] = torch.tensor([0.5, 0.6, -0.1, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"1 entries are negative \(most negative -0\.1\)"):
        loss(logits, negative)
    short = target.clone()
    short[6] *= 0.5
    with pytest.raises(ValueError, match=r"1 of 7 rows do not; worst row sum is 0\.5"):
        loss(logits, short)


def test_subclass_handing_its_own_log_probs_to_a_variant_gets_the_right_gradient():
    class Tempered(ConfidencePenaltyLoss):  # a user's extension: temperature 2 before the variant's formula
        def per_sample_loss(self, log_probs, target, weight):
            return super().per_sample_loss(F.log_softmax(log_probs / 2, dim=1), target, weight)

    for kind in ("index", "soft"):
        logits, target = make_inputs(kind, kind == "index", seed=4)
        ours = Tempered(penalty=0.3, class_weights=WEIGHTS)(logits, target)
        hand = hand_loss("confidence_penalty", dict(penalty=0.3), logits / 2, target, WEIGHTS, "mean", 0.0)
        v, g = value_and_grad(ours, logits)
        v_hand, g_hand = value_and_grad(hand, logits)
        torch.testing.assert_close(v, v_hand, **TOL)
        torch.testing.assert_close(g, g_hand, **TOL)


# ---- knobs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (FocalLoss, dict(gamma=-0.5), r"gamma must be in \[0, inf\), got -0\.5"),
        (FocalLoss, dict(gamma=float("nan")), r"gamma.*nan"),
        (FocalLoss, dict(gamma="two"), r"gamma must be a number.*'two'"),
        (FocalLoss, dict(alpha=0.25), r"alpha.*scalar 0\.25"),
        (FocalLoss, dict(alpha=[1.0, -0.5]), r"alpha.*-0\.5"),
        (FocalLoss, dict(alpha=[0.0, 0.0]), r"alpha must not be all zero"),
        (ConfidencePenaltyLoss, dict(penalty=-0.1), r"penalty must be in \[0, inf\), got -0\.1"),
        (LogitAdjustedLoss, dict(tau=-1.0), r"tau must be in \[0, inf\), got -1\.0"),
        (Poly1Loss, dict(epsilon=-1.5), r"epsilon must be in \[-1, inf\), got -1\.5"),
        (Poly1Loss, dict(epsilon=float("inf")), r"epsilon.*inf"),
        (SymmetricCrossEntropyLoss, dict(sce_alpha=-1.0), r"sce_alpha must be in \[0, inf\), got -1\.0"),
        (SymmetricCrossEntropyLoss, dict(sce_beta=-2.0), r"sce_beta.*-2\.0"),
        (SymmetricCrossEntropyLoss, dict(sce_alpha=0.0, sce_beta=0.0), r"sce_alpha and sce_beta.*both be 0"),
        (SymmetricCrossEntropyLoss, dict(log_zero=0.0), r"log_zero must be in \(-inf, 0\), got 0\.0"),
        (GeneralizedCrossEntropyLoss, dict(q=0.0), r"q must be in \(0, 1\], got 0\.0"),
        (GeneralizedCrossEntropyLoss, dict(q=1.5), r"q must be in \(0, 1\], got 1\.5"),
        (GeneralizedCrossEntropyLoss, dict(q=True), r"q must be a number.*True"),
        (GeneralizedCrossEntropyLoss, dict(label_smoothing=0.1), r"class-index targets only.*label_smoothing=0\.1"),
        (CrossEntropyLoss, dict(z_loss=-1e-4), r"z_loss must be in \[0, inf\), got -0\.0001"),
        (FocalLoss, dict(z_loss=float("nan")), r"z_loss.*nan"),
        (LogitAdjustedLoss, dict(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\)"),
    ],
)
def test_bad_knobs_name_the_value(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_generalized_ce_rejects_probability_targets():
    logits, target = make_inputs("soft", False)
    for validate in (True, False):
        with pytest.raises(ValueError, match=r"GeneralizedCrossEntropyLoss is defined for class-index targets only"):
            GeneralizedCrossEntropyLoss(validate=validate)(logits, target)


def test_alpha_and_prior_lengths_are_checked_against_the_logits():
    with pytest.raises(ValueError, match=r"alpha has 3 entries but logits have C=5"):
        FocalLoss(alpha=[1.0, 2.0, 3.0])(torch.randn(2, C), torch.tensor([0, 1]))
    loss = LogitAdjustedLoss()
    loss.set_class_counts([1, 2, 3])
    with pytest.raises(ValueError, match=r"priors have 3 entries.*C=5"):
        loss(torch.randn(2, C), torch.tensor([0, 1]))


def test_variants_keep_the_base_validation():
    for name, cls in VARIANTS.items():
        loss = cls()
        if loss.needs_class_counts:
            loss.set_class_counts(COUNTS)
        with pytest.raises(ValueError, match=r"smallest bad value 7.*C=5"):
            loss(torch.randn(2, C), torch.tensor([0, 7]))
        bad = torch.randn(2, C)
        bad[0, 1] = float("nan")
        with pytest.raises(ValueError, match=r"1 non-finite"):
            loss(bad, torch.tensor([0, 1]))


# ---- priors, class counts, state ---------------------------------------------------------------------------


def test_logit_adjusted_priors_come_from_class_counts():
    loss = LogitAdjustedLoss(tau=1.0)
    assert loss.needs_class_counts
    with pytest.raises(RuntimeError, match=r"LogitAdjustedLoss\(tau=1\.0\) needs the class priors.*set_class_counts"):
        loss(torch.randn(2, C), torch.tensor([0, 1]))
    loss.set_class_counts(COUNTS)
    assert not loss.needs_class_counts
    clamped = [max(c, 1.0) for c in COUNTS]
    expected = torch.tensor([math.log(c / sum(clamped)) for c in clamped], dtype=torch.float32)
    torch.testing.assert_close(loss.log_prior, expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(loss.logit_offset(torch.zeros(1, C)), expected)
    assert not LogitAdjustedLoss(tau=0.0).needs_class_counts
    assert LogitAdjustedLoss(tau=0.0).logit_offset(torch.zeros(1, C)) is None


def test_logit_adjusted_with_a_weight_strategy_sets_both_from_one_call():
    loss = LogitAdjustedLoss(class_weights="balanced")
    loss.set_class_counts(COUNTS)
    assert not loss.needs_class_counts
    assert torch.equal(loss.weight, class_weights(COUNTS, "balanced"))
    tau_zero = LogitAdjustedLoss(tau=0.0, class_weights="balanced")
    assert tau_zero.needs_class_counts  # the weights are still pending
    tau_zero.set_class_counts(COUNTS)
    assert not tau_zero.needs_class_counts


def test_priors_survive_a_checkpoint_into_a_fresh_loss_and_dtype_casts():
    trained = LogitAdjustedLoss(tau=2.0, class_weights="effective_number")
    trained.set_class_counts(COUNTS)
    state = trained.state_dict()
    assert set(state) == {"weight", "log_prior"}
    fresh = LogitAdjustedLoss(tau=2.0, class_weights="effective_number")
    assert fresh.needs_class_counts
    fresh.load_state_dict(state)
    assert not fresh.needs_class_counts
    logits, target = make_inputs("index", True)
    assert torch.equal(fresh(logits, target), trained(logits, target))
    cast = fresh.to(torch.bfloat16)
    assert cast.log_prior.dtype == torch.float32 and cast.weight.dtype == torch.float32
    focal = FocalLoss(alpha=ALPHA).half()
    assert focal.alpha.dtype == torch.float32 and "alpha" not in focal.state_dict()


def test_variants_compute_low_precision_logits_in_float32():
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(16, C, generator=g) * 3
    target = torch.randint(0, C, (16,), generator=g)
    for name, knobs in CASES:
        loss = build(name, knobs, WEIGHTS)
        xl = x32.bfloat16().requires_grad_()
        out = loss(xl, target)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, loss(xl.detach().float(), target), rtol=0, atol=0)
        (grad,) = torch.autograd.grad(out, xl)
        assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()


def test_repr_shows_the_knobs():
    assert "gamma=2.0, alpha=[0.25, 1.0, 0.5, 2.0, 0.75]" in repr(FocalLoss(alpha=ALPHA))
    assert "penalty=0.1" in repr(ConfidencePenaltyLoss())
    assert "sce_alpha=0.1, sce_beta=1.0, log_zero=-4.0" in repr(SymmetricCrossEntropyLoss())
    assert "q=0.7" in repr(GeneralizedCrossEntropyLoss()) and "tau=1.0" in repr(LogitAdjustedLoss())
    assert "z_loss=0.001" in repr(Poly1Loss(z_loss=1e-3)) and "z_loss" not in repr(CrossEntropyLoss())


def test_happy_path_reads_the_host_at_most_once(monkeypatch):
    from test_losses import _SyncCounter

    logits, target = make_inputs("index", True)
    losses = [build(name, {**knobs, "z_loss": 1e-3}, WEIGHTS, smoothing=0.0) for name, knobs in CASES]
    counter = _SyncCounter(monkeypatch)
    for i, loss in enumerate(losses, 1):
        loss(logits, target)
        assert counter.count == i


# ---- configs -----------------------------------------------------------------------------------------------


# The presets: a registered class with some options set (each of these keys differs from the constructor's default).
PRESETS = {("class_balanced", "class_weights"), ("nfl_rce", "gamma"), ("ldam_drw", "class_weights"),
           ("ldam_drw", "beta"), ("ldam_drw", "reweight_from_epoch")}


def test_every_registered_loss_has_a_config_with_the_constructor_defaults():
    for name, cls in LOSSES.items():
        path = CONF / "loss" / f"{name}.yaml"
        text = path.read_text()
        node = yaml.safe_load(text)
        assert node["defaults"] == [f"/schema/loss/{name}@_here_", "_self_"]
        assert node["ignore_index"] == "${ignore_index}"
        module_path, cls_name = node["_target_"].rsplit(".", 1)
        assert cls_name == cls.__name__ and module_path in {"xentlit", "xentlit.losses"}
        # what the constructor accepts: its own parameters, plus the base loss's when it passes **kwargs on
        signature = dict(inspect.signature(cls.__init__).parameters)
        base_parameters = inspect.signature(CrossEntropyLoss.__init__).parameters
        if signature.pop("kwargs", None) is not None:
            signature = {**base_parameters, **signature}
        base = set(base_parameters)
        assert set(node) - {"defaults", "_target_"} <= set(signature) - {"self"}, name
        assert set(signature) - base <= set(node), name  # every knob of the variant is spelled out
        for key, value in node.items():
            if key in {"defaults", "_target_", "ignore_index"} or (name, key) in PRESETS:
                continue
            assert value == signature[key].default, (name, key)
    assert yaml.safe_load((CONF / "loss" / "class_balanced.yaml").read_text())["class_weights"] == "effective_number"
    for name, key in PRESETS:  # each preset really sets its key
        node = yaml.safe_load((CONF / "loss" / f"{name}.yaml").read_text())
        own = inspect.signature(LOSSES[name].__init__).parameters
        assert node[key] != (own[key] if key in own else CE_PARAMETERS[key]).default, (name, key)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_option_composes_instantiates_and_trains_a_step(compose, name, tmp_path):
    from hydra.utils import instantiate

    cfg = compose(f"loss={name}", f"paths.output_dir={tmp_path}")
    loss = instantiate(cfg.loss)
    assert type(loss) is LOSSES[name]
    if loss.needs_class_counts:  # what XentModule.setup does with the datamodule's counts
        loss.set_class_counts([5.0, 3.0, 1.0])
    logits = torch.randn(5, 3, requires_grad=True)
    out = loss(logits, torch.tensor([0, 1, 2, 1, 0]))
    (grad,) = torch.autograd.grad(out, logits)
    assert out.ndim == 0 and torch.isfinite(out) and grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["loss=focal", "loss.gama=1"], "gama"),
        (["loss=focal", "loss.gamma=strong"], "gamma"),
        (["loss=generalized_ce", "loss.q=[0.5]"], "q"),
        (["loss=symmetric_ce", "loss.alpha=0.5"], "alpha"),
        (["loss=confidence_penalty", "loss.beta_penalty=1"], "beta_penalty"),
        (["loss=logit_adjusted", "loss.tau=high"], "tau"),
        (["loss=poly1", "loss.z_los=1e-4"], "z_los"),
    ],
)
def test_loss_knob_typos_fail_at_compose_time(compose, overrides, words):
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigKeyError, ValidationError

    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)) as info:
        compose(*overrides)
    assert words in str(info.value) + str(info.value.__cause__ or "")


def test_knob_overrides_reach_the_loss(compose, tmp_path):
    from hydra.utils import instantiate

    cfg = compose("loss=focal", "loss.gamma=1.5", "loss.alpha=[1,2,3]", "loss.z_loss=1e-4",
                  f"paths.output_dir={tmp_path}")
    loss = instantiate(cfg.loss)
    assert loss.gamma == 1.5 and loss.alpha.tolist() == [1.0, 2.0, 3.0] and loss.z_loss == 1e-4


@pytest.mark.parametrize(("experiment", "key", "value"), [("imbalanced", "imbalance_factor", 100.0),
                                                         ("noisy_labels", "label_noise", 0.4)])
def test_experiment_presets(compose, tmp_path, experiment, key, value):
    from hydra.utils import instantiate

    assert (CONF / "experiment" / f"{experiment}.yaml").read_text().startswith("# @package _global_")
    cfg = compose(f"experiment={experiment}", "loss=logit_adjusted", f"paths.output_dir={tmp_path}")
    assert cfg.data._target_ == "xentlit.SyntheticDataModule" and cfg.data[key] == value
    assert cfg.loss._target_ == "xentlit.losses.LogitAdjustedLoss"
    datamodule = instantiate(cfg.data, num_samples=2000)
    datamodule.setup("fit")
    counts = datamodule.class_counts
    if key == "imbalance_factor":
        assert counts.max() / counts.min() == pytest.approx(100.0, rel=0.1)
    else:
        assert datamodule.train_noisy_mask.float().mean().item() == pytest.approx(0.4, abs=0.01)


# ---- scripts -----------------------------------------------------------------------------------------------


def rows_name(row):
    return row.split(" + ")[0]


def test_bench_quick_prints_a_row_per_loss(tmp_path):
    result = run_script("bench_losses.py", "--quick", cwd=tmp_path, timeout=120)
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| loss")}
    assert set(LOSSES) | {"cross_entropy + z_loss=1e-4"} == set(rows)
    for name, line in rows.items():
        ratios = [float(r) for r in re.findall(r"(\d+\.\d+)x \[\d+\.\d+\] \(", line)]
        expected = 4 if LOSSES[rows_name(name)].supports_soft_targets else 2  # GCE, LDAM: class indices only
        assert len(ratios) == expected and all(r > 0 for r in ratios), line  # values are for the README, not tests
    assert rows["generalized_ce"].count("n/a (indices only)") == 2


def test_bench_only_times_the_matching_cells(tmp_path):
    result = run_script("bench_losses.py", "--quick", "--only", "^focal", "--only", "soft", "--system-malloc",
                        cwd=tmp_path, timeout=120)
    assert "system malloc defaults" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| loss")]
    assert len(rows) == 1 and rows[0].startswith("| focal |")
    cells = [cell.strip() for cell in rows[0].split("|")[2:-1]]
    assert cells[:3] == ["-", "-", "-"] and re.match(r"\d+\.\d+x \[", cells[3])


@pytest.mark.slow
def test_compiled_loss_matches_eager_and_the_benchmark_reports_it():
    """compile=True runs the same formula through torch.compile (smoothing, weights, ignored rows, a second batch
    size): eager's value and gradient to float32 rounding; the loss benchmark times it and shows its compile time."""
    from xentlit.loss_benchmark import markdown, run

    logits, target = make_inputs("index", True, seed=11, n=16, dtype=torch.float32)
    kwargs = dict(gamma=2.0, class_weights=WEIGHTS, label_smoothing=0.1, z_loss=0.01)
    eager, compiled = FocalLoss(**kwargs), FocalLoss(**kwargs, compile=True)
    assert "compile=True" in repr(compiled)
    for rows in (16, 9):
        want = value_and_grad(eager(logits[:rows], target[:rows]), logits)
        got = value_and_grad(compiled(logits[:rows], target[:rows]), logits)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert compiled._compiled is not None and eager._compiled is None
    with pytest.raises(ValueError, match="class indices outside"):  # validation stays outside the compiled part
        compiled(logits[:2], torch.tensor([0, 7]))
    cells = run(32, 5, reps=1, warmup=0, inner=1, only=["^focal plain"], compile=True)
    assert [(c["row"], c["setting"]) for c in cells] == [("focal", "plain")]
    assert cells[0]["compile_s"] > 0 and cells[0]["compiled_ratio"] > 0
    assert re.search(r"\| focal \| \d+\.\d+x \[\d+\.\d+\] \([^)]*\); compiled \d+\.\d+x, \d+ s \| - \| - \| - \|",
                     markdown(cells, 32, 5, 1, 1))


def test_compare_quick_writes_csv_table_and_plot(tmp_path):
    out = tmp_path / "cmp"
    result = run_script("compare_losses.py", "--quick", "--workers", "1", "--out", str(out), cwd=tmp_path,
                        timeout=300)
    assert "6 runs in" in result.stdout
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    pairs = {(r["dataset"], r["loss"]) for r in rows}
    assert pairs == {(d, l) for d in compare.DATASETS
                     for l in ("cross_entropy", "logit_adjusted", *compare.POSTHOC_SETTINGS)}
    by_key = {(r["dataset"], r["loss"]): r for r in rows}
    for d in compare.DATASETS:  # temperature scaling keeps the model's predictions; its calibration changes
        ce, scaled = by_key[(d, "cross_entropy")], by_key[(d, "cross_entropy + temperature")]
        assert float(scaled["test/acc"]) == pytest.approx(float(ce["test/acc"]), abs=1e-6)
        assert float(scaled["test/ece"]) != float(ce["test/ece"])
    for r in rows:
        for metric in compare.METRICS:
            assert 0.0 <= float(r[metric]) <= 1.0
        assert float(r["test/acc"]) > 0.1  # better than chance (10 classes) after one epoch
    table = (out / "summary.md").read_text()
    for dataset in compare.DATASETS:
        assert f"**{dataset}**" in table
    sections = {d: table.split(f"**{d}**")[1] for d in compare.DATASETS}
    for r in rows:  # every (loss, dataset) has its row, with its numbers, in its dataset's table
        section = sections[r["dataset"]].split("\n\n**")[0]
        [line] = [line for line in section.splitlines() if line.startswith(f"| {r['loss']} |")]
        for metric in compare.METRICS:
            assert f"{float(r[metric]):.3f}" in line
        run = r["loss"] if r["loss"] not in compare.POSTHOC_SETTINGS else "cross_entropy"  # (its model's run)
        assert (out / "runs" / r["dataset"] / run / "seed0" / "metrics.json").exists()
    assert table.count("| cross_entropy |") == 3 and table.count("| logit_adjusted |") == 3
    assert table.count("| cross_entropy + temperature |") == 3
    png = (out / "comparison.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_compare_summary_statistics_and_table_by_hand():
    rows = [{"dataset": "d", "loss": loss, "seed": s, "test/acc": acc, "test/f1_macro": 0.5, "test/balanced_acc": 0.5,
             "test/ece": ece} for loss, s, acc, ece in [("a", 0, 0.8, 0.1), ("a", 1, 0.6, 0.3), ("b", 0, 0.9, 0.25),
                                                       ("b", 1, 0.9, 0.25)]]
    summary = compare.summarize(rows)
    mean, std, n = summary[("d", "a")]["test/acc"]
    assert (mean, n) == (pytest.approx(0.7), 2) and std == pytest.approx(math.sqrt(0.02))
    table = compare.markdown_table(rows)
    assert "| a | 0.700 ± 0.141 | **0.500 ± 0.000** | **0.500 ± 0.000** | **0.200 ± 0.141** |" in table
    assert "| b | **0.900 ± 0.000** | **0.500 ± 0.000** | **0.500 ± 0.000** | 0.250 ± 0.000 |" in table
    with pytest.raises(ValueError, match=r"unknown loss \['bogus'\]"):
        compare.Settings(losses=["bogus"]).validate()
    overrides = compare.overrides_for(compare.Settings(), "imbalanced", "z_loss", 2, tmp := "x")
    assert overrides[:3] == ["experiment=imbalanced", "loss=cross_entropy", "loss.z_loss=1e-4"]
    assert "seed=2" in overrides and f"paths.output_dir={tmp}" in overrides


# ---- an ignore_index inside the class range ---------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(set(LOSSES) - {"class_balanced"}))
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"class_weights": [1.0, 2.0, 0.5, 1.5]},
                                     {"class_weights": [1.0, 2.0, 0.5, 1.5], "z_loss": 0.01}],
                         ids=["plain", "smoothing", "weights", "weights+z"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_an_ignore_index_inside_the_class_range_drops_exactly_its_rows(name, options, reduction):
    """ignore_index=2 is also a class index: the loss equals the same loss on the other rows, so a mask such as
    ``target > ignore_index`` (which would also drop classes 0 and 1) or ``target >= 0`` fails here."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.arange(40) % 4  # every class, class 2 ignored
    if not LOSSES[name].supports_soft_targets and "label_smoothing" in options:
        pytest.skip(f"{name} takes class indices only, without smoothing")
    ignored = LOSSES[name](ignore_index=2, reduction=reduction, **options)
    kept = LOSSES[name](ignore_index=-100, reduction=reduction, **options)
    for loss in (ignored, kept):
        if loss.needs_class_counts:
            loss.set_class_counts([50.0, 20.0, 7.0, 3.0])
    rows = target != 2
    expected = kept(logits[rows], target[rows])
    actual = ignored(logits, target)
    torch.testing.assert_close(actual, expected, **TOL)
    (grad,) = torch.autograd.grad(actual, logits)
    assert torch.all(grad[~rows] == 0) and torch.all(grad[rows].abs().sum(1) > 0)
