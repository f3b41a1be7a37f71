"""The chunked linear + cross-entropy path (xentlit.chunked) against the plain one.

Plain path: ``F.cross_entropy(F.linear(hidden, weight, bias), target, ...)`` on the full logits. Value and
gradients of hidden, weight and bias must match to 1e-5 in float32 and 1e-10 in float64; memory must be
a fraction of the plain path's.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xentlit.chunked import (
    ChunkedLinearCrossEntropy,
    linear_cross_entropy,
    linear_cross_entropy_terms,
    peak_allocated_bytes,
)
from xentlit.losses import CrossEntropyLoss

from conftest import ROOT

N, D, C = 37, 6, 11
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def make(dtype=torch.float64, n=N, d=D, c=C, bias=True, ignore_every=0, ignore_index=-100, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(c, d, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(c, generator=g, dtype=dtype).requires_grad_() if bias else None
    target = torch.randint(0, c, (n,), generator=g)
    if ignore_every:
        target[::ignore_every] = ignore_index
    return hidden, weight, b, target


def grads(out, inputs, seed=1):
    """Gradients of ``<out, R>`` for a fixed random R (so "none" is tested with a non-uniform upstream grad)."""
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    inputs = [x for x in inputs if x is not None]
    return torch.autograd.grad(out, inputs, upstream)


def assert_matches(hidden, weight, bias, target, dtype, **kwargs):
    plain_kwargs = {k: v for k, v in kwargs.items() if k != "chunk_size"}
    if "class_weights" in plain_kwargs:
        plain_kwargs["weight"] = plain_kwargs.pop("class_weights")
    ref = F.cross_entropy(F.linear(hidden, weight, bias), target, **plain_kwargs)
    out = linear_cross_entropy(hidden, weight, bias, target, **kwargs)
    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    for got, want in zip(grads(out, (hidden, weight, bias)), grads(ref, (hidden, weight, bias))):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"ignore_index": -100},
        {"class_weights": True},
        {"label_smoothing": 0.1},
        {"class_weights": True, "label_smoothing": 0.2, "ignore_index": -100},
        {"ignore_index": 3, "label_smoothing": 0.05},
    ],
    ids=["plain", "ignore", "weights", "smoothing", "all", "ignore_a_class"],
)
@pytest.mark.parametrize("chunk_size", [1, 5, 8, N, 1000])  # 5, 8 do not divide N=37; N and 1000: one block
def test_matches_plain_path(dtype, reduction, options, chunk_size):
    hidden, weight, bias, target = make(
        dtype, ignore_every=4 if "ignore_index" in options else 0, ignore_index=options.get("ignore_index", -100)
    )
    kwargs = dict(options, reduction=reduction, chunk_size=chunk_size)
    if kwargs.pop("class_weights", False):
        kwargs["class_weights"] = torch.rand(C, generator=torch.Generator().manual_seed(2), dtype=dtype) + 0.1
    assert_matches(hidden, weight, bias, target, dtype, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_bias_and_partial_requires_grad(dtype):
    hidden, weight, _, target = make(dtype, bias=False)
    assert_matches(hidden, weight, None, target, dtype, chunk_size=4, label_smoothing=0.1)
    # a frozen head: only hidden needs a gradient (and the other way round)
    frozen = weight.detach()
    out = linear_cross_entropy(hidden, frozen, None, target, chunk_size=4)
    (g,) = torch.autograd.grad(out, hidden)
    (want,) = torch.autograd.grad(F.cross_entropy(F.linear(hidden, frozen), target), hidden)
    torch.testing.assert_close(g, want, atol=TOL[dtype], rtol=TOL[dtype])
    out = linear_cross_entropy(hidden.detach(), weight, None, target, chunk_size=4)
    (g,) = torch.autograd.grad(out, weight)
    (want,) = torch.autograd.grad(F.cross_entropy(F.linear(hidden.detach(), weight), target), weight)
    torch.testing.assert_close(g, want, atol=TOL[dtype], rtol=TOL[dtype])


def test_large_logits_are_stable():
    """Logits of +-1e4 (float32): no overflow, still torch's numbers."""
    hidden, weight, bias, target = make(torch.float32)
    with torch.no_grad():
        weight.mul_(1e3)
    ref = F.cross_entropy(F.linear(hidden, weight, bias), target, label_smoothing=0.1)
    out = linear_cross_entropy(hidden, weight, bias, target, label_smoothing=0.1, chunk_size=8)
    assert torch.isfinite(out)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", [False, True])
