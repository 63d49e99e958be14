"""DP-SGD's per-example gradient norm kernels (issue 17): ``ops.dp_row_sqnorms`` (one
Dense layer's "ghost norms") and ``ops.dp_clip_factors`` (Opacus's clip factors, as
per-row gradient scales), against the float64 reference, against brute-force
per-example gradients, and against the documented summation order bit for bit.

Tolerances: both kernels compute in double and round to float32 once, so against the
float64 reference they are within half an ulp plus the double sums' error (~1e-16
relative); we allow 1 ulp (``ulp_tol(want, 1)``).
"""

from __future__ import annotations

import numpy as np
import pytest

import fastmlp as fm
from fastmlp import reference as ref
from helpers import assert_close, assert_meaningful, normal, shape_id, ulp_tol

ROWS = [0, 1, 3, 32, 33, 1024]
INS = [1, 5, 784]
OUTS = [1, 10, 128]


def _prev(rng, rows):
    """Running sums of earlier layers (what accumulate adds to): positive, varied."""
    return rng.uniform(0.5, 50.0, size=rows).astype(np.float32)


# ---------------------------------------------------------------------------- dp_row_sqnorms


@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "acc"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("rows,n_in,n_out",
                         [(r, i, o) for r in ROWS for i in INS for o in OUTS],
                         ids=[shape_id(r, i, o) for r in ROWS for i in INS for o in OUTS])
def test_row_sqnorms_vs_reference(backend, rng, rows, n_in, n_out, bias, accumulate):
    x, dz = normal(rng, (rows, n_in)), normal(rng, (rows, n_out), 0.1)
    prev = _prev(rng, rows)
    # Without accumulate the old contents must not be read: poison them.
    out = backend.to(prev) if accumulate else backend.nan((rows,))
    got = fm.ops.dp_row_sqnorms(backend.to(x), backend.to(dz), bias=bias, out=out,
                                accumulate=accumulate)
    assert got is out
    want = ref.dp_row_sqnorms(x.astype(np.float64), dz.astype(np.float64), bias=bias,
                              out=prev.astype(np.float64) if accumulate else None,
                              accumulate=accumulate)
    if rows:
        assert (want > 0).all()  # every row has a non-zero norm: a skipped row fails
    assert_meaningful(want)
    assert_close(backend.host(got), want, ulp_tol(want, 1), "dp_row_sqnorms")


def test_row_sqnorms_new_output(backend, rng):
    """out=None: a new (rows,) float32 array on the inputs' device."""
    x, dz = normal(rng, (7, 5)), normal(rng, (7, 3))
    got = fm.ops.dp_row_sqnorms(backend.to(x), backend.to(dz))
    assert type(got) is type(backend.to(x)) and got.dtype == np.float32 and got.shape == (7,)
    want = ref.dp_row_sqnorms(x.astype(np.float64), dz.astype(np.float64))
    assert_close(backend.host(got), want, ulp_tol(want, 1), "dp_row_sqnorms")


def _brute_force_sqnorms(layers, bias):
    """sum over layers of ||x_r dz_r^T||_F^2 (+ ||dz_r||^2 with a bias), per example r,
    from the explicit per-example gradients in float64."""
    rows = layers[0][0].shape[0]
    total = np.zeros(rows)
    for x, dz in layers:
        for r in range(rows):
            dw = np.outer(x[r].astype(np.float64), dz[r].astype(np.float64))
            total[r] += (dw ** 2).sum()
            if bias:
                total[r] += (dz[r].astype(np.float64) ** 2).sum()
    return total


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("rows,n_in,n_hidden,n_out", [(1, 1, 1, 1), (3, 5, 7, 2), (5, 13, 10, 3)])
def test_row_sqnorms_vs_per_example_gradients(backend, rng, rows, n_in, n_hidden, n_out, bias):
    """Two Dense layers accumulated in order equal the squared norms of the explicit
    per-example gradients (outer products) over both layers."""
    x0, dz0 = normal(rng, (rows, n_in)), normal(rng, (rows, n_hidden))
    x1, dz1 = normal(rng, (rows, n_hidden)), normal(rng, (rows, n_out))
    acc = fm.ops.dp_row_sqnorms(backend.to(x1), backend.to(dz1), bias=bias)
    fm.ops.dp_row_sqnorms(backend.to(x0), backend.to(dz0), bias=bias, out=acc, accumulate=True)
    want = _brute_force_sqnorms([(x1, dz1), (x0, dz0)], bias)
    assert_meaningful(want)
    # Two roundings to float32 (one per layer): 1 ulp of the total.
    assert_close(backend.host(acc), want, ulp_tol(want, 1), "per-example squared norms")


