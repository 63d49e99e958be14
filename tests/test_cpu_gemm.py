"""The CPU GEMM's packed, register-blocked drivers (csrc/cpu/gemm_driver.h), one
instruction set at a time: every driver this CPU supports runs every case.

The micro-kernel's register tile is MR x NR (AVX-512 8 x 32, AVX2 6 x 16, generic
4 x 16) and k is cut into slices of at most KC (384 / 256): each dimension is
swept over 1 .. 2*tile + 1 with the other two fixed at edge sizes, in all four
transposes, with alpha/beta and the Dense epilogues, on shapes small enough to
read operands in place and large enough to pack them. Results are held to the
float64 reference with helpers.gemm_tol (a rounding-error bound, not a loose
constant); a C element the kernel forgets to write stays NaN and fails.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import fastmlp as fm
from fastmlp import _C
from fastmlp import reference as ref
from helpers import assert_close, f64, gemm_operands, gemm_tol, normal

ISAS = _C.cpu.gemm_isas_supported().split(",")
TILES = {"avx512": (8, 32, 384), "avx2": (6, 16, 256), "generic": (4, 16, 256)}
TRANS = list(itertools.product([False, True], [False, True]))
TRANS_IDS = ["NN", "NT", "TN", "TT"]


@pytest.fixture(params=ISAS)
def isa(request):
    old = _C.cpu.set_gemm_isa(request.param)
    yield request.param
    _C.cpu.set_gemm_isa(old)


def _check(rng, m, n, k, ta, tb, alpha=1.0, beta=0.0):
    a, b = gemm_operands(rng, m, k, n, ta, tb)
    c0 = normal(rng, (m, n))
    out = c0.copy() if beta != 0 else np.full((m, n), np.nan, np.float32)
    fm.ops.gemm(a, b, trans_a=ta, trans_b=tb, alpha=alpha, beta=beta, out=out)
    want = ref.gemm(*f64(a, b), trans_a=ta, trans_b=tb, alpha=alpha, beta=beta,
                    out=f64(c0).copy())
    tol = gemm_tol(a, b, c0, trans_a=ta, trans_b=tb, alpha=alpha, beta=beta)
    assert_close(out, want, tol, f"gemm m={m} n={n} k={k} ta={ta} tb={tb} a={alpha} b={beta}")


def test_isas_reported():
    assert _C.cpu.gemm_isa() in ISAS
    assert "generic" in ISAS
    assert fm.backends()["cpu_gemm"] == _C.cpu.gemm_isa()
    with pytest.raises(ValueError, match="not one of"):
        _C.cpu.set_gemm_isa("sse9")


@pytest.mark.parametrize("trans", TRANS, ids=TRANS_IDS)
def test_m_sweep(isa, rng, trans):
    mr, nr, _ = TILES[isa]
    for m in range(1, 2 * mr + 2):
        _check(rng, m, nr + 3, 37, *trans)


@pytest.mark.parametrize("trans", TRANS, ids=TRANS_IDS)
def test_n_sweep(isa, rng, trans):
    mr, nr, _ = TILES[isa]
    for n in range(1, 2 * nr + 2):
        _check(rng, mr + 1, n, 29, *trans)


@pytest.mark.parametrize("trans", TRANS, ids=TRANS_IDS)
def test_k_sweep(isa, rng, trans):
    mr, nr, kc = TILES[isa]
    ks = sorted(set(range(1, 18)) | {kc - 1, kc, kc + 1, 2 * kc - 3, 2 * kc + 1})
    for k in ks:
        _check(rng, mr + 2, nr - 1, k, *trans)


@pytest.mark.parametrize("trans", TRANS, ids=TRANS_IDS)
@pytest.mark.parametrize("alpha, beta", [(1.0, 1.0), (0.5, -2.0), (-1.5, 0.0), (0.0, 0.75)])
def test_alpha_beta_edges(isa, rng, trans, alpha, beta):
    mr, nr, kc = TILES[isa]
    for m, n, k in [(2 * mr + 1, 2 * nr + 1, kc + 5), (1, 1, 1), (mr - 1, nr + 1, 3)]:
        _check(rng, m, n, k, *trans, alpha=alpha, beta=beta)


# Shapes large enough that the driver packs A and/or B (see Gemm::run), with edge
# tiles in both dimensions; the MLP shapes; and narrow ones (n at most one vector)
# that take the narrow tile (Gemm::run_narrow: the 128 -> 10 layer).
PACKED = [(75, 133, 900), (300, 261, 900), (261, 300, 901), (32, 128, 784), (784, 128, 32),
          (32, 784, 128), (1024, 130, 70), (200, 5, 300), (128, 10, 2048), (131, 16, 257)]


@pytest.mark.parametrize("shape", PACKED, ids=["x".join(map(str, s)) for s in PACKED])
@pytest.mark.parametrize("trans", TRANS, ids=TRANS_IDS)
def test_packed_paths(isa, rng, shape, trans):
    _check(rng, *shape, *trans)
    _check(rng, *shape, *trans, alpha=0.5, beta=1.5)


@pytest.mark.parametrize("shape", [(1, 1, 1), (17, 33, 5), (75, 133, 900), (9, 65, 400),
                                   (200, 5, 300), (130, 10, 600)],
                         ids=["1x1x1", "17x33x5", "75x133x900", "9x65x400", "200x5x300",
                              "130x10x600"])
def test_epilogues_on_edge_tiles(isa, rng, shape):
    """Bias + ReLU, the ReLU mask and the column sums, on tiles cut by every edge."""
    m, n, k = shape
    x, w, bias = normal(rng, (m, k)), normal(rng, (k, n)), normal(rng, (n,))
    y = fm.ops.dense_forward(x, w, bias, activation="relu")
    z = f64(x) @ f64(w) + f64(bias)
    tol = gemm_tol(x, w, None, trans_a=False, trans_b=False, alpha=1.0, beta=0.0) \
        + 2 ** -23 * (np.abs(z) + np.abs(f64(bias)))
    assert_close(y, np.maximum(z, 0), tol, "dense_forward relu")

    dy = normal(rng, (m, n))
    mask = np.maximum(normal(rng, (m, k)), 0)
    dx = fm.ops.dense_backward_input(dy, w, relu_output=mask)
    want = np.where(mask > 0, f64(dy) @ f64(w).T, 0.0)
    assert_close(dx, want, gemm_tol(dy, w, None, trans_a=False, trans_b=True, alpha=1.0,
                                    beta=0.0), "dense_backward_input")
    assert (dx[mask == 0] == 0).all()

    dw, db = fm.ops.dense_backward_weight(x, dy)
    assert_close(dw, f64(x).T @ f64(dy),
                 gemm_tol(x, dy, None, trans_a=True, trans_b=False, alpha=1.0, beta=0.0), "dW")
    assert_close(db, f64(dy).sum(0), 2 ** -22 * (m + 2) * np.abs(f64(dy)).sum(0) + 1e-30, "db")


@pytest.mark.parametrize("trans", TRANS, ids=TRANS_IDS)
def test_narrow_tile_m_sweep(isa, rng, trans):
    """n <= one vector: 2*MR-row tiles (run_narrow), edge rows in every position, with
    alpha/beta, and k from 1 to past a k-slice."""
    mr, nr, kc = TILES[isa]
    for m in range(1, 4 * mr + 2):
        _check(rng, m, min(10, nr // 2), 19, *trans)
    for k in (1, 2, kc + 3):
        _check(rng, 2 * mr + 3, 7, k, *trans, alpha=-0.5, beta=2.0)


def test_drivers_agree_closely(rng):
    """Every driver computes the same products (to rounding) on the MLP shapes."""
    a, b = normal(rng, (32, 784)), normal(rng, (784, 128))
    outs = {}
    old = _C.cpu.gemm_isa()
    try:
        for name in ISAS:
            _C.cpu.set_gemm_isa(name)
            outs[name] = fm.ops.gemm(a, b)
    finally:
        _C.cpu.set_gemm_isa(old)
    tol = gemm_tol(a, b, None, trans_a=False, trans_b=False, alpha=1.0, beta=0.0)
    for name, out in outs.items():
        assert_close(out, f64(a) @ f64(b), tol, name)


@pytest.mark.parametrize("shape", [(1024, 130, 70), (64, 1000, 513), (300, 261, 900), (3000, 10, 300),
                                   (8192, 128, 100), (32, 128, 784), (100, 300, 1200)],
                         ids=["1024x130x70", "64x1000x513", "300x261x900", "3000x10x300", "8192x128x100",
                              "32x128x784-splitk", "100x300x1200-splitk"])
@pytest.mark.parametrize("trans", TRANS, ids=TRANS_IDS)
def test_thread_count_does_not_change_bits(rng, shape, trans):
    """The k-slicing depends on k only, so 1 and 2 threads give the same bits."""
    m, n, k = shape
    a, b = gemm_operands(rng, m, k, n, *trans)
    before = fm.get_num_threads()
    try:
        fm.set_num_threads(2)
        two = fm.ops.gemm(a, b, trans_a=trans[0], trans_b=trans[1])
        fm.set_num_threads(1)
        one = fm.ops.gemm(a, b, trans_a=trans[0], trans_b=trans[1])
    finally:
        fm.set_num_threads(before)
    assert np.array_equal(one, two)


def test_set_num_threads_validates():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            fm.set_num_threads(bad)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_split_k_epilogues_match_one_thread_bits(rng, beta):
    """Few rows and a deep k run as parallel k-slices (Gemm::run_splitk) on 2+ threads:
    the same bits as the sequential slices of one thread, with alpha/beta, bias + ReLU
    and the ReLU mask."""
    m, k, n = 32, 784, 128
    x, w, bias, c0 = normal(rng, (m, k)), normal(rng, (k, n)), normal(rng, (n,)), normal(rng, (m, n))
    dy, w_t = normal(rng, (m, k)), normal(rng, (n, k))  # dx = dy @ w_t^T: k = 784 deep
    mask = np.maximum(normal(rng, (m, n)), 0)
    before = fm.get_num_threads()
    outs = {}
    try:
        for threads in (1, 2):
            fm.set_num_threads(threads)
            c = c0.copy()
            fm.ops.gemm(x, w, alpha=1.5, beta=beta, out=c)
            outs[threads] = (c, fm.ops.dense_forward(x, w, bias, activation="relu"),
                             fm.ops.dense_backward_input(dy, w_t, relu_output=mask))
    finally:
        fm.set_num_threads(before)
    for a, b in zip(outs[1], outs[2]):
        assert np.array_equal(a, b)
    want = np.where(mask > 0, f64(dy) @ f64(w_t).T, 0.0)
    assert_close(outs[2][2], want, gemm_tol(dy, w_t, None, trans_a=False, trans_b=True, alpha=1.0,
                                            beta=0.0), "dx")
