"""BatchNormalization / LayerNormalization ops (issue 15) against fm.reference in float64,
float64 finite differences, PyTorch, and themselves (determinism, thread counts), on the CPU
and -- through the `backend` fixture -- the GPU.

Outputs are poisoned with NaN before each kernel call, so an element the kernel never
writes fails; reference results are checked non-zero so an all-zero output cannot pass.

Tolerances (float32 kernels against float64 math). The statistics are sums in double
(csrc/kernel_math.h: norm_stats), so their only float32 error is the final rounding:
mean within 1/2 ulp, invstd = 1 / sqrt(var + eps) within ~2 ulps (var, + eps, sqrt and
the division each round once). The rest is a handful of float32 roundings per element:
  xhat = (x - mean) * invstd: the subtraction (1/2 ulp of |x - mean|), the rounded mean
    (1/2 ulp of |mean|, which counts when the data sit far from 0), invstd (2 ulps) and
    the product -> |xhat| err <= 4 eps (|x| + |mean|) invstd;
  y = xhat * gamma + beta: two more roundings of |xhat gamma| and |y|.
We allow twice the sum of these bounds (8 eps) -- still ~10x below what a float32 (rather
than double) one-pass sum of squares would give on the offset data below.
The backward's sums are double too (rounded once, 1/2 ulp), and dx = k * (n dy - db -
xhat dg) rounds each term: we allow 8 eps times the sum of the terms' magnitudes, plus
the xhat error times |k dg|.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import F32_EPS, F32_TINY, assert_close, assert_meaningful, f64, normal, shape_id

import fastmlp as fm
from fastmlp import reference as ref

# (rows, cols): 1, primes, 31/32/33 around the GPU's 32-column strips and warps, 255-257
# around the CPU's 256-column strips, > 512 rows (several CPU row blocks) with few columns,
# zeros, and a large case.
SHAPES = [
    (1, 1), (1, 7), (7, 1), (2, 3), (13, 31), (31, 32), (32, 33), (33, 31), (97, 13),
    (255, 256), (256, 257), (257, 255), (1031, 3), (0, 5), (5, 0), (0, 0), (4096, 512),
]
IDS = [shape_id(*s) for s in SHAPES]

EPS = 1e-3


def _data(rng, rows, cols, offset=3.0, scale=2.0):
    """Columns with different means and spreads (so BN's per-column and LN's per-row
    statistics both matter)."""
    col_off = rng.uniform(-offset, offset, size=cols)
    col_scale = rng.uniform(0.5, scale, size=cols)
    return (rng.standard_normal((rows, cols)) * col_scale + col_off).astype(np.float32)


def _params(rng, cols):
    gamma = rng.uniform(0.5, 2.0, cols) * rng.choice([-1.0, 1.0], cols)
    return gamma.astype(np.float32), normal(rng, (cols,))


def _xhat_err(x, mean, invstd):
    """The bound on |xhat - exact| from the module docstring (arrays broadcast)."""
    return 4 * F32_EPS * (np.abs(x) + np.abs(mean)) * invstd


def _fwd_tol(x, mean, invstd, gamma, y):
    """y = xhat * gamma + beta: the xhat error times |gamma| and two roundings (8 eps)."""
    g = 1.0 if gamma is None else np.abs(gamma)
    xhat = np.abs((x - mean) * invstd)
    return 2 * (_xhat_err(x, mean, invstd) * g + F32_EPS * (xhat * g + np.abs(y))) + F32_TINY


def _dx_tol(n, dy, x, mean, invstd, k, db, dg):
    """dx = k * (n dy - db - xhat dg): 8 eps over the terms, plus xhat's error times |k dg|."""
    xhat = np.abs((x - mean) * invstd)
    terms = np.abs(k) * (n * np.abs(dy) + np.abs(db) + xhat * np.abs(dg))
    return 8 * F32_EPS * terms + 2 * _xhat_err(x, mean, invstd) * np.abs(k * dg) + F32_TINY


def _maybe(b, a):
    return None if a is None else b.to(a)


# --------------------------------------------------------------------------- BatchNormalization


def _bn_case(b, rng, rows, cols, *, scale=True, center=True, offset=3.0):
    x = _data(rng, rows, cols, offset=offset)
    gamma, beta = _params(rng, cols)
    gamma = gamma if scale else None
    beta = beta if center else None
    mm = normal(rng, (cols,))
    mv = rng.uniform(0.5, 2.0, cols).astype(np.float32)
    return x, gamma, beta, mm, mv


@pytest.mark.parametrize("rows,cols", SHAPES, ids=IDS)
@pytest.mark.parametrize("scale,center", [(True, True), (False, False), (True, False),
                                          (False, True)], ids=["affine", "plain", "scale",
                                                               "center"])
