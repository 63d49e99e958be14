"""The fused Dense ops (GEMM + epilogue in one kernel) and the matmul precision switch.

dense_forward = relu(x @ w + b), dense_backward_input = (dy @ w.T) * (y_prev > 0),
dense_backward_weight = (x.T @ dy, dy.sum(0)); each is held to the float64 reference
with the GEMM's bound (helpers.gemm_tol) plus one rounding of the bias add. ReLU is
1-Lipschitz, so the bound on the pre-activation also bounds the activation.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastmlp as fm
from fastmlp import reference as ref
from helpers import (F32_EPS, assert_close, assert_meaningful, away_from_zero, f64, gemm_tol,
                     normal, shape_id, sum_tol)

# (batch, in, out): the MLP layers, sizes around the CPU micro-kernel's tiles, 1 and 0.
SHAPES = [(1, 1, 1), (32, 784, 128), (32, 128, 10), (7, 13, 31), (65, 63, 129), (17, 300, 49),
          (0, 5, 3), (4, 0, 3)]
IDS = [shape_id(*s) for s in SHAPES]


@pytest.fixture(autouse=True)
def _fp32():
    """Every test starts from (and leaves) the default precision."""
    fm.ops.set_matmul_precision("fp32")
    yield
    fm.ops.set_matmul_precision("fp32")


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_dense_forward(backend, rng, shape, activation, with_bias):
    n, fin, fout = shape
    x, w = normal(rng, (n, fin)), normal(rng, (fin, fout))
    b = normal(rng, (fout,)) if with_bias else None
    out = backend.nan((n, fout))
    res = fm.ops.dense_forward(backend.to(x), backend.to(w), None if b is None else backend.to(b),
                               activation=activation, out=out)
    assert res is out
    z = f64(x) @ f64(w) + (0.0 if b is None else f64(b))
    want = np.maximum(z, 0.0) if activation == "relu" else z
    if n * fout and fin:
        assert_meaningful(z)
        if activation == "relu" and n * fout >= 8:  # both signs: the ReLU did something
            assert (z < 0).any() and (z > 0).any()
    tol = gemm_tol(x, w, None, trans_a=False, trans_b=False, alpha=1.0, beta=0.0)
    tol = tol + (0.0 if b is None else F32_EPS * (np.abs(z) + np.abs(f64(b))))
    assert_close(backend.host(out), want, tol, f"dense_forward {activation}")
    again = fm.ops.dense_forward(backend.to(x), backend.to(w), None if b is None else backend.to(b),
                                 activation=activation)
    assert np.array_equal(backend.host(again), backend.host(out))  # deterministic


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
def test_dense_backward_input(backend, rng, shape, masked):
    n, fin, fout = shape
    dy, w = normal(rng, (n, fout)), normal(rng, (fin, fout))
    y_prev = np.maximum(away_from_zero(rng, (n, fin)), 0.0) if masked else None
    out = backend.nan((n, fin))
    res = fm.ops.dense_backward_input(backend.to(dy), backend.to(w),
                                      relu_output=None if y_prev is None else backend.to(y_prev),
                                      out=out)
    assert res is out
    want = f64(dy) @ f64(w).T
    if n * fin and fout:
        assert_meaningful(want)
    if masked:
        want = np.where(y_prev > 0, want, 0.0)
    tol = gemm_tol(dy, w, None, trans_a=False, trans_b=True, alpha=1.0, beta=0.0)
    assert_close(backend.host(out), want, tol, "dense_backward_input")
    if masked:  # masked elements are exactly 0, not merely small
        assert (backend.host(out)[y_prev <= 0] == 0).all()


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_dense_backward_weight(backend, rng, shape, with_bias):
    n, fin, fout = shape
    x, dy = normal(rng, (n, fin)), normal(rng, (n, fout))
    dw_out = backend.nan((fin, fout))
    db_out = backend.nan((fout,)) if with_bias else None
    dw, db = fm.ops.dense_backward_weight(backend.to(x), backend.to(dy), out=dw_out,
                                          bias_out=db_out, bias=with_bias)
    assert dw is dw_out and db is db_out
    want = f64(x).T @ f64(dy)
    if n and fin * fout:
        assert_meaningful(want)
    tol = gemm_tol(x, dy, None, trans_a=True, trans_b=False, alpha=1.0, beta=0.0)
    assert_close(backend.host(dw), want, tol, "dense_backward_weight dw")
    if with_bias:
        want_db = f64(dy).sum(axis=0)
        if n and fout:
            assert_meaningful(want_db)
        assert_close(backend.host(db), want_db, sum_tol(n, np.abs(f64(dy)).sum(axis=0)),
                     "dense_backward_weight db")


def test_fused_ops_match_reference_signatures(backend, rng):
    """fm.reference has the same fused ops with the same keywords."""
    x, w, b = normal(rng, (5, 4)), normal(rng, (4, 3)), normal(rng, (3,))
    got = backend.host(fm.ops.dense_forward(backend.to(x), backend.to(w), backend.to(b),
                                            activation="relu", precision="fp32"))
    want = ref.dense_forward(x, w, b, activation="relu", precision="fp32")
    assert_close(got, want, 1e-5, "dense_forward vs reference")
    dy = normal(rng, (5, 3))
    dw, db = ref.dense_backward_weight(x, dy)
    assert dw.shape == (4, 3) and db.shape == (3,)
    assert ref.dense_backward_weight(x, dy, bias=False)[1] is None


def test_matmul_precision_switch():
    assert fm.ops.get_matmul_precision() == "fp32"
    fm.ops.set_matmul_precision("tf32")
    assert fm.ops.get_matmul_precision() == "tf32"
    fm.set_matmul_precision("highest")  # torch's name for fp32
    assert fm.get_matmul_precision() == "fp32"
    fm.set_matmul_precision("high")
    assert fm.get_matmul_precision() == "tf32"
    with pytest.raises(ValueError, match="precision must be one of"):
        fm.set_matmul_precision("bf16")
    one = np.ones((2, 2), np.float32)
    for call in (lambda p: fm.ops.gemm(one, one, precision=p),
                 lambda p: fm.ops.dense_forward(one, one, precision=p),
                 lambda p: fm.ops.dense_backward_input(one, one, precision=p),
                 lambda p: fm.ops.dense_backward_weight(one, one, precision=p)):
        with pytest.raises(ValueError, match="precision must be one of"):
            call("fp16")
        with pytest.raises(ValueError, match="precision must be one of"):
            call(32)
        with pytest.raises(ValueError, match="precision must be one of"):
            call(["tf32"])


def test_cpu_ignores_tf32(rng):
    """The CPU always computes in fp32: tf32 gives bit-identical results there."""
    a, b = normal(rng, (33, 70)), normal(rng, (70, 19))
    exact = fm.ops.gemm(a, b)
    fm.set_matmul_precision("tf32")
    assert np.array_equal(fm.ops.gemm(a, b), exact)
    assert np.array_equal(fm.ops.gemm(a, b, precision="tf32"), exact)


@pytest.mark.parametrize("call, exc, words", [
    (lambda z: fm.ops.dense_forward(z(3, 4), z(5, 2)), ValueError, ["'w'", "4 rows"]),
    (lambda z: fm.ops.dense_forward(z(3, 4), z(4, 2), z(3)), ValueError, ["'b'", r"\(2,\)"]),
    # (tanh & co. are valid since issue 15; an unknown name is still refused)
    (lambda z: fm.ops.dense_forward(z(3, 4), z(4, 2), activation="mish"), ValueError,
     ["activation", "mish"]),
    (lambda z: fm.ops.dense_backward_input(z(3, 2), z(4, 5)), ValueError, ["'w'", "2 columns"]),
    (lambda z: fm.ops.dense_backward_input(z(3, 2), z(4, 2), relu_output=z(3, 5)), ValueError,
     ["'relu_output'", r"\(3, 4\)"]),
    (lambda z: fm.ops.dense_backward_weight(z(3, 4), z(5, 2)), ValueError, ["'dy'", "3 rows"]),
    (lambda z: fm.ops.dense_backward_weight(z(3, 4), z(3, 2), bias=False, bias_out=z(2)),
     ValueError, ["bias_out", "bias=False"]),
    (lambda z: fm.ops.dense_forward(z(3, 4), z(4, 2).astype(np.float64)), TypeError,
     ["'w'", "float64"]),
], ids=["fwd-w-rows", "fwd-b-shape", "fwd-activation", "bwdx-w-cols", "bwdx-mask-shape",
        "bwdw-rows", "bwdw-bias-out", "fwd-dtype"])
def test_fused_errors(call, exc, words):
    def z(*shape):
        return np.zeros(shape, np.float32)
    with pytest.raises(exc) as info:
        call(z)
    for word in words:
        assert __import__("re").search(word, str(info.value)), (word, str(info.value))


def test_fused_outputs_must_not_overlap_inputs(rng):
    x = normal(rng, (4, 4))
    with pytest.raises(ValueError, match="overlaps"):
        fm.ops.dense_forward(x, normal(rng, (4, 4)), out=x)
    dy = normal(rng, (4, 4))
    with pytest.raises(ValueError, match="overlaps"):
        fm.ops.dense_backward_weight(x, dy, out=dy)