def _lane_order_sum_sq(v):
    """The documented order of the kernels' row sums (kernel_math.h kDpLanes): column c in
    lane c % 32, each lane summed in column order in float64, the lanes added by a
    butterfly with offsets 16, 8, 4, 2, 1 -- per row of v."""
    rows, n = v.shape
    k = -(-n // 32)
    sq = np.zeros((rows, k * 32))
    sq[:, :n] = v.astype(np.float64) ** 2  # exact: a float squared fits in a double
    sq = sq.reshape(rows, k, 32)
    acc = np.zeros((rows, 32))
    for i in range(k):  # sequential per lane (np.sum would add pairwise)
        acc = acc + sq[:, i]  # adding the zero padding changes nothing
    off = 16
    while off:
        acc[:, :off] = acc[:, :off] + acc[:, off:2 * off]
        off //= 2
    return acc[:, 0]


@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "acc"])
@pytest.mark.parametrize("rows,n_in,n_out", [(3, 1, 1), (33, 5, 10), (64, 784, 128), (5, 97, 33)])
def test_row_sqnorms_exact_summation_order(backend, rng, rows, n_in, n_out, accumulate):
    """Bit for bit the documented order and rounding, so the CPU and the GPU agree exactly:
    float32(prev + (sx + 1) * sdz) from the lane-order double sums."""
    x, dz = normal(rng, (rows, n_in)), normal(rng, (rows, n_out), 0.1)
    prev = _prev(rng, rows)
    out = backend.to(prev) if accumulate else backend.nan((rows,))
    got = backend.host(fm.ops.dp_row_sqnorms(backend.to(x), backend.to(dz), out=out,
                                             accumulate=accumulate))
    sx, sdz = _lane_order_sum_sq(x), _lane_order_sum_sq(dz)
    want = ((prev.astype(np.float64) if accumulate else 0.0) + (sx + 1.0) * sdz)
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_row_sqnorms_zero_width(backend, rng):
    """in == 0: ||x||^2 = 0, only the bias term remains; out == 0: every norm is 0."""
    dz = normal(rng, (4, 3))
    got = fm.ops.dp_row_sqnorms(backend.to(np.zeros((4, 0), np.float32)), backend.to(dz))
    want = (dz.astype(np.float64) ** 2).sum(1)
    assert_meaningful(want)
    assert_close(backend.host(got), want, ulp_tol(want, 1), "in == 0")
    got = fm.ops.dp_row_sqnorms(backend.to(normal(rng, (4, 3))),
                                backend.to(np.zeros((4, 0), np.float32)), out=backend.nan((4,)))
    np.testing.assert_array_equal(backend.host(got), np.zeros(4, np.float32))


def test_row_sqnorms_nan_propagates(backend, rng):
    x, dz = normal(rng, (3, 40)), normal(rng, (3, 10))
    x[1, 37] = np.nan
    got = backend.host(fm.ops.dp_row_sqnorms(backend.to(x), backend.to(dz)))
    assert np.isnan(got[1]) and np.isfinite(got[[0, 2]]).all() and (got[[0, 2]] > 0).all()