def test_batch_norm_train_matches_reference(backend, rng, rows, cols, scale, center):
    if (scale, center) != (True, True) and rows * cols > 100_000:
        pytest.skip("the large shape runs with gamma and beta only (the rest is the same code)")
    b = backend
    x, gamma, beta, mm, mv = _bn_case(b, rng, rows, cols, scale=scale, center=center)
    d_mm, d_mv = b.to(mm), b.to(mv)
    y, sm, si = fm.ops.batch_norm_forward(
        b.to(x), _maybe(b, gamma), _maybe(b, beta), d_mm, d_mv, training=True, momentum=0.99,
        epsilon=EPS, out=b.nan((rows, cols)),
        save_mean=b.nan((cols,)) if rows else None, save_invstd=b.nan((cols,)) if rows else None)
    r_mm, r_mv = f64(mm), f64(mv)
    ry, rsm, rsi = ref.batch_norm_forward(
        f64(x), None if gamma is None else f64(gamma), None if beta is None else f64(beta),
        r_mm, r_mv, training=True, momentum=float(np.float32(0.99)), epsilon=float(np.float32(EPS)))
    y, sm, si = b.host(y), b.host(sm), b.host(si)
    assert y.shape == (rows, cols) and sm.shape == si.shape == (cols,)
    if rows == 0:
        # Nothing to average: the moving statistics stay bit for bit, new save_* are NaN.
        assert np.array_equal(b.host(d_mm), mm) and np.array_equal(b.host(d_mv), mv)
        assert np.isnan(sm).all() and np.isnan(si).all()
        return
    assert_meaningful(rsm, "reference mean")
    if rows > 1 or center:  # one row: xhat = 0, so y = beta
        assert_meaningful(ry)
    assert_close(sm, rsm, F32_EPS * np.abs(rsm) + 1e-12 * np.abs(x).max(initial=0.0) + F32_TINY, "save_mean")
    assert_close(si, rsi, 4 * F32_EPS * rsi, "save_invstd")
    assert_close(y, ry, _fwd_tol(f64(x), rsm, rsi, gamma, ry), "y")
    # moving = moving * 0.99 + batch * 0.01: each product and the sum round once (+ the
    # batch statistic's own error): 4 eps of the magnitudes.
    rvar = 1.0 / rsi**2 - float(np.float32(EPS))
    assert_close(b.host(d_mm), r_mm, 4 * F32_EPS * (np.abs(mm) + np.abs(rsm)) + F32_TINY,
                 "moving_mean")
    assert_close(b.host(d_mv), r_mv, 4 * F32_EPS * (np.abs(mv) + np.abs(rvar)) + F32_TINY,
                 "moving_var")


@pytest.mark.parametrize("rows,cols", SHAPES, ids=IDS)
def test_batch_norm_inference_matches_reference(backend, rng, rows, cols):
    b = backend
    x, gamma, beta, mm, mv = _bn_case(b, rng, rows, cols)
    d_mm, d_mv = b.to(mm), b.to(mv)
    y, sm, si = fm.ops.batch_norm_forward(b.to(x), b.to(gamma), b.to(beta), d_mm, d_mv,
                                          training=False, epsilon=EPS, out=b.nan((rows, cols)))
    assert sm is None and si is None
    ry, _, _ = ref.batch_norm_forward(f64(x), f64(gamma), f64(beta), f64(mm), f64(mv),
                                      training=False, epsilon=float(np.float32(EPS)))
    assert_meaningful(ry)
    rsi = 1.0 / np.sqrt(f64(mv) + float(np.float32(EPS)))
    assert_close(b.host(y), ry, _fwd_tol(f64(x), f64(mm), rsi, gamma, ry), "y")
    # Inference reads the moving statistics and never writes them.
    assert np.array_equal(b.host(d_mm), mm) and np.array_equal(b.host(d_mv), mv)


def _bn_backward_check(b, rng, rows, cols, scale, want_params=True):
    x, gamma, beta, mm, mv = _bn_case(b, rng, rows, cols, scale=scale)
    _, sm, si = fm.ops.batch_norm_forward(x, gamma, beta, mm.copy(), mv.copy(), training=True,
                                          epsilon=EPS)
    dy = normal(rng, (rows, cols))
    dx, dg, db = fm.ops.batch_norm_backward(
        b.to(dy), b.to(x), _maybe(b, gamma), b.to(sm), b.to(si), out=b.nan((rows, cols)),
        dgamma_out=b.nan((cols,)) if want_params else None,
        dbeta_out=b.nan((cols,)) if want_params else None)
    # The reference gets the kernel's own float32 statistics: this checks the backward alone.
    rdx, rdg, rdb = ref.batch_norm_backward(f64(dy), f64(x), None if gamma is None else f64(gamma),
                                            f64(sm), f64(si))
    return x, gamma, sm, si, dy, b.host(dx), b.host(dg), b.host(db), rdx, rdg, rdb


