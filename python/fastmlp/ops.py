"""Functional ops on the hand-written kernels.

float32, C-contiguous arrays. NumPy arrays run the C++ CPU kernels; CuPy
arrays run the CUDA kernels on CuPy's current stream; any DLPack or
``__cuda_array_interface__`` array (PyTorch, JAX) is shared zero-copy and runs
on the device it lives on. Results are NumPy / CuPy arrays; ``out=`` (any of
those array kinds) is written in place and returned.

The same ops, written once against the array module, are in
:mod:`fastmlp.reference`; the tests hold these to that.
"""
from __future__ import annotations

import numpy as np

from . import _nvtx
from ._interop import Checker, address

__all__ = [
    "gemm", "bias_add", "bias_grad", "relu", "relu_backward",
    "softmax_cross_entropy", "softmax_cross_entropy_backward", "sgd_step", "adam_step",
]

_LABEL_INT32, _LABEL_INT64, _LABEL_ONEHOT = 0, 1, 2


def gemm(a, b, *, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, out=None):
    """``out = alpha * op(a) @ op(b) + beta * out``; op(x) is x or x.T.

    With ``out=None`` a new array is returned (beta must then be 0). With
    ``beta == 0`` the old contents of ``out`` are never read (BLAS rule).
    """
    ck = Checker("gemm")
    a = ck.f32(a, "a", ndim=2)
    b = ck.f32(b, "b", ndim=2)
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    kb, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if kb != k:
        raise ValueError(f"gemm: 'b' must have {k} rows in op(b) to match op(a) of shape "
                         f"({m}, {k}), got op(b) of shape ({kb}, {n}) "
                         f"(trans_a={trans_a}, trans_b={trans_b})")
    if out is None and beta != 0.0:
        raise ValueError("gemm: beta != 0 accumulates into 'out'; pass out=")
    c = ck.out(out, "out", (m, n), like=a)
    ck.no_overlap(c, "out", (a, "a"), (b, "b"))
    mod, extra, ctx = ck.backend(a)
    with ctx, _nvtx.annotate("gemm"):
        mod.gemm(bool(trans_a), bool(trans_b), m, n, k, float(alpha),
                 address(a), max(a.shape[1], 1), address(b), max(b.shape[1], 1),
                 float(beta), address(c), max(n, 1), *extra)
    return c


def bias_add(x, bias, *, out=None):
    """``x + bias`` for x of shape (n, f) and bias (f,). ``out`` may be ``x``."""
    ck = Checker("bias_add")
    x = ck.f32(x, "x", ndim=2)
    bias = ck.f32(bias, "bias", shape=(x.shape[1],))
    y = ck.out(out, "out", x.shape, like=x)
    ck.no_overlap(y, "out", (x, "x"), allow_same=True)
    ck.no_overlap(y, "out", (bias, "bias"))
    mod, extra, ctx = ck.backend(x)
    with ctx, _nvtx.annotate("bias_add"):
        mod.bias_add(address(x), address(bias), address(y), x.shape[0], x.shape[1], *extra)
    return y


def bias_grad(dy, *, out=None):
    """Column sums of dy (n, f) -> (f,): the bias gradient of a Dense layer."""
    ck = Checker("bias_grad")
    dy = ck.f32(dy, "dy", ndim=2)
    db = ck.out(out, "out", (dy.shape[1],), like=dy)
    ck.no_overlap(db, "out", (dy, "dy"))
    mod, extra, ctx = ck.backend(dy)
    with ctx, _nvtx.annotate("bias_grad"):
        mod.bias_grad(address(dy), address(db), dy.shape[0], dy.shape[1], *extra)
    return db


