"""Robustness sweep: random shapes, dtypes, targets, weights and smoothing thrown at every loss.

Whatever comes in, the result is a finite loss with finite gradients, or a ValueError that says what was wrong —
never another exception type, and never a silent NaN.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xentlit.losses import LOSSES

NAMES = sorted(LOSSES)


@st.composite
def cases(draw):
    n = draw(st.integers(0, 6))
    c = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64]))
    scale = draw(st.sampled_from([1.0, 1e4]))
    extra_dims = draw(st.sampled_from([(), (2,)]))
    kind = draw(st.sampled_from(["index", "all_ignored", "soft", "bad_index", "float_ids", "bad_soft"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, *extra_dims, generator=g) * scale).to(dtype)
    shape = (n, *extra_dims)
    if kind in ("index", "bad_index"):
        target = torch.randint(0, max(c, 1), shape, generator=g)
        target[torch.rand(shape, generator=g) < 0.3] = -100
        if kind == "bad_index" and n:
            target.view(-1)[0] = c + draw(st.integers(0, 3))
    elif kind == "all_ignored":
        target = torch.full(shape, -100)
    elif kind == "float_ids":
        target = torch.randint(0, max(c, 1), shape, generator=g).float()
    else:
        target = torch.rand(n, c, *extra_dims, generator=g)
        target = target / target.sum(1, keepdim=True).clamp_min(1e-6)
        if kind == "bad_soft":
            target = target * 1.5
    weights = draw(st.sampled_from([None, "random", "wrong_length", "negative"]))
    if weights == "random":
        weights = (torch.rand(c, generator=g) + 0.1).tolist()
    elif weights == "wrong_length":
        weights = [1.0] * (c + 1)
    elif weights == "negative":
        weights = [-1.0] + [1.0] * (c - 1)
    smoothing = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0, -0.1]))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    return logits, target, weights, smoothing, reduction


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_finite_result_or_a_clear_value_error(name, case):
    check_finite_result_or_a_clear_value_error(name, *case)


def check_finite_result_or_a_clear_value_error(name, logits, target, weights, smoothing, reduction):
    logits = logits.clone().requires_grad_(logits.is_floating_point())
    try:
        loss_fn = LOSSES[name](class_weights=weights, label_smoothing=smoothing, reduction=reduction)
        if loss_fn.needs_class_counts:
            loss_fn.set_class_counts(torch.arange(1.0, logits.shape[1] + 1 if logits.ndim > 1 else 2))
        value = loss_fn(logits, target)
    except ValueError as err:
        assert str(err), "a ValueError must say what was wrong"
        return
    assert value.dtype in (torch.float32, torch.float64)
    assert torch.isfinite(value).all(), f"{name} returned a non-finite loss silently"
    if logits.requires_grad and value.requires_grad and value.numel():
        (grad,) = torch.autograd.grad(value.sum(), logits)
        assert torch.isfinite(grad).all(), f"{name} gave non-finite gradients silently"