@pytest.mark.parametrize("rows,cols", SHAPES, ids=IDS)
@pytest.mark.parametrize("scale", [True, False], ids=["gamma", "nogamma"])
def test_batch_norm_backward_matches_reference(backend, rng, rows, cols, scale):
    if not scale and rows * cols > 100_000:
        pytest.skip("the large shape runs with gamma only")
    b = backend
    x, gamma, sm, si, dy, dx, dg, db, rdx, rdg, rdb = _bn_backward_check(b, rng, rows, cols, scale)
    if rows == 0:
        assert dx.shape == (0, cols)
        assert np.array_equal(dg, np.zeros(cols)) and np.array_equal(db, np.zeros(cols))
        return
    x64, sm64, si64, dy64 = f64(x), f64(sm), f64(si), f64(dy)
    xerr = _xhat_err(x64, sm64, si64)
    # dbeta: a double sum rounded once; dgamma: plus each term's xhat error.
    assert_close(db, rdb, F32_EPS * np.abs(dy64).sum(0) + F32_TINY, "dbeta")
    assert_close(dg, rdg, F32_EPS * np.abs(rdg) + (np.abs(dy64) * xerr).sum(0) + F32_TINY,
                 "dgamma")
    g = np.ones(cols) if gamma is None else f64(gamma)
    k = g * si64 / rows
    assert_close(dx, rdx, _dx_tol(rows, dy64, x64, sm64, si64, k, rdb, rdg), "dx")
    if rows > 1:
        assert_meaningful(rdx, "reference dx")
    assert_meaningful(rdb, "reference dbeta")


def test_batch_norm_backward_without_param_grads(backend, rng):
    """dgamma / dbeta not wanted (null): dx is the same, bit for bit."""
    b = backend
    rows, cols = 67, 45
    x, gamma, sm, si, dy, dx, *_ = _bn_backward_check(b, rng, rows, cols, True)
    dx2, _, _ = fm.ops.batch_norm_backward(b.to(dy), b.to(x), b.to(gamma), b.to(sm), b.to(si))
    assert np.array_equal(b.host(dx2), dx)


# --------------------------------------------------------------------------- LayerNormalization


@pytest.mark.parametrize("rows,cols", SHAPES, ids=IDS)
@pytest.mark.parametrize("scale,center", [(True, True), (False, False), (True, False),
                                          (False, True)], ids=["affine", "plain", "scale",
                                                               "center"])
def test_layer_norm_forward_matches_reference(backend, rng, rows, cols, scale, center):
    if (scale, center) != (True, True) and rows * cols > 100_000:
        pytest.skip("the large shape runs with gamma and beta only")
    b = backend
    x = _data(rng, rows, cols)
    gamma, beta = _params(rng, cols)
    gamma = gamma if scale else None
    beta = beta if center else None
    y, sm, si = fm.ops.layer_norm_forward(
        b.to(x), _maybe(b, gamma), _maybe(b, beta), epsilon=EPS, out=b.nan((rows, cols)),
        save_mean=b.nan((rows,)) if cols else None, save_invstd=b.nan((rows,)) if cols else None)
    ry, rsm, rsi = ref.layer_norm_forward(f64(x), None if gamma is None else f64(gamma),
                                          None if beta is None else f64(beta),
                                          epsilon=float(np.float32(EPS)))
    y, sm, si = b.host(y), b.host(sm), b.host(si)
    assert y.shape == (rows, cols) and sm.shape == si.shape == (rows,)
    if cols == 0:
        assert np.isnan(sm).all() and np.isnan(si).all()
        return
    assert_meaningful(rsm, "reference mean")
    if cols > 1 or center:  # one column: xhat = 0, so y = beta
        assert_meaningful(ry)
    assert_close(sm, rsm, F32_EPS * np.abs(rsm) + 1e-12 * np.abs(x).max(initial=0.0) + F32_TINY, "save_mean")
    assert_close(si, rsi, 4 * F32_EPS * rsi, "save_invstd")
    assert_close(y, ry, _fwd_tol(f64(x), rsm[:, None], rsi[:, None], gamma, ry), "y")


