"""The interpretability kernels of issue 18: ``ops.target_seed`` (the gradient seed of the
explained output), ``ops.ig_interpolate`` (integrated gradients' path points) and
``ops.ig_accumulate`` (the quadrature, saliency, gradient x input).

Tolerances: ig_interpolate / ig_accumulate are fixed sequences of float32 operations, each
correctly rounded on both devices, so they equal the float32 NumPy reference bit for bit.
target_seed computes exp, a row sum and divisions in float32; against the float64
reference (see ``_seed_tol``) each p carries exp's <= 2 ulp, the row sum's rounding
(``2 eps (sqrt(c) + 2)`` relative, helpers.sum_tol's bound) and the division's half ulp;
the seed p_t (d - p_j) inherits p_t's and p_j's errors.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastmlp as fm
from fastmlp import reference as ref
from fastmlp._interop import address
from helpers import F32_EPS, F32_TINY, assert_close, assert_meaningful, normal, shape_id

TRANSFORMS = ["none", "sigmoid", "softmax"]
SEED_SHAPES = [(0, 5), (1, 1), (1, 10), (7, 13), (33, 257), (1000, 10), (3, 2000)]


def _targets(rng, rows, cols):
    return rng.integers(0, cols, size=rows).astype(np.int32)


def _seed_tol(z, t, transform):
    """Elementwise bound of target_seed against the float64 reference (module docstring)."""
    z = z.astype(np.float64)
    n, c = z.shape
    if transform == "none":
        return np.zeros((n, c))
    if transform == "sigmoid":
        want = ref.target_seed(z, t, transform="sigmoid")
        return 8 * F32_EPS * np.abs(want) + F32_TINY  # two sigmoids (each ~3 ulp) and a product
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    pt = p[np.arange(n), t][:, None]
    d = (np.arange(c)[None, :] == t[:, None]).astype(np.float64)
    rel_p = F32_EPS * (4.0 + 2.0 * (np.sqrt(c) + 2.0))
    return 2.0 * rel_p * pt * (np.abs(d - p) + p) + F32_TINY


def _raw(backend, name, *args):
    """Call kernel ``name`` of the backend's _C module directly (the engine's entry)."""
    mod = fm._C.cuda if backend.is_gpu else fm._C.cpu
    extra = (backend.xp.cuda.get_current_stream().ptr,) if backend.is_gpu else ()
    getattr(mod, name)(*args, *extra)
    backend.sync()


# ---------------------------------------------------------------------------- target_seed


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("rows,cols", SEED_SHAPES, ids=[shape_id(*s) for s in SEED_SHAPES])
def test_target_seed_vs_reference(backend, rng, rows, cols, transform):
    z = normal(rng, (rows, cols), 3.0)
    t = _targets(rng, rows, cols)
    out = backend.nan((rows, cols))  # every element must be written
    got = fm.ops.target_seed(backend.to(z), backend.to(t), transform=transform, out=out)
    assert got is out
    want = ref.target_seed(z.astype(np.float64), t, transform=transform)
    if transform != "softmax" or cols > 1:  # (a 1-class softmax is constant: seed 0)
        assert_meaningful(want)
        if rows:  # the target column is non-zero in every row
            assert (want[np.arange(rows), t] != 0).all()
    assert_close(backend.host(got), want, _seed_tol(z, t, transform), f"target_seed {transform}")


def test_target_seed_new_output(backend, rng):
    z, t = normal(rng, (4, 6)), _targets(rng, 4, 6)
    got = fm.ops.target_seed(backend.to(z), backend.to(t), transform="softmax")
    assert type(got) is type(backend.to(z)) and got.dtype == np.float32 and got.shape == (4, 6)


@pytest.mark.parametrize("cols", [2, 10, 1000])
def test_target_seed_softmax_rows_sum_to_zero(backend, rng, cols):
    """sum_j p_t (d_tj - p_j) = p_t (1 - sum_j p_j) = 0."""
    z, t = normal(rng, (64, cols), 2.0), _targets(rng, 64, cols)
    got = backend.host(fm.ops.target_seed(backend.to(z), backend.to(t), transform="softmax"))
    assert (np.abs(got).max(axis=1) > 0).all()
    scale = np.abs(got.astype(np.float64)).sum(axis=1)
    assert (np.abs(got.astype(np.float64).sum(axis=1)) <= 4 * F32_EPS * (np.sqrt(cols) + 2)
            * (scale + 1e-30)).all()


def _transform64(z, transform):
    if transform == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    if transform == "softmax":
        e = np.exp(z - z.max())
        return e / e.sum()
    return z


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_target_seed_finite_differences(backend, rng, transform):
    """Central differences of f(z)[t] in float64 agree with the kernel's derivative."""
    rows, cols, h = 5, 7, 1e-6
    z, t = normal(rng, (rows, cols)), _targets(rng, rows, cols)
    got = backend.host(fm.ops.target_seed(backend.to(z), backend.to(t), transform=transform))
    fd = np.zeros((rows, cols))
    for r in range(rows):
        for j in range(cols):
            zp, zm = z[r].astype(np.float64), z[r].astype(np.float64)
            zp[j] += h
            zm[j] -= h
            fd[r, j] = (_transform64(zp, transform)[t[r]] - _transform64(zm, transform)[t[r]]) / (2 * h)
    assert_meaningful(fd)
    assert_close(got, fd, 1e-6, f"target_seed {transform} vs finite differences")


