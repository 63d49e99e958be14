"""Issue 17: the row-scaled weight-gradient GEMM of DP-SGD (GemmEpilogue::row_scale_k).

dW = x^T diag(s) dy and db = s^T dy with per-example clip factors s, scaled inside the
GEMM (the CPU packs dy's rows scaled, the GPU scales its tiles as it loads them) and in
the column sums. Each product dy[r, j] * s[r] is rounded to float32 before it is used,
so the call computes exactly what the unscaled call does on the float32 array s * dy:
on the CPU that is checked bit for bit (every path the driver can take reads the same
values, in the same order, whether B is packed or read in place), and s = 1 gives the
unscaled call's bits. Against the float64 reference, the tolerances are those of the
other GEMM tests (helpers.gemm_tol / sum_tol, with the scaled dy as B): the extra
rounding of s * dy is half an ulp per term, well inside their bound.

On the GPU the unscaled call may run a tuned family kernel (gemm_family.h, chosen by
the GPU's tuning table) while the scaled one runs the foundation's tiled kernel, so
there the comparisons with unscaled calls are within the GEMM tolerance, not bitwise.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import fastmlp as fm
from fastmlp import _C
from fastmlp import reference as ref
from helpers import assert_close, assert_meaningful, f64, gemm_tol, normal, sum_tol

ROWS = [0, 1, 2, 7, 31, 32, 33, 128, 257, 1024, 3000]
INS = [1, 3, 10, 128, 784]
OUTS = [1, 10, 128, 300]
SHAPES = list(itertools.product(ROWS, INS, OUTS))
IDS = [f"n{n}-in{i}-out{o}" for n, i, o in SHAPES]
ISAS = _C.cpu.gemm_isas_supported().split(",")


def scales(rng, n, kind):
    """Clip factors of one kind: DP-SGD's are in [0, 1]; 'mixed' adds exact 0 and 1,
    a tiny one and a few > 1 (the kernel does not assume s <= 1)."""
    if kind == "ones":
        return np.ones(n, np.float32)
    if kind == "zeros":
        return np.zeros(n, np.float32)
    if kind == "tiny":  # products ~1e-30: still normal floats, not flushed
        return np.full(n, 1e-30, np.float32)
    s = rng.uniform(0.0, 1.0, n)
    pick = rng.integers(0, 5, n)
    s = np.where(pick == 0, 0.0, np.where(pick == 1, 1.0, s))
    s = np.where(rng.integers(0, 7, n) == 0, rng.uniform(1.0, 30.0, n), s)
    if n:
        s[rng.integers(0, n)] = 1e-30
    return s.astype(np.float32)


def _check_dw(backend, x, dy, s, with_bias=True):
    n, fin = x.shape
    fout = dy.shape[1]
    dw_out = backend.nan((fin, fout))
    db_out = backend.nan((fout,)) if with_bias else None
    dw, db = fm.ops.dense_backward_weight(backend.to(x), backend.to(dy), row_scale=backend.to(s),
                                          out=dw_out, bias_out=db_out, bias=with_bias)
    assert dw is dw_out and db is db_out
    want_dw, want_db = ref.dense_backward_weight(*f64(x, dy), row_scale=f64(s), bias=with_bias)
    sdy = f64(s)[:, None] * f64(dy)
    tol = gemm_tol(x, sdy, None, trans_a=True, trans_b=False, alpha=1.0, beta=0.0)
    what = f"dw n={n} in={fin} out={fout}"
    assert_close(backend.host(dw), want_dw, tol, what)
    if with_bias:
        assert_close(backend.host(db), want_db, sum_tol(n, np.abs(sdy).sum(axis=0)),
                     f"db n={n} out={fout}")
    return backend.host(dw), (backend.host(db) if with_bias else None)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_dense_backward_weight_row_scale(backend, rng, shape):
    n, fin, fout = shape
    x, dy = normal(rng, (n, fin)), normal(rng, (n, fout))
    s = scales(rng, n, "mixed")
    want = f64(x).T @ (f64(s)[:, None] * f64(dy))
    if n > 8 and fin * fout:
        assert_meaningful(want)
    dw, db = _check_dw(backend, x, dy, s)
    if not backend.is_gpu:
        # The scaled call is the unscaled one on the rounded float32 s * dy, bit for bit
        # (whichever path -- narrow, split-k, packed or in place -- the latter takes).
        sdy = (s[:, None] * dy).astype(np.float32)
        dw2, db2 = fm.ops.dense_backward_weight(x, sdy)
        np.testing.assert_array_equal(dw, dw2)
        np.testing.assert_array_equal(db, db2)


@pytest.mark.parametrize("kind", ["ones", "zeros", "tiny", "mixed"])
@pytest.mark.parametrize("shape", [(0, 3, 10), (1, 1, 1), (33, 10, 300), (257, 784, 128),
                                   (1024, 128, 10), (3000, 3, 128)], ids=lambda s: str(s))
def test_scale_kinds(backend, rng, shape, kind):
    n, fin, fout = shape
    x, dy = normal(rng, (n, fin)), normal(rng, (n, fout))
    s = scales(rng, n, kind)
    dw, db = _check_dw(backend, x, dy, s)
    if kind == "zeros":  # every product is +-0: the sums are exactly 0
        assert not np.any(dw) and not np.any(db)
    if kind == "ones":
        udw, udb = fm.ops.dense_backward_weight(backend.to(x), backend.to(dy))
        udw, udb = backend.host(udw), backend.host(udb)
        if backend.is_gpu:  # the unscaled call may run a tuned kernel (module docstring)
            tol = gemm_tol(x, dy, None, trans_a=True, trans_b=False, alpha=1.0, beta=0.0)
            assert_close(dw, f64(udw), 2 * tol, "ones vs unscaled dw")
            assert_close(db, f64(udb), 2 * sum_tol(n, np.abs(f64(dy)).sum(axis=0)),
                         "ones vs unscaled db")
        else:  # s * 1 == s exactly and the sums run in the same order: the same bits
            np.testing.assert_array_equal(dw, udw)
            np.testing.assert_array_equal(db, udb)


@pytest.mark.parametrize("shape", [(7, 10, 10), (257, 128, 300)], ids=str)
def test_without_bias(backend, rng, shape):
    n, fin, fout = shape
    x, dy = normal(rng, (n, fin)), normal(rng, (n, fout))
    dw, db = _check_dw(backend, x, dy, scales(rng, n, "mixed"), with_bias=False)
    assert db is None


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
def test_every_cpu_driver_and_thread_count(rng, isa, threads):
    """Each instruction set's driver and both the serial and the parallel paths (split-k
    over few rows of dW, the narrow tile, row/column bands) scale like packing s * dy."""
    old_isa = _C.cpu.set_gemm_isa(isa)
    old_threads = fm.get_num_threads()
    fm.set_num_threads(threads)
    try:
        for n, fin, fout in [(1, 1, 1), (5, 3, 17), (800, 3, 300), (1500, 10, 128),
                             (2, 784, 10), (1024, 784, 128), (257, 128, 16), (3000, 31, 33)]:
            x, dy = normal(rng, (n, fin)), normal(rng, (n, fout))
            s = scales(rng, n, "mixed")
            dw, db = _check_dw(fm_cpu(), x, dy, s)
            dw2, db2 = fm.ops.dense_backward_weight(x, (s[:, None] * dy).astype(np.float32))
            np.testing.assert_array_equal(dw, dw2, err_msg=f"{isa} n={n} in={fin} out={fout}")
            np.testing.assert_array_equal(db, db2, err_msg=f"{isa} n={n} in={fin} out={fout}")
    finally:
        fm.set_num_threads(old_threads)
        _C.cpu.set_gemm_isa(old_isa)


def fm_cpu():
    from conftest import Backend
    return Backend("cpu", np)


@pytest.mark.parametrize("trans", list(itertools.product([False, True], repeat=2)),
                         ids=["NN", "NT", "TN", "TT"])
@pytest.mark.parametrize("mnk", [(1, 1, 1), (9, 33, 7), (40, 70, 300), (130, 20, 1031)], ids=str)
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (-0.5, 2.0)])
def test_gemm_row_scale_k(backend, rng, trans, mnk, alpha, beta):
    """ops.gemm(row_scale_k=s): alpha * op(a) diag(s) op(b) + beta * c, all transposes."""
    ta, tb = trans
    m, n, k = mnk
    a = normal(rng, (k, m) if ta else (m, k))
    b = normal(rng, (n, k) if tb else (k, n))
    c0 = normal(rng, (m, n))
    s = scales(rng, k, "mixed")
    out = backend.to(c0)
    res = fm.ops.gemm(backend.to(a), backend.to(b), trans_a=ta, trans_b=tb, alpha=alpha,
                      beta=beta, out=out, row_scale_k=backend.to(s))
    assert res is out
    want = ref.gemm(*f64(a, b), trans_a=ta, trans_b=tb, alpha=alpha, beta=beta,
                    out=f64(c0).copy(), row_scale_k=f64(s))
    sb = f64(b) * (f64(s)[None, :] if tb else f64(s)[:, None])
    tol = gemm_tol(a, sb, c0, trans_a=ta, trans_b=tb, alpha=alpha, beta=beta)
    assert_close(backend.host(out), want, tol, f"gemm row_scale_k ta={ta} tb={tb}")
    if not backend.is_gpu:
        sb32 = (b * (s[None, :] if tb else s[:, None])).astype(np.float32)
        plain = fm.ops.gemm(a, sb32, trans_a=ta, trans_b=tb, alpha=alpha, beta=beta,
                            out=c0.copy())
        np.testing.assert_array_equal(backend.host(out), plain)


def test_gemm_row_scale_k_new_output(backend, rng):
    a, b = normal(rng, (5, 4)), normal(rng, (4, 6))
    s = scales(rng, 4, "mixed")
    got = backend.host(fm.ops.gemm(backend.to(a), backend.to(b), row_scale_k=backend.to(s)))
    want = f64(a) @ (f64(s)[:, None] * f64(b))
    assert_close(got, want, gemm_tol(a, f64(s)[:, None] * f64(b), None, trans_a=False,
                                     trans_b=False, alpha=1.0, beta=0.0), "gemm new out")


def test_row_scale_errors(backend, rng):
    x, dy = backend.to(normal(rng, (6, 4))), backend.to(normal(rng, (6, 3)))
    dwb = fm.ops.dense_backward_weight
    with pytest.raises(ValueError, match=r"'row_scale' must have shape \(6,\)"):
        dwb(x, dy, row_scale=backend.to(np.ones(5, np.float32)))
    with pytest.raises(ValueError, match=r"'row_scale' must .*1-D|'row_scale' must have shape"):
        dwb(x, dy, row_scale=backend.to(np.ones((6, 1), np.float32)))
    with pytest.raises(TypeError, match="'row_scale' must be"):
        dwb(x, dy, row_scale=backend.to(np.ones(6, np.float64)))
    with pytest.raises(TypeError, match="'row_scale_k' must be"):
        fm.ops.gemm(x, dy, trans_a=True, row_scale_k=backend.to(np.ones(6, np.int32)))
    with pytest.raises(ValueError, match=r"'row_scale_k' must have shape \(6,\)"):
        fm.ops.gemm(x, dy, trans_a=True, row_scale_k=backend.to(np.ones(4, np.float32)))
    if backend.is_gpu:  # a host array with device data
        with pytest.raises(ValueError, match="'row_scale' is on"):
            dwb(x, dy, row_scale=np.ones(6, np.float32))
    else:
        with pytest.raises(ValueError, match=r"'row_scale' must have shape \(6,\)"):
            dwb(x, dy, row_scale=np.ones(7, np.float32)[:6:1].reshape(2, 3))
    with pytest.raises(ValueError, match=r"'row_scale' must have shape \(6,\)"):
        ref.dense_backward_weight(f64(backend.host(x)), f64(backend.host(dy)),
                                  row_scale=np.ones(5))


def test_row_scale_overlapping_output_refused(rng):
    """The scale is read while dW / db are written: an overlap is refused, in Python and
    by the shared C++ check (gemm_epilogue.h) that both backends run."""
    x, dy = normal(rng, (6, 4)), normal(rng, (6, 3))
    dw = np.empty((4, 3), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        fm.ops.dense_backward_weight(x, dy, row_scale=dw.reshape(-1)[:6], out=dw)
    db = np.empty(6, np.float32)
    with pytest.raises(ValueError, match="overlap"):
        fm.ops.dense_backward_weight(x, dy, row_scale=db, bias_out=db[:3])
    addr = lambda a: a.__array_interface__["data"][0]  # noqa: E731
    with pytest.raises(ValueError, match="row_scale_k overlaps C"):
        _C.cpu.gemm_ex_row_scaled(True, False, 4, 3, 6, 1.0, addr(x), 4, addr(dy), 3, 0.0,
                                  addr(dw), 3, 0, addr(dw), 0)
    with pytest.raises(ValueError, match="row_scale_k overlaps colsum_b"):
        _C.cpu.gemm_ex_row_scaled(True, False, 4, 3, 6, 1.0, addr(x), 4, addr(dy), 3, 0.0,
                                  addr(dw), 3, addr(db), addr(db) + 8, 0)


def test_checked_path_matches_fast_path(rng):
    """NumPy arrays take the C++ fast path (bindings.cpp gemm_fast); other arrays (here
    torch tensors, shared zero-copy) take ops.py's checked path: the same kernel call,
    so the same bits."""
    torch = pytest.importorskip("torch")
    for n, fin, fout in [(33, 10, 300), (128, 784, 128), (1024, 128, 10)]:
        x, dy = normal(rng, (n, fin)), normal(rng, (n, fout))
        s = scales(rng, n, "mixed")
        dw, db = fm.ops.dense_backward_weight(x, dy, row_scale=s)
        tdw, tdb = fm.ops.dense_backward_weight(torch.from_numpy(x), torch.from_numpy(dy),
                                                row_scale=torch.from_numpy(s))
        np.testing.assert_array_equal(np.asarray(tdw), dw)
        np.testing.assert_array_equal(np.asarray(tdb), db)
        _check_dw(fm_cpu(), x, dy, s)
