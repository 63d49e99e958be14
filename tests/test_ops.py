"""fm.ops (the kernels) against fm.reference run in float64, on the CPU and the GPU.

Every test poisons its output with NaN before the kernel call, so an element the
kernel never writes fails the comparison; the reference result is checked to be
non-zero so an all-zero output cannot pass. Shapes cover 1, primes, sizes that are
not multiples of GPU tiles (63, 65, 129), 0 and a large case. Test ids of shapes
whose dims are all <= 65 contain "small" (the compute-sanitizer subset).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    F32_EPS,
    F32_TINY,
    assert_close,
    assert_equal_f32,
    assert_meaningful,
    away_from_zero,
    f64,
    gemm_operands,
    gemm_tol,
    normal,
    onehot,
    shape_id,
    soft_labels,
    sum_tol,
    ulp_tol,
)

import fastmlp as fm
from fastmlp import reference as ref

TRANSPOSES = [(False, False), (False, True), (True, False), (True, True)]
TRANS_IDS = ["nn", "nt", "tn", "tt"]

# (m, k, n): 1, primes, tile non-multiples, zeros, and the MNIST first layer (batch 1024).
GEMM_SHAPES = [
    (1, 1, 1),
    (1, 7, 1),
    (7, 13, 31),
    (13, 1, 7),
    (31, 97, 13),
    (97, 127, 7),
    (127, 31, 97),
    (63, 65, 64),
    (65, 63, 65),
    (64, 64, 64),
    (63, 129, 65),
    (129, 65, 63),
    (0, 7, 5),
    (7, 0, 5),
    (7, 5, 0),
    (0, 0, 0),
    (1024, 784, 128),
]

# (rows, cols) for the elementwise ops
EW_SHAPES = [
    (1, 1),
    (7, 13),
    (13, 7),
    (31, 97),
    (63, 65),
    (65, 64),
    (97, 127),
    (129, 63),
    (0, 7),
    (7, 0),
    (4096, 1000),
]

# (rows, classes) for softmax cross-entropy
SCE_SHAPES = [
    (1, 1),
    (1, 2),
    (7, 13),
    (13, 7),
    (31, 10),
    (63, 65),
    (65, 129),
    (97, 1000),
    (0, 10),
    (4096, 1000),
]

LABEL_KINDS = ["int32", "int64", "onehot", "soft"]


def _ids(shapes):
    return [shape_id(*s) for s in shapes]


def _ref_labels(labels):
    """Labels for the float64 reference: float rows as float64, class indices unchanged."""
    return f64(labels) if labels.dtype.kind == "f" else labels


def _labels(rng, kind, n, c):
    idx = rng.integers(0, c, size=n)
    if kind == "int32":
        return idx.astype(np.int32)
    if kind == "int64":
        return idx.astype(np.int64)
    if kind == "onehot":
        return onehot(idx, c)
    return soft_labels(rng, n, c)


# ----------------------------------------------------------------------------- gemm


@pytest.mark.parametrize("trans", TRANSPOSES, ids=TRANS_IDS)
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=_ids(GEMM_SHAPES))
def test_gemm(backend, rng, shape, trans):
    m, k, n = shape
    ta, tb = trans
    a, b = gemm_operands(rng, m, k, n, ta, tb)
    A, B = backend.to(a), backend.to(b)
    out = backend.nan((m, n))  # beta == 0: the NaN must neither survive nor leak in
    res = fm.ops.gemm(A, B, trans_a=ta, trans_b=tb, out=out)
    assert res is out
    got = backend.host(out)
    want = ref.gemm(*f64(a, b), trans_a=ta, trans_b=tb)
    if m * n * k:
        assert_meaningful(want)
    assert_close(
        got, want, gemm_tol(a, b, None, trans_a=ta, trans_b=tb, alpha=1.0, beta=0.0), "gemm"
    )

    fresh = fm.ops.gemm(A, B, trans_a=ta, trans_b=tb)  # out=None: a new array
    assert (
        isinstance(fresh, backend.xp.ndarray)
        and fresh.dtype == np.float32
        and fresh.shape == (m, n)
    )
    # same kernel, same inputs: bit-identical (reductions are deterministic)
    assert np.array_equal(backend.host(fresh), got)


GEMM_AB_SHAPES = [(1, 1, 1), (7, 13, 31), (65, 63, 129), (0, 3, 4), (5, 0, 4)]
# only one shape of this 120-case grid joins the "small" (compute-sanitizer) subset
GEMM_AB_IDS = [
    "small-7x13x31" if s == (7, 13, 31) else "x".join(map(str, s)) for s in GEMM_AB_SHAPES
]


@pytest.mark.parametrize(
    "alpha,beta", [(0.5, 0.0), (-2.0, 1.0), (1.0, 1.0), (0.25, -0.5), (0.0, 2.0), (3.0, 0.0)]
)
@pytest.mark.parametrize("trans", TRANSPOSES, ids=TRANS_IDS)
@pytest.mark.parametrize("shape", GEMM_AB_SHAPES, ids=GEMM_AB_IDS)
def test_gemm_alpha_beta(backend, rng, shape, trans, alpha, beta):
    m, k, n = shape
    ta, tb = trans
    a, b = gemm_operands(rng, m, k, n, ta, tb)
    c0 = normal(rng, (m, n))
    out = backend.to(c0) if beta != 0 else backend.nan((m, n))
    res = fm.ops.gemm(
        backend.to(a), backend.to(b), trans_a=ta, trans_b=tb, alpha=alpha, beta=beta, out=out
    )
    assert res is out
    want = ref.gemm(*f64(a, b), trans_a=ta, trans_b=tb, alpha=alpha, beta=beta, out=f64(c0).copy())
    if m * n and (alpha * k != 0 or beta != 0):
        assert_meaningful(want)
    tol = gemm_tol(a, b, c0, trans_a=ta, trans_b=tb, alpha=alpha, beta=beta)
    assert_close(backend.host(out), want, tol, f"gemm alpha={alpha} beta={beta}")


def test_gemm_beta_zero_never_reads_out(backend, rng):
    """beta == 0: Inf and NaN already in out do not propagate (BLAS semantics)."""
    a, b = normal(rng, (9, 5)), normal(rng, (5, 11))
    c0 = np.full((9, 11), np.inf, dtype=np.float32)
    c0[::2] = np.nan
    out = backend.to(c0)
    fm.ops.gemm(backend.to(a), backend.to(b), alpha=2.0, beta=0.0, out=out)
    want = ref.gemm(*f64(a, b), alpha=2.0)
    assert_close(
        backend.host(out),
        want,
        gemm_tol(a, b, None, trans_a=False, trans_b=False, alpha=2.0, beta=0.0),
    )


def test_gemm_nan_in_a_poisons_its_rows(backend, rng):
    """NaN is data: a NaN in row i of A makes row i of C NaN, and only that row."""
    a, b = normal(rng, (6, 8)), normal(rng, (8, 5))
    a[2, 3] = np.nan
    got = backend.host(fm.ops.gemm(backend.to(a), backend.to(b)))
    assert np.isnan(got[2]).all()
    assert np.isfinite(np.delete(got, 2, axis=0)).all()
    want = ref.gemm(*f64(a, b))
    assert_close(
        got,
        want,
        gemm_tol(np.nan_to_num(a), b, None, trans_a=False, trans_b=False, alpha=1.0, beta=0.0),
    )


def test_gemm_out_aliasing_input_is_safe(backend, rng):
    """gemm cannot run in place; an `out` that is an input must raise or still be right,
    never silently wrong."""
    a, b = normal(rng, (16, 16)), normal(rng, (16, 16))
    A, B = backend.to(a), backend.to(b)
    want = ref.gemm(*f64(a, b))
    try:
        fm.ops.gemm(A, B, out=A)
    except ValueError as e:
        assert "out" in str(e)
        assert np.array_equal(backend.host(A), a), "a rejected call must not modify its inputs"
    else:
        assert_close(
            backend.host(A),
            want,
            gemm_tol(a, b, None, trans_a=False, trans_b=False, alpha=1.0, beta=0.0),
        )


def test_gemm_backward_products(backend, rng):
    """The Dense backward pass: dW = X^T dY and dX = dY W^T through the transposed kernels."""
    n, fin, fout = 97, 65, 31
    x, w, dy = normal(rng, (n, fin)), normal(rng, (fin, fout)), normal(rng, (n, fout))
    X, W, DY = backend.to(x), backend.to(w), backend.to(dy)
    dw = fm.ops.gemm(X, DY, trans_a=True, out=backend.nan((fin, fout)))
    dx = fm.ops.gemm(DY, W, trans_b=True, out=backend.nan((n, fin)))
    assert_close(
        backend.host(dw),
        f64(x).T @ f64(dy),
        gemm_tol(x, dy, None, trans_a=True, trans_b=False, alpha=1, beta=0),
        "dW",
    )
    assert_close(
        backend.host(dx),
        f64(dy) @ f64(w).T,
        gemm_tol(dy, w, None, trans_a=False, trans_b=True, alpha=1, beta=0),
        "dX",
    )


# ----------------------------------------------------------------------------- bias


@pytest.mark.parametrize("shape", EW_SHAPES, ids=_ids(EW_SHAPES))
def test_bias_add(backend, rng, shape):
    x, bias = normal(rng, shape), normal(rng, shape[1:])
    X, Bias = backend.to(x), backend.to(bias)
    out = backend.nan(shape)
    assert fm.ops.bias_add(X, Bias, out=out) is out
    want = ref.bias_add(*f64(x, bias))
    assert_meaningful(want)
    assert_equal_f32(backend.host(out), want, "bias_add")  # one fp32 add: exact
    fresh = fm.ops.bias_add(X, Bias)
    assert fresh.shape == shape and fresh.dtype == np.float32
    assert_equal_f32(backend.host(fresh), want, "bias_add out=None")
    # in place: out aliasing x
    assert fm.ops.bias_add(X, Bias, out=X) is X
    assert_equal_f32(backend.host(X), want, "bias_add out=x")


@pytest.mark.parametrize("shape", EW_SHAPES, ids=_ids(EW_SHAPES))
def test_bias_grad(backend, rng, shape):
    n, f = shape
    dy = normal(rng, shape)
    DY = backend.to(dy)
    out = backend.nan((f,))
    assert fm.ops.bias_grad(DY, out=out) is out
    got = backend.host(out)
    want = ref.bias_grad(f64(dy))
    if n:
        assert_meaningful(want)
    # a sum of n float32 terms per column (n == 0: exact zeros)
    assert_close(got, want, sum_tol(n, np.abs(f64(dy)).sum(axis=0)), "bias_grad")
    # an accumulating-looking kernel must reset: a second call on the same out gives the same
    fm.ops.bias_grad(DY, out=out)
    assert np.array_equal(backend.host(out), got), "bias_grad accumulated into out (not reset)"
    fresh = fm.ops.bias_grad(DY)
    assert fresh.shape == (f,) and np.array_equal(backend.host(fresh), got)


def test_bias_grad_zero_rows_gives_zeros(backend):
    out = backend.nan((13,))
    fm.ops.bias_grad(backend.xp.zeros((0, 13), dtype=np.float32), out=out)
    assert np.array_equal(backend.host(out), np.zeros(13, np.float32))


# ----------------------------------------------------------------------------- relu


@pytest.mark.parametrize("shape", EW_SHAPES, ids=_ids(EW_SHAPES))
def test_relu(backend, rng, shape):
    x = away_from_zero(rng, shape)
    x.flat[:1] = np.abs(x.flat[:1])  # at least one positive and (size > 1) one negative input
    x.flat[1:2] = -np.abs(x.flat[1:2])
    X = backend.to(x)
    out = backend.nan(shape)
    assert fm.ops.relu(X, out=out) is out
    want = ref.relu(f64(x))
    assert_meaningful(want)
    if x.size > 1:
        assert (want == 0).any(), "test data has no negative inputs"
    assert_equal_f32(backend.host(out), want, "relu")  # a select: exact
    assert_equal_f32(backend.host(fm.ops.relu(X)), want, "relu out=None")
    assert fm.ops.relu(X, out=X) is X  # in place
    assert_equal_f32(backend.host(X), want, "relu out=x")


@pytest.mark.parametrize(
    "shape",
    [(1,), (97,), (5, 7, 3), (2, 3, 4, 5)],
    ids=["small-1", "small-97", "small-3d", "small-4d"],
)
def test_relu_any_rank(backend, rng, shape):
    x = away_from_zero(rng, shape)
    out = backend.nan(shape)
    fm.ops.relu(backend.to(x), out=out)
    assert_equal_f32(backend.host(out), ref.relu(f64(x)), "relu")


@pytest.mark.parametrize("shape", EW_SHAPES, ids=_ids(EW_SHAPES))
def test_relu_backward(backend, rng, shape):
    z = away_from_zero(rng, shape)
    z.flat[:1] = np.abs(z.flat[:1])  # at least one positive, so some gradient passes
    y = ref.relu(z)  # a relu output: zeros and positives
    dy = away_from_zero(rng, shape)
    DY, Y = backend.to(dy), backend.to(y)
    out = backend.nan(shape)
    assert fm.ops.relu_backward(DY, Y, out=out) is out
    want = ref.relu_backward(*f64(dy, y))
    if y.size:
        assert_meaningful(want)
    assert_equal_f32(backend.host(out), want, "relu_backward")
    assert_equal_f32(backend.host(fm.ops.relu_backward(DY, Y)), want, "relu_backward out=None")
    assert fm.ops.relu_backward(DY, Y, out=DY) is DY  # in place over dy
    assert_equal_f32(backend.host(DY), want, "relu_backward out=dy")


def test_relu_nan_inf(backend):
    """relu is torch.relu (x < 0 ? 0 : x): NaN and +Inf pass, -Inf -> 0, -0.0 stays -0.0;
    relu_backward is threshold_backward (y <= 0 ? 0 : dy): where y is NaN, dy passes."""
    x = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 2.5, -2.5], dtype=np.float32)
    got = backend.host(fm.ops.relu(backend.to(x)))
    assert_equal_f32(got, ref.relu(f64(x)), "relu")
    assert_equal_f32(got, np.array([np.nan, np.inf, 0, 0, 0, 2.5, 0]), "relu")
    assert np.signbit(got).tolist() == [False, False, False, True, False, False, False]
    dy = np.array([1.0, np.nan, np.inf, 3.0, np.nan, -1.0, 2.0], dtype=np.float32)
    y = np.array([1.0, 2.0, 0.0, 0.0, 0.0, 5.0, np.nan], dtype=np.float32)
    got = backend.host(fm.ops.relu_backward(backend.to(dy), backend.to(y)))
    assert_equal_f32(got, ref.relu_backward(*f64(dy, y)), "relu_backward")
    assert_equal_f32(got, np.array([1.0, np.nan, 0, 0, 0, -1.0, 2.0]), "relu_backward")


# ----------------------------------------------------------------------------- softmax CE


def _probs_tol(logits, want_probs):
    """p = exp(z - max) / sum_c exp(z_c - max) in float32. The sum of c terms is off by up to
    sum_tol(c) relative (a sequential float32 sum of 1000 terms: measured ~30 ulp), the
    rounded exponent z - max adds eps * |z - max| relative through exp, and exp, the
    division and the roundings a few ulp more. The result is relative to p (small p are just
    as accurate), plus subnormal steps for p that underflow."""
    n, c = logits.shape
    zdist = np.abs(f64(logits) - f64(logits).max(axis=1, keepdims=True)) if n else 0.0
    rel = 2 * F32_EPS * (np.sqrt(max(c, 1)) + 2) + F32_EPS * (zdist + 4)
    return rel * np.abs(want_probs) + 4 * F32_TINY


def _loss_tol(logits, want, n):
    """A row's loss is -(z_y - max) + log(sum): its float32 error is a few ulp of |z - max|
    plus the relative error of the sum (see _probs_tol) as an absolute error of its log.
    The mean over n non-negative row losses is a sum of n terms: sum_tol(n) relative (the
    CPU sums in double, a GPU block reduction in float32)."""
    if n == 0:
        return 0.0
    c = logits.shape[1]
    zdist = float(np.abs(f64(logits) - f64(logits).max(axis=1, keepdims=True)).max())
    per_row = 2 * F32_EPS * (np.sqrt(c) + 2) + F32_EPS * (2 * zdist + np.log(c) + 4)
    return per_row + sum_tol(n, abs(float(want)))


@pytest.mark.parametrize("kind", LABEL_KINDS)
@pytest.mark.parametrize("shape", SCE_SHAPES, ids=_ids(SCE_SHAPES))
def test_softmax_cross_entropy(backend, rng, shape, kind):
    n, c = shape
    logits = normal(rng, shape, scale=3.0)
    labels = _labels(rng, kind, n, c)
    loss, probs = fm.ops.softmax_cross_entropy(backend.to(logits), backend.to(labels))
    assert (
        isinstance(probs, backend.xp.ndarray) and probs.dtype == np.float32 and probs.shape == shape
    )
    assert loss.shape == () and loss.dtype == np.float32
    want_loss, want_probs = ref.softmax_cross_entropy(f64(logits), _ref_labels(labels))
    got_probs = backend.host(probs)
    assert_meaningful(want_probs)
    assert_close(got_probs, want_probs, _probs_tol(logits, want_probs), "softmax probs")
    got_loss = float(backend.host(loss))
    if n and c > 1:
        assert float(want_loss) > 0
    assert abs(got_loss - float(want_loss)) <= _loss_tol(logits, want_loss, n), (
        f"loss: got {got_loss!r}, expected {float(want_loss)!r}"
    )
    if n:
        assert np.allclose(got_probs.sum(axis=1), 1.0, atol=c * F32_EPS)


@pytest.mark.parametrize("kind", LABEL_KINDS)
@pytest.mark.parametrize("shape", SCE_SHAPES, ids=_ids(SCE_SHAPES))
def test_softmax_cross_entropy_backward(backend, rng, shape, kind):
    n, c = shape
    probs = ref.softmax_cross_entropy(f64(normal(rng, shape, scale=3.0)), np.zeros(n, np.int64))[
        1
    ].astype(np.float32)
    labels = _labels(rng, kind, n, c)
    P, L = backend.to(probs), backend.to(labels)
    out = backend.nan(shape)
    assert fm.ops.softmax_cross_entropy_backward(P, L, out=out) is out
    want = ref.softmax_cross_entropy_backward(f64(probs), _ref_labels(labels))
    if c > 1:  # with one class p == 1 == y: the gradient is exactly 0
        assert_meaningful(want)
    # (p - y) * (1/n) or (p - y) / n: at most three float32 roundings -> 4 ulp of |want|
    tol = ulp_tol(want, 4)
    assert_close(backend.host(out), want, tol, "softmax_cross_entropy_backward")
    assert_close(
        backend.host(fm.ops.softmax_cross_entropy_backward(P, L)), want, tol, "backward out=None"
    )
    assert fm.ops.softmax_cross_entropy_backward(P, L, out=P) is P  # in place over probs
    assert_close(backend.host(P), want, tol, "backward out=probs")


@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_softmax_cross_entropy_extreme_logits(backend, rng, kind):
    """Logits of +-1000: the row max is subtracted, so loss and probs stay finite."""
    n, c = 33, 17
    logits = (
        rng.choice(np.array([-1000.0, 1000.0]), size=(n, c)) + rng.uniform(-3, 3, size=(n, c))
    ).astype(np.float32)
    logits[0] = -1000.0  # a row of ties at -1000
    logits[1] = 1000.0
    labels = _labels(rng, kind, n, c)
    loss, probs = fm.ops.softmax_cross_entropy(backend.to(logits), backend.to(labels))
    got_probs, got_loss = backend.host(probs), float(backend.host(loss))
    assert np.isfinite(got_probs).all() and np.isfinite(got_loss)
    want_loss, want_probs = ref.softmax_cross_entropy(f64(logits), _ref_labels(labels))
    assert_close(got_probs, want_probs, _probs_tol(logits, want_probs), "probs")
    assert_close(
        got_probs[0], np.full(c, 1.0 / c), _probs_tol(logits[:1], want_probs[:1])[0], "tied row"
    )
    assert float(want_loss) > 100  # wrong-class rows cost ~2000: nontrivial
    assert abs(got_loss - float(want_loss)) <= _loss_tol(logits, want_loss, n)
    grad = fm.ops.softmax_cross_entropy_backward(probs, backend.to(labels))
    assert np.isfinite(backend.host(grad)).all()


def test_softmax_cross_entropy_every_exponent(backend):
    """Two classes with gaps over the whole float range of exp (0 down to -110, where
    e^gap underflows): probabilities within 4 ulp (plus FLT_MIN, where a result is
    denormal or flushed) and the loss within 1e-6 of float64 -- the CPU's
    vectorised exp and log (kernel_math.h: exp_vec, log_vec) included."""
    gaps = np.concatenate([np.linspace(-110, 0, 20001), [-1e-6, -1e-30, 0.0]]).astype(np.float32)
    logits = np.stack([gaps, np.zeros_like(gaps)], axis=1)
    labels = np.zeros(len(gaps), np.int64)
    loss, probs = fm.ops.softmax_cross_entropy(backend.to(logits), backend.to(labels))
    e = np.exp(f64(gaps))
    want = np.stack([e / (e + 1), 1 / (e + 1)], axis=1)
    got = backend.host(probs).astype(np.float64)
    tol = 4 * np.spacing(want.astype(np.float32)).astype(np.float64) + np.finfo(np.float32).tiny
    assert (np.abs(got - want) <= tol).all(), np.abs(got - want).max()
    want_loss = np.mean(np.log1p(e) - f64(gaps))
    assert abs(float(backend.host(loss)) - want_loss) <= 1e-6 * want_loss


def test_softmax_cross_entropy_labels_agree(backend, rng):
    """int32, int64 and one-hot labels of the same classes give the same loss and probs."""
    n, c = 45, 11
    logits = backend.to(normal(rng, (n, c), scale=2.0))
    idx = rng.integers(0, c, size=n)
    results = [
        fm.ops.softmax_cross_entropy(logits, backend.to(lab))
        for lab in (idx.astype(np.int32), idx.astype(np.int64), onehot(idx, c))
    ]
    l32, p32 = (backend.host(v) for v in results[0])
    for loss, probs in results[1:]:
        assert np.array_equal(backend.host(probs), p32)
        assert abs(float(backend.host(loss)) - float(l32)) <= 1e-6 * abs(float(l32))
    assert np.array_equal(
        backend.host(results[0][0]), backend.host(results[1][0])
    )  # int32 vs int64: bitwise
    g = [
        backend.host(fm.ops.softmax_cross_entropy_backward(results[0][1], backend.to(lab)))
        for lab in (idx.astype(np.int32), idx.astype(np.int64), onehot(idx, c))
    ]
    assert np.array_equal(g[0], g[1]) and np.array_equal(g[0], g[2])


def test_softmax_cross_entropy_forward_out(backend, rng):
    """out= receives the probabilities (the same values as without it); an out
    overlapping the logits or of the wrong shape is a ValueError."""
    logits = backend.to(normal(rng, (9, 5)))
    labels = backend.to(rng.integers(0, 5, 9).astype(np.int64))
    loss, probs, _ = fm.ops.softmax_cross_entropy_forward(logits, labels)
    out = backend.to(np.full((9, 5), np.nan, np.float32))
    loss2, probs2, _ = fm.ops.softmax_cross_entropy_forward(logits, labels, out=out)
    assert probs2 is out
    assert np.array_equal(backend.host(probs2), backend.host(probs))
    assert float(backend.host(loss2)) == float(backend.host(loss))
    with pytest.raises(ValueError, match="out"):
        fm.ops.softmax_cross_entropy_forward(logits, labels, out=logits)
    with pytest.raises(ValueError, match="out"):
        fm.ops.softmax_cross_entropy_forward(logits, labels, out=backend.to(np.zeros((9, 4), np.float32)))


def test_softmax_cross_entropy_empty(backend):
    for labels in (np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros((0, 10), np.float32)):
        loss, probs = fm.ops.softmax_cross_entropy(
            backend.xp.zeros((0, 10), np.float32), backend.to(labels)
        )
        assert float(backend.host(loss)) == 0.0
        assert probs.shape == (0, 10)
        grad = fm.ops.softmax_cross_entropy_backward(probs, backend.to(labels))
        assert grad.shape == (0, 10)


def test_softmax_cross_entropy_deterministic(backend, rng):
    """Two runs on the same inputs are bit-identical (no floating-point atomics)."""
    n, c = 2049, 129
    logits, labels = (
        backend.to(normal(rng, (n, c), scale=4.0)),
        backend.to(rng.integers(0, c, n).astype(np.int64)),
    )
    l1, p1 = fm.ops.softmax_cross_entropy(logits, labels)
    l2, p2 = fm.ops.softmax_cross_entropy(logits, labels)
    assert backend.host(l1).tobytes() == backend.host(l2).tobytes()
    assert backend.host(p1).tobytes() == backend.host(p2).tobytes()
    g1 = fm.ops.softmax_cross_entropy_backward(p1, labels)
    g2 = fm.ops.softmax_cross_entropy_backward(p1, labels)
    assert backend.host(g1).tobytes() == backend.host(g2).tobytes()


def test_reductions_deterministic(backend, rng):
    x, w = backend.to(normal(rng, (1024, 784))), backend.to(normal(rng, (784, 128)))
    c1, c2 = fm.ops.gemm(x, w), fm.ops.gemm(x, w)
    assert backend.host(c1).tobytes() == backend.host(c2).tobytes()
    d1 = fm.ops.gemm(x, c1, trans_a=True)
    d2 = fm.ops.gemm(x, c1, trans_a=True)
    assert backend.host(d1).tobytes() == backend.host(d2).tobytes()
    b1, b2 = fm.ops.bias_grad(x), fm.ops.bias_grad(x)
    assert backend.host(b1).tobytes() == backend.host(b2).tobytes()


@pytest.mark.parametrize("bad", [-1, 10, 2**40], ids=["negative", "eq-classes", "huge"])
@pytest.mark.parametrize("dtype", [np.int32, np.int64], ids=["int32", "int64"])
def test_bad_labels_raise(backend, rng, dtype, bad):
    """On both backends a label outside [0, classes) raises ValueError naming its value."""
    if dtype == np.int32 and bad > np.iinfo(np.int32).max:
        bad = np.iinfo(np.int32).max
    labels = rng.integers(0, 10, size=17).astype(dtype)
    labels[11] = bad
    logits = backend.to(normal(rng, (17, 10)))
    with pytest.raises(ValueError, match=rf"(?<![\d-]){bad}(?!\d)"):
        fm.ops.softmax_cross_entropy(logits, backend.to(labels))
    probs = backend.to(np.full((17, 10), 0.1, np.float32))
    with pytest.raises(ValueError, match=rf"(?<![\d-]){bad}(?!\d)"):
        fm.ops.softmax_cross_entropy_backward(probs, backend.to(labels))


# ----------------------------------------------------------------------------- a Dense layer


def _dense_data(rng, n, d, h, c):
    """Data for a Dense(relu) -> Dense step whose pre-activations are all >= 1e-4 away from 0.

    With W1 ~ N(0, 1/d) the pre-activations are ~N(0, 1) and their float32 error is < 2e-5
    (sum_tol over d = 97 terms), so no relu mask can differ between kernel and reference.
    A draw with a pre-activation closer to 0 than 1e-4 (probability ~0.15) is redrawn.
    """
    while True:
        x = normal(rng, (n, d))
        w1, b1 = normal(rng, (d, h), 1 / np.sqrt(d)), normal(rng, (h,), 0.1)
        w2, b2 = normal(rng, (h, c), 1 / np.sqrt(h)), normal(rng, (c,), 0.1)
        y = rng.integers(0, c, n).astype(np.int64)
        if np.abs(f64(x) @ f64(w1) + f64(b1)).min() > 1e-4:
            return x, w1, b1, w2, b2, y


def test_dense_layer_forward_backward(backend, rng):
    """The ops chained as one training step of Dense(relu) -> Dense -> softmax CE, vs the
    same chain of reference ops in float64."""
    n, d, h, c = 65, 97, 31, 10
    x, w1, b1, w2, b2, y = _dense_data(rng, n, d, h, c)
    X, W1, B1, W2, B2, Y = (backend.to(v) for v in (x, w1, b1, w2, b2, y))
    o = fm.ops
    z1 = o.bias_add(o.gemm(X, W1), B1)
    a1 = o.relu(z1)
    z2 = o.bias_add(o.gemm(a1, W2), B2)
    loss, p = o.softmax_cross_entropy(z2, Y)
    dz2 = o.softmax_cross_entropy_backward(p, Y)
    dw2, db2 = o.gemm(a1, dz2, trans_a=True), o.bias_grad(dz2)
    dz1 = o.relu_backward(o.gemm(dz2, W2, trans_b=True), a1)
    dw1, db1 = o.gemm(X, dz1, trans_a=True), o.bias_grad(dz1)

    r = ref
    x64, w164, b164, w264, b264 = f64(x, w1, b1, w2, b2)
    rz1 = r.bias_add(r.gemm(x64, w164), b164)
    ra1 = r.relu(rz1)
    rz2 = r.bias_add(r.gemm(ra1, w264), b264)
    rloss, rp = r.softmax_cross_entropy(rz2, y)
    rdz2 = r.softmax_cross_entropy_backward(rp, y)
    rdw2, rdb2 = r.gemm(ra1, rdz2, trans_a=True), r.bias_grad(rdz2)
    rdz1 = r.relu_backward(r.gemm(rdz2, w264, trans_b=True), ra1)
    rdw1, rdb1 = r.gemm(x64, rdz1, trans_a=True), r.bias_grad(rdz1)

    h_ = backend.host
    assert abs(float(h_(loss)) - float(rloss)) <= 1e-5 * float(rloss)
    for got, want, name in (
        (dw1, rdw1, "dW1"),
        (db1, rdb1, "db1"),
        (dw2, rdw2, "dW2"),
        (db2, rdb2, "db2"),
    ):
        want = np.asarray(want)
        assert_meaningful(want, name)
        # float32 errors compound over three chained reductions (<= 97 terms each); measured
        # ~3e-7 of the largest entry. 1e-5 of it leaves 30x, far below any real bug.
        assert_close(h_(got), want, 1e-5 * np.abs(want).max(), name)


# ----------------------------------------------------------------------------- threads

_THREADS_SCRIPT = """
import sys, numpy as np, fastmlp as fm
rng = np.random.default_rng(42)
a = rng.standard_normal((300, 517)).astype(np.float32)
b = rng.standard_normal((517, 211)).astype(np.float32)
dy = rng.standard_normal((5000, 300)).astype(np.float32)
z = rng.standard_normal((3000, 100)).astype(np.float32)
y = rng.integers(0, 100, 3000)
loss, p = fm.ops.softmax_cross_entropy(z, y)
np.savez(sys.argv[1], c=fm.ops.gemm(a, b), ct=fm.ops.gemm(a, dy[:300].copy(), trans_a=True),
         cnt=fm.ops.gemm(a, a, trans_b=True),
         db=fm.ops.bias_grad(dy), loss=loss, p=p, g=fm.ops.softmax_cross_entropy_backward(p, y),
         threads=fm.backends()["cpu_threads"])