@pytest.mark.parametrize("transform", ["sigmoid", "softmax"])
def test_target_seed_vs_torch_autograd(backend, rng, transform):
    torch = pytest.importorskip("torch")
    rows, cols = 16, 11
    z, t = normal(rng, (rows, cols), 2.0), _targets(rng, rows, cols)
    zt = torch.tensor(z.astype(np.float64), requires_grad=True)
    f = torch.sigmoid(zt) if transform == "sigmoid" else torch.softmax(zt, dim=1)
    f[torch.arange(rows), torch.tensor(t.astype(np.int64))].sum().backward()
    want = zt.grad.numpy()
    got = backend.host(fm.ops.target_seed(backend.to(z), backend.to(t), transform=transform))
    assert_close(got, want, _seed_tol(z, t, transform), f"target_seed {transform} vs torch")


def test_target_seed_extreme_logits(backend):
    """Logits of +-1000 give finite seeds (max-subtracted softmax); sigmoid'(30) ~ e^-30 is
    not cancelled to 0 (s(z) s(-z), not s (1 - s))."""
    z = np.array([[1000.0, -1000.0, 0.0], [30.0, -30.0, 5.0], [-88.0, 80.0, 79.0]], np.float32)  # (e^-79: not yet subnormal)
    t = np.array([0, 0, 2], np.int32)
    for transform in ("sigmoid", "softmax"):
        got = backend.host(fm.ops.target_seed(backend.to(z), backend.to(t), transform=transform))
        want = ref.target_seed(z.astype(np.float64), t, transform=transform)
        assert np.isfinite(got).all()
        assert_close(got, want, _seed_tol(z, t, transform), f"target_seed {transform}")
    got = backend.host(fm.ops.target_seed(backend.to(z), backend.to(t), transform="sigmoid"))
    assert got[1, 0] > 0 and abs(got[1, 0] - np.exp(-30.0)) <= 1e-5 * np.exp(-30.0)


def test_target_seed_nan_propagates(backend):
    z = np.array([[np.nan, 1.0, 2.0], [1.0, 2.0, 3.0]], np.float32)
    t = np.array([0, 1], np.int32)
    soft = backend.host(fm.ops.target_seed(backend.to(z), backend.to(t), transform="softmax"))
    assert np.isnan(soft[0]).all() and np.isfinite(soft[1]).all()
    sig = backend.host(fm.ops.target_seed(backend.to(z), backend.to(t), transform="sigmoid"))
    assert np.isnan(sig[0, 0]) and (sig[0, 1:] == 0).all()  # d sigmoid(z_t) / d z_j = 0, j != t
    none = backend.host(fm.ops.target_seed(backend.to(z), backend.to(t), transform="none"))
    np.testing.assert_array_equal(none, [[1, 0, 0], [0, 1, 0]])


@pytest.mark.parametrize("transform", [0, 1, 2])
def test_target_seed_kernel_bad_target_zeros(backend, rng, transform):
    """The kernel itself (the engine's entry, no Python validation): a target outside
    [0, cols) gives a row of zeros and nothing out of bounds."""
    z = normal(rng, (4, 5))
    t = np.array([2, -1, 5, 2**31 - 1], np.int32)
    zd, td, out = backend.to(z), backend.to(t), backend.nan((4, 5))
    _raw(backend, "target_seed", address(zd), address(td), address(out), 4, 5, transform)
    got = backend.host(out)
    assert (got[1:] == 0).all()
    name = ["none", "sigmoid", "softmax"][transform]
    want = ref.target_seed(z[:1].astype(np.float64), t[:1], transform=name)
    assert_close(got[:1], want, _seed_tol(z[:1], t[:1], name), "target_seed row 0")