@pytest.mark.parametrize("rows,cols", SHAPES, ids=IDS)
@pytest.mark.parametrize("scale", [True, False], ids=["gamma", "nogamma"])
@pytest.mark.parametrize("want_params", [True, False], ids=["params", "noparams"])
def test_layer_norm_backward_matches_reference(backend, rng, rows, cols, scale, want_params):
    if (not scale or not want_params) and rows * cols > 100_000:
        pytest.skip("the large shape runs with gamma and parameter gradients only")
    b = backend
    x = _data(rng, rows, cols)
    gamma, beta = _params(rng, cols)
    gamma = gamma if scale else None
    _, sm, si = fm.ops.layer_norm_forward(x, gamma, beta, epsilon=EPS)
    dy = normal(rng, (rows, cols))
    dx, dg, db = fm.ops.layer_norm_backward(
        b.to(dy), b.to(x), _maybe(b, gamma), b.to(sm), b.to(si), out=b.nan((rows, cols)),
        dgamma_out=b.nan((cols,)) if want_params else None,
        dbeta_out=b.nan((cols,)) if want_params else None)
    dx, dg, db = b.host(dx), b.host(dg), b.host(db)
    rdx, rdg, rdb = ref.layer_norm_backward(f64(dy), f64(x), None if gamma is None else f64(gamma),
                                            f64(sm), f64(si))
    if rows == 0:
        assert dx.shape == (0, cols)
        assert np.array_equal(dg, np.zeros(cols)) and np.array_equal(db, np.zeros(cols))
        return
    x64, dy64 = f64(x), f64(dy)
    sm64, si64 = f64(sm)[:, None], f64(si)[:, None]
    xerr = _xhat_err(x64, sm64, si64)
    if want_params:
        assert_close(db, rdb, F32_EPS * np.abs(dy64).sum(0) + F32_TINY, "dbeta")
        assert_close(dg, rdg, F32_EPS * np.abs(rdg) + (np.abs(dy64) * xerr).sum(0) + F32_TINY,
                     "dgamma")
    if cols == 0:
        return
    # dx = invstd / f * (f g - sum g - xhat * sum g xhat) with g = dy * gamma: the BN
    # bound with the roles of rows and columns swapped (g rounds once more: 1/2 ulp).
    g = dy64 if gamma is None else dy64 * f64(gamma)
    sg = g.sum(1, keepdims=True)
    xhat = (x64 - sm64) * si64
    sgx = (g * xhat).sum(1, keepdims=True)
    k = si64 / cols
    tol = _dx_tol(cols, g, x64, sm64, si64, k, sg, sgx)
    tol += 8 * F32_EPS * np.abs(k) * (np.abs(g).sum(1, keepdims=True) + (np.abs(g) * xerr).sum(
        1, keepdims=True) * np.abs(xhat))
    assert_close(dx, rdx, tol, "dx")
    if cols > 1:
        assert_meaningful(rdx, "reference dx")


# --------------------------------------------------------------------------- finite differences


def _fd_grad(f, a, h=1e-6):
    """Central differences of the scalar f at a (float64): error O(h^2) + O(1e-16 / h)."""
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + h
        fp = f()
        a[i] = old - h
        fm_ = f()
        a[i] = old
        g[i] = (fp - fm_) / (2 * h)
    return g


@pytest.mark.parametrize("kind", ["batch", "layer"])
@pytest.mark.parametrize("rows,cols", [(2, 1), (1, 3), (5, 4), (7, 3)], ids=lambda v: str(v))
def test_gradients_match_finite_differences(backend, rng, kind, rows, cols):
    """The kernels' backward against d(sum(y * w))/d(x, gamma, beta) of the float64
    reference forward. Finite differences are good to ~1e-9 here (h = 1e-6, values O(1));
    the kernels' float32 gradients to ~1e-5 relative: tolerance 1e-4 of the gradient scale."""
    if kind == "batch" and rows == 1:
        pytest.skip("BN over one row: xhat = 0 always (covered by the reference tests)")
    b = backend
    x = _data(rng, rows, cols, offset=1.0)
    gamma, beta = _params(rng, cols)
    w = normal(rng, (rows, cols))
    x64, g64, b64, w64 = f64(x), f64(gamma), f64(beta), f64(w)
    eps = float(np.float32(EPS))

    def loss():
        if kind == "batch":
            y, _, _ = ref.batch_norm_forward(x64, g64, b64, np.zeros(cols), np.ones(cols),
                                             training=True, epsilon=eps)
        else:
            y, _, _ = ref.layer_norm_forward(x64, g64, b64, epsilon=eps)
        return float((y * w64).sum())

    want = [_fd_grad(loss, a) for a in (x64, g64, b64)]
    if kind == "batch":
        _, sm, si = fm.ops.batch_norm_forward(b.to(x), b.to(gamma), b.to(beta),
                                              b.xp.zeros(cols, np.float32),
                                              b.xp.ones(cols, np.float32), training=True,
                                              epsilon=EPS)
        got = fm.ops.batch_norm_backward(b.to(w), b.to(x), b.to(gamma), sm, si)
    else:
        _, sm, si = fm.ops.layer_norm_forward(b.to(x), b.to(gamma), b.to(beta), epsilon=EPS)
        got = fm.ops.layer_norm_backward(b.to(w), b.to(x), b.to(gamma), sm, si)
    # LN over one column: xhat = 0, so dx = dgamma = 0 exactly (compared, not required > 0).
    nonzero = ("dbeta",) if kind == "layer" and cols == 1 else ("dx", "dgamma", "dbeta")
    for name, g, fd in zip(("dx", "dgamma", "dbeta"), got, want):
        if name in nonzero:
            assert_meaningful(fd, f"finite-difference {name}")
        assert_close(b.host(g), fd, 1e-4 * (np.abs(fd).max() + 1e-3), name)


