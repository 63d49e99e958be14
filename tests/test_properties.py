"""Property tests (hypothesis) of the CPU kernels over shapes 0..70 and finite values:
each op equals the float64 reference, and softmax cross-entropy keeps its invariants
(rows of probs sum to 1, loss >= 0). Hypothesis seeks out adversarial data (many equal
terms of one sign), so sums are held to their worst-case rounding bound (k*eps of the sum
of magnitudes), not the sqrt(k) bound that random data meets in test_ops.

The IEEE properties run with fm.set_flush_denormal(False) (subnormals included: the
kernels must not lose them in that mode); test_gemm_property_flush_on holds the default
flush-to-zero mode to the reference of the flushed inputs (test_denormal.py has the
exact cases)."""

from __future__ import annotations

import numpy as np
from helpers import (
    F32_EPS,
    F32_TINY,
    assert_close,
    assert_equal_f32,
    f64,
    gemm_tol,
    sum_tol,
    ulp_tol,
)
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastmlp as fm
from fastmlp import reference as ref

FAST = settings(max_examples=100, deadline=None)
dims = st.integers(min_value=0, max_value=70)


@pytest.fixture(autouse=True)
def ieee_mode():
    """IEEE gradual underflow for the properties below (flush-to-zero is the default)."""
    before = fm.get_flush_denormal()
    fm.set_flush_denormal(False)
    yield
    fm.set_flush_denormal(before)


def floats(lo=-10.0, hi=10.0):
    """Finite float32 values in [lo, hi] (subnormals included)."""
    return st.floats(min_value=lo, max_value=hi, width=32, allow_nan=False, allow_infinity=False)


def arrays(shape, elements=None):
    return hnp.arrays(np.float32, shape, elements=elements if elements is not None else floats())


# The GEMM properties' shapes and transposes (alpha/beta pairs per test).
GEMM_GIVEN = dict(data=st.data(), m=dims, k=dims, n=dims, ta=st.booleans(), tb=st.booleans())


@FAST
@given(**GEMM_GIVEN,
       ab=st.sampled_from([(1.0, 0.0), (0.5, 0.0), (-1.5, 1.0), (2.0, -0.25), (0.0, 1.0)]))
def test_gemm_property(data, m, k, n, ta, tb, ab):
    alpha, beta = ab
    a = data.draw(arrays((k, m) if ta else (m, k)), label="a")
    b = data.draw(arrays((n, k) if tb else (k, n)), label="b")
    c0 = data.draw(arrays((m, n)), label="c0") if beta != 0 else np.full((m, n), np.nan, np.float32)
    out = c0.copy()
    res = fm.ops.gemm(a, b, trans_a=ta, trans_b=tb, alpha=alpha, beta=beta, out=out)
    assert res is out
    want = ref.gemm(*f64(a, b), trans_a=ta, trans_b=tb, alpha=alpha, beta=beta, out=f64(c0).copy())
    assert_close(
        out,
        want,
        gemm_tol(a, b, c0, trans_a=ta, trans_b=tb, alpha=alpha, beta=beta, worst_case=True),
        "gemm",
    )


F32_MIN_NORMAL = float(np.finfo(np.float32).tiny)  # 2**-126: below it, flush-to-zero writes 0


def flushed(a):
    """a with its denormals replaced by (signed) zero, as DAZ reads them."""
    return np.where(np.abs(a) < F32_MIN_NORMAL, np.float32(0) * a, a).astype(np.float32)