def test_target_seed_errors(backend, rng):
    z, t = backend.to(normal(rng, (3, 4))), backend.to(np.array([0, 1, 2], np.int32))
    with pytest.raises(ValueError, match="'transform' must be one of"):
        fm.ops.target_seed(z, t, transform="softmax2")
    with pytest.raises(TypeError, match="'targets' must be int32, got int64"):
        fm.ops.target_seed(z, backend.to(np.array([0, 1, 2], np.int64)))
    with pytest.raises(ValueError, match=r"targets\[1\] = 4 is outside \[0, 4\)"):
        fm.ops.target_seed(z, backend.to(np.array([0, 4, -1], np.int32)))
    with pytest.raises(ValueError, match=r"targets\[2\] = -1 is outside"):
        fm.ops.target_seed(z, backend.to(np.array([0, 3, -1], np.int32)))
    with pytest.raises(ValueError, match="'logits' must be 2-D"):
        fm.ops.target_seed(z.reshape(-1), t)
    with pytest.raises(ValueError, match=r"'targets' must have shape \(3,\)"):
        fm.ops.target_seed(z, t[:2])
    with pytest.raises(ValueError, match="'out' overlaps 'logits'"):
        fm.ops.target_seed(z, t, out=z)
    with pytest.raises(ValueError, match="transform must be 0"):  # the kernel's own check
        _raw(backend, "target_seed", address(z), address(t), address(z), 3, 4, 3)


# ---------------------------------------------------------------------------- ig_interpolate

IG_SHAPES = [(0, 5, 3), (1, 1, 1), (3, 7, 5), (2, 0, 4), (13, 784, 20)]


def _bits_equal(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape)
    same = (got.view(np.uint32) == want.view(np.uint32))
    assert same.all(), (f"{what}: {int((~same).sum())} of {got.size} differ; first at "
                        f"{np.argwhere(~same)[0].tolist()}: got {got[~same][0]!r}, "
                        f"expected {want[~same][0]!r}")


def _alphas(steps):
    """Riemann-trapezoid points in [0, 1] (Captum's default method's alphas)."""
    return np.linspace(0.0, 1.0, steps).astype(np.float32) if steps > 1 else np.ones(1, np.float32)


@pytest.mark.parametrize("with_targets", [False, True], ids=["notargets", "targets"])
@pytest.mark.parametrize("with_baseline", [False, True], ids=["zeros", "baseline"])
@pytest.mark.parametrize("images,cols,steps", IG_SHAPES, ids=[shape_id(*s) for s in IG_SHAPES])
def test_ig_interpolate_vs_reference(backend, rng, images, cols, steps, with_baseline,
                                     with_targets):
    x = rng.uniform(0, 1, (images, cols)).astype(np.float32)
    b = normal(rng, (images, cols), 0.1) if with_baseline else None
    t = rng.integers(0, 10, images).astype(np.int32) if with_targets else None
    a = _alphas(steps)
    rows = images * steps
    out = backend.nan((rows, cols))
    tout = backend.to(np.full(rows, -7, np.int32)) if with_targets else None
    got = fm.ops.ig_interpolate(backend.to(x), backend.to(a),
                                baseline=None if b is None else backend.to(b),
                                targets=None if t is None else backend.to(t),
                                out=out, targets_out=tout)
    want = ref.ig_interpolate(x, a, baseline=b, targets=t)
    if with_targets:
        assert got[0] is out and got[1] is tout
        _bits_equal(backend.host(got[1]).view(np.float32), want[1].view(np.float32), "targets_out")
        got, want = got[0], want[0]
    assert got is out
    assert_meaningful(want)
    _bits_equal(backend.host(got), want, "ig_interpolate")
    if images and cols:  # Captum's formula, in float32
        i, m = np.arange(rows) // steps, np.arange(rows) % steps
        base = np.zeros_like(x) if b is None else b
        captum = base[i] + a[m][:, None] * (x[i] - base[i])
        np.testing.assert_array_equal(backend.host(got), captum)