# --------------------------------------------------------------------------- PyTorch

torch = pytest.importorskip("torch")


def _torch_scales(x, gamma, dy, axis):
    """The magnitudes the float32 roundings of either side scale with (see the module
    docstring), per quantity: y, dx, dgamma, dbeta. ``axis`` is the one normalised over
    (0: BN, 1: LN); torch's own float32 statistics err like ours, so degenerate cases
    (one row / column: xhat is 0 up to rounding) are covered too."""
    x, dy = f64(x), f64(dy)
    g = np.abs(f64(gamma))[None, :]
    mean = x.mean(axis, keepdims=True)
    invstd = 1 / np.sqrt(x.var(axis, keepdims=True) + EPS)
    xs = (np.abs(x) + np.abs(mean)) * invstd  # bounds |xhat| and scales its error
    gdy = g * np.abs(dy)
    dx = invstd * (gdy + gdy.mean(axis, keepdims=True) + xs * (gdy * xs).mean(axis, keepdims=True))
    return {"y": g * xs, "dx": dx, "dgamma": (np.abs(dy) * xs).sum(0),
            "dbeta": np.abs(dy).sum(0)}


def _torch_close(got, want, scale, what):
    """Both sides round in float32 (torch sums in float32 too): 1e-5 (~80 ulps) of the
    largest result or term magnitude."""
    want = want.detach().double().numpy() if hasattr(want, "detach") else want
    tol = 1e-5 * (np.abs(want).max(initial=0.0) + np.max(scale, initial=0.0) + 1e-3)
    assert_close(got, want, tol, what)


def _torch_bn(cols, gamma, beta):
    m = torch.nn.BatchNorm1d(cols, eps=EPS, momentum=0.01)  # torch's 0.01 = Keras' 0.99
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(gamma))
        m.bias.copy_(torch.from_numpy(beta))
    return m


@pytest.mark.parametrize("rows,cols", [(2, 1), (64, 33), (257, 31), (1024, 128)],
                         ids=lambda v: str(v))
def test_batch_norm_train_matches_torch(backend, rng, rows, cols):
    """Outputs, the three gradients and the moving statistics against torch.nn.BatchNorm1d
    in train mode (float32 on the CPU). Both round differently in float32: we allow
    1e-5 of each quantity's scale (~80 ulps; the errors measured are ~1e-7)."""
    b = backend
    x = _data(rng, rows, cols)
    gamma, beta = _params(rng, cols)
    w = normal(rng, (rows, cols))
    mm0 = normal(rng, (cols,))
    mv0 = rng.uniform(0.5, 2.0, cols).astype(np.float32)
    m = _torch_bn(cols, gamma, beta)
    with torch.no_grad():
        m.running_mean.copy_(torch.from_numpy(mm0))
        m.running_var.copy_(torch.from_numpy(mv0))
    m.train()
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = m(tx)
    ty.backward(torch.from_numpy(w))

    d_mm, d_mv = b.to(mm0), b.to(mv0)
    y, sm, si = fm.ops.batch_norm_forward(b.to(x), b.to(gamma), b.to(beta), d_mm, d_mv,
                                          training=True, momentum=0.99, epsilon=EPS)
    dx, dg, db = fm.ops.batch_norm_backward(b.to(w), b.to(x), b.to(gamma), sm, si)

    sc = _torch_scales(x, gamma, w, 0)
    _torch_close(b.host(y), ty, sc["y"], "y")
    _torch_close(b.host(dx), tx.grad, sc["dx"], "dx")
    _torch_close(b.host(dg), m.weight.grad, sc["dgamma"], "dgamma")
    _torch_close(b.host(db), m.bias.grad, sc["dbeta"], "dbeta")
    # torch's rule with momentum 0.01 is Keras' with 0.99
    _torch_close(b.host(d_mm), m.running_mean, np.abs(mm0) + np.abs(f64(x)).max(0), "moving_mean")
    # torch's running_var takes the unbiased variance; Keras' moving_var the biased one.
    var_b = f64(x).var(axis=0)
    want_mv = 0.99 * f64(mv0) + 0.01 * var_b
    torch_var_u = (m.running_var.double().numpy() - 0.99 * f64(mv0)) / 0.01
    assert_close(torch_var_u * (rows - 1) / rows, var_b, 1e-4 * (var_b.max() + 1e-3),
                 "torch's unbiased rule, converted")
    assert_close(b.host(d_mv), want_mv, 1e-5 * (want_mv.max() + 1e-3), "moving_var")


