"""The tuned CUDA GEMM kernel family (csrc/cuda/gemm_family*): every configuration
run explicitly through _C.cuda.gemm_config, and the table dispatch of gemm_ex.

All GPU tests are marked `gpu` (they skip without a usable GPU). They check,
against a float64 reference on outputs poisoned with NaN:
- every configuration x all four transposes x edge shapes around its tile
  sizes (1, primes, tile +- 1, 2*tile + 1) x aligned / misaligned leading
  dimensions and base pointers (the 16-byte and 4-byte copy paths), with
  alpha, beta != 0 and the fused epilogue (bias, ReLU, ReLU mask, colsum);
- split-K: correct, and bit-identical on repeats (fixed-order reduction);
- the TF32 configurations' error (near 3e-4, and clearly not FP32-exact);
- gemm_ex's table dispatch (fm.ops.* run the table's kernel; tf32 only on opt-in).
The sanitizer subset of benchmarks/gpu_check.sh selects `-k sanitize`.
The table plumbing that needs no GPU is tested in test_gemm_cuda_tuning.py.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastmlp as fm
from fastmlp import _C
from helpers import F32_EPS, gemm_tol

pytestmark = pytest.mark.gpu

if not getattr(_C, "cuda_built", False):
    pytest.skip("fastmlp was built without its CUDA part", allow_module_level=True)

CONFIGS = _C.cuda.gemm_configs()
NAMES = [c["name"] for c in CONFIGS]
BY_NAME = {c["name"]: c for c in CONFIGS}
TRANS = [(False, False), (False, True), (True, False), (True, True)]
TRANS_IDS = ["nn", "nt", "tn", "tt"]


def edge_shapes(cfg):
    """(m, n, k) around the configuration's tiles: 1, primes, tile +- 1, 2*tile + 1."""
    bm, bn, bk = cfg["bm"], cfg["bn"], cfg["bk"]
    return [(1, 1, 1), (bm - 1, bn + 1, bk - 1), (bm + 1, bn - 1, 2 * bk + 1),
            (2 * bm + 1, 2 * bn + 1, 3 * bk + 3), (37, 53, 97), (1, 2 * bn + 1, 2), (2 * bm + 1, 1, 5)]


class Operand:
    """A matrix of `rows` x `cols` stored with leading dimension ld (>= cols) at a
    float offset from a 256-byte aligned allocation: misaligned ld / base pointers
    exercise the 4-byte copy path of an operand that could use 16-byte copies."""

    def __init__(self, gpu, rng, rows, cols, pad=0, offset=0, fill=None):
        self.rows, self.cols, self.ld = rows, cols, max(cols + pad, 1)
        store = rng.standard_normal(rows * self.ld + offset + 1).astype(np.float32)
        if fill is not None:
            store[:] = fill
        self.host_store = store
        self.dev_store = gpu.to(store)
        self.offset = offset

    @property
    def ptr(self):
        return int(self.dev_store.data.ptr) + 4 * self.offset

    def host(self):
        """The matrix (rows x cols) as stored on the device now."""
        flat = fm._interop.cupy_module().asnumpy(self.dev_store)[self.offset:]
        return flat[:self.rows * self.ld].reshape(self.rows, self.ld)[:, :self.cols] \
            if self.rows * self.cols else np.zeros((self.rows, self.cols), np.float32)


def run_config(gpu, name, splits, ta, tb, m, n, k, A, B, Cm, *, alpha=1.0, beta=0.0, bias=None,
               relu=False, mask=None, colsum=None, workspace=True):
    need = _C.cuda.gemm_config_workspace_floats(m, n, splits)
    ws = gpu.xp.empty((max(need, 1),), gpu.xp.float32) if workspace else None
    stream = gpu.xp.cuda.get_current_stream().ptr
    _C.cuda.gemm_config(name, splits, ta, tb, m, n, k, alpha, A.ptr, A.ld, B.ptr, B.ld, beta,
                        Cm.ptr, Cm.ld, 0 if bias is None else int(bias.data.ptr), relu,
                        0 if mask is None else mask.ptr, 0 if mask is None else mask.ld,
                        0 if colsum is None else int(colsum.data.ptr),
                        0 if ws is None else int(ws.data.ptr), need if ws is not None else 0,
                        stream)
    gpu.sync()