@pytest.mark.parametrize("as_array", [False, True], ids=["int", "array"])
@pytest.mark.parametrize("batch", [1, 2, 3, 7])
def test_ig_batches_equal_one_call(backend, rng, batch, as_array):
    """ig_interpolate + ig_accumulate over the steps of a batched run (batch path points a
    step, the last one partial) equal one call over everything, bit for bit."""
    images, cols, steps = 6, 33, 5
    batch = batch * steps if batch % steps else batch  # ig_accumulate needs multiples of steps
    x, b = rng.uniform(0, 1, (images, cols)).astype(np.float32), normal(rng, (images, cols), 0.2)
    t = rng.integers(0, 10, images).astype(np.int32)
    a, w = _alphas(steps), rng.uniform(0.1, 0.3, steps).astype(np.float32)
    g_all = normal(rng, (images * steps, cols))  # the "gradients" at every path point
    xd, bd, ad, wd, td = (backend.to(v) for v in (x, b, a, w, t))
    whole, twhole = fm.ops.ig_interpolate(xd, ad, baseline=bd, targets=td)
    attr_whole = fm.ops.ig_accumulate(backend.to(g_all), xd, wd, baseline=bd)
    parts, tparts = [], []
    attr = backend.nan((images, cols))
    total = images * steps
    for s in range((total + batch - 1) // batch):
        step = backend.to(np.array([s], np.int64)) if as_array else s
        n = min(batch, total - s * batch)
        p, tp = fm.ops.ig_interpolate(xd, ad, baseline=bd, targets=td, step=step, batch=batch,
                                      rows=n if as_array else None)
        assert p.shape == (n, cols)
        parts.append(backend.host(p))
        tparts.append(backend.host(tp))
        fm.ops.ig_accumulate(backend.to(g_all[s * batch:s * batch + n]), xd, wd, baseline=bd,
                             step=step, batch=batch, out=attr)
    _bits_equal(np.concatenate(parts), backend.host(whole), "batched ig_interpolate")
    np.testing.assert_array_equal(np.concatenate(tparts), backend.host(twhole))
    assert_meaningful(backend.host(attr_whole))
    _bits_equal(backend.host(attr), backend.host(attr_whole), "batched ig_accumulate")


def test_ig_interpolate_step_out_of_range_skipped(backend, rng):
    """A step (device memory, read by the kernel) past the end, or negative, writes nothing;
    a batch that runs past the end writes only the rows inside."""
    x, a = normal(rng, (3, 4)), _alphas(2)
    xd, ad = backend.to(x), backend.to(a)
    for s in (3, 10**15, 2**62, -1):
        out = backend.nan((2, 4))
        fm.ops.ig_interpolate(xd, ad, step=backend.to(np.array([s], np.int64)), batch=2, rows=2,
                              out=out)
        assert np.isnan(backend.host(out)).all(), s
    out = backend.nan((4, 4))  # rows 4, 5 of 6, then past the end
    fm.ops.ig_interpolate(xd, ad, step=backend.to(np.array([1], np.int64)), batch=4, rows=4,
                          out=out)
    got = backend.host(out)
    _bits_equal(got[:2], ref.ig_interpolate(x, a)[4:6], "rows inside")
    assert np.isnan(got[2:]).all()


def test_ig_interpolate_nan_propagates(backend):
    x = np.array([[np.nan, 1.0]], np.float32)
    b = np.array([[0.0, np.inf]], np.float32)
    a = np.array([0.0, 0.5], np.float32)
    got = backend.host(fm.ops.ig_interpolate(backend.to(x), backend.to(a), baseline=backend.to(b)))
    with np.errstate(invalid="ignore"):
        want = ref.ig_interpolate(x, a, baseline=b)
    assert np.isnan(got[:, 0]).all() and np.isnan(got[:, 1]).all()  # inf + 0 * -inf = NaN
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))