@pytest.mark.parametrize("rows,cols", [(1, 1), (64, 33), (257, 31)], ids=lambda v: str(v))
def test_batch_norm_eval_matches_torch(backend, rng, rows, cols):
    b = backend
    x = _data(rng, rows, cols)
    gamma, beta = _params(rng, cols)
    mm = normal(rng, (cols,))
    mv = rng.uniform(0.5, 2.0, cols).astype(np.float32)
    m = _torch_bn(cols, gamma, beta)
    with torch.no_grad():
        m.running_mean.copy_(torch.from_numpy(mm))
        m.running_var.copy_(torch.from_numpy(mv))
    m.eval()
    with torch.no_grad():
        want = m(torch.from_numpy(x)).double().numpy()
    y, _, _ = fm.ops.batch_norm_forward(b.to(x), b.to(gamma), b.to(beta), b.to(mm), b.to(mv),
                                        training=False, epsilon=EPS)
    assert_meaningful(want)
    assert_close(b.host(y), want, 1e-5 * (np.abs(want).max() + 1e-3), "y")


@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 7), (64, 33), (257, 512)], ids=lambda v: str(v))
def test_layer_norm_matches_torch(backend, rng, rows, cols):
    b = backend
    x = _data(rng, rows, cols)
    gamma, beta = _params(rng, cols)
    w = normal(rng, (rows, cols))
    m = torch.nn.LayerNorm(cols, eps=EPS)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(gamma))
        m.bias.copy_(torch.from_numpy(beta))
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = m(tx)
    ty.backward(torch.from_numpy(w))
    y, sm, si = fm.ops.layer_norm_forward(b.to(x), b.to(gamma), b.to(beta), epsilon=EPS)
    dx, dg, db = fm.ops.layer_norm_backward(b.to(w), b.to(x), b.to(gamma), sm, si)
    sc = _torch_scales(x, gamma, w, 1)
    for got, want, what in ((y, ty, "y"), (dx, tx.grad, "dx"), (dg, m.weight.grad, "dgamma"),
                            (db, m.bias.grad, "dbeta")):
        _torch_close(b.host(got), want, sc[what], what)


def test_nan_propagates_like_torch(backend, rng):
    """A NaN in x poisons its column (BN) or its row (LN) -- outputs, gradients, BN's
    moving statistics of that column -- and nothing else, as in torch."""
    b = backend
    rows, cols = 40, 37
    x = _data(rng, rows, cols)
    x[5, 11] = np.nan
    gamma, beta = _params(rng, cols)
    w = normal(rng, (rows, cols))

    m = _torch_bn(cols, gamma, beta)
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = m(tx)
    ty.backward(torch.from_numpy(w))
    d_mm, d_mv = b.xp.zeros(cols, np.float32), b.xp.ones(cols, np.float32)
    y, sm, si = fm.ops.batch_norm_forward(b.to(x), b.to(gamma), b.to(beta), d_mm, d_mv,
                                          training=True, epsilon=EPS)
    dx, dg, db = fm.ops.batch_norm_backward(b.to(w), b.to(x), b.to(gamma), sm, si)
    col = np.zeros(cols, bool)
    col[11] = True
    assert np.array_equal(np.isnan(b.host(y)), np.isnan(ty.detach().numpy()))
    assert np.isnan(b.host(y)[:, 11]).all() and not np.isnan(np.delete(b.host(y), 11, 1)).any()
    assert np.array_equal(np.isnan(b.host(dx)), np.isnan(tx.grad.numpy()))
    assert np.array_equal(np.isnan(b.host(dg)), np.isnan(m.weight.grad.numpy()))
    assert np.array_equal(np.isnan(b.host(d_mm)), col)
    assert np.array_equal(np.isnan(b.host(d_mv)), col)
    assert not np.isnan(b.host(db)).any()  # dbeta = sum dy does not see x

    ln = torch.nn.LayerNorm(cols, eps=EPS)
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = ln(tx)
    ty.backward(torch.from_numpy(w))
    y, sm, si = fm.ops.layer_norm_forward(b.to(x), None, None, epsilon=EPS)
    dx, dg, db = fm.ops.layer_norm_backward(b.to(w), b.to(x), None, sm, si)
    assert np.isnan(b.host(y)[5]).all() and not np.isnan(np.delete(b.host(y), 5, 0)).any()
    assert np.array_equal(np.isnan(b.host(y)), np.isnan(ty.detach().numpy()))
    assert np.array_equal(np.isnan(b.host(dx)), np.isnan(tx.grad.numpy()))
    assert np.array_equal(np.isnan(b.host(dg)), np.isnan(ln.weight.grad.numpy()))
    assert np.isnan(b.host(dg)).all() and not np.isnan(b.host(db)).any()