def test_all_rows_ignored_gives_zero_and_zero_grads(dtype, weights):
    hidden, weight, bias, target = make(dtype)
    target.fill_(-100)
    cw = torch.rand(C, dtype=dtype) + 0.1 if weights else None
    for reduction in ("mean", "sum"):
        out = linear_cross_entropy(hidden, weight, bias, target, class_weights=cw, label_smoothing=0.1,
                                   reduction=reduction, chunk_size=8)
        assert out.item() == 0.0
        for g in torch.autograd.grad(out, (hidden, weight, bias)):
            assert torch.equal(g, torch.zeros_like(g))
    loss_sum, denominator = linear_cross_entropy_terms(hidden, weight, bias, target, class_weights=cw)
    assert loss_sum.item() == 0.0 and denominator.item() == 0.0


def test_zero_weight_targets_mean_is_zero_like_xentlit():
    """Every target's class weight 0: denominator 0, mean 0 with zero grads (torch gives NaN)."""
    hidden, weight, bias, target = make()
    target.fill_(2)
    cw = torch.ones(C, dtype=torch.float64)
    cw[2] = 0.0
    out = linear_cross_entropy(hidden, weight, bias, target, class_weights=cw, label_smoothing=0.1)
    assert out.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in torch.autograd.grad(out, (hidden, weight, bias)))
    assert torch.isnan(F.cross_entropy(F.linear(hidden, weight, bias), target, weight=cw, label_smoothing=0.1))


def test_empty_batch():
    hidden, weight, bias, target = make(n=0)
    out = linear_cross_entropy(hidden, weight, bias, target)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [{}, {"class_weights": True, "label_smoothing": 0.1}])
def test_terms_match_xentlit_loss_terms(dtype, options):
    hidden, weight, bias, target = make(dtype, ignore_every=3)
    cw = torch.rand(C, dtype=dtype) + 0.1 if options.get("class_weights") else None
    eps = options.get("label_smoothing", 0.0)
    loss = CrossEntropyLoss(class_weights=cw, label_smoothing=eps)
    ref_sum, ref_den = loss.loss_terms(F.linear(hidden, weight, bias), target)
    got_sum, got_den = linear_cross_entropy_terms(hidden, weight, bias, target, class_weights=cw,
                                                  label_smoothing=eps, chunk_size=5)
    tol = TOL[dtype]
    torch.testing.assert_close(got_sum, ref_sum, atol=tol, rtol=tol)
    torch.testing.assert_close(got_den, ref_den.to(got_den.dtype), atol=tol, rtol=tol)
    assert not got_den.requires_grad
    for got, want in zip(grads(got_sum, (hidden, weight, bias)), grads(ref_sum, (hidden, weight, bias))):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(bias):
    hidden, weight, b, target = make(torch.float64, n=7, d=3, c=5, bias=bias)
    target[1] = -100
    cw = torch.tensor([0.5, 1.0, 2.0, 0.25, 1.5], dtype=torch.float64)
    inputs = tuple(x for x in (hidden, weight, b) if x is not None)

    def fn(*args):
        h, w = args[:2]
        return linear_cross_entropy(h, w, args[2] if bias else None, target, class_weights=cw,
                                    label_smoothing=0.15, chunk_size=3)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradcheck(
        lambda *a: linear_cross_entropy(a[0], a[1], a[2] if bias else None, target, reduction="none", chunk_size=2),
        inputs,
    )