def test_ig_interpolate_errors(backend, rng):
    x, a = backend.to(normal(rng, (3, 4))), backend.to(_alphas(2))
    with pytest.raises(ValueError, match="'alphas' must hold at least one"):
        fm.ops.ig_interpolate(x, backend.to(np.zeros(0, np.float32)))
    with pytest.raises(ValueError, match=r"'baseline' must have shape \(3, 4\)"):
        fm.ops.ig_interpolate(x, a, baseline=backend.to(np.zeros((3, 5), np.float32)))
    with pytest.raises(TypeError, match="'targets' must be int32"):
        fm.ops.ig_interpolate(x, a, targets=backend.to(np.zeros(3, np.int64)))
    with pytest.raises(ValueError, match="'step' must be >= 0"):
        fm.ops.ig_interpolate(x, a, step=-1)
    with pytest.raises(TypeError, match="'step' must be int64"):
        fm.ops.ig_interpolate(x, a, step=backend.to(np.zeros(1, np.int32)))
    with pytest.raises(ValueError, match=r"'out' must have shape \(6, 4\)"):
        fm.ops.ig_interpolate(x, a, out=backend.to(np.zeros((5, 4), np.float32)))
    with pytest.raises(ValueError, match="'out' overlaps 'x'"):
        fm.ops.ig_interpolate(x, a, batch=3, out=x)
    with pytest.raises(ValueError, match="'targets_out' given without 'targets'"):
        fm.ops.ig_interpolate(x, a, targets_out=backend.to(np.zeros(6, np.int32)))
    with pytest.raises(ValueError, match="steps must be >= 1"):  # the kernel's own check
        _raw(backend, "ig_interpolate", address(x), 0, address(a), 0, address(x), 0, 3, 4, 0, 0,
             0, 0)


# ---------------------------------------------------------------------------- ig_accumulate


@pytest.mark.parametrize("mode", ["ig", "ig-abs", "sum", "saliency"])
@pytest.mark.parametrize("with_baseline", [False, True], ids=["zeros", "baseline"])
@pytest.mark.parametrize("images,cols,steps", IG_SHAPES, ids=[shape_id(*s) for s in IG_SHAPES])
def test_ig_accumulate_vs_reference(backend, rng, images, cols, steps, with_baseline, mode):
    multiply = mode.startswith("ig")
    absolute = mode in ("ig-abs", "saliency")
    x = rng.uniform(0, 1, (images, cols)).astype(np.float32)
    b = normal(rng, (images, cols), 0.1) if with_baseline else None
    w = rng.uniform(0.0, 2.0 / steps, steps).astype(np.float32)
    g = normal(rng, (images * steps, cols))
    out = backend.nan((images, cols))
    got = fm.ops.ig_accumulate(backend.to(g), backend.to(x), backend.to(w),
                               baseline=None if b is None else backend.to(b), multiply=multiply,
                               absolute=absolute, out=out)
    assert got is out
    want = ref.ig_accumulate(g, x, w, baseline=b, multiply=multiply, absolute=absolute)
    assert_meaningful(want)
    if absolute and want.size:
        assert (want >= 0).all()
    _bits_equal(backend.host(got), want, "ig_accumulate")


def test_saliency_and_gradient_x_input(backend, rng):
    """steps 1, weights [1]: saliency = |grad|, gradient x input = x * grad (exactly)."""
    x, g = normal(rng, (9, 31)), normal(rng, (9, 31))
    one = np.ones(1, np.float32)
    sal = fm.ops.ig_accumulate(backend.to(g), backend.to(x), backend.to(one), multiply=False,
                               absolute=True)
    np.testing.assert_array_equal(backend.host(sal), np.abs(g))
    gxi = fm.ops.ig_accumulate(backend.to(g), backend.to(x), backend.to(one))
    np.testing.assert_array_equal(backend.host(gxi), x * g)


def test_integrated_gradients_completeness_linear_model(backend, rng):
    """For f(x) = x . v the gradient is v at every path point, so IG with weights summing to
    1 gives (x - b) v, whose sum over the columns is f(x) - f(b) (completeness)."""
    images, cols, steps = 4, 50, 8
    x, b = rng.uniform(0, 1, (images, cols)).astype(np.float32), normal(rng, (images, cols), 0.1)
    v = normal(rng, (cols,))
    w = np.full(steps, 1.0 / steps, np.float32)  # 1/8: exact, sums to 1
    pts = fm.ops.ig_interpolate(backend.to(x), backend.to(_alphas(steps)), baseline=backend.to(b))
    assert pts.shape == (images * steps, cols)
    grads = np.broadcast_to(v, (images * steps, cols)).astype(np.float32)
    attr = backend.host(fm.ops.ig_accumulate(backend.to(grads), backend.to(x), backend.to(w),
                                             baseline=backend.to(b)))
    want = (x.astype(np.float64) - b) @ v.astype(np.float64)
    assert_close(attr.astype(np.float64).sum(axis=1), want,
                 4 * F32_EPS * np.abs(x - b) @ np.abs(v) + 1e-30, "sum of attributions")