def test_row_sqnorms_thread_count_determinism(rng):
    """The CPU result repeats bit for bit with 1, 2 and 3 threads (one thread per row)."""
    x, dz = normal(rng, (1024, 784)), normal(rng, (1024, 128))
    prev = _prev(rng, 1024)
    old = fm.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            fm.set_num_threads(threads)
            out = prev.copy()
            fm.ops.dp_row_sqnorms(x, dz, out=out, accumulate=True)
            results.append(out.tobytes())
    finally:
        fm.set_num_threads(old)
    assert results[0] == results[1] == results[2]
    assert (np.frombuffer(results[0], np.float32) > prev).all()


# ---------------------------------------------------------------------------- dp_clip_factors


def _sqnorms_around(rng, rows, clip, grad_scale):
    """Squared norms (of the gradient / grad_scale) whose norms lie from 0.01 to 100 x clip."""
    norms = clip * 10.0 ** rng.uniform(-2, 2, size=rows)
    return ((norms / grad_scale) ** 2).astype(np.float32)


@pytest.mark.parametrize("rows", [1, 3, 33, 1024])
@pytest.mark.parametrize("clip,grad_scale,divisor", [(1.0, 1.0, 1.0), (0.5, 32.0, 50.0),
                                                     (3.0, 7.0, 1.0)])
def test_clip_factors_vs_reference(backend, rng, rows, clip, grad_scale, divisor):
    acc = _sqnorms_around(rng, rows, clip, grad_scale)
    acc[0] = 0.0  # a zero gradient: factor 1
    a = backend.to(acc)
    got = fm.ops.dp_clip_factors(a, clip=clip, grad_scale=grad_scale, divisor=divisor)
    assert got is a  # in place
    want = ref.dp_clip_factors(acc.astype(np.float64), clip=clip, grad_scale=grad_scale,
                               divisor=divisor)
    assert_meaningful(want)
    assert_close(backend.host(got), want, ulp_tol(want, 1), "dp_clip_factors")
    got = backend.host(got).astype(np.float64)
    unclipped = np.float32(grad_scale / divisor)
    assert got[0] == unclipped  # zero norm: c = 1 exactly
    norm = grad_scale * np.sqrt(acc.astype(np.float64))
    if rows > 3:  # both kinds of rows are there
        assert (norm > clip).any() and (norm < clip).any()
    # A row under the bound keeps its gradient (scale grad_scale / divisor); a row over it
    # is scaled to norm clip: its scaled norm is clip / divisor.
    small = norm < clip * 0.99
    np.testing.assert_array_equal(got[small], unclipped)
    big = norm > clip * 1.01
    np.testing.assert_allclose(got[big] * np.sqrt(acc[big].astype(np.float64)) * divisor, clip,
                               rtol=1e-5)


def test_clip_factors_nan_inf_and_std(backend):
    acc = np.array([np.nan, np.inf, 0.0, 4.0, 0.25], np.float32)
    std = backend.nan((1,))
    got = backend.host(fm.ops.dp_clip_factors(backend.to(acc), clip=1.0, noise_multiplier=1.1,
                                              grad_scale=2.0, divisor=4.0, std_out=std))
    want = ref.dp_clip_factors(acc.astype(np.float64), clip=1.0, grad_scale=2.0, divisor=4.0)
    assert np.isnan(got[0])               # NaN norm: NaN scale (the step sees it)
    assert got[1] == 0.0                  # infinite norm: clipped to nothing
    assert got[2] == np.float32(0.5)      # zero norm: grad_scale / divisor
    assert_close(got, want, ulp_tol(np.nan_to_num(want), 1), "dp_clip_factors")
    assert backend.host(std)[0] == np.float32(1.1 * 1.0 / 4.0)


