"""Flush-to-zero / denormals-are-zero in the CPU kernels (fm.set_flush_denormal).

On (the default): a denormal float32 input reads as zero and a result that would
be denormal is written as zero -- exact expected outputs below. Off: IEEE 754
gradual underflow. Either way the caller's own floating-point mode is restored
after each kernel, so NumPy keeps IEEE arithmetic.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastmlp as fm

TINY = np.float32(1e-40)  # a denormal float32 (smallest normal: 1.18e-38)
assert 0 < TINY < np.finfo(np.float32).tiny

pytestmark = pytest.mark.skipif(not fm.set_flush_denormal(fm.get_flush_denormal()),
                                reason="this CPU has no flush-to-zero mode")


@pytest.fixture
def flush_mode():
    """Sets the mode for one test and restores the process default afterwards."""
    before = fm.get_flush_denormal()

    def set_(on):
        assert fm.set_flush_denormal(on) is True
        assert fm.get_flush_denormal() is on

    yield set_
    fm.set_flush_denormal(before)


def numpy_keeps_denormals():
    return np.float32(1e-39) * np.float32(0.5) != 0


def test_default_is_on_and_reported():
    assert fm.get_flush_denormal() is True
    assert fm.backends()["cpu_flush_denormal"] is True


def test_bad_mode_is_a_value_error():
    with pytest.raises(ValueError, match="set_flush_denormal"):
        fm.set_flush_denormal("yes")
    with pytest.raises(ValueError, match="set_flush_denormal"):
        fm.set_flush_denormal(2)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(8, 8, 8), (512, 384, 300)])  # small: one thread; large: the pool
def test_gemm_denormal_input(flush_mode, threads, shape):
    m, n, k = shape
    a = np.full((m, k), TINY, np.float32)
    b = np.ones((k, n), np.float32)
    old = fm.get_num_threads()
    fm.set_num_threads(threads)
    try:
        flush_mode(True)
        got = fm.ops.gemm(a, b)
        assert np.array_equal(got, np.zeros((m, n), np.float32))  # every worker flushed too
        flush_mode(False)
        got = fm.ops.gemm(a, b)
    finally:
        fm.set_num_threads(old)
    want = (a.astype(np.float64) @ b.astype(np.float64)).astype(np.float32)  # k * 1e-40, normal or not
    assert np.all(got > 0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert numpy_keeps_denormals()


def test_gemm_denormal_result_flushed(flush_mode):
    # normal inputs whose products are denormal: FTZ writes zero
    a = np.full((4, 3), 1e-20, np.float32)
    b = np.full((3, 5), 1e-20, np.float32)
    flush_mode(True)
    assert np.array_equal(fm.ops.gemm(a, b), np.zeros((4, 5), np.float32))
    flush_mode(False)
    got = fm.ops.gemm(a, b)
    np.testing.assert_allclose(got, np.full((4, 5), 3e-40, np.float32), rtol=1e-3)
    assert np.all(got > 0)


def test_bias_add_and_bias_grad(flush_mode):
    x = np.full((40, 7), TINY, np.float32)
    zero_bias = np.zeros(7, np.float32)
    flush_mode(True)
    assert np.array_equal(fm.ops.bias_add(x, zero_bias), np.zeros_like(x))
    assert np.array_equal(fm.ops.bias_grad(x), np.zeros(7, np.float32))
    flush_mode(False)
    assert np.array_equal(fm.ops.bias_add(x, zero_bias), x)
    np.testing.assert_allclose(fm.ops.bias_grad(x), np.full(7, 40 * 1e-40, np.float32), rtol=1e-3)


def test_adam_step_denormal_moments(flush_mode):
    """Adam's moments of a zero gradient decay into denormals; flushed they are zero."""
    def run():
        p = np.ones(1000, np.float32)
        g = np.zeros(1000, np.float32)
        m = np.full(1000, TINY, np.float32)
        v = np.full(1000, TINY, np.float32)
        fm.ops.adam_step(p, g, m, v, step=900, lr=1e-3)
        return p, m, v

    flush_mode(True)
    p, m, v = run()
    assert np.array_equal(m, np.zeros(1000, np.float32))
    assert np.array_equal(v, np.zeros(1000, np.float32))
    assert np.array_equal(p, np.ones(1000, np.float32))
    flush_mode(False)
    p, m, v = run()
    assert np.all(m > 0) and np.all(m < TINY)  # 0.9 * 1e-40, still denormal
    assert np.all(v > 0)


def test_sgd_step_denormal_gradient(flush_mode):
    p = np.zeros(100, np.float32)
    g = np.full(100, TINY, np.float32)
    flush_mode(True)
    fm.ops.sgd_step(p, g, None, lr=1.0)
    assert np.array_equal(p, np.zeros(100, np.float32))
    flush_mode(False)
    fm.ops.sgd_step(p, g, None, lr=1.0)
    assert np.array_equal(p, -g)


def test_softmax_cross_entropy_denormal_logits_read_as_zero(flush_mode):
    logits = np.full((6, 10), TINY, np.float32)
    logits[:, 3] = -TINY
    labels = np.arange(6, dtype=np.int32)
    zeros = np.zeros_like(logits)
    flush_mode(True)
    loss, probs = fm.ops.softmax_cross_entropy(logits, labels)
    loss0, probs0 = fm.ops.softmax_cross_entropy(zeros, labels)
    assert float(loss) == float(loss0) == pytest.approx(np.log(10), rel=1e-6)
    assert np.array_equal(probs, probs0)


def test_callers_mode_is_restored(flush_mode):
    """The kernels set the mode for themselves only: NumPy keeps denormals after them."""
    flush_mode(True)
    a = np.random.default_rng(0).random((300, 300), dtype=np.float32)
    fm.ops.gemm(a, a)  # runs on the pool's workers too
    fm.ops.relu(a)
    assert numpy_keeps_denormals()
    assert np.float32(1e-40) + np.float32(0) == TINY  # DAZ not left on either


def test_fit_is_unchanged_on_normal_data_and_runs_either_way(flush_mode):
    """Training data without denormals: the mode does not change a single bit of fit
    (no weight or moment is denormal in 2 short epochs)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((256, 20)).astype(np.float32)
    y = rng.integers(0, 4, 256).astype(np.int32)

    def train():
        fm.set_seed(3)
        model = fm.Sequential([fm.Dense(16, activation="relu"), fm.Dense(4, activation="softmax")])
        model.compile(optimizer=fm.optim.Adam(lr=1e-2), loss="sparse_categorical_crossentropy")
        model.fit(x, y, epochs=2, batch_size=32, verbose=0)
        return [w.copy() for w in model.get_weights()]

    flush_mode(True)
    on = train()
    flush_mode(False)
    off = train()
    for a, b in zip(on, off):
        tiny = (a != 0) & (np.abs(a) < np.finfo(np.float32).tiny)
        assert not tiny.any()
        assert np.array_equal(a, b)
    assert numpy_keeps_denormals()