# --------------------------------------------------------------------------- moving statistics


def test_moving_statistics_over_steps(backend, rng):
    """Five training steps: the moving statistics follow Keras' rule step by step."""
    b = backend
    cols = 19
    d_mm, d_mv = b.xp.zeros(cols, np.float32), b.xp.ones(cols, np.float32)
    r_mm, r_mv = np.zeros(cols), np.ones(cols)
    for step in range(5):
        x = _data(rng, 50 + step, cols)
        fm.ops.batch_norm_forward(b.to(x), None, None, d_mm, d_mv, training=True,
                                  momentum=0.9, epsilon=EPS)
        ref.batch_norm_forward(f64(x), None, None, r_mm, r_mv, training=True,
                               momentum=float(np.float32(0.9)), epsilon=float(np.float32(EPS)))
    # Five steps of the 4-eps bound of one step, on values of O(1-10).
    assert_close(b.host(d_mm), r_mm, 20 * F32_EPS * (np.abs(r_mm) + 3), "moving_mean")
    assert_close(b.host(d_mv), r_mv, 20 * F32_EPS * (np.abs(r_mv) + 3), "moving_var")
    assert_meaningful(r_mm)


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_edges_are_exact(backend, rng, momentum):
    """momentum 1 keeps the moving statistics bit for bit; momentum 0 replaces them with the
    batch's (m * 0 + v * 1 rounds nothing)."""
    b = backend
    rows, cols = 33, 9
    x = _data(rng, rows, cols)
    mm, mv = normal(rng, (cols,)), rng.uniform(0.5, 2, cols).astype(np.float32)
    d_mm, d_mv = b.to(mm), b.to(mv)
    _, sm, si = fm.ops.batch_norm_forward(b.to(x), None, None, d_mm, d_mv, training=True,
                                          momentum=momentum, epsilon=EPS)
    if momentum == 1.0:
        assert np.array_equal(b.host(d_mm), mm) and np.array_equal(b.host(d_mv), mv)
    else:
        assert np.array_equal(b.host(d_mm), b.host(sm))
        # invstd = 1 / sqrt(var + eps) was computed from exactly this moving_var
        inv = (np.float32(1) / np.sqrt(b.host(d_mv) + np.float32(EPS))).astype(np.float32)
        assert np.array_equal(inv, b.host(si))


# --------------------------------------------------------------------------- determinism


def _all_outputs(b, x, gamma, beta, dy):
    cols = x.shape[1]
    mm, mv = b.xp.zeros(cols, np.float32), b.xp.ones(cols, np.float32)
    out = list(fm.ops.batch_norm_forward(x, gamma, beta, mm, mv, training=True, epsilon=EPS))
    out += [mm, mv]
    out += fm.ops.batch_norm_backward(dy, x, gamma, out[1], out[2])
    ln = fm.ops.layer_norm_forward(x, gamma, beta, epsilon=EPS)
    out += ln
    out += fm.ops.layer_norm_backward(dy, x, gamma, ln[1], ln[2])
    return [b.host(a).copy() for a in out]


@pytest.mark.parametrize("rows,cols", [(4096, 512), (20000, 7), (3, 3000)], ids=lambda v: str(v))
def test_deterministic(backend, rng, rows, cols):
    """Two runs are bit-identical; on the CPU also with 1 and 2 threads (the summation
    order depends on the shape only)."""
    b = backend
    x = b.to(_data(rng, rows, cols))
    gamma, beta = (b.to(a) for a in _params(rng, cols))
    dy = b.to(normal(rng, (rows, cols)))
    first = _all_outputs(b, x, gamma, beta, dy)
    runs = [_all_outputs(b, x, gamma, beta, dy)]
    if not b.is_gpu:
        old = fm._C.cpu.num_threads()
        try:
            for n in (1, 2):
                fm._C.cpu.set_num_threads(n)
                runs.append(_all_outputs(b, x, gamma, beta, dy))
        finally:
            fm._C.cpu.set_num_threads(old)
    for run in runs:
        for i, (a, c) in enumerate(zip(first, run)):
            assert a.tobytes() == c.tobytes(), f"output {i} differs between runs"
    assert_meaningful(first[0])