def check_case(gpu, rng, name, ta, tb, m, n, k, *, pad=0, offset=0, splits=1, epilogue=True):
    """Run one configuration on one case and compare everything with float64."""
    A = Operand(gpu, rng, k if ta else m, m if ta else k, pad, offset)
    B = Operand(gpu, rng, n if tb else k, k if tb else n, pad, offset)
    c0 = rng.standard_normal((m, n)).astype(np.float32)
    Cm = Operand(gpu, rng, m, n, pad, offset)
    # beta != 0 on half the shapes; with beta == 0, C starts as NaN (write-only).
    alpha, beta = (1.5, -0.75 if (m + n) % 2 else 0.0) if epilogue else (1.0, 0.0)
    if beta == 0.0:
        Cm.dev_store.fill(np.nan)  # write-only: NaN must not propagate, every element written
    else:
        st = Cm.host_store.copy()
        st[offset:offset + m * Cm.ld].reshape(m, Cm.ld)[:, :n] = c0
        Cm.dev_store[...] = gpu.xp.asarray(st)
    bias = gpu.to(rng.standard_normal(n).astype(np.float32)) if epilogue else None
    mask = Operand(gpu, rng, m, n, pad, offset) if epilogue and k % 2 else None
    relu = epilogue and not k % 2
    colsum = gpu.nan((n,)) if not tb else None
    run_config(gpu, name, splits, ta, tb, m, n, k, A, B, Cm, alpha=alpha, beta=beta, bias=bias,
               relu=relu, mask=mask, colsum=colsum)

    a64 = A.host().astype(np.float64)
    b64 = B.host().astype(np.float64)
    oa, ob = (a64.T if ta else a64), (b64.T if tb else b64)
    z = alpha * (oa @ ob) + (beta * c0.astype(np.float64) if beta else 0.0)
    tol = gemm_tol(A.host(), B.host(), c0 if beta else None, trans_a=ta, trans_b=tb,
                   alpha=alpha, beta=beta)
    if bias is not None:
        b_h = gpu.host(bias).astype(np.float64)
        z = z + b_h
        tol = tol + F32_EPS * (np.abs(z) + np.abs(b_h))
    if BY_NAME[name]["tf32"]:
        # TF32 inputs carry ~2^-11 relative rounding each: bound by the absolute products.
        tol = tol + 2.0 ** -10 * alpha * (np.abs(oa) @ np.abs(ob))
    want = z
    if relu:
        want = np.maximum(want, 0.0)
    if mask is not None:
        want = np.where(mask.host() > 0, want, 0.0)
    got = Cm.host()
    assert np.isfinite(got).all(), f"{name}: unwritten or NaN elements in C"
    bad = np.abs(got - want) > tol
    assert not bad.any(), (f"{name} ta={ta} tb={tb} {m}x{n}x{k} pad={pad} off={offset} "
                           f"splits={splits}: {bad.sum()} elements off, first at "
                           f"{np.argwhere(bad)[0]}: got {got[bad][0]} want {want[bad][0]}")
    if mask is not None:
        assert (got[mask.host() <= 0] == 0).all()
    if colsum is not None:
        want_cs = ob.sum(axis=0)
        cs_tol = 2 * k * F32_EPS * np.abs(ob).sum(axis=0) + 1e-30
        got_cs = gpu.host(colsum)
        assert np.isfinite(got_cs).all() and (np.abs(got_cs - want_cs) <= cs_tol).all(), \
            f"{name}: colsum off"
    # The stored matrix outside the m x n window (padding) is untouched.
    if pad and m and n:
        full = fm._interop.cupy_module().asnumpy(Cm.dev_store)[offset:offset + m * Cm.ld]
        tail = full.reshape(m, Cm.ld)[:, n:]
        orig = Cm.host_store[offset:offset + m * Cm.ld].reshape(m, Cm.ld)[:, n:]
        if beta == 0.0:
            assert np.isnan(tail).all()
        else:
            assert np.array_equal(tail, orig)


def test_gemm_configs_listed():
    assert len(NAMES) == len(set(NAMES)) >= 6
    assert any(c["tf32"] for c in CONFIGS) and any(not c["tf32"] for c in CONFIGS)