def test_low_precision_inputs_compute_in_float32():
    hidden, weight, bias, target = make(torch.float32)
    h16, w16, b16 = (x.detach().bfloat16().requires_grad_() for x in (hidden, weight, bias))
    out = linear_cross_entropy(h16, w16, b16, target, chunk_size=8)
    assert out.dtype == torch.float32
    ref = F.cross_entropy(F.linear(h16.float(), w16.float(), b16.float()), target)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.backward()
    assert h16.grad.dtype == w16.grad.dtype == b16.grad.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not push the GEMMs to bf16
        out_autocast = linear_cross_entropy(hidden, weight, bias, target, chunk_size=8)
    torch.testing.assert_close(out_autocast, F.cross_entropy(F.linear(hidden, weight, bias), target),
                               atol=1e-5, rtol=1e-5)


# ---- the module ----------------------------------------------------------------------------------


def test_module_matches_linear_plus_cross_entropy():
    torch.manual_seed(0)
    linear = nn.Linear(D, C)
    cw = torch.rand(C) + 0.5
    head = ChunkedLinearCrossEntropy(D, C, chunk_size=6, ignore_index=-1, label_smoothing=0.1, class_weights=cw)
    head.load_state_dict({**linear.state_dict(), "class_weights": cw})
    assert set(head.state_dict()) == {"weight", "bias", "class_weights"}
    hidden = torch.randn(N, D)
    target = torch.randint(0, C, (N,))
    target[::5] = -1
    torch.testing.assert_close(head.logits(hidden), linear(hidden))
    loss = head(hidden, target)
    ref = F.cross_entropy(linear(hidden), target, weight=cw, ignore_index=-1, label_smoothing=0.1)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(head.weight.grad, linear.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head.bias.grad, linear.bias.grad, atol=1e-5, rtol=1e-5)
    loss_sum, denominator = head.loss_terms(hidden, target)
    torch.testing.assert_close(loss_sum / denominator, ref, atol=1e-5, rtol=1e-5)
    # a plain head (no class weights, no bias) loads nn.Linear's weights directly
    plain = ChunkedLinearCrossEntropy(D, C, bias=False)
    plain.load_state_dict(nn.Linear(D, C, bias=False).state_dict())
    assert plain.bias is None and plain.class_weights is None
    # dtype casts keep the class weights' dtype (they are tiny; rounding them would change the loss)
    assert head.double().class_weights.dtype == torch.float32


def test_module_init_like_linear():
    torch.manual_seed(3)
    linear = nn.Linear(64, 100)
    torch.manual_seed(3)
    head = ChunkedLinearCrossEntropy(64, 100)
    torch.testing.assert_close(head.weight, linear.weight)
    torch.testing.assert_close(head.bias, linear.bias)


# ---- bad inputs ----------------------------------------------------------------------------------


def _bad_calls():
    h, w, b, t = make(torch.float32)
    return {
        "hidden 1-D": ((h[0], w, b, t), {}, "hidden"),
        "hidden int": ((h.long(), w, b, t), {}, "hidden"),
        "D mismatch": ((h, w[:, :3], b, t), {}, "weight"),
        "bias shape": ((h, w, b[:3], t), {}, "bias"),
        "target shape": ((h, w, b, t[:5]), {}, "target"),
        "target float": ((h, w, b, t.float()), {}, "target"),
        "target too large": ((h, w, b, torch.full((N,), C)), {}, "outside"),
        "target negative": ((h, w, b, torch.full((N,), -1)), {}, "outside"),
        "chunk_size 0": ((h, w, b, t), {"chunk_size": 0}, "chunk_size"),
        "chunk_size float": ((h, w, b, t), {"chunk_size": 2.5}, "chunk_size"),
        "smoothing 1": ((h, w, b, t), {"label_smoothing": 1.0}, "label_smoothing"),
        "smoothing negative": ((h, w, b, t), {"label_smoothing": -0.1}, "label_smoothing"),
        "reduction": ((h, w, b, t), {"reduction": "avg"}, "reduction"),
        "class_weights length": ((h, w, b, t), {"class_weights": torch.ones(C + 1)}, "class_weights"),
        "class_weights negative": ((h, w, b, t), {"class_weights": -torch.ones(C)}, "class_weights"),
        "ignore_index float": ((h, w, b, t), {"ignore_index": 1.5}, "ignore_index"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_inputs_raise_value_error(case):
    args, kwargs, word = _bad_calls()[case]
    with pytest.raises(ValueError, match=word):
        linear_cross_entropy(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"in_features": 0, "num_classes": 5}, "in_features"),
        ({"in_features": 4, "num_classes": 0}, "num_classes"),
        ({"in_features": 4, "num_classes": 5, "chunk_size": 0}, "chunk_size"),
        ({"in_features": 4, "num_classes": 5, "label_smoothing": 1.0}, "label_smoothing"),
        ({"in_features": 4, "num_classes": 5, "class_weights": [1.0, 2.0]}, "class_weights"),
        ({"in_features": 4, "num_classes": 2, "class_weights": [0.0, 0.0]}, "class_weights"),
        ({"in_features": 4, "num_classes": 2, "class_weights": [1.0, math.nan]}, "class_weights"),
    ],
)
def test_module_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ChunkedLinearCrossEntropy(**kwargs)


