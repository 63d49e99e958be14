"""GPU-only checks (all marked `gpu`; skipped with fastmlp's reason where CUDA is not
usable): the CUDA kernels agree with the CPU kernels on the same float32 data, they run
on CuPy's current stream, mixed devices are refused by name, and a bad label flagged on
the device raises without poisoning the CUDA context. The per-op comparisons with the
reference run on the GPU through test_ops.py's `backend` fixture."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    F32_EPS,
    assert_close,
    assert_equal_f32,
    away_from_zero,
    f64,
    gemm_operands,
    gemm_tol,
    normal,
    onehot,
    shape_id,
    sum_tol,
    ulp_tol,
)

import fastmlp as fm
from fastmlp import reference as ref

pytestmark = pytest.mark.gpu

AGREE_GEMM = [
    (1, 1, 1),
    (7, 13, 31),
    (63, 65, 64),
    (129, 127, 97),
    (1024, 784, 128),
    (256, 2048, 10),
]
TRANS = [(False, False), (False, True), (True, False), (True, True)]


@pytest.mark.parametrize("trans", TRANS, ids=["nn", "nt", "tn", "tt"])
@pytest.mark.parametrize("shape", AGREE_GEMM, ids=[shape_id(*s) for s in AGREE_GEMM])
def test_gemm_cpu_gpu_agree(gpu, rng, shape, trans):
    m, k, n = shape
    ta, tb = trans
    a, b = gemm_operands(rng, m, k, n, ta, tb)
    c0 = normal(rng, (m, n))
    cpu = c0.copy()
    fm.ops.gemm(a, b, trans_a=ta, trans_b=tb, alpha=0.5, beta=-1.0, out=cpu)
    dev = gpu.to(c0)
    fm.ops.gemm(gpu.to(a), gpu.to(b), trans_a=ta, trans_b=tb, alpha=0.5, beta=-1.0, out=dev)
    # both are within gemm_tol of the exact result, so within twice that of each other
    tol = 2 * gemm_tol(a, b, c0, trans_a=ta, trans_b=tb, alpha=0.5, beta=-1.0)
    assert_close(gpu.host(dev), cpu, tol, "gpu vs cpu gemm")


@pytest.mark.parametrize(
    "shape", [(1, 1), (13, 7), (65, 63), (4096, 1000)], ids=lambda s: shape_id(*s)
)
def test_elementwise_cpu_gpu_bitwise(gpu, rng, shape):
    """One rounding (add) or a select: the two backends must agree bit for bit."""
    x, bias, dy = away_from_zero(rng, shape), normal(rng, shape[1:]), normal(rng, shape)
    X, B, DY = gpu.to(x), gpu.to(bias), gpu.to(dy)
    pairs = [
        (fm.ops.bias_add(x, bias), fm.ops.bias_add(X, B)),
        (fm.ops.relu(x), fm.ops.relu(X)),
        (fm.ops.relu_backward(dy, fm.ops.relu(x)), fm.ops.relu_backward(DY, fm.ops.relu(X))),
    ]
    for cpu, dev in pairs:
        assert gpu.host(dev).tobytes() == cpu.tobytes()
    dbc, dbg = fm.ops.bias_grad(dy), gpu.host(fm.ops.bias_grad(DY))
    assert_close(
        dbg, dbc, 2 * sum_tol(shape[0], np.abs(f64(dy)).sum(axis=0)), "bias_grad gpu vs cpu"
    )


@pytest.mark.parametrize("kind", ["int32", "int64", "onehot"])
@pytest.mark.parametrize(
    "shape", [(1, 1), (7, 13), (65, 10), (1000, 1000), (4096, 10)], ids=lambda s: shape_id(*s)
)
def test_softmax_xent_cpu_gpu_agree(gpu, rng, shape, kind):
    n, c = shape
    logits = normal(rng, shape, 3.0)
    idx = rng.integers(0, c, n)
    labels = {
        "int32": idx.astype(np.int32),
        "int64": idx.astype(np.int64),
        "onehot": onehot(idx, c),
    }[kind]
    lc, pc = fm.ops.softmax_cross_entropy(logits, labels)
    lg, pg = fm.ops.softmax_cross_entropy(gpu.to(logits), gpu.to(labels))
    zdist = np.abs(f64(logits) - f64(logits).max(axis=1, keepdims=True))
    rel = 2 * (2 * F32_EPS * (np.sqrt(c) + 2) + F32_EPS * (zdist + 4))  # twice test_ops' bound
    assert_close(gpu.host(pg), pc, rel * np.abs(f64(pc)) + 1e-44, "probs gpu vs cpu")
    assert abs(float(gpu.host(lg)) - float(lc)) <= 2 * (1e-5 * abs(float(lc)) + 1e-6)
    gc = fm.ops.softmax_cross_entropy_backward(pc, labels)
    gg = fm.ops.softmax_cross_entropy_backward(gpu.to(pc), gpu.to(labels))
    assert_close(gpu.host(gg), gc, 2 * ulp_tol(gc, 4), "dlogits gpu vs cpu")


def test_optimizers_cpu_gpu_agree(gpu, rng):
    """Shared math.h rules: one step agrees to a few ulp (nvcc may contract to FMA)."""
    p0, g = normal(rng, 1031), normal(rng, 1031)
    pc, bc = p0.copy(), np.zeros_like(p0)
    pg, bg = gpu.to(p0), gpu.xp.zeros(1031, np.float32)
    fm.ops.sgd_step(pc, g, bc, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    fm.ops.sgd_step(pg, gpu.to(g), bg, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    assert_close(gpu.host(pg), pc, 4 * F32_EPS * (np.abs(p0) + 0.2 * np.abs(g)) + 1e-30, "sgd")
    pc, mc, vc = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    pg, mg, vg = gpu.to(p0), gpu.xp.zeros(1031, np.float32), gpu.xp.zeros(1031, np.float32)
    for t in (1, 2, 3):
        fm.ops.adam_step(pc, g, mc, vc, step=t, lr=1e-2, weight_decay=0.1, decoupled=True)
        fm.ops.adam_step(pg, gpu.to(g), mg, vg, step=t, lr=1e-2, weight_decay=0.1, decoupled=True)
    assert_close(gpu.host(pg), pc, 8 * F32_EPS * (np.abs(p0) + 0.03) + 1e-30, "adamw")


def test_mixed_devices_refused(gpu):
    h = np.zeros((3, 4), np.float32)
    d = gpu.xp.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="'b'"):
        fm.ops.gemm(h, d)
    with pytest.raises(ValueError, match="'out'"):
        fm.ops.gemm(gpu.to(h), d, out=np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="'bias'"):
        fm.ops.bias_add(gpu.to(h), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="'labels'"):
        fm.ops.softmax_cross_entropy(gpu.to(h), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="'grad'"):
        fm.ops.sgd_step(gpu.xp.zeros(4, np.float32), np.zeros(4, np.float32), None, lr=0.1)
    with pytest.raises(ValueError, match="'m'"):
        fm.ops.adam_step(
            gpu.xp.zeros(4, np.float32),
            gpu.xp.zeros(4, np.float32),
            np.zeros(4, np.float32),
            gpu.xp.zeros(4, np.float32),
            step=1,
            lr=0.1,
        )


def test_gpu_bad_inputs_named(gpu):
    cp = gpu.xp
    with pytest.raises(TypeError, match="'a'"):
        fm.ops.gemm(cp.zeros((2, 3), cp.float64), cp.zeros((3, 2), cp.float32))
    with pytest.raises(ValueError, match="'a'"):
        fm.ops.gemm(cp.zeros((3, 2), cp.float32).T, cp.zeros((3, 2), cp.float32))
    with pytest.raises(ValueError, match="'out'"):
        fm.ops.relu(cp.zeros(4, cp.float32), out=cp.zeros(5, cp.float32))


def test_small_bad_label_keeps_context_usable(gpu, rng):
    """The kernel flags a bad label (no out-of-bounds read, no device assert): the op raises
    ValueError naming it, and the CUDA context still runs the next op correctly."""
    labels = np.array([0, 3, 12, 1], np.int64)
    with pytest.raises(ValueError, match=r"(?<!\d)12(?!\d)"):
        fm.ops.softmax_cross_entropy(gpu.xp.zeros((4, 5), np.float32), gpu.to(labels))
    with pytest.raises(ValueError, match=r"(?<![\d-])-5(?!\d)"):
        fm.ops.softmax_cross_entropy_backward(
            gpu.xp.full((4, 5), 0.2, np.float32), gpu.to(np.array([0, -5, 1, 1], np.int32))
        )
    a, b = normal(rng, (8, 8)), normal(rng, (8, 8))
    c = fm.ops.gemm(gpu.to(a), gpu.to(b))
    gpu.sync()
    assert_close(
        gpu.host(c),
        ref.gemm(*f64(a, b)),
        gemm_tol(a, b, None, trans_a=False, trans_b=False, alpha=1, beta=0),
    )


def test_small_runs_on_current_stream(gpu, rng):
    """Inputs produced by CuPy on a non-blocking stream, the op, and a CuPy consumer on the
    same stream: correct only if the kernel is ordered on that stream."""
    cp = gpu.xp
    a, b = normal(rng, (65, 63)), normal(rng, (63, 31))
    want = ref.relu(ref.gemm(*f64(a, b), alpha=2.0))
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        A = cp.asarray(a) * 2  # written on `stream`
        B = cp.asarray(b)
        C = fm.ops.gemm(A, B)
        R = fm.ops.relu(C)
        S = R * 1  # read on `stream`
    stream.synchronize()
    assert_close(
        cp.asnumpy(S),
        want,
        2 * gemm_tol(a, b, None, trans_a=False, trans_b=False, alpha=2.0, beta=0.0),
    )


def test_results_stay_on_device(gpu, rng):
    x = gpu.to(normal(rng, (7, 5)))
    for y in (fm.ops.relu(x), fm.ops.gemm(x, x, trans_b=True), fm.ops.bias_grad(x)):
        assert isinstance(y, gpu.xp.ndarray)
    loss, probs = fm.ops.softmax_cross_entropy(x, gpu.to(np.zeros(7, np.int64)))
    assert (
        isinstance(loss, gpu.xp.ndarray) and loss.shape == () and isinstance(probs, gpu.xp.ndarray)
    )


def test_large_elementwise_and_reduction(gpu, rng):
    """Sizes past one grid's worth of blocks (grid-stride loops / 2-D grids)."""
    n, f = 70001, 129
    dy = normal(rng, (n, f))
    got = gpu.host(fm.ops.bias_grad(gpu.to(dy)))
    assert_close(
        got, ref.bias_grad(f64(dy)), sum_tol(n, np.abs(f64(dy)).sum(axis=0)), "bias_grad 70001 rows"
    )
    x = away_from_zero(rng, (n, f))
    out = gpu.nan((n, f))
    fm.ops.relu(gpu.to(x), out=out)
    assert_equal_f32(gpu.host(out), ref.relu(f64(x)), "relu 70001x129")