def test_clip_factors_std_out(backend):
    """std_out alone (rows == 0) is still written; without std_out nothing else changes."""
    std = backend.nan((1,))
    empty = backend.xp.zeros((0,), np.float32)
    fm.ops.dp_clip_factors(empty, clip=0.7, noise_multiplier=1.3, grad_scale=1.0, divisor=3.0,
                           std_out=std)
    want = np.zeros(1)
    ref.dp_clip_factors(np.zeros(0), clip=0.7, noise_multiplier=1.3, grad_scale=1.0,
                        divisor=3.0, std_out=want)
    assert want[0] > 0
    assert_close(backend.host(std), want, ulp_tol(want, 1), "std_out")
    std = backend.to(np.array([5.0], np.float32))
    fm.ops.dp_clip_factors(backend.to(np.ones(2, np.float32)), clip=1.0, grad_scale=1.0,
                           divisor=1.0, std_out=std)
    assert backend.host(std)[0] == 0.0  # noise_multiplier defaults to 0


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_clipped_sum_equals_per_example_clipping(backend, rng, bias):
    """The end-to-end DP-SGD rule: with a mean loss (dz = per-example gradient / n, so
    grad_scale = n), scaling the rows of dz by the factors and running the ordinary
    backward gives sum_r clip(g_r) / divisor, g_r the per-example gradient over both layers
    (brute force, float64)."""
    n, n_in, n_h, n_out, clip, divisor = 6, 5, 7, 3, 1.0, 8.0
    x0, x1 = normal(rng, (n, n_in)), normal(rng, (n, n_h))
    dz0, dz1 = normal(rng, (n, n_h), 1.0 / n), normal(rng, (n, n_out), 1.0 / n)
    acc = fm.ops.dp_row_sqnorms(backend.to(x1), backend.to(dz1), bias=bias)
    fm.ops.dp_row_sqnorms(backend.to(x0), backend.to(dz0), bias=bias, out=acc, accumulate=True)
    s = backend.host(fm.ops.dp_clip_factors(acc, clip=clip, grad_scale=n, divisor=divisor))
    # Brute force: per-example gradients g_r = n * (x_r dz_r^T, dz_r) of both layers.
    want = {}
    clipped_any = False
    for r in range(n):
        parts = []
        for name, x, dz in (("w0", x0, dz0), ("w1", x1, dz1)):
            parts.append((name, n * np.outer(x[r], dz[r]).astype(np.float64)))
            if bias:
                parts.append(("b" + name[1], n * dz[r].astype(np.float64)))
        norm = np.sqrt(sum((g ** 2).sum() for _, g in parts))
        c = min(1.0, clip / (norm + 1e-6))
        clipped_any |= c < 1.0
        for name, g in parts:
            want[name] = want.get(name, 0.0) + c * g / divisor
    assert clipped_any
    got = {"w0": x0.T.astype(np.float64) @ (s[:, None] * dz0),
           "w1": x1.T.astype(np.float64) @ (s[:, None] * dz1)}
    if bias:
        got["b0"], got["b1"] = (s[:, None] * dz0).sum(0), (s[:, None] * dz1).sum(0)
    for name in want:
        # The scales are float32 (1 ulp each), the rest float64.
        assert_close(got[name], want[name], 4e-7 * np.abs(want[name]).max(), name)


# ---------------------------------------------------------------------------- errors


def test_row_sqnorms_errors(backend):
    x, dz = backend.xp.ones((3, 4), np.float32), backend.xp.ones((3, 2), np.float32)
    with pytest.raises(TypeError, match="'x' must be float32"):
        fm.ops.dp_row_sqnorms(x.astype(np.float64), dz)
    with pytest.raises(TypeError, match="'dz' must be float32"):
        fm.ops.dp_row_sqnorms(x, dz.astype(np.float16))
    with pytest.raises(ValueError, match="'x' must be 2-D"):
        fm.ops.dp_row_sqnorms(x[0], dz)
    with pytest.raises(ValueError, match="'dz' must have 3 rows"):
        fm.ops.dp_row_sqnorms(x, backend.xp.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"'out' must have shape \(3,\)"):
        fm.ops.dp_row_sqnorms(x, dz, out=backend.xp.ones((4,), np.float32))
    with pytest.raises(TypeError, match="'out' must be float32"):
        fm.ops.dp_row_sqnorms(x, dz, out=backend.xp.ones((3,), np.float64))
    with pytest.raises(ValueError, match="accumulate=True needs 'out'"):
        fm.ops.dp_row_sqnorms(x, dz, accumulate=True)
    with pytest.raises(ValueError, match="'x' must be C-contiguous"):
        fm.ops.dp_row_sqnorms(backend.xp.ones((4, 3), np.float32).T, dz)
    with pytest.raises(ValueError, match="'out' overlaps 'x'"):
        fm.ops.dp_row_sqnorms(x, dz, out=x.reshape(-1)[:3])