"""


def test_cpu_results_do_not_depend_on_thread_count(tmp_path):
    """The CPU kernels split work so that each output is one thread's fixed-order sum: one
    thread and all threads give bit-identical results (sizes above the parallel threshold)."""
    import os
    import subprocess
    import sys

    runs = {}
    for threads in ("1", "3"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        path = tmp_path / f"t{threads}.npz"
        subprocess.run(
            [sys.executable, "-c", _THREADS_SCRIPT, str(path)], env=env, check=True, timeout=120
        )
        runs[threads] = np.load(path)
    one, many = runs["1"], runs["3"]
    assert int(one["threads"]) == 1 and int(many["threads"]) == 3
    for key in ("c", "ct", "cnt", "db", "loss", "p", "g"):
        assert one[key].tobytes() == many[key].tobytes(), f"{key} differs between 1 and 3 threads"


# ----------------------------------------------------------------------------- fused softmax CE


@pytest.mark.parametrize("backward", [True, False], ids=["backward", "forward"])
@pytest.mark.parametrize("kind", LABEL_KINDS)
@pytest.mark.parametrize("shape", SCE_SHAPES, ids=_ids(SCE_SHAPES))
def test_softmax_cross_entropy_fused(backend, rng, shape, kind, backward):
    """The training step's loss in one pass: out (dlogits or probs), the mean loss and
    the arg-max hits, against the float64 reference (same tolerances as the unfused
    ops) -- and on the CPU equal bit for bit to the unfused forward then backward."""
    n, c = shape
    logits = normal(rng, shape, scale=3.0)
    labels = _labels(rng, kind, n, c)
    truth = labels if labels.ndim == 1 else labels.argmax(axis=1)
    logits[np.arange(n // 2), truth[:n // 2]] += 8.0  # the first half of the rows hit
    Z, L = backend.to(logits), backend.to(labels)
    out = backend.nan(shape)
    loss, res, hits, bad = fm.ops.softmax_cross_entropy_fused(Z, L, backward=backward, out=out)
    assert res is out and hits.dtype == np.int64 and hits.shape == ()
    want_loss, want_out, want_hits = ref.softmax_cross_entropy_fused(
        f64(logits), _ref_labels(labels), backward=backward)
    _, want_probs = ref.softmax_cross_entropy(f64(logits), _ref_labels(labels))
    tol = ulp_tol(want_out, 4) + _probs_tol(logits, want_probs) / max(n, 1) if backward \
        else _probs_tol(logits, want_probs)
    assert_close(backend.host(out), want_out, tol, "fused out")
    assert abs(float(backend.host(loss)) - float(want_loss)) <= _loss_tol(logits, want_loss, n)
    # hits: exact (normal logits have no ties; the reference's argmax is the first max)
    assert int(backend.host(hits)) == int(want_hits)
    assert int(backend.host(bad)[0]) == -1
    if n >= 7 and c >= 7:
        assert 0 < int(want_hits) < n  # neither all nor none: a wrong count shows
    if not backend.is_gpu:
        l0, p0 = fm.ops.softmax_cross_entropy(Z, L)
        if backward:
            p0 = fm.ops.softmax_cross_entropy_backward(p0, L, out=p0)
        np.testing.assert_array_equal(backend.host(out), p0)
        assert float(loss) == float(l0)


def test_softmax_cross_entropy_fused_hits_ties_and_bad_labels(backend):
    """Ties go to the first maximum (NumPy's argmax); a bad label is never a hit and is
    reported (and, with check_labels, raised)."""
    logits = np.array([[1, 3, 3], [2, 2, 2], [0, 1, 5], [5, 1, 0]], np.float32)
    labels = np.array([1, 0, 2, 2], np.int32)  # hits: rows 0, 1, 2
    Z = backend.to(logits)
    _, _, hits, _ = fm.ops.softmax_cross_entropy_fused(Z, backend.to(labels))
    assert int(backend.host(hits)) == 3
    onehot_rows = backend.to(np.eye(3, dtype=np.float32)[[1, 2, 2, 0]])  # hits: 0, 2, 3
    _, _, hits, _ = fm.ops.softmax_cross_entropy_fused(Z, onehot_rows)
    assert int(backend.host(hits)) == 3
    bad = backend.to(np.array([1, 0, 7, 2], np.int32))
    loss, _, hits, row = fm.ops.softmax_cross_entropy_fused(Z, bad, check_labels=False)
    assert int(backend.host(row)[0]) == 2 and int(backend.host(hits)) == 2
    assert np.isnan(float(backend.host(loss)))
    with pytest.raises(ValueError, match="label 7 in row 2"):
        fm.ops.softmax_cross_entropy_fused(Z, bad)
    with pytest.raises(ValueError, match="'out' overlaps 'logits'"):
        fm.ops.softmax_cross_entropy_fused(Z, backend.to(labels), out=Z)
