"""Data makers and comparison helpers shared by the test modules.

Tolerances live here, each with the reasoning that sets it, so every op test
uses the same bound for the same arithmetic.
"""

from __future__ import annotations

import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)  # 2**-23: one ulp at 1.0; rounding error <= eps/2
F32_TINY = float(np.finfo(np.float32).smallest_subnormal)  # 2**-149: underflow granularity


def shape_id(*dims) -> str:
    """A test id for a shape; shapes whose dims are all <= 65 get a 'small' prefix,
    so `-m gpu -k small` (the compute-sanitizer subset) picks only quick cases."""
    body = "x".join(str(d) for d in dims)
    return f"small-{body}" if max(dims, default=0) <= 65 else body


def normal(rng, shape, scale=1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def away_from_zero(rng, shape, lo=1e-2, hi=3.0) -> np.ndarray:
    """Random signs, magnitudes in [lo, hi]: no value sits near ReLU's kink."""
    mag = rng.uniform(lo, hi, size=shape)
    sign = rng.choice(np.array([-1.0, 1.0]), size=shape)
    return (sign * mag).astype(np.float32)


def f64(*arrays):
    out = tuple(np.asarray(a, dtype=np.float64) for a in arrays)
    return out if len(out) > 1 else out[0]


def assert_close(got, want, tol, what: str = "result"):
    """|got - want| <= tol elementwise (tol: scalar or array), with a precise message.

    `got` is the kernel's float32 output on the host, `want` the float64 reference.
    NaN in `got` where `want` is finite (e.g. an element the kernel never wrote
    over its NaN poison) always fails; NaN in `want` must be NaN in `got`.
    """
    got = np.asarray(got)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    g = got.astype(np.float64)
    want_nan = np.isnan(want)
    assert np.array_equal(np.isnan(g), want_nan), (
        f"{what}: NaN at {np.argwhere(np.isnan(g) != want_nan)[:5].tolist()} "
        f"(got NaN count {int(np.isnan(g).sum())}, expected {int(want_nan.sum())}): "
        "an element left unwritten (poisoned out) or a NaN where none belongs"
    )
    tol = np.broadcast_to(np.asarray(tol, dtype=np.float64), want.shape)
    with np.errstate(invalid="ignore"):
        inf_ok = np.isinf(want) & (g == want)
        err = np.where(want_nan | inf_ok, 0.0, np.abs(g - want))
    bad = ~(err <= tol)
    if bad.any():
        idx = tuple(np.argwhere(bad)[np.argmax((err - tol)[bad])]) if want.ndim else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {want.size} elements off; worst at {list(idx)}: "
            f"got {g[idx]!r}, expected {want[idx]!r}, |diff| {err[idx]:.3e} > tol {tol[idx]:.3e}"
        )


def assert_equal_f32(got, want64, what: str = "result"):
    """Exact: a single correctly rounded float32 operation (x + b, a select) must equal the
    float64 reference rounded to float32 (float64 carries > 2*24+2 bits, so double rounding
    cannot differ from float32's own rounding)."""
    got = np.asarray(got)
    want = np.asarray(want64, dtype=np.float64).astype(np.float32)
    assert got.dtype == np.float32, f"{what}: dtype {got.dtype}, expected float32"
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    if not same.all():
        idx = tuple(np.argwhere(~same)[0])
        raise AssertionError(
            f"{what}: {int((~same).sum())} of {want.size} elements differ; first at {list(idx)}: "
            f"got {got[idx]!r}, expected {want[idx]!r}"
        )


def assert_meaningful(want, what="reference"):
    """The reference result is not all zeros, so an all-zero kernel output cannot pass."""
    want = np.asarray(want)
    assert want.size == 0 or np.count_nonzero(want) > 0, (
        f"{what} is all zeros: the test data is degenerate"
    )


def sum_tol(k, scale, worst_case=False):
    """Bound for a float32 sum of k terms (or products) against the exact (float64) sum.

    Random data (the example tests): rounding errors of random sign grow like sqrt(k);
    measured errors of fp32 sequential and blocked sums stay under 2*eps * sum|terms| for
    k up to 4096. We allow 2*eps*(sqrt(k)+2) * sum|terms|: 30x the measured error at
    k = 784, yet ~1/20 of the error of TF32 inputs (whose 10-bit mantissa gives ~1e3 eps
    here), so a reduced-precision kernel fails.
    worst_case=True (hypothesis picks adversarial data, e.g. k equal terms): any summation
    order is within (k-1)*eps/2 of sum|terms|, the products add eps/2; we allow k*eps.
    k*2**-149 covers products/sums that underflow into float32 subnormals.
    """
    k = max(k, 1)
    rel = k * F32_EPS if worst_case else 2.0 * F32_EPS * (np.sqrt(k) + 2.0)
    return rel * scale + k * F32_TINY


def gemm_operands(rng, m, k, n, trans_a, trans_b):
    a = normal(rng, (k, m) if trans_a else (m, k))
    b = normal(rng, (n, k) if trans_b else (k, n))
    return a, b


def gemm_tol(a, b, c0, *, trans_a, trans_b, alpha, beta, worst_case=False):
    """Elementwise bound for C = alpha*op(a)@op(b) + beta*c0 (see sum_tol): the scale is
    |alpha| * |op(a)| @ |op(b)| + |beta| * |c0| (k+1 terms when beta != 0)."""
    a, b = f64(a, b)
    oa = a.T if trans_a else a
    ob = b.T if trans_b else b
    k = oa.shape[1]
    scale = abs(alpha) * (np.abs(oa) @ np.abs(ob))
    if beta != 0 and c0 is not None:
        scale = scale + abs(beta) * np.abs(f64(c0))
        k += 1
    return sum_tol(k, scale, worst_case)


def ulp_tol(want64, ulps):
    """`ulps` units in the last place of float32, relative to |want| (plus the subnormal step)."""
    return ulps * F32_EPS * np.abs(np.asarray(want64, dtype=np.float64)) + F32_TINY


def onehot(labels, c, dtype=np.float32):
    y = np.zeros((labels.shape[0], c), dtype=dtype)
    y[np.arange(labels.shape[0]), labels] = 1
    return y


def soft_labels(rng, n, c):
    """Random class distributions (rows sum to 1 in float32 up to rounding)."""
    w = rng.uniform(0.0, 1.0, size=(n, c))
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def blobs(n=600, features=20, classes=4, seed=0):
    """Linearly separable-ish clusters (float32 x, int labels): a model that trains
    reaches high accuracy."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (classes, features))
    y = rng.integers(0, classes, n)
    x = (centers[y] + rng.normal(0, 1, (n, features))).astype(np.float32)
    return x, y