@FAST
@given(**GEMM_GIVEN, ab=st.sampled_from([(1.0, 0.0), (-1.5, 1.0), (2.0, -0.25)]))
def test_gemm_property_flush_on(data, m, k, n, ta, tb, ab):
    """Flush-to-zero on: the reference of the flushed inputs, plus at most one FLT_MIN
    per flushed partial sum (k of them) and per epilogue operation."""
    alpha, beta = ab
    a = data.draw(arrays((k, m) if ta else (m, k)), label="a")
    b = data.draw(arrays((n, k) if tb else (k, n)), label="b")
    c0 = data.draw(arrays((m, n)), label="c0") if beta != 0 else np.full((m, n), np.nan, np.float32)
    out = c0.copy()
    fm.set_flush_denormal(True)
    fm.ops.gemm(a, b, trans_a=ta, trans_b=tb, alpha=alpha, beta=beta, out=out)
    fa, fb, fc = flushed(a), flushed(b), flushed(c0) if beta != 0 else c0
    want = ref.gemm(*f64(fa, fb), trans_a=ta, trans_b=tb, alpha=alpha, beta=beta, out=f64(fc).copy())
    tol = gemm_tol(fa, fb, fc, trans_a=ta, trans_b=tb, alpha=alpha, beta=beta, worst_case=True)
    assert_close(out, want, tol + (k + 3) * (1 + abs(alpha) + abs(beta)) * F32_MIN_NORMAL,
                 "gemm (flush)")
    assert not ((out != 0) & (np.abs(out) < F32_MIN_NORMAL)).any()  # no denormal written


@FAST
@given(data=st.data(), n=dims, f=dims)
def test_bias_add_and_grad_property(data, n, f):
    x = data.draw(arrays((n, f)), label="x")
    bias = data.draw(arrays((f,)), label="bias")
    out = np.full((n, f), np.nan, np.float32)
    fm.ops.bias_add(x, bias, out=out)
    assert_equal_f32(out, ref.bias_add(*f64(x, bias)), "bias_add")
    db = np.full((f,), np.nan, np.float32)
    fm.ops.bias_grad(x, out=db)
    assert_close(
        db,
        ref.bias_grad(f64(x)),
        sum_tol(n, np.abs(f64(x)).sum(axis=0), worst_case=True),
        "bias_grad",
    )


nonzero = st.one_of(
    floats(2.0**-10, 100.0), floats(-100.0, -(2.0**-10))
)  # |x| >= ~1e-3: off the kink


@FAST
@given(data=st.data(), n=dims, f=dims)
def test_relu_property(data, n, f):
    x = data.draw(arrays((n, f), nonzero), label="x")
    dy = data.draw(arrays((n, f)), label="dy")
    y = np.full((n, f), np.nan, np.float32)
    fm.ops.relu(x, out=y)
    assert_equal_f32(y, ref.relu(f64(x)), "relu")
    assert (y >= 0).all()
    dx = np.full((n, f), np.nan, np.float32)
    fm.ops.relu_backward(dy, y, out=dx)
    assert_equal_f32(dx, ref.relu_backward(*f64(dy, y)), "relu_backward")


@FAST
@given(
    data=st.data(), n=dims, c=st.integers(min_value=1, max_value=70), onehot_labels=st.booleans()
)
def test_softmax_cross_entropy_property(data, n, c, onehot_labels):
    logits = data.draw(arrays((n, c), floats(-50.0, 50.0)), label="logits")
    idx = np.array(
        data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n), label="labels"),
        dtype=np.int64,
    )
    labels = np.eye(c, dtype=np.float32)[idx] if onehot_labels else idx
    loss, probs = fm.ops.softmax_cross_entropy(logits, labels)
    loss = float(loss)
    assert probs.shape == (n, c) and np.isfinite(probs).all() and (probs >= 0).all()
    if n:
        # each row sums to 1 up to the rounding of c float32 terms
        np.testing.assert_allclose(
            probs.sum(axis=1, dtype=np.float64), 1.0, atol=2 * F32_EPS * (c + 2)
        )
    assert np.isfinite(loss) and loss >= 0
    want_loss, want_probs = ref.softmax_cross_entropy(
        f64(logits), f64(labels) if onehot_labels else labels
    )
    zdist = np.abs(f64(logits) - f64(logits).max(axis=1, keepdims=True)) if n else 0.0
    # as test_ops._probs_tol / _loss_tol, with the worst-case bound c*eps for the row sum
    rel = c * F32_EPS + F32_EPS * (zdist + 4)
    assert_close(probs, want_probs, rel * np.abs(want_probs) + 4 * F32_TINY, "probs")
    loss_tol = (
        c * F32_EPS
        + F32_EPS * (2 * np.max(zdist, initial=0) + np.log(c) + 4)
        + 4 * F32_EPS * float(want_loss)
    )
    assert abs(loss - float(want_loss)) <= loss_tol, (loss, float(want_loss))
    grad = np.full((n, c), np.nan, np.float32)
    fm.ops.softmax_cross_entropy_backward(probs, labels, out=grad)
    want_grad = ref.softmax_cross_entropy_backward(
        f64(probs), f64(labels) if onehot_labels else labels
    )
    assert_close(grad, want_grad, ulp_tol(want_grad, 4), "dlogits")