def test_data_far_from_zero(backend, rng):
    """x = 1000 + N(0, 1): the variance must not cancel away (the sums are of shifted
    values in double). A float32 E[x^2] - E[x]^2 would be off by ~1e6 * 1e-7 = 0.1."""
    b = backend
    x = (1000.0 + rng.standard_normal((513, 40))).astype(np.float32)
    mm, mv = b.xp.zeros(40, np.float32), b.xp.ones(40, np.float32)
    _, sm, si = fm.ops.batch_norm_forward(b.to(x), None, None, mm, mv, training=True,
                                          epsilon=EPS)
    want = 1 / np.sqrt(f64(x).var(0) + float(np.float32(EPS)))
    assert_close(b.host(si), want, 4 * F32_EPS * want, "BN invstd")
    _, sm, si = fm.ops.layer_norm_forward(b.to(x.T.copy()), None, None, epsilon=EPS)
    assert_close(b.host(si), want, 4 * F32_EPS * want, "LN invstd")


# --------------------------------------------------------------------------- errors


def test_bad_arguments_raise(rng):
    x = _data(rng, 8, 5)
    g, bt = _params(rng, 5)
    mm, mv = np.zeros(5, np.float32), np.ones(5, np.float32)
    bn = fm.ops.batch_norm_forward
    with pytest.raises(TypeError, match="'x' must be float32"):
        bn(x.astype(np.float64), g, bt, mm, mv, training=True)
    with pytest.raises(ValueError, match="'x' must be 2-D"):
        bn(x[0], g, bt, mm, mv, training=True)
    with pytest.raises(ValueError, match="'gamma' must have shape"):
        bn(x, g[:4], bt, mm, mv, training=True)
    with pytest.raises(ValueError, match="'moving_var' must have shape"):
        bn(x, g, bt, mm, mv[:3], training=True)
    with pytest.raises(ValueError, match="'x' must be C-contiguous"):
        bn(np.asfortranarray(x), g, bt, mm, mv, training=True)
    with pytest.raises(ValueError, match="'epsilon' must be > 0"):
        bn(x, g, bt, mm, mv, training=True, epsilon=0.0)
    with pytest.raises(ValueError, match="'momentum' must be in"):
        bn(x, g, bt, mm, mv, training=True, momentum=1.5)
    with pytest.raises(ValueError, match="'momentum' must be in"):
        bn(x, g, bt, mm, mv, training=True, momentum=-0.1)
    with pytest.raises(ValueError, match="training=True only"):
        bn(x, g, bt, mm, mv, training=False, save_mean=np.empty(5, np.float32))
    ro = mm.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="'moving_mean' is written in place"):
        bn(x, g, bt, ro, mv, training=True)
    with pytest.raises(ValueError, match="'out' overlaps 'x'"):
        bn(x, g, bt, mm, mv, training=True, out=x)
    assert np.array_equal(mm, np.zeros(5)), "a refused call must not touch the statistics"
    with pytest.raises(ValueError, match="'epsilon' must be > 0"):
        fm.ops.layer_norm_forward(x, g, bt, epsilon=float("nan"))
    with pytest.raises(ValueError, match="'beta' must have shape"):
        fm.ops.layer_norm_forward(x, g, bt[:2])
    _, sm, si = fm.ops.layer_norm_forward(x, g, bt)
    with pytest.raises(ValueError, match="'save_mean' must have shape \\(8,\\)"):
        fm.ops.layer_norm_backward(x, x, g, sm[:5], si)
    with pytest.raises(ValueError, match="'x' must have shape \\(8, 5\\)"):
        fm.ops.batch_norm_backward(x, x[:4], g, mm, mv)
    with pytest.raises(ValueError, match="'dgamma_out' must have shape"):
        fm.ops.batch_norm_backward(x, x, g, mm, mv, dgamma_out=np.empty(4, np.float32))
    with pytest.raises(TypeError, match="'save_invstd' must be float32"):
        fm.ops.batch_norm_backward(x, x, g, mm, mv.astype(np.float64))


# --------------------------------------------------------------------------- CPU vs GPU


@pytest.mark.gpu
@pytest.mark.parametrize("rows,cols", [(1, 1), (33, 31), (257, 256), (4096, 512)],
                         ids=lambda v: str(v))
def test_cpu_and_gpu_agree(gpu, rng, rows, cols):
    """Both sum in double in different orders, then round once: the float32 results agree
    to a few ulps of each quantity's scale (1e-6 relative)."""
    cpu_b = type(gpu)("cpu", np)
    x = _data(rng, rows, cols)
    gamma, beta = _params(rng, cols)
    dy = normal(rng, (rows, cols))
    a = _all_outputs(cpu_b, x, gamma, beta, dy)
    g = _all_outputs(gpu, gpu.to(x), gpu.to(gamma), gpu.to(beta), gpu.to(dy))
    names = ["bn y", "bn mean", "bn invstd", "moving_mean", "moving_var", "bn dx", "bn dgamma",
             "bn dbeta", "ln y", "ln mean", "ln invstd", "ln dx", "ln dgamma", "ln dbeta"]
    for name, c, d in zip(names, a, g):
        assert_close(d, f64(c), 1e-6 * (np.abs(c).max() + 1), name)