# ---- memory ----------------------------------------------------------------------------------------

MEM_N, MEM_C, MEM_D, MEM_CHUNK = 2048, 20000, 64, 256


@pytest.fixture(scope="module")
def big_case():
    return make(torch.float32, n=MEM_N, d=MEM_D, c=MEM_C)


def _plain_step(hidden, weight, bias, target):
    F.cross_entropy(F.linear(hidden, weight, bias), target).backward()


def _chunked_step(hidden, weight, bias, target):
    linear_cross_entropy(hidden, weight, bias, target, chunk_size=MEM_CHUNK).backward()


def _saved_bytes(step, case) -> tuple[int, int]:
    """(bytes of distinct storages autograd saves for backward, largest saved tensor's numel)."""
    storages: dict[int, int] = {}
    largest = [0]

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        largest[0] = max(largest[0], t.numel())
        return t

    for x in case[:3]:
        x.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(*case)
    return sum(storages.values()), largest[0]


def test_saves_no_logits_for_backward(big_case):
    """Deterministic: what autograd keeps between forward and backward."""
    plain, plain_largest = _saved_bytes(_plain_step, big_case)
    chunked, chunked_largest = _saved_bytes(_chunked_step, big_case)
    logits_bytes = MEM_N * MEM_C * 4
    assert plain >= logits_bytes and plain_largest == MEM_N * MEM_C  # the plain path keeps (N, C)
    assert chunked_largest < MEM_N * MEM_C / 10  # nothing logits-sized: the inputs and O(N) vectors only
    assert chunked < plain / 4, (chunked, plain)


def test_peak_allocated_memory_is_a_fraction(big_case):
    """Peak allocated bytes of forward+backward (torch's allocation records via the profiler)."""
    hidden, weight, bias, target = big_case

    def measure(step):
        for x in (hidden, weight, bias):
            x.grad = None
        return peak_allocated_bytes(lambda: step(hidden, weight, bias, target))

    plain = measure(_plain_step)
    chunked = measure(_chunked_step)
    logits_bytes = MEM_N * MEM_C * 4
    grads_bytes = (MEM_N * MEM_D + MEM_C * MEM_D + MEM_C) * 4
    assert plain >= 2 * logits_bytes  # (N, C) logits + their gradient at least
    # one (chunk, C) block + the parameter gradients, with 25% slack for small vectors
    assert chunked <= 1.25 * (MEM_CHUNK * MEM_C * 4 + grads_bytes), chunked
    assert chunked < plain / 4, (chunked, plain)


# ---- the benchmark script --------------------------------------------------------------------------


def test_bench_script_quick_runs():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_large_head.py"), "--quick"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    table = result.stdout
    assert "| plain (nn.Linear + F.cross_entropy) |" in table
    assert "| chunked, chunk_size=128 |" in table