# -- issue 18: the attacks' and the attributions' elementwise kernels -----------------------


@FAST
@given(data=st.data(), n=dims, f=dims, eps=st.floats(0.0, 2.0, width=32),
       alpha=st.floats(0.0009765625, 1.0, width=32), project=st.booleans(),
       clip=st.sampled_from([(0.0, 1.0), (-1.5, 0.5), None]))
def test_adversarial_step_property(data, n, f, eps, alpha, project, clip):
    """The sign step equals the float32 reference bit for bit, stays in the clip range
    and, projected, in the eps-ball around x (up to the rounding of x + delta)."""
    x = data.draw(arrays((n, f), floats(-2.0, 2.0)))
    adv0 = data.draw(arrays((n, f), floats(-2.0, 2.0)))
    g = data.draw(arrays((n, f)))
    got = fm.ops.adversarial_step(x, adv0.copy(), g, eps=eps, alpha=alpha, clip=clip,
                                  project=project)
    want = ref.adversarial_step(x, adv0.copy(), g, eps=eps, alpha=alpha, clip=clip,
                                project=project)
    np.testing.assert_array_equal(got, want)
    lo, hi = clip if clip is not None else (-np.inf, np.inf)
    assert np.all((got >= lo) & (got <= hi))
    if project and clip is None:
        bound = np.float32(eps) + np.spacing(np.abs(x) + np.float32(eps)) + 1e-30
        assert np.all(np.abs(got.astype(np.float64) - x) <= bound)


@FAST
@given(data=st.data(), images=st.integers(0, 9), f=dims, steps=st.integers(1, 6),
       per_batch=st.integers(1, 4), multiply=st.booleans(), absolute=st.booleans(),
       with_base=st.booleans())
def test_integrated_gradients_kernels_property(data, images, f, steps, per_batch, multiply,
                                               absolute, with_base):
    """Interpolating and summing batch by batch equals one call over everything, and
    both equal the float32 reference bit for bit."""
    x = data.draw(arrays((images, f), floats(-3.0, 3.0)))
    base = data.draw(arrays((images, f), floats(-1.0, 1.0))) if with_base else None
    alphas = np.linspace(0, 1, steps).astype(np.float32)
    weights = data.draw(arrays((steps,), floats(0.0, 1.0)))
    rows = images * steps
    grads = data.draw(arrays((rows, f)))
    whole = fm.ops.ig_interpolate(x, alphas, baseline=base)
    np.testing.assert_array_equal(whole, ref.ig_interpolate(x, alphas, baseline=base))
    batch = per_batch * steps
    out = np.zeros((images, f), np.float32)
    for s in range(-(-rows // batch)):
        part = fm.ops.ig_interpolate(x, alphas, baseline=base, step=s, batch=batch)
        np.testing.assert_array_equal(part, whole[s * batch:s * batch + len(part)])
        fm.ops.ig_accumulate(grads[s * batch:(s + 1) * batch], x, weights, baseline=base,
                             multiply=multiply, absolute=absolute, step=s, batch=batch, out=out)
    want = ref.ig_accumulate(grads, x, weights, baseline=base, multiply=multiply,
                             absolute=absolute)
    np.testing.assert_array_equal(out, want)