def test_ig_accumulate_nan_propagates(backend, rng):
    g = normal(rng, (6, 3))
    g[4, 1] = np.nan  # image 1 (steps 3), column 1
    x, w = normal(rng, (2, 3)), np.full(3, 0.25, np.float32)
    got = backend.host(fm.ops.ig_accumulate(backend.to(g), backend.to(x), backend.to(w)))
    assert np.isnan(got[1, 1]) and np.isfinite(np.delete(got.reshape(-1), 4)).all()


def test_ig_accumulate_errors(backend, rng):
    g, x, w = backend.to(normal(rng, (6, 4))), backend.to(normal(rng, (2, 4))), backend.to(
        np.full(3, 0.5, np.float32))
    with pytest.raises(ValueError, match=r"rows of 'grads' \(5\) and batch \(5\) must be multiples"):
        fm.ops.ig_accumulate(g[:5], x, w)
    with pytest.raises(ValueError, match=r"batch \(4\) must be multiples"):
        fm.ops.ig_accumulate(g, x, w, batch=4)
    with pytest.raises(ValueError, match="'x' must have 4 columns"):
        fm.ops.ig_accumulate(g, backend.to(normal(rng, (2, 5))), w)
    with pytest.raises(ValueError, match="'weights' must hold at least one"):
        fm.ops.ig_accumulate(g, x, backend.to(np.zeros(0, np.float32)))
    with pytest.raises(ValueError, match="'out' overlaps 'x'"):
        fm.ops.ig_accumulate(g, x, w, out=x)
    with pytest.raises(ValueError, match="must be multiples of steps"):  # the kernel's own check
        _raw(backend, "ig_accumulate", address(g), address(x), 0, address(w), address(x), 2, 4, 3,
             address(g), 3, 5, True, False)


# ---------------------------------------------------------------------------- CPU vs GPU


@pytest.mark.gpu
def test_gpu_matches_cpu(gpu, rng):
    """ig_*: bit for bit; target_seed: within the kernels' tolerance (expf and the warp's
    sum order differ from the CPU's)."""
    images, cols, steps = 17, 129, 6
    x, b = rng.uniform(0, 1, (images, cols)).astype(np.float32), normal(rng, (images, cols), 0.1)
    a, w = _alphas(steps), rng.uniform(0, 0.3, steps).astype(np.float32)
    cpu = fm.ops.ig_interpolate(x, a, baseline=b)
    dev = fm.ops.ig_interpolate(gpu.to(x), gpu.to(a), baseline=gpu.to(b))
    _bits_equal(gpu.host(dev), cpu, "ig_interpolate cpu vs gpu")
    g = normal(rng, (images * steps, cols))
    cpu = fm.ops.ig_accumulate(g, x, w, baseline=b)
    dev = fm.ops.ig_accumulate(gpu.to(g), gpu.to(x), gpu.to(w), baseline=gpu.to(b))
    _bits_equal(gpu.host(dev), cpu, "ig_accumulate cpu vs gpu")
    z, t = normal(rng, (300, 1000), 3.0), _targets(rng, 300, 1000)
    for transform in TRANSFORMS:
        cpu = fm.ops.target_seed(z, t, transform=transform)
        dev = gpu.host(fm.ops.target_seed(gpu.to(z), gpu.to(t), transform=transform))
        assert_close(dev, cpu.astype(np.float64), 2 * _seed_tol(z, t, transform), transform)
        again = gpu.host(fm.ops.target_seed(gpu.to(z), gpu.to(t), transform=transform))
        np.testing.assert_array_equal(dev, again)  # deterministic


@pytest.mark.gpu
def test_gpu_mixed_devices(gpu, rng):
    x, a = gpu.to(normal(rng, (3, 4))), _alphas(2)
    with pytest.raises(ValueError, match="'alphas' is on cpu"):
        fm.ops.ig_interpolate(x, a)
    with pytest.raises(ValueError, match="'step' is on cpu"):
        fm.ops.ig_interpolate(x, gpu.to(a), step=np.zeros(1, np.int64))