def relu(x, *, out=None):
    """``max(x, 0)`` (as ``x > 0 ? x : 0``, so relu(NaN) = 0). ``out`` may be ``x``."""
    ck = Checker("relu")
    x = ck.f32(x, "x")
    y = ck.out(out, "out", x.shape, like=x)
    ck.no_overlap(y, "out", (x, "x"), allow_same=True)
    mod, extra, ctx = ck.backend(x)
    with ctx, _nvtx.annotate("relu"):
        mod.relu(address(x), address(y), x.size, *extra)
    return y


def relu_backward(dy, y, *, out=None):
    """``dy * (y > 0)`` where y is relu's output. ``out`` may be ``dy``."""
    ck = Checker("relu_backward")
    dy = ck.f32(dy, "dy")
    y = ck.f32(y, "y", shape=dy.shape)
    dx = ck.out(out, "out", dy.shape, like=dy)
    ck.no_overlap(dx, "out", (dy, "dy"), (y, "y"), allow_same=True)
    mod, extra, ctx = ck.backend(dy)
    with ctx, _nvtx.annotate("relu_backward"):
        mod.relu_backward(address(dy), address(y), address(dx), dy.size, *extra)
    return dx


def _labels(ck, labels, rows, cols):
    """Validated labels and their kind: (rows,) int32/int64, or (rows, cols) float32."""
    lab = ck.array(labels, "labels", dtypes=(np.int32, np.int64, np.float32))
    if lab.dtype == np.float32:
        if lab.shape != (rows, cols):
            raise ValueError(f"{ck.op}: one-hot 'labels' must have shape ({rows}, {cols}) like "
                             f"the logits, got {lab.shape}")
        return lab, _LABEL_ONEHOT
    if lab.shape != (rows,):
        raise ValueError(f"{ck.op}: integer 'labels' must have shape ({rows},), got {lab.shape}")
    return lab, (_LABEL_INT32 if lab.dtype == np.int32 else _LABEL_INT64)


def _raise_bad_label(op, labels, bad_row, classes):
    row = int(bad_row)
    value = int(labels[row])
    raise ValueError(f"{op}: label {value} in row {row} is outside [0, {classes}) "
                     f"(the logits have {classes} classes)")


def softmax_cross_entropy_forward(logits, labels, *, check_labels=True):
    """Like :func:`softmax_cross_entropy`, plus the bad-label flag.

    Returns ``(loss, probs, bad_row)``; ``bad_row`` is a 1-element int64
    array on the logits' device holding the first row with an out-of-range
    label, or -1. With ``check_labels=False`` nothing is read back from the
    GPU (no sync): the caller checks ``bad_row`` later (``fit`` does, once
    per epoch at the latest).
    """
    op = "softmax_cross_entropy"
    ck = Checker(op)
    logits = ck.f32(logits, "logits", ndim=2)
    rows, cols = logits.shape
    lab, kind = _labels(ck, labels, rows, cols)
    if rows > 0 and cols == 0:
        raise ValueError(f"{op}: 'logits' has 0 classes")
    probs = ck.empty((rows, cols), np.float32, like=logits)
    row_loss = ck.empty((rows,), np.float32, like=logits)
    loss = ck.empty((), np.float32, like=logits)
    bad_row = ck.empty((1,), np.int64, like=logits)
    mod, extra, ctx = ck.backend(logits)
    with ctx, _nvtx.annotate("softmax_cross_entropy"):
        mod.softmax_xent_fwd(address(logits), address(lab), kind, address(probs),
                             address(row_loss), address(loss), address(bad_row),
                             rows, cols, *extra)
    if check_labels and int(bad_row[0]) >= 0:
        _raise_bad_label(op, lab, bad_row[0], cols)
    return loss, probs, bad_row


def softmax_cross_entropy(logits, labels):
    """Mean softmax cross-entropy over the rows of ``logits`` (n, classes).

    ``labels``: class indices (n,) int32/int64, or float32 rows (n, classes)
    (one-hot, or any distribution). Returns ``(loss, probs)``: the loss as a
    0-d float32 array on the logits' device, and the softmax probabilities.
    A label outside [0, classes) raises ValueError naming it.
    """
    loss, probs, _ = softmax_cross_entropy_forward(logits, labels)
    return loss, probs


