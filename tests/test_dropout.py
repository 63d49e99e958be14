"""Dropout (issue 15): fm.ops.dropout / dropout_backward, dropout inside
activation / activation_backward and fused into the Dense GEMM epilogue, on the CPU
and (the `gpu` twins) the GPU.

The mask is Philox4x32-10 of (element // 4, step) under dropout_key(seed, layer),
lane element % 4 (kernel_math.h): the tests hold the kernels' mask to the reference's
bit for bit and check its statistics.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import fastmlp as fm
from fastmlp import ops
from fastmlp import reference as ref
from helpers import F32_EPS, F32_TINY, assert_close, f64, gemm_tol, normal, shape_id

SHAPES = [(0, 3), (1, 1), (1, 5), (3, 1), (7, 13), (47, 49), (97, 97), (512, 301)]


def kept_mask(y):
    return np.asarray(y) != 0


def test_dropout_key_matches_reference():
    for seed, layer in [(0, 0), (1, 2), (2**63 + 5, 7), (12345, 2**40 + 1)]:
        assert fm._C.dropout_key(seed, layer) == ref.dropout_key(seed, layer)
    # and the reference Philox against the kernel's (kernel_math.h) on one counter
    r = ref.philox4x32_10((1, 2, 3, 4), (5, 6))
    assert tuple(int(v) for v in r) == tuple(fm._C.philox4x32_10([1, 2, 3, 4], [5, 6]))


def test_dropout_constants():
    assert ops.dropout_constants(0) == (0, 1.0)
    t, s = ops.dropout_constants(0.5)
    assert t == 2**31 and s == 2.0
    t, s = ops.dropout_constants(0.1)
    assert t == round(0.1 * 2**32) and s == float(np.float32(1 / 0.9))
    assert ops.dropout_constants(1 - 1e-12)[0] == 2**32 - 1  # clamped to 32 bits
    for bad in (-0.1, 1.0, 1.5, float("nan"), float("inf"), "0.5", None, True):
        with pytest.raises(ValueError, match="rate"):
            ops.dropout_constants(bad)


@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(*s) for s in SHAPES])
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_mask_equals_reference(backend, rng, shape, rate):
    """Same zeros as the reference's Philox mask, and the kept values scaled exactly: a
    kept element is the float32 product x * float32(1 / (1 - rate)), one rounding."""
    x = normal(rng, shape)
    x[x == 0] = 1.0
    y = backend.host(ops.dropout(backend.to(x), rate, seed=42, step=7, layer=3,
                                 out=backend.nan(shape)))
    m = ref.dropout_mask(x.size, rate, 42, 7, 3).reshape(shape)
    np.testing.assert_array_equal(kept_mask(y), m != 0)
    _, scale = ops.dropout_constants(rate)
    want = np.where(m != 0, x * np.float32(scale), np.float32(0))  # float32 products
    np.testing.assert_array_equal(y, want.astype(np.float32))
    assert_close(y, ref.dropout(f64(x), rate, seed=42, step=7, layer=3),
                 F32_EPS * np.abs(f64(x)) * scale + F32_TINY, "dropout vs reference")


@pytest.mark.parametrize("rate", [0.05, 0.3, 0.5, 0.8])
def test_fraction_dropped_within_binomial_bound(backend, rate):
    n = 200_003
    x = np.ones((n,), np.float32)
    y = backend.host(ops.dropout(backend.to(x), rate, seed=3, step=1))
    dropped = int(np.count_nonzero(y == 0))
    sd = math.sqrt(n * rate * (1 - rate))
    # 6 standard deviations: a false failure has probability ~2e-9 for a fair mask
    assert abs(dropped - n * rate) <= 6 * sd, (dropped, n * rate, sd)
    kept = y[y != 0]
    assert np.all(kept == np.float32(1.0) * np.float32(ops.dropout_constants(rate)[1]))


def test_repeatable_and_varies_with_step_layer_seed(backend, rng):
    x = backend.to(normal(rng, (64, 33)))
    base = dict(seed=9, step=4, layer=1)
    a = backend.host(ops.dropout(x, 0.5, **base))
    b = backend.host(ops.dropout(x, 0.5, **base))
    np.testing.assert_array_equal(a, b)
    for change in (dict(step=5), dict(layer=2), dict(seed=10), dict(step=2**40 + 4)):
        c = backend.host(ops.dropout(x, 0.5, **{**base, **change}))
        # two independent masks of 2112 elements agree on ~half; identical has p = 2^-2112
        assert np.count_nonzero(kept_mask(a) != kept_mask(c)) > 500, change


def test_step_as_device_array(backend, rng):
    """step may be a 1-element int64 array on the data's device (an engine's counter):
    the kernel reads it, so changing it in place changes the mask."""
    x = backend.to(normal(rng, (31, 17)))
    step = backend.xp.array([6], dtype=backend.xp.int64)
    a = backend.host(ops.dropout(x, 0.4, seed=1, step=step))
    np.testing.assert_array_equal(a, backend.host(ops.dropout(x, 0.4, seed=1, step=6)))
    step[0] = 7
    b = backend.host(ops.dropout(x, 0.4, seed=1, step=step))
    np.testing.assert_array_equal(b, backend.host(ops.dropout(x, 0.4, seed=1, step=7)))
    assert not np.array_equal(a, b)
    with pytest.raises(TypeError, match="int64"):
        ops.dropout(x, 0.4, seed=1, step=backend.xp.array([6], dtype=backend.xp.int32))
    with pytest.raises(ValueError, match="shape"):
        ops.dropout(x, 0.4, seed=1, step=backend.xp.array([6, 7], dtype=backend.xp.int64))


def test_rate_zero_is_identity(backend, rng):
    x = normal(rng, (19, 23))
    x[0, 0] = np.nan
    y = backend.host(ops.dropout(backend.to(x), 0.0, seed=1, step=1))
    np.testing.assert_array_equal(y, x)
    y = backend.host(ops.dense_forward(backend.to(x), backend.to(np.eye(23, dtype=np.float32)),
                                       dropout=ops.Dropout(0.0, 1, 1)))
    assert np.isnan(y[0, 0])


def test_bad_rates_raise(backend, rng):
    x = backend.to(normal(rng, (4, 4)))
    for bad in (-0.5, 1.0, 2.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="rate"):
            ops.dropout(x, bad, seed=0, step=0)
        with pytest.raises(ValueError, match="rate"):
            ops.dense_forward(x, x, dropout=ops.Dropout(bad, 0, 0))
    with pytest.raises(ValueError, match="integer"):
        ops.dropout(x, 0.5, seed=1.5, step=0)
    with pytest.raises(ValueError, match="Dropout"):
        ops.activation(x, "relu", dropout=0.5)


def test_nan_propagates_where_dropped(backend):
    """x * mask * scale as torch: a NaN stays NaN even where the element is dropped."""
    x = np.full((1, 4096), np.nan, np.float32)
    y = backend.host(ops.dropout(backend.to(x), 0.5, seed=1, step=1))
    assert np.isnan(y).all()
    y = backend.host(ops.activation(backend.to(x), "relu", dropout=ops.Dropout(0.5, 1, 1)))
    assert np.isnan(y).all()


@pytest.mark.parametrize("shape", [(0, 4), (1, 1), (53, 47), (129, 97)],
                         ids=lambda s: shape_id(*s))
def test_backward_uses_the_forward_mask(backend, rng, shape):
    dy = normal(rng, shape)
    kw = dict(seed=77, step=3, layer=4)
    dx = backend.host(ops.dropout_backward(backend.to(dy), 0.3, **kw))
    m = ref.dropout_mask(dy.size, 0.3, 77, 3, 4, dtype=np.float32).reshape(shape)
    np.testing.assert_array_equal(dx, dy * m)
    np.testing.assert_array_equal(dx, backend.host(ops.dropout(backend.to(dy), 0.3, **kw)))


@pytest.mark.parametrize("name", ["relu", "tanh", "gelu", "elu", "linear"])
def test_activation_with_dropout(backend, rng, name):
    shape = (61, 37)
    x = normal(rng, shape, 2.0)
    d = ops.Dropout(0.25, seed=5, step=9, layer=1)
    y = backend.host(ops.activation(backend.to(x), name, dropout=d))
    want = ref.activation(f64(x), name, dropout=d)
    # zero where dropped, or where the activation itself is 0 in float32 (gelu of z < -5.5)
    plain = backend.host(ops.activation(backend.to(x), name))
    np.testing.assert_array_equal(y == 0, (ref.dropout_mask(x.size, 0.25, 5, 9, 1).reshape(shape)
                                           == 0) | (plain == 0))
    assert_close(y, want, 16 * F32_EPS * (np.abs(want) + np.abs(f64(x)) + 1) * 1.34, name)
    dy = normal(rng, shape)
    dx = backend.host(ops.activation_backward(backend.to(dy), backend.to(x), name,
                                              saved_is_input=True, dropout=d))
    want = ref.activation_backward(f64(dy), f64(x), name, saved_is_input=True, dropout=d)
    assert_close(dx, want, 16 * F32_EPS * (np.abs(want) + 1.34 * np.abs(f64(dy)) *
                                           (1 + np.abs(f64(x)))), f"{name} backward")


DENSE = [(1, 1, 1), (7, 13, 3), (47, 17, 48), (48, 33, 49), (32, 784, 128), (129, 65, 257)]


@pytest.mark.parametrize("n,k,m", DENSE, ids=[shape_id(*s) for s in DENSE])
@pytest.mark.parametrize("name", ["linear", "relu", "silu"])
def test_dense_fused_dropout(backend, rng, name, n, k, m):
    """Dense forward with dropout (element index row * m + col) and the backward through
    it: the fused epilogue draws the reference's mask; the backward of the previous
    layer (grad through this activation and its dropout) too."""
    x, w, b = normal(rng, (n, k)), normal(rng, (k, m), 1 / math.sqrt(k)), normal(rng, (m,))
    d = ops.Dropout(0.4, seed=123, step=17, layer=2)
    pre = backend.nan((n, m))
    y = backend.host(ops.dense_forward(backend.to(x), backend.to(w), backend.to(b),
                                       activation=name, dropout=d, preact_out=pre))
    zk = backend.host(pre)
    mask = ref.dropout_mask(n * m, 0.4, 123, 17, 2).reshape(n, m)
    plain = ops.activation(zk, name)  # zero where the float32 activation itself is 0
    np.testing.assert_array_equal(y == 0, (mask == 0) | (plain == 0))
    want = ref.activation(f64(zk), name, dropout=d)
    assert_close(y, want, 16 * F32_EPS * (np.abs(want) + 1.67 * (np.abs(f64(zk)) + 1)),
                 "fused forward with dropout")
    y_nopre = backend.host(ops.dense_forward(backend.to(x), backend.to(w), backend.to(b),
                                             activation=name, dropout=d))
    np.testing.assert_array_equal(y_nopre, y)
    # backward into this layer's pre-activation: dz = act'(z) * (dy_next @ w_next.T * mask)
    w2 = normal(rng, (m, 11))
    dy2 = normal(rng, (n, 11))
    dz = backend.host(ops.dense_backward_input(backend.to(dy2), backend.to(w2), activation=name,
                                               saved=backend.to(zk), saved_is_input=True,
                                               dropout=d))
    g64 = f64(dy2) @ f64(w2).T
    want = ref.activation_backward(g64, f64(zk), name, saved_is_input=True, dropout=d)
    gtol = gemm_tol(dy2, w2, None, trans_a=False, trans_b=True, alpha=1.0, beta=0.0)
    assert_close(dz, want, 1.2 * 1.67 * gtol + 16 * F32_EPS * (
        np.abs(want) + 1.67 * np.abs(g64) * (1 + np.abs(f64(zk)))), "fused backward")
    assert np.all(dz[mask == 0] == 0)


def test_cpu_gpu_same_mask(rng):
    """The CPU and the GPU draw the identical mask (and agree on the values)."""
    from conftest import gpu_backend

    gpu = gpu_backend()
    x = normal(rng, (301, 257))
    d = dict(seed=2024, step=99, layer=5)
    c = ops.dropout(x, 0.35, **d)
    g = gpu.host(ops.dropout(gpu.to(x), 0.35, **d))
    np.testing.assert_array_equal(c, g)  # one float32 product per element: exact
    w, b = normal(rng, (257, 129), 0.06), normal(rng, (129,))
    dd = ops.Dropout(0.35, **d)
    yc = ops.dense_forward(x, w, b, activation="gelu", dropout=dd)
    yg = gpu.host(ops.dense_forward(gpu.to(x), gpu.to(w), gpu.to(b), activation="gelu",
                                    dropout=dd))
    np.testing.assert_array_equal(yc == 0, yg == 0)
    assert_close(yg, f64(yc), 1e-4 * (np.abs(f64(yc)) + 1), "CPU vs GPU fused gelu+dropout")


test_cpu_gpu_same_mask = pytest.mark.gpu(test_cpu_gpu_same_mask)