@pytest.mark.parametrize("trans", TRANS, ids=TRANS_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_config_edge_shapes(gpu, rng, name, trans):
    """Every shape around the tiles, 16-byte aligned (pad chosen so ld % 4 == 0 where it can be)."""
    ta, tb = trans
    for m, n, k in edge_shapes(BY_NAME[name]):
        check_case(gpu, rng, name, ta, tb, m, n, k)


@pytest.mark.parametrize("trans", TRANS, ids=TRANS_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_config_misaligned_ld_and_pointer(gpu, rng, name, trans):
    """ld not a multiple of 4 floats / base pointer off by 1 float: the 4-byte copy path."""
    ta, tb = trans
    cfg = BY_NAME[name]
    for pad, offset in ((1, 0), (0, 1), (3, 2)):
        check_case(gpu, rng, name, ta, tb, cfg["bm"] + 3, cfg["bn"] + 5, 2 * cfg["bk"] + 4,
                   pad=pad, offset=offset)
    check_case(gpu, rng, name, ta, tb, 64, 64, 64, pad=4)   # ld % 4 == 0 with padding: 16-byte path


@pytest.mark.parametrize("name", NAMES)
def test_config_split_k_deterministic(gpu, rng, name):
    """The dW shape class (trans_a, k = batch): split-K is right and repeats bit for bit."""
    for splits in (2, 3, 7):
        check_case(gpu, rng, name, True, False, 67, 33, 1000, splits=splits)
    m, n, k = 131, 40, 777
    A = Operand(gpu, rng, k, m)
    B = Operand(gpu, rng, k, n)
    outs = []
    for _ in range(3):
        Cm = Operand(gpu, rng, m, n, fill=np.nan)
        cs = gpu.nan((n,))
        run_config(gpu, name, 5, True, False, m, n, k, A, B, Cm, colsum=cs)
        outs.append((Cm.host().copy(), gpu.host(cs)))
    for got, cs in outs[1:]:
        assert np.array_equal(got, outs[0][0]) and np.array_equal(cs, outs[0][1])


@pytest.mark.parametrize("name", [n for n in NAMES if BY_NAME[n]["tf32"]])
def test_tf32_error_bound(gpu, rng, name):
    """TF32 lands near 3e-4 relative (Frobenius), and is clearly not exact FP32."""
    m = n = k = 512
    A = Operand(gpu, rng, m, k)
    B = Operand(gpu, rng, k, n)
    Cm = Operand(gpu, rng, m, n, fill=np.nan)
    run_config(gpu, name, 1, False, False, m, n, k, A, B, Cm)
    want = A.host().astype(np.float64) @ B.host().astype(np.float64)
    err = np.linalg.norm(Cm.host() - want) / np.linalg.norm(want)
    assert 1e-5 < err < 1e-3, err


def test_zero_sizes(gpu, rng):
    """k == 0: C = beta * C and colsum = 0; m == 0 or n == 0: nothing written."""
    name = NAMES[0]
    A = Operand(gpu, rng, 5, 1)
    B = Operand(gpu, rng, 1, 7)
    Cm = Operand(gpu, rng, 5, 7)
    before = Cm.host().copy()
    cs = gpu.nan((7,))
    run_config(gpu, name, 1, False, False, 5, 7, 0, A, B, Cm, beta=2.0, colsum=cs)
    assert np.array_equal(Cm.host(), 2.0 * before) and (gpu.host(cs) == 0).all()
    run_config(gpu, name, 1, False, False, 0, 7, 3, A, B, Cm)
    run_config(gpu, name, 1, False, False, 5, 0, 3, A, B, Cm)
    assert np.array_equal(Cm.host(), 2.0 * before)


def test_errors_named(gpu, rng):
    A = Operand(gpu, rng, 64, 64)
    with pytest.raises(ValueError, match="unknown configuration"):
        run_config(gpu, "no_such_kernel", 1, False, False, 64, 64, 64, A, A, Operand(gpu, rng, 64, 64))
    with pytest.raises(ValueError, match="workspace"):
        run_config(gpu, NAMES[0], 4, False, False, 64, 64, 64, A, A, Operand(gpu, rng, 64, 64),
                   workspace=False)


@pytest.mark.parametrize("name", NAMES)
def test_sanitize_family_small(gpu, rng, name):
    """The compute-sanitizer subset: every kernel, all transposes, both copy paths, split-K."""
    for ta, tb in TRANS:
        check_case(gpu, rng, name, ta, tb, 33, 45, 29)
        check_case(gpu, rng, name, ta, tb, 33, 45, 29, pad=1, offset=1)
    check_case(gpu, rng, name, True, False, 40, 36, 300, splits=3)


# ---- the table dispatch of gemm_ex (fm.ops) -----------------------------------------------------
@pytest.fixture
def table(gpu):
    """Set this device's table inside a test; the packaged table is restored after."""
    from fastmlp import _gemm_tuning as T
    dev = gpu.xp.cuda.Device().id
    T.ensure_loaded(dev)
    saved = list(T._loaded.get(dev, []))
    yield lambda entries: T.set_table(dev, entries)
    T.set_table(dev, saved)


def _entry(prec, ta, tb, m, n, k, name, splits=1):
    b = _C.cuda.gemm_size_bucket
    return (prec, ta, tb, b(m), b(n), b(k), name, splits)


def test_sanitize_dispatch_runs_table_kernel(gpu, rng, table):
    """dense_forward / dense_backward_weight run the table's kernel (bit-identical to it)."""
    simt = next(n for n in NAMES if not BY_NAME[n]["tf32"] and BY_NAME[n]["bm"] == 64)
    m, n, k = 96, 40, 70
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (k, n), (n,)))
    table([])
    plain = gpu.host(fm.ops.dense_forward(gpu.to(x), gpu.to(w), gpu.to(b), activation="relu"))
    table([_entry(0, False, False, m, n, k, simt)])
    assert _C.cuda.gemm_dispatch(gpu.xp.cuda.Device().id, 0, False, False, m, n, k) == (simt, 1)
    got = gpu.host(fm.ops.dense_forward(gpu.to(x), gpu.to(w), gpu.to(b), activation="relu"))
    X, W = Operand(gpu, rng, m, k), Operand(gpu, rng, k, n)
    X.dev_store[:m * k] = gpu.to(x.ravel())
    W.dev_store[:k * n] = gpu.to(w.ravel())
    Cm = Operand(gpu, rng, m, n, fill=np.nan)
    run_config(gpu, simt, 1, False, False, m, n, k, X, W, Cm, bias=gpu.to(b), relu=True)
    assert np.array_equal(got, Cm.host())
    np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-4)

    # dW with a split-K entry: the Python layer passes the workspace.
    dy = rng.standard_normal((m, n)).astype(np.float32)
    table([_entry(0, True, False, k, n, m, simt, 4)])
    dw, db = fm.ops.dense_backward_weight(gpu.to(x), gpu.to(dy))
    want = x.astype(np.float64).T @ dy.astype(np.float64)
    np.testing.assert_allclose(gpu.host(dw), want, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(gpu.host(db), dy.astype(np.float64).sum(0), rtol=1e-4, atol=1e-4)
    dw2, db2 = fm.ops.dense_backward_weight(gpu.to(x), gpu.to(dy))
    assert np.array_equal(gpu.host(dw), gpu.host(dw2)) and np.array_equal(gpu.host(db), gpu.host(db2))


def test_dispatch_tf32_only_on_opt_in(gpu, rng, table):
    """A tf32 entry is used only for precision="tf32"; fp32 calls never touch it."""
    tf = next(n for n in NAMES if BY_NAME[n]["tf32"])
    m = n = k = 256
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    want = a.astype(np.float64) @ b.astype(np.float64)
    table([_entry(1, False, False, m, n, k, tf)])
    exact = gpu.host(fm.ops.gemm(gpu.to(a), gpu.to(b)))
    assert np.linalg.norm(exact - want) / np.linalg.norm(want) < 1e-5
    fast = gpu.host(fm.ops.gemm(gpu.to(a), gpu.to(b), precision="tf32"))
    err = np.linalg.norm(fast - want) / np.linalg.norm(want)
    assert 1e-5 < err < 1e-3
    table([])
    assert np.array_equal(gpu.host(fm.ops.gemm(gpu.to(a), gpu.to(b), precision="tf32")), exact)