def test_clip_factors_errors(backend):
    acc = backend.xp.ones((3,), np.float32)
    kw = dict(clip=1.0, grad_scale=1.0, divisor=1.0)
    for name, bad in (("clip", 0.0), ("clip", -1.0), ("clip", float("nan")),
                      ("grad_scale", 0.0), ("divisor", -2.0), ("divisor", float("inf")),
                      ("noise_multiplier", -0.1)):
        with pytest.raises(ValueError, match=f"'{name}' must be a finite number"):
            fm.ops.dp_clip_factors(acc, **{**kw, name: bad})
    with pytest.raises(TypeError, match="'sqnorms' must be float32"):
        fm.ops.dp_clip_factors(acc.astype(np.float64), **kw)
    with pytest.raises(ValueError, match="'sqnorms' must be 1-D"):
        fm.ops.dp_clip_factors(acc.reshape(1, 3), **kw)
    with pytest.raises(ValueError, match=r"'std_out' must have shape \(1,\)"):
        fm.ops.dp_clip_factors(acc, std_out=backend.xp.ones((2,), np.float32), **kw)
    with pytest.raises(ValueError, match="'std_out' overlaps 'sqnorms'"):
        fm.ops.dp_clip_factors(acc, std_out=acc[1:2], **kw)
    assert backend.host(acc).tolist() == [1.0, 1.0, 1.0]  # untouched by the failed calls


def test_clip_factors_read_only(rng):
    acc = np.ones(3, np.float32)
    acc.flags.writeable = False
    with pytest.raises(ValueError, match="'sqnorms' is written in place but is read-only"):
        fm.ops.dp_clip_factors(acc, clip=1.0, grad_scale=1.0, divisor=1.0)


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_mixed_devices(gpu):
    x = gpu.xp.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="'dz' is on cpu"):
        fm.ops.dp_row_sqnorms(x, np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match="'std_out' is on cpu"):
        fm.ops.dp_clip_factors(gpu.xp.ones(3, np.float32), clip=1.0, grad_scale=1.0,
                               divisor=1.0, std_out=np.zeros(1, np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("rows,n_in,n_out", [(1024, 784, 128), (33, 5, 10), (70000, 3, 1)])
def test_gpu_repeats_and_matches_cpu_bitwise(gpu, rng, rows, n_in, n_out):
    """Both devices sum in the same order and round the same way: identical floats, and the
    GPU repeats itself bit for bit."""
    x, dz = normal(rng, (rows, n_in)), normal(rng, (rows, n_out), 0.1)
    prev = _prev(rng, rows)
    cpu = fm.ops.dp_row_sqnorms(x, dz, out=prev.copy(), accumulate=True)
    runs = []
    for _ in range(2):
        out = gpu.to(prev)
        fm.ops.dp_row_sqnorms(gpu.to(x), gpu.to(dz), out=out, accumulate=True)
        runs.append(gpu.host(out))
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0], cpu)
    std_c, std_g = np.zeros(1, np.float32), gpu.xp.zeros(1, np.float32)
    fm.ops.dp_clip_factors(cpu, clip=1.0, noise_multiplier=0.9, grad_scale=float(rows),
                           divisor=float(rows), std_out=std_c)
    g = gpu.to(runs[0])
    fm.ops.dp_clip_factors(g, clip=1.0, noise_multiplier=0.9, grad_scale=float(rows),
                           divisor=float(rows), std_out=std_g)
    np.testing.assert_array_equal(gpu.host(g), cpu)
    np.testing.assert_array_equal(gpu.host(std_g), std_c)