def softmax_cross_entropy_backward(probs, labels, *, out=None, check_labels=True):
    """Gradient of the mean loss w.r.t. the logits: ``(probs - onehot) / n``.

    ``out`` may be ``probs`` (computed in place). With ``check_labels=False`` the
    bad-label flag is not read back (no GPU sync); the caller has checked the
    labels already (``fit`` checks the whole dataset before training).
    """
    op = "softmax_cross_entropy_backward"
    ck = Checker(op)
    probs = ck.f32(probs, "probs", ndim=2)
    rows, cols = probs.shape
    lab, kind = _labels(ck, labels, rows, cols)
    dlogits = ck.out(out, "out", probs.shape, like=probs)
    ck.no_overlap(dlogits, "out", (probs, "probs"), allow_same=True)
    ck.no_overlap(dlogits, "out", (lab, "labels"))
    bad_row = ck.empty((1,), np.int64, like=probs)
    mod, extra, ctx = ck.backend(probs)
    with ctx, _nvtx.annotate("softmax_cross_entropy_backward"):
        mod.softmax_xent_bwd(address(probs), address(lab), kind, address(dlogits),
                             address(bad_row), rows, cols, *extra)
    if check_labels and int(bad_row[0]) >= 0:
        _raise_bad_label(op, lab, bad_row[0], cols)
    return dlogits


def sgd_step(param, grad, buf, *, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
    """One in-place torch.optim.SGD step (dampening 0). Returns ``param``.

    ``buf`` is the momentum buffer (zeros before the first step; may be None
    when ``momentum == 0``).
    """
    ck = Checker("sgd_step")
    param = ck.f32(param, "param", writable=True)
    grad = ck.f32(grad, "grad", shape=param.shape)
    if momentum != 0.0 and buf is None:
        raise ValueError("sgd_step: momentum != 0 needs 'buf' (a zero-initialised array "
                         "shaped like 'param')")
    if nesterov and momentum == 0.0:
        raise ValueError("sgd_step: nesterov=True needs momentum > 0 (as in torch.optim.SGD)")
    if buf is not None:
        buf = ck.f32(buf, "buf", shape=param.shape, writable=True)
    ck.disjoint((param, "param"), (grad, "grad"), (buf, "buf"))
    mod, extra, ctx = ck.backend(param)
    with ctx, _nvtx.annotate("sgd_step"):
        mod.sgd_step(address(param), address(grad), 0 if buf is None else address(buf),
                     param.size, float(lr), float(momentum), bool(nesterov),
                     float(weight_decay), *extra)
    return param


def adam_step(param, grad, m, v, *, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
              weight_decay=0.0, decoupled=False):
    """One in-place Adam (or, with ``decoupled=True``, AdamW) step, as torch.optim.

    ``m`` and ``v`` are the first and second moment buffers (zeros before
    step 1); ``step`` counts from 1. Returns ``param``.
    """
    ck = Checker("adam_step")
    param = ck.f32(param, "param", writable=True)
    grad = ck.f32(grad, "grad", shape=param.shape)
    m = ck.f32(m, "m", shape=param.shape, writable=True)
    v = ck.f32(v, "v", shape=param.shape, writable=True)
    ck.disjoint((param, "param"), (grad, "grad"), (m, "m"), (v, "v"))
    if int(step) != step or step < 1:
        raise ValueError(f"adam_step: 'step' counts from 1, got {step}")
    for name, val in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= val < 1.0:
            raise ValueError(f"adam_step: '{name}' must be in [0, 1), got {val}")
    mod, extra, ctx = ck.backend(param)
    with ctx, _nvtx.annotate("adam_step"):
        mod.adam_step(address(param), address(grad), address(m), address(v), param.size,
                      float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
                      bool(decoupled), int(step), *extra)
    return param
