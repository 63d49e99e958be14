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

import numbers
from typing import Any, NamedTuple

import numpy as np

from . import _C, _act_codes, _gemm_tuning, _nvtx
from ._interop import Checker, address, as_array, cupy_module, device_of, is_cupy

_cpu = _C.cpu

__all__ = [
    "gemm", "dense_forward", "dense_backward_input", "dense_backward_weight",
    "set_matmul_precision", "get_matmul_precision", "bias_add", "bias_grad", "relu", "relu_backward",
    "softmax_cross_entropy", "softmax_cross_entropy_backward", "softmax_cross_entropy_fused",
    "random_permutation", "sgd_step", "adam_step", "rmsprop_step", "grad_clip_scale",
    "first_nonfinite",
    "batch_norm_forward", "batch_norm_backward", "layer_norm_forward", "layer_norm_backward",
    "ACTIVATIONS", "Dropout", "dropout_constants", "activation", "activation_backward",
    "dropout", "dropout_backward",
    "METRIC_FLAGS", "metric_sums", "roc_auc",
    "LOSS_KINDS", "loss_forward_backward",
    "dp_row_sqnorms", "dp_clip_factors",
    "target_seed", "ig_interpolate", "ig_accumulate", "adversarial_init", "adversarial_step",
]

_LABEL_INT32, _LABEL_INT64, _LABEL_ONEHOT = 0, 1, 2

# Matmul precision: "fp32" (exact float32 products, the default, as in PyTorch)
# or "tf32" (TF32 tensor cores on CUDA where a verified kernel exists; the CPU
# always computes in fp32). torch's names are accepted too.
_PRECISIONS = {"fp32": 0, "highest": 0, "tf32": 1, "high": 1}
_precision = "fp32"


def set_matmul_precision(precision: str) -> None:
    """Set the default precision of every GEMM: ``"fp32"`` (default) or ``"tf32"``.

    ``"tf32"`` lets CUDA GEMMs use TF32 tensor cores (inputs rounded to a
    10-bit mantissa, fp32 accumulation: relative error around 1e-3 instead of
    1e-6), like ``torch.backends.cuda.matmul.allow_tf32``. The CPU kernels
    always compute in fp32. torch's names ``"highest"`` (= fp32) and ``"high"``
    (= tf32) are accepted. A ``precision=`` argument of an op overrides this.
    """
    global _precision
    _precision = _canonical_precision(precision, "set_matmul_precision")


def get_matmul_precision() -> str:
    """The default GEMM precision: ``"fp32"`` or ``"tf32"``."""
    return _precision


def _canonical_precision(precision, op: str) -> str:
    if precision is None:
        return _precision
    if not isinstance(precision, str) or precision.lower() not in _PRECISIONS:
        raise ValueError(f"{op}: precision must be one of 'fp32', 'tf32' (or torch's "
                         f"'highest', 'high'), got {precision!r}")
    return "tf32" if _PRECISIONS[precision.lower()] else "fp32"


_F32 = np.dtype(np.float32)
_ndarray = np.ndarray
_gemm_fast = _C.cpu.gemm_fast  # NumPy fast path: True when it ran (see bindings.cpp)


def _plain(precision) -> bool:
    """Whether ``precision`` needs no checking (None or a canonical name)."""
    return precision is None or (type(precision) is str and precision in _PRECISIONS)


def _nd2(*arrays) -> bool:
    """Whether all are 2-D NumPy arrays (so the fast path can size a new output)."""
    return all(type(a) is _ndarray and a.ndim == 2 for a in arrays)


def _gemm_call(ck, op, a, b, c, *, trans_a, trans_b, alpha, beta, bias=None, relu=False,
               mask=None, colsum=None, precision=None, act=0, preact=None, dropout=None,
               grad_act=0, saved=None, saved_is_input=False, grad_dropout=None,
               row_scale=None):
    """Run gemm_ex on validated arrays; C, bias, mask, colsum already checked.

    [issue 15] act / preact / dropout and grad_act / saved / saved_is_input /
    grad_dropout (dropouts as :func:`_dropout_args` tuples) are the activation
    epilogue; without them the call is the plain gemm_ex of before.
    [issue 17] row_scale (k floats, checked) scales op(b)'s rows inside the GEMM
    and colsum (GemmEpilogue::row_scale_k); only with colsum, no other epilogue.
    """
    m, n = c.shape
    k = a.shape[1] if not trans_a else a.shape[0]
    prec = _PRECISIONS[_canonical_precision(precision, op)]
    mod, extra, ctx = ck.backend(a)
    if row_scale is not None:
        assert bias is None and not relu and mask is None and not act and not grad_act \
            and preact is None and dropout is None and grad_dropout is None
        with ctx, _nvtx.annotate(op):
            mod.gemm_ex_row_scaled(bool(trans_a), bool(trans_b), m, n, k, float(alpha),
                                   address(a), max(a.shape[1], 1), address(b),
                                   max(b.shape[1], 1), float(beta), address(c), max(n, 1),
                                   0 if colsum is None else address(colsum),
                                   address(row_scale), prec, *extra)
        return c
    with ctx, _nvtx.annotate(op):
        # [issue 6] CUDA only: the tuned kernel family's split-K scratch (0 floats
        # unless the GPU's tuning table picks a split-K kernel for this shape).
        ws = _gemm_tuning.workspace(ctx, prec, trans_a, trans_b, m, n, k) if extra else None
        args = (bool(trans_a), bool(trans_b), m, n, k, float(alpha),
                address(a), max(a.shape[1], 1), address(b), max(b.shape[1], 1),
                float(beta), address(c), max(n, 1),
                0 if bias is None else address(bias), bool(relu),
                0 if mask is None else address(mask), max(n, 1),
                0 if colsum is None else address(colsum), prec,
                0 if ws is None else address(ws), 0 if ws is None else ws.size)
        if act or grad_act or dropout is not None or grad_dropout is not None \
                or preact is not None:
            args += (int(act), 0 if preact is None else address(preact), max(n, 1),
                     _NO_DROPOUT if dropout is None else dropout,
                     int(grad_act), 0 if saved is None else address(saved), max(n, 1),
                     bool(saved_is_input), _NO_DROPOUT if grad_dropout is None else grad_dropout)
        mod.gemm_ex(*args, *extra)
    return c


def gemm(a, b, *, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, out=None,
         precision=None, row_scale_k=None):
    """``out = alpha * op(a) @ op(b) + beta * out``; op(x) is x or x.T.

    With ``out=None`` a new array is returned (beta must then be 0). With
    ``beta == 0`` the old contents of ``out`` are never read (BLAS rule).
    ``precision`` (``"fp32"`` / ``"tf32"``) overrides :func:`set_matmul_precision`.
    ``row_scale_k`` (k,) float32 [issue 17]: ``alpha * op(a) @ diag(s) @ op(b)``, each
    ``op(b)[p, j] * s[p]`` rounded to float32 first (DP-SGD's clip factors).
    """
    if row_scale_k is None and (out is not None or (beta == 0.0 and _nd2(a, b))):
        c = out if out is not None else np.empty((a.shape[bool(trans_a)],
                                                  b.shape[not trans_b]), _F32)
        if _plain(precision) and \
                _gemm_fast(a, b, c, trans_a, trans_b, alpha, beta, None, False, None, None):
            return c
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
    if row_scale_k is not None:
        row_scale_k = ck.f32(row_scale_k, "row_scale_k", shape=(k,))
        ck.no_overlap(c, "out", (row_scale_k, "row_scale_k"))
    return _gemm_call(ck, "gemm", a, b, c, trans_a=trans_a, trans_b=trans_b, alpha=alpha,
                      beta=beta, precision=precision, row_scale=row_scale_k)


_ACTIVATIONS = (None, "linear", "relu")

# [issue 15] The elementwise activations by name -> kernel code (None means
# "linear"), and the codes whose derivative needs the pre-activation.
ACTIVATIONS = _act_codes.ACTIVATIONS
_NEEDS_INPUT = _act_codes.NEEDS_INPUT
_NO_DROPOUT = (0, 1.0, 0, 0, 0)


class Dropout(NamedTuple):
    """Inverted dropout of one layer: drop with probability ``rate``, scale the rest by
    ``1 / (1 - rate)``. The mask is a pure function of (seed, layer, step, element
    index), the same on the CPU and the GPU, so the backward pass regenerates it.
    ``step`` is a Python int or a 1-element int64 array on the data's device (read by
    the kernel, so a training engine can pass a view of its step counter)."""
    rate: float
    seed: int
    step: Any
    layer: int = 0


def dropout_constants(rate):
    """``(threshold, scale)`` of a dropout rate: element e is dropped when its 32 random
    bits are below ``threshold = min(round(rate * 2**32), 2**32 - 1)``; the kept ones are
    multiplied by ``scale = float32(1 / (1 - rate))`` (rounded once, from double).
    ``rate`` must be a number with 0 <= rate < 1."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        raise ValueError(f"dropout rate must be a number in [0, 1), got {rate!r}")
    r = float(rate)
    if not (0.0 <= r < 1.0):  # also refuses NaN
        raise ValueError(f"dropout rate must be in [0, 1), got {rate!r}")
    return min(round(r * 2.0**32), 2**32 - 1), float(np.float32(1.0 / (1.0 - r)))


def _act_code(op, name):
    if name is None:
        return 0
    code = ACTIVATIONS.get(name) if isinstance(name, str) else None
    if code is None:
        raise ValueError(f"{op}: unknown activation {name!r}; expected None or one of "
                         + ", ".join(repr(k) for k in ACTIVATIONS))
    return code


def _int(op, value, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{op}: {what} must be an integer, got {value!r}")
    return int(value)


def _dropout_args(ck, dropout, like):
    """``(tuple for the kernels, keep-alive)`` of a :class:`Dropout` (or None): the
    tuple is (threshold, scale, key0, key1, address of the int64 step)."""
    op = ck.op
    if dropout is None:
        return None, None
    if not isinstance(dropout, tuple) or len(dropout) not in (3, 4):
        raise ValueError(f"{op}: dropout must be fm.ops.Dropout(rate, seed, step, layer=0), "
                         f"got {dropout!r}")
    d = Dropout(*dropout)
    threshold, scale = dropout_constants(d.rate)
    seed = _int(op, d.seed, "dropout seed") & (2**64 - 1)
    layer = _int(op, d.layer, "dropout layer")
    if layer < 0:
        raise ValueError(f"{op}: dropout layer must be >= 0, got {layer}")
    if isinstance(d.step, numbers.Integral) and not isinstance(d.step, bool):
        step = ck.empty((1,), np.int64, like)
        step[...] = int(d.step)
    else:
        step = ck.array(d.step, "dropout.step", dtypes=(np.int64,), shape=(1,))
    if threshold == 0:
        return None, None
    k0, k1 = _C.dropout_key(seed, layer)
    return (threshold, scale, k0, k1, address(step)), step


def _rows_cols(x):
    """(rows, cols) of x seen as a matrix: rows = x.shape[0] (1 for a scalar)."""
    if x.ndim == 0:
        return 1, 1
    rows = x.shape[0]
    cols = 1
    for s in x.shape[1:]:
        cols *= s
    return rows, cols


def activation(x, name, *, dropout=None, out=None):
    """``act(x) * mask``: an elementwise activation of :data:`ACTIVATIONS` and, with
    ``dropout=Dropout(rate, seed, step, layer)``, inverted dropout, in one pass.

    The dropout element index is the flat C-order index (row * cols + col of x seen as
    (x.shape[0], rest)). ``out`` may be ``x``.
    """
    ck = Checker("activation")
    x = ck.f32(x, "x")
    code = _act_code("activation", name)
    d, keep = _dropout_args(ck, dropout, x)
    y = ck.out(out, "out", x.shape, like=x)
    ck.no_overlap(y, "out", (x, "x"), allow_same=True)
    rows, cols = _rows_cols(x)
    mod, extra, ctx = ck.backend(x)
    with ctx, _nvtx.annotate("activation"):
        mod.activation_fwd(address(x), address(y), rows, cols, code,
                           _NO_DROPOUT if d is None else d, *extra)
    del keep
    return y


def activation_backward(dy, saved, name, *, saved_is_input=False, dropout=None, out=None):
    """``dx = act'(z) * (dy * mask)``: the gradient through :func:`activation`.

    ``saved`` is the activation's output y (default) or, with ``saved_is_input``, its
    input z; gelu, silu and softplus need the input. ``saved`` may be None for
    "linear". ``dropout`` is the forward's. ``out`` may be ``dy``.
    """
    op = "activation_backward"
    ck = Checker(op)
    dy = ck.f32(dy, "dy")
    code = _act_code(op, name)
    if code in _NEEDS_INPUT and not saved_is_input:
        raise ValueError(f"{op}: the derivative of {name!r} needs its input: pass the "
                         "pre-activation as 'saved' with saved_is_input=True")
    if saved is None:
        if code != 0:
            raise ValueError(f"{op}: 'saved' is required for activation {name!r}")
    else:
        saved = ck.f32(saved, "saved", shape=dy.shape)
    d, keep = _dropout_args(ck, dropout, dy)
    dx = ck.out(out, "out", dy.shape, like=dy)
    ck.no_overlap(dx, "out", (dy, "dy"), (saved, "saved"), allow_same=True)
    rows, cols = _rows_cols(dy)
    mod, extra, ctx = ck.backend(dy)
    with ctx, _nvtx.annotate(op):
        mod.activation_bwd(address(dy), 0 if saved is None else address(saved), address(dx),
                           rows, cols, code, bool(saved_is_input),
                           _NO_DROPOUT if d is None else d, *extra)
    del keep
    return dx


def dropout(x, rate, *, seed, step, layer=0, out=None):
    """Inverted dropout: ``x * mask``, mask 0 with probability ``rate`` else
    ``1 / (1 - rate)`` (see :class:`Dropout`). ``out`` may be ``x``."""
    return activation(x, "linear", dropout=Dropout(rate, seed, step, layer), out=out)


def dropout_backward(dy, rate, *, seed, step, layer=0, out=None):
    """``dy * mask`` with the forward's mask (same rate, seed, step, layer)."""
    return activation_backward(dy, None, "linear", dropout=Dropout(rate, seed, step, layer),
                               out=out)


def dense_forward(x, w, b=None, *, activation=None, dropout=None, preact_out=None, out=None,
                  precision=None):
    """``act(x @ w + b) * mask`` in one fused kernel: a Dense layer's forward pass.

    x (n, in), w (in, out), b (out,) or None; ``activation`` is None or a name of
    :data:`ACTIVATIONS`; ``dropout`` a :class:`Dropout` (element index row * out +
    col). ``preact_out`` (n, out), when given, receives ``x @ w + b`` (what the
    backward of gelu / silu / softplus needs).
    """
    op = "dense_forward"
    if dropout is None and _plain(precision) and (out is not None or _nd2(x, w)):
        y = out if out is not None else np.empty((x.shape[0], w.shape[1]), _F32)
        if preact_out is None and activation in _ACTIVATIONS:
            if _gemm_fast(x, w, y, False, False, 1.0, 0.0, b, activation == "relu", None, None):
                return y
        elif activation is None or (type(activation) is str and activation in ACTIVATIONS):
            if _gemm_fast(x, w, y, False, False, 1.0, 0.0, b, False, None, None,
                          ACTIVATIONS[activation or "linear"], preact_out):
                return y
    ck = Checker(op)
    x = ck.f32(x, "x", ndim=2)
    w = ck.f32(w, "w", ndim=2)
    if w.shape[0] != x.shape[1]:
        raise ValueError(f"{op}: 'w' must have {x.shape[1]} rows (the features of 'x' of shape "
                         f"{tuple(x.shape)}), got shape {tuple(w.shape)}")
    code = _act_code(op, activation)
    n_out = w.shape[1]
    if b is not None:
        b = ck.f32(b, "b", shape=(n_out,))
    d, keep = _dropout_args(ck, dropout, x)
    shape = (x.shape[0], n_out)
    y = ck.out(out, "out", shape, like=x)
    ck.no_overlap(y, "out", (x, "x"), (w, "w"), (b, "b"))
    if preact_out is not None:
        preact_out = ck.out(preact_out, "preact_out", shape, like=x)
        ck.no_overlap(preact_out, "preact_out", (y, "out"), (x, "x"), (w, "w"), (b, "b"))
    if code == 1 and d is None and preact_out is None:  # the relu fast path
        return _gemm_call(ck, op, x, w, y, trans_a=False, trans_b=False, alpha=1.0, beta=0.0,
                          bias=b, relu=True, precision=precision)
    _gemm_call(ck, op, x, w, y, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, bias=b,
               precision=precision, act=code, preact=preact_out, dropout=d)
    del keep
    return y


def dense_backward_input(dy, w, *, relu_output=None, activation=None, saved=None,
                         saved_is_input=False, dropout=None, out=None, precision=None):
    """``dx = act'(z) * ((dy @ w.T) * mask)``: the gradient with respect to the
    pre-activation z of the activation that produced this layer's input, in one
    fused kernel.

    dy (n, out), w (in, out). ``activation`` (a name of :data:`ACTIVATIONS`) with
    ``saved`` (n, in): that activation's output y, or with ``saved_is_input`` its
    input z (gelu, silu and softplus need z). ``dropout`` is the forward's
    :class:`Dropout` of that activation. ``relu_output=y`` is
    ``activation="relu", saved=y``.
    """
    op = "dense_backward_input"
    if relu_output is not None:
        if activation not in (None, "relu") or saved is not None or saved_is_input:
            raise ValueError(f"{op}: relu_output= is activation='relu', saved=relu_output; "
                             "do not combine it with another activation or saved=")
        activation, saved = "relu", relu_output
    plain_relu = activation in _ACTIVATIONS and not saved_is_input and dropout is None \
        and (activation == "relu" or saved is None)
    if _plain(precision) and dropout is None and (out is not None or _nd2(dy, w)):
        dx = out if out is not None else np.empty((dy.shape[0], w.shape[0]), _F32)
        if plain_relu:
            if _gemm_fast(dy, w, dx, False, True, 1.0, 0.0, None, False,
                          saved if activation == "relu" else None, None):
                return dx
        elif type(activation) is str and activation in ACTIVATIONS and saved is not None:
            # the NumPy fast path declines what the checks below would refuse
            if _gemm_fast(dy, w, dx, False, True, 1.0, 0.0, None, False, None, None, 0, None,
                          None, ACTIVATIONS[activation], saved, bool(saved_is_input)):
                return dx
    ck = Checker(op)
    dy = ck.f32(dy, "dy", ndim=2)
    w = ck.f32(w, "w", ndim=2)
    if w.shape[1] != dy.shape[1]:
        raise ValueError(f"{op}: 'w' must have {dy.shape[1]} columns (the features of 'dy' of "
                         f"shape {tuple(dy.shape)}), got shape {tuple(w.shape)}")
    code = _act_code(op, activation)
    saved_name = "relu_output" if relu_output is not None else "saved"
    if code in _NEEDS_INPUT and not saved_is_input:
        raise ValueError(f"{op}: the derivative of {activation!r} needs its input: pass the "
                         "pre-activation as 'saved' with saved_is_input=True")
    shape = (dy.shape[0], w.shape[0])
    if saved is not None:
        saved = ck.f32(saved, saved_name, shape=shape)
    elif code != 0:
        raise ValueError(f"{op}: activation {activation!r} needs 'saved' (its output, or its "
                         "input with saved_is_input=True)")
    d, keep = _dropout_args(ck, dropout, dy)
    dx = ck.out(out, "out", shape, like=dy)
    ck.no_overlap(dx, "out", (dy, "dy"), (w, "w"), (saved, saved_name))
    if code == 1 and not saved_is_input and d is None:  # the relu_mask fast path
        return _gemm_call(ck, op, dy, w, dx, trans_a=False, trans_b=True, alpha=1.0, beta=0.0,
                          mask=saved, precision=precision)
    _gemm_call(ck, op, dy, w, dx, trans_a=False, trans_b=True, alpha=1.0, beta=0.0,
               precision=precision, grad_act=code, saved=saved if code else None,
               saved_is_input=saved_is_input, grad_dropout=d)
    del keep
    return dx


def dense_backward_weight(x, dy, *, row_scale=None, out=None, bias_out=None, bias=True,
                          precision=None):
    """``dw = x.T @ dy`` and, with ``bias=True``, ``db = dy.sum(0)``, in one pass.

    x (n, in), dy (n, out). Returns ``(dw, db)``; ``db`` is None with
    ``bias=False``. ``out`` / ``bias_out`` receive dw / db when given.
    ``row_scale`` (n,) float32 [issue 17]: DP-SGD's per-example clip factors s,
    ``dw = x.T @ diag(s) @ dy`` and ``db = s @ dy``, scaled inside the GEMM (each
    ``dy[r, j] * s[r]`` rounded to float32 first); ones give the unscaled result.
    """
    op = "dense_backward_weight"
    if (bias or bias_out is None) and _plain(precision) \
            and _nd2(x, dy):
        dw = out if out is not None else np.empty((x.shape[1], dy.shape[1]), _F32)
        db = (np.empty((dy.shape[1],), _F32) if bias_out is None else bias_out) if bias else None
        if row_scale is None:
            if _gemm_fast(x, dy, dw, True, False, 1.0, 0.0, None, False, None, db):
                return dw, db
        elif _gemm_fast(x, dy, dw, True, False, 1.0, 0.0, None, False, None, db,
                        0, None, None, 0, None, False, None, row_scale):
            return dw, db
    ck = Checker(op)
    x = ck.f32(x, "x", ndim=2)
    dy = ck.f32(dy, "dy", ndim=2)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: 'dy' must have {x.shape[0]} rows like 'x' of shape "
                         f"{tuple(x.shape)}, got shape {tuple(dy.shape)}")
    dw = ck.out(out, "out", (x.shape[1], dy.shape[1]), like=x)
    db = None
    if bias:
        db = ck.out(bias_out, "bias_out", (dy.shape[1],), like=x)
    elif bias_out is not None:
        raise ValueError(f"{op}: bias_out= was given with bias=False")
    if row_scale is not None:
        row_scale = ck.f32(row_scale, "row_scale", shape=(x.shape[0],))
        ck.no_overlap(dw, "out", (row_scale, "row_scale"))
        if db is not None:
            ck.no_overlap(db, "bias_out", (row_scale, "row_scale"))
    ck.no_overlap(dw, "out", (db, "bias_out"), (x, "x"), (dy, "dy"))
    if db is not None:
        ck.no_overlap(db, "bias_out", (x, "x"), (dy, "dy"))
    _gemm_call(ck, op, x, dy, dw, trans_a=True, trans_b=False, alpha=1.0, beta=0.0,
               colsum=db, precision=precision, row_scale=row_scale)
    return dw, db


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
    """``x < 0 ? 0 : x``, as ``torch.relu``: NaN and +Inf pass, -Inf -> 0. ``out`` may be ``x``."""
    ck = Checker("relu")
    x = ck.f32(x, "x")
    y = ck.out(out, "out", x.shape, like=x)
    ck.no_overlap(y, "out", (x, "x"), allow_same=True)
    mod, extra, ctx = ck.backend(x)
    with ctx, _nvtx.annotate("relu"):
        mod.relu(address(x), address(y), x.size, *extra)
    return y


def relu_backward(dy, y, *, out=None):
    """``y <= 0 ? 0 : dy`` where y is relu's output (torch's ``threshold_backward``: where
    y is NaN, dy passes). ``out`` may be ``dy``."""
    ck = Checker("relu_backward")
    dy = ck.f32(dy, "dy")
    y = ck.f32(y, "y", shape=dy.shape)
    dx = ck.out(out, "out", dy.shape, like=dy)
    ck.no_overlap(dx, "out", (dy, "dy"), (y, "y"), allow_same=True)
    mod, extra, ctx = ck.backend(dy)
    with ctx, _nvtx.annotate("relu_backward"):
        mod.relu_backward(address(dy), address(y), address(dx), dy.size, *extra)
    return dx


def first_nonfinite(x):
    """The index (a tuple, C order) of the first NaN or +-Inf element of a float32 array,
    or ``None`` when every element is finite. One pass over ``x`` on its device (the GPU
    reads back one int64); ``fit``, ``evaluate`` and ``predict`` run it on their inputs."""
    ck = Checker("first_nonfinite")
    x = ck.f32(x, "x")
    out = ck.empty((1,), np.int64, like=x)
    mod, extra, ctx = ck.backend(x)
    with ctx, _nvtx.annotate("first_nonfinite"):
        mod.first_nonfinite(address(x), x.size, address(out), *extra)
    i = int(out[0])
    if i < 0:
        return None
    return tuple(int(v) for v in np.unravel_index(i, x.shape)) if x.ndim else ()


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


def _logits_labels(ck, logits, labels):
    """Validated (logits, labels, label kind) of a softmax-cross-entropy op."""
    logits = ck.f32(logits, "logits", ndim=2)
    rows, cols = logits.shape
    lab, kind = _labels(ck, labels, rows, cols)
    if rows > 0 and cols == 0:
        raise ValueError(f"{ck.op}: 'logits' has 0 classes")
    return logits, lab, kind


def _raise_bad_label(op, labels, bad_row, classes):
    row = int(bad_row)
    value = int(labels[row])
    raise ValueError(f"{op}: label {value} in row {row} is outside [0, {classes}) "
                     f"(the logits have {classes} classes)")


def softmax_cross_entropy_forward(logits, labels, *, check_labels=True, out=None):
    """Like :func:`softmax_cross_entropy`, plus the bad-label flag.

    Returns ``(loss, probs, bad_row)``; ``bad_row`` is a 1-element int64
    array on the logits' device holding the first row with an out-of-range
    label, or -1. With ``check_labels=False`` nothing is read back from the
    GPU (no sync): the caller checks ``bad_row`` later (``fit`` does, once
    per epoch at the latest). ``out`` (rows, classes) receives the
    probabilities when given; it must not overlap ``logits``.
    """
    op = "softmax_cross_entropy"
    ck = Checker(op)
    logits, lab, kind = _logits_labels(ck, logits, labels)
    rows, cols = logits.shape
    if out is None:
        probs = ck.empty((rows, cols), np.float32, like=logits)
    else:
        probs = ck.out(out, "out", (rows, cols), like=logits)
        ck.no_overlap(probs, "out", (logits, "logits"), (lab, "labels"))
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


def softmax_cross_entropy_fused(logits, labels, *, backward=True, out=None,
                                check_labels=True):
    """The loss of a training step in one kernel pass: ``(loss, out, hits, bad_row)``.

    ``out`` (n, classes) receives ``(probs - onehot) / n`` with ``backward`` (the
    gradient of the mean loss w.r.t. the logits), else the probabilities; it must not
    overlap ``logits``. ``loss`` is the mean loss (0-d float32), ``hits`` the number of
    rows whose arg-max (the first maximum) equals the label (0-d int64; for float
    label rows, the label row's arg-max), ``bad_row`` as
    :func:`softmax_cross_entropy_forward`. Nothing is read back from the GPU with
    ``check_labels=False``.
    """
    op = "softmax_cross_entropy_fused"
    ck = Checker(op)
    logits, lab, kind = _logits_labels(ck, logits, labels)
    rows, cols = logits.shape
    res = ck.out(out, "out", (rows, cols), like=logits)
    ck.no_overlap(res, "out", (logits, "logits"), (lab, "labels"))
    row_loss = ck.empty((rows,), np.float32, like=logits)
    row_hits = ck.empty((rows,), np.int32, like=logits)
    loss = ck.empty((), np.float32, like=logits)
    hits = ck.empty((), np.int64, like=logits)
    bad_row = ck.empty((1,), np.int64, like=logits)
    mod, extra, ctx = ck.backend(logits)
    with ctx, _nvtx.annotate(op):
        mod.softmax_xent_fused(address(logits), address(lab), kind, address(res),
                               address(row_loss), address(row_hits), address(loss),
                               address(hits), address(bad_row), rows, cols, bool(backward),
                               *extra)
    if check_labels and int(bad_row[0]) >= 0:
        _raise_bad_label(op, lab, bad_row[0], cols)
    return loss, res, hits, bad_row


def _vector_out(op, out, size, dtype, device):
    """``out``, or a new (size,) array of dtype on ``device`` ("cpu" / "cuda")."""
    if out is not None:
        return out
    if device not in ("cpu", "cuda"):
        raise ValueError(f"{op}: device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        from ._interop import cupy_module, require_cuda
        require_cuda(op)
        return cupy_module().empty((size,), dtype)
    return np.empty((size,), dtype)


def random_permutation(n, seed, counter=0, *, out=None, device="cpu"):
    """A random permutation of ``[0, n)`` as int64, the same on every device: the
    permutation numbered ``counter`` of the stream ``seed`` (both unsigned 64-bit).

    Computed per element by a keyed Feistel network over Philox (no sort, no state):
    ``fit`` shuffles epoch ``e`` with ``random_permutation(rows, seed, e)`` on the CPU
    and on the GPU alike. ``out`` (an int64 array of n elements, NumPy or CuPy) is
    written in place; otherwise a new array is made on ``device`` ("cpu" / "cuda").
    """
    op = "random_permutation"
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError(f"{op}: 'n' must be a non-negative integer, got {n!r}")
    n = int(n)
    seed, counter = int(seed) & (2**64 - 1), int(counter) & (2**64 - 1)
    ck = Checker(op)
    out = ck.array(_vector_out(op, out, n, np.int64, device), "out", dtypes=(np.int64,),
                   shape=(n,), writable=True)
    mod, extra, ctx = ck.backend(out)
    with ctx, _nvtx.annotate(op):
        mod.random_permutation(address(out), n, seed, counter, *extra)
    return out


def gaussian_noise(size, *, seed, step, offset=0, out=None, device="cpu"):
    """Standard normal float32 numbers: element i is number ``offset + i`` of the
    stream (``seed``, ``step``), the same floats on every device (kernel_math.h
    ``gaussian_noise``: Philox4x32-10 of (element // 4, step) under
    ``noise_key(seed)``, Box-Muller on pairs of its words). The generator of the
    optimizers' DP-SGD noise (``noise_std`` of :func:`sgd_step` and the others).

    ``seed`` and ``step`` are unsigned 64-bit, ``offset`` >= 0. ``out`` (a float32
    array of ``size`` elements, NumPy or CuPy) is written in place; otherwise a new
    array is made on ``device`` ("cpu" / "cuda")."""
    op = "gaussian_noise"
    size = _int(op, size, "'size'")
    offset = _int(op, offset, "'offset'")
    if size < 0:
        raise ValueError(f"{op}: 'size' must be >= 0, got {size}")
    if offset < 0 or offset + size > 2**63 - 1:
        raise ValueError(f"{op}: 'offset' must be in [0, 2**63 - size), got {offset}")
    seed = _int(op, seed, "'seed'") & (2**64 - 1)
    step = _int(op, step, "'step'") & (2**64 - 1)
    ck = Checker(op)
    out = ck.array(_vector_out(op, out, size, np.float32, device), "out",
                   dtypes=(np.float32,), shape=(size,), writable=True)
    mod, extra, ctx = ck.backend(out)
    with ctx, _nvtx.annotate(op):
        mod.gaussian_noise(address(out), size, seed, step, offset, *extra)
    return out


_TRANSFORM_DOC = """
    The gradient transform, applied to each gradient element before the rule, in
    this order (w: the parameter before the update): with ``noise_std`` (a 1-element
    float32 array on the parameter's device: the DP-SGD noise's standard deviation)
    ``g = fma(noise_std[0], z_i, g)`` with ``z_i = gaussian_noise(noise_offset + i,
    noise_step, noise_key(noise_seed))`` (see :func:`gaussian_noise`; i: the flat
    element index), then ``g += l1 * sign(w) + 2 * l2 * w``
    (Keras l1 / l2 kernel regularizers), ``g *= clip_scale[0]`` (clip by norm: a
    1-element float32 array on the parameter's device, e.g. from
    :func:`grad_clip_scale`), ``g = clip(g, -clipvalue, clipvalue)`` when
    ``clipvalue > 0``. ``penalty_out`` (a 1-element float64 array on the device)
    receives ``l1 * sum|w| + l2 * sum w^2`` over the pre-update w (written, not
    accumulated; a fixed summation order)."""


def _transform(ck, op, param, grad, l1, l2, clip_scale, clipvalue, penalty_out,
               noise_std=None, noise_seed=0, noise_step=1, noise_offset=0):
    """(the (l1, l2, scale address, clipvalue, penalty address, work address, noise std
    address, noise key0, key1, noise step address, noise offset) tuple of the
    bindings, the arrays to keep alive): clip_scale / penalty_out / noise_std
    validated on the call's device; the noise step goes through a 1-element int64
    array made on that device (the kernels read it, as the engine's step counter).
    The caller holds the returned arrays until the kernel is launched (CuPy's pool
    reuses a freed block only for work ordered after it on the same stream)."""
    l1, l2, clipvalue = float(l1), float(l2), float(clipvalue)
    for name, val in (("l1", l1), ("l2", l2), ("clipvalue", clipvalue)):
        if not val >= 0.0:  # NaN fails too
            raise ValueError(f"{op}: '{name}' must be >= 0, got {val}")
    scale_addr = pen_addr = work_addr = 0
    work = None
    if clip_scale is not None:
        clip_scale = ck.f32(clip_scale, "clip_scale", shape=(1,))
        scale_addr = address(clip_scale)
    if penalty_out is not None:
        penalty_out = ck.array(penalty_out, "penalty_out", dtypes=(np.float64,), shape=(1,),
                               writable=True)
        ck.disjoint((param, "param"), (grad, "grad"), (penalty_out, "penalty_out"))
        pen_addr = address(penalty_out)
        mod, _, ctx = ck.backend(param)
        n_work = mod.optimizer_work_doubles()
        if n_work:
            with ctx:
                work = ck.empty((n_work,), np.float64, param)
            work_addr = address(work)
    noise = (0, 0, 0, 0, 0)
    step_arr = None
    if noise_std is not None:
        noise_std = ck.f32(noise_std, "noise_std", shape=(1,))
        seed = _int(op, noise_seed, "'noise_seed'") & (2**64 - 1)
        nstep = _int(op, noise_step, "'noise_step'")
        offset = _int(op, noise_offset, "'noise_offset'")
        if not 0 <= nstep < 2**63:
            raise ValueError(f"{op}: 'noise_step' must be in [0, 2**63), got {nstep}")
        if offset < 0 or offset + param.size > 2**63 - 1:
            raise ValueError(f"{op}: 'noise_offset' must be in [0, 2**63 - size), got {offset}")
        _, _, ctx = ck.backend(param)
        with ctx:
            step_arr = ck.empty((1,), np.int64, param)
        step_arr[...] = nstep
        k0, k1 = _C.noise_key(seed)
        noise = (address(noise_std), k0, k1, address(step_arr), offset)
    return (l1, l2, scale_addr, clipvalue, pen_addr, work_addr) + noise, (work, step_arr)


def sgd_step(param, grad, buf, *, lr, momentum=0.0, nesterov=False, weight_decay=0.0,
             l1=0.0, l2=0.0, clip_scale=None, clipvalue=0.0, penalty_out=None,
             noise_std=None, noise_seed=0, noise_step=1, noise_offset=0):
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
    tr, work = _transform(ck, "sgd_step", param, grad, l1, l2, clip_scale, clipvalue,
                          penalty_out, noise_std, noise_seed, noise_step, noise_offset)
    mod, extra, ctx = ck.backend(param)
    with ctx, _nvtx.annotate("sgd_step"):
        mod.sgd_step(address(param), address(grad), 0 if buf is None else address(buf),
                     param.size, float(lr), float(momentum), bool(nesterov),
                     float(weight_decay), tr, *extra)
    del work  # the penalty's scratch and the noise step: held until the kernel was launched
    return param


def adam_step(param, grad, m, v, *, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
              weight_decay=0.0, decoupled=False, l1=0.0, l2=0.0, clip_scale=None,
              clipvalue=0.0, penalty_out=None, noise_std=None, noise_seed=0, noise_step=1,
              noise_offset=0):
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
    tr, work = _transform(ck, "adam_step", param, grad, l1, l2, clip_scale, clipvalue,
                          penalty_out, noise_std, noise_seed, noise_step, noise_offset)
    mod, extra, ctx = ck.backend(param)
    with ctx, _nvtx.annotate("adam_step"):
        mod.adam_step(address(param), address(grad), address(m), address(v), param.size,
                      float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
                      bool(decoupled), int(step), tr, *extra)
    del work  # the penalty's scratch and the noise step: held until the kernel was launched
    return param


sgd_step.__doc__ += _TRANSFORM_DOC
adam_step.__doc__ += _TRANSFORM_DOC


# --------------------------------------------------------------------------- normalisation
# [issue 15] BatchNormalization / LayerNormalization, Keras semantics (csrc/fastmlp.h).


def _check_epsilon(op, epsilon):
    if not epsilon > 0:  # NaN fails too
        raise ValueError(f"{op}: 'epsilon' must be > 0, got {epsilon!r}")


def _norm_params(ck, gamma, beta, n):
    """gamma / beta validated as (n,) float32, or None (scale / center off)."""
    if gamma is not None:
        gamma = ck.f32(gamma, "gamma", shape=(n,))
    if beta is not None:
        beta = ck.f32(beta, "beta", shape=(n,))
    return gamma, beta


def _stat_out(ck, arr, name, n, like, fresh_nan):
    """A (n,) float32 statistics output; a new one is NaN-filled when ``fresh_nan`` (the
    kernel leaves statistics of an empty reduction unwritten: the mean of nothing)."""
    if arr is not None:
        return ck.out(arr, name, (n,), like=like)
    out = ck.out(None, name, (n,), like=like)
    if fresh_nan:
        out.fill(np.nan)
    return out


def _addr(a):
    return 0 if a is None else address(a)


def batch_norm_forward(x, gamma, beta, moving_mean, moving_var, *, training, momentum=0.99,
                       epsilon=1e-3, out=None, save_mean=None, save_invstd=None):
    """Keras ``BatchNormalization`` on x (rows, cols): per column over the rows.

    ``y = (x - mean) * invstd * gamma + beta`` with ``invstd = 1 / sqrt(var + epsilon)``;
    gamma / beta (cols,) or None (scale / center off: 1 / 0).
    ``training=True``: mean and var are the batch's (biased variance); ``moving_mean`` and
    ``moving_var`` are updated in place, ``moving = moving * momentum + batch * (1 -
    momentum)``; returns ``(y, save_mean, save_invstd)`` (the batch mean and invstd, for
    :func:`batch_norm_backward`). With 0 rows the moving statistics stay as they are (and
    new save_* arrays are NaN). ``training=False``: the moving statistics normalise;
    returns ``(y, None, None)``.
    """
    op = "batch_norm_forward"
    ck = Checker(op)
    x = ck.f32(x, "x", ndim=2)
    rows, cols = x.shape
    gamma, beta = _norm_params(ck, gamma, beta, cols)
    moving_mean = ck.f32(moving_mean, "moving_mean", shape=(cols,), writable=bool(training))
    moving_var = ck.f32(moving_var, "moving_var", shape=(cols,), writable=bool(training))
    _check_epsilon(op, epsilon)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{op}: 'momentum' must be in [0, 1], got {momentum!r}")
    y = ck.out(out, "out", (rows, cols), like=x)
    if training:
        save_mean = _stat_out(ck, save_mean, "save_mean", cols, x, rows == 0)
        save_invstd = _stat_out(ck, save_invstd, "save_invstd", cols, x, rows == 0)
        ck.disjoint((y, "out"), (save_mean, "save_mean"), (save_invstd, "save_invstd"),
                    (moving_mean, "moving_mean"), (moving_var, "moving_var"))
        for arr, name in ((save_mean, "save_mean"), (save_invstd, "save_invstd"),
                          (moving_mean, "moving_mean"), (moving_var, "moving_var")):
            ck.no_overlap(arr, name, (x, "x"), (gamma, "gamma"), (beta, "beta"))
    elif save_mean is not None or save_invstd is not None:
        raise ValueError(f"{op}: save_mean / save_invstd are outputs of training=True only")
    ck.no_overlap(y, "out", (x, "x"), (gamma, "gamma"), (beta, "beta"),
                  (moving_mean, "moving_mean"), (moving_var, "moving_var"))
    mod, extra, ctx = ck.backend(x)
    with ctx, _nvtx.annotate(op):
        mod.batchnorm_fwd(address(x), _addr(gamma), _addr(beta), address(y),
                          _addr(save_mean if training else None),
                          _addr(save_invstd if training else None), address(moving_mean),
                          address(moving_var), rows, cols, float(epsilon), float(momentum),
                          bool(training), *extra)
    if training:
        return y, save_mean, save_invstd
    return y, None, None


def _norm_backward(op, kernel, dy, x, gamma, save_mean, save_invstd, stats, out, dgamma_out,
                   dbeta_out):
    ck = Checker(op)
    dy = ck.f32(dy, "dy", ndim=2)
    x = ck.f32(x, "x", shape=dy.shape)
    rows, cols = dy.shape
    if gamma is not None:
        gamma = ck.f32(gamma, "gamma", shape=(cols,))
    n = cols if stats == "cols" else rows
    save_mean = ck.f32(save_mean, "save_mean", shape=(n,))
    save_invstd = ck.f32(save_invstd, "save_invstd", shape=(n,))
    dx = ck.out(out, "out", (rows, cols), like=dy)
    dgamma = ck.out(dgamma_out, "dgamma_out", (cols,), like=dy)
    dbeta = ck.out(dbeta_out, "dbeta_out", (cols,), like=dy)
    ck.disjoint((dx, "out"), (dgamma, "dgamma_out"), (dbeta, "dbeta_out"))
    for arr, name in ((dx, "out"), (dgamma, "dgamma_out"), (dbeta, "dbeta_out")):
        ck.no_overlap(arr, name, (dy, "dy"), (x, "x"), (gamma, "gamma"),
                      (save_mean, "save_mean"), (save_invstd, "save_invstd"))
    mod, extra, ctx = ck.backend(dy)
    with ctx, _nvtx.annotate(op):
        getattr(mod, kernel)(address(dy), address(x), _addr(gamma), address(save_mean),
                             address(save_invstd), address(dx), address(dgamma),
                             address(dbeta), rows, cols, *extra)
    return dx, dgamma, dbeta


def batch_norm_backward(dy, x, gamma, save_mean, save_invstd, *, out=None, dgamma_out=None,
                        dbeta_out=None):
    """Gradients of :func:`batch_norm_forward` in training: ``(dx, dgamma, dbeta)``.

    ``save_mean`` / ``save_invstd`` (cols,) come from the forward; gamma (cols,) or None.
    ``dgamma = sum_r dy * xhat`` and ``dbeta = sum_r dy`` are written (not accumulated).
    """
    return _norm_backward("batch_norm_backward", "batchnorm_bwd", dy, x, gamma, save_mean,
                          save_invstd, "cols", out, dgamma_out, dbeta_out)


def layer_norm_forward(x, gamma, beta, *, epsilon=1e-3, out=None, save_mean=None,
                       save_invstd=None):
    """Keras ``LayerNormalization`` over the last axis of x (rows, cols):
    ``(y, save_mean, save_invstd)`` with the per-row mean and ``1 / sqrt(var + epsilon)``
    (biased variance) as (rows,) arrays. gamma / beta (cols,) or None. With 0 columns new
    save_* arrays are NaN (the kernel writes no statistics of an empty row)."""
    op = "layer_norm_forward"
    ck = Checker(op)
    x = ck.f32(x, "x", ndim=2)
    rows, cols = x.shape
    gamma, beta = _norm_params(ck, gamma, beta, cols)
    _check_epsilon(op, epsilon)
    y = ck.out(out, "out", (rows, cols), like=x)
    save_mean = _stat_out(ck, save_mean, "save_mean", rows, x, cols == 0)
    save_invstd = _stat_out(ck, save_invstd, "save_invstd", rows, x, cols == 0)
    ck.disjoint((y, "out"), (save_mean, "save_mean"), (save_invstd, "save_invstd"))
    for arr, name in ((y, "out"), (save_mean, "save_mean"), (save_invstd, "save_invstd")):
        ck.no_overlap(arr, name, (x, "x"), (gamma, "gamma"), (beta, "beta"))
    mod, extra, ctx = ck.backend(x)
    with ctx, _nvtx.annotate(op):
        mod.layernorm_fwd(address(x), _addr(gamma), _addr(beta), address(y),
                          address(save_mean), address(save_invstd), rows, cols,
                          float(epsilon), *extra)
    return y, save_mean, save_invstd


def layer_norm_backward(dy, x, gamma, save_mean, save_invstd, *, out=None, dgamma_out=None,
                        dbeta_out=None):
    """Gradients of :func:`layer_norm_forward`: ``(dx, dgamma, dbeta)``; save_* (rows,)
    from the forward. dgamma / dbeta are written (not accumulated)."""
    return _norm_backward("layer_norm_backward", "layernorm_bwd", dy, x, gamma, save_mean,
                          save_invstd, "rows", out, dgamma_out, dbeta_out)


# ------------------------------------------------------------------ [issue 16] metrics

# The metrics of the fused metrics kernel (fastmlp.h MetricFlag) by name; the kernel
# writes their sums in the order of the flag bits.
METRIC_FLAGS = {"argmax": 1, "binary": 2, "top_k": 4, "abs": 8, "sq": 16}
_METRIC_TRANSFORMS = {"none": 0, "sigmoid": 1, "softmax": 2}
_NUM_METRIC_SUMS = 5


def metric_sums(pred, labels, metrics, *, transform="none", k=5, threshold=0.5, probs_out=None):
    """Sums over the rows of per-row metric values, from one fused kernel pass.

    ``pred`` (rows, cols) float32 holds the model's last pre-transform values; the
    predictions are ``p = transform(pred)``: ``"none"``, ``"sigmoid"`` (elementwise) or
    ``"softmax"`` (per row), written to ``probs_out`` (rows, cols) when given. ``labels``:
    class indices (rows,) int32/int64, or float32 rows (rows, cols). ``metrics``: names of
    :data:`METRIC_FLAGS`, each giving the sum over rows of
      ``argmax``  1 when the first maximum of the row is the label (float rows: their
                  first maximum) -- Keras (sparse_)categorical_accuracy
      ``binary``  mean over the row of ``(p > threshold) == (y > 0.5)`` (float labels)
      ``top_k``   1 when fewer than ``k`` classes score strictly above the label's
                  (tf.math.in_top_k: ties at the boundary count as in)
      ``abs``     mean over the row of ``|p - y|`` (float labels); ``sq``: of ``(p - y)^2``
    argmax and top_k compare ``pred`` (every transform is monotone per row). A row with a
    NaN in ``pred`` (or in its float label row) and an integer label outside [0, cols)
    are misses; NaN propagates into abs / sq. Returns a dict name -> float (the sums in
    float64; divide by rows for the means). NumPy -> CPU kernel, CuPy -> CUDA.
    """
    op = "metric_sums"
    ck = Checker(op)
    if isinstance(metrics, str):
        metrics = [metrics]
    names = list(metrics)
    for name in names:
        if name not in METRIC_FLAGS:
            raise ValueError(f"{op}: unknown metric {name!r}; expected names of "
                             f"{sorted(METRIC_FLAGS)}")
    if transform not in _METRIC_TRANSFORMS:
        raise ValueError(f"{op}: 'transform' must be one of {sorted(_METRIC_TRANSFORMS)}, "
                         f"got {transform!r}")
    flags = 0
    for name in names:
        flags |= METRIC_FLAGS[name]
    pred = ck.f32(pred, "pred", ndim=2)
    rows, cols = pred.shape
    lab, kind = _labels(ck, labels, rows, cols)
    if rows > 0 and cols == 0:
        raise ValueError(f"{op}: 'pred' has 0 columns")
    if kind != _LABEL_ONEHOT:
        float_only = [n for n in names if n in ("binary", "abs", "sq")]
        if float_only:
            raise ValueError(f"{op}: metrics {float_only} need float32 label rows "
                             f"({rows}, {cols}), got integer class labels")
    k = _int(op, k, "k")
    if "top_k" in names and not 1 <= k < 2**31:
        raise ValueError(f"{op}: 'k' must be in [1, 2**31), got {k}")
    k = min(max(k, 1), 2**31 - 1)
    threshold = float(threshold)
    if probs_out is not None:
        probs_out = ck.out(probs_out, "probs_out", (rows, cols), like=pred)
        ck.no_overlap(probs_out, "probs_out", (pred, "pred"), (lab, "labels"))
    scratch = ck.empty((_NUM_METRIC_SUMS * rows,), np.float32, like=pred)
    sums = ck.empty((_NUM_METRIC_SUMS,), np.float64, like=pred)
    mod, extra, ctx = ck.backend(pred)
    with ctx, _nvtx.annotate(op):
        mod.metrics_fused(address(pred), address(lab), kind,
                          0 if probs_out is None else address(probs_out), address(scratch),
                          address(sums), rows, cols, flags, _METRIC_TRANSFORMS[transform], k,
                          threshold, *extra)
    host = sums.get() if hasattr(sums, "get") else sums
    order = sorted(METRIC_FLAGS, key=METRIC_FLAGS.get)
    return {name: float(host[order.index(name)]) for name in names}


def _any_array(x, name, op):
    """A NumPy / CuPy array of x (lists and tuples too: roc_auc takes plain data)."""
    if isinstance(x, (list, tuple)):
        return np.asarray(x)
    return as_array(x, name, op)


def roc_auc(scores, labels):
    """Exact ROC AUC of ``scores`` (n,) or (n, c) against binary ``labels`` (0/1 or bool)
    of the same shape; (n, c) is flattened (the micro average).

    Computed with the array module of ``scores`` (NumPy, or CuPy on the GPU) as the
    Mann-Whitney statistic with average ranks for ties, in float64:
    ``(sum of the positives' ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)``, which is
    what ``sklearn.metrics.roc_auc_score`` computes. ValueError when the shapes differ,
    a label is not 0 or 1, a score is NaN, or only one class is present (as sklearn).
    """
    op = "roc_auc"
    s = _any_array(scores, "scores", op)
    y = _any_array(labels, "labels", op)
    if device_of(s) != device_of(y):
        raise ValueError(f"{op}: 'scores' is on {device_of(s)} but 'labels' is on "
                         f"{device_of(y)}; pass both on one device")
    if tuple(s.shape) != tuple(y.shape):
        raise ValueError(f"{op}: 'scores' and 'labels' must have the same shape, got "
                         f"{tuple(s.shape)} and {tuple(y.shape)}")
    if s.ndim not in (1, 2):
        raise ValueError(f"{op}: 'scores' must be 1-D or 2-D, got shape {tuple(s.shape)}")
    if s.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
        raise TypeError(f"{op}: 'scores' and 'labels' must be numeric, got {s.dtype} "
                        f"and {y.dtype}")
    xp = cupy_module() if is_cupy(s) else np
    # float32 scores stay float32 (NumPy sorts them with its vector sort; every value and
    # tie is kept), any other type becomes float64 (exact for ints below 2**53)
    s = s.ravel() if s.dtype == np.float32 else s.astype(xp.float64).ravel()
    y = y.ravel()
    pos = y == 1
    # One reduction read back: [any bad label, any NaN score, positives, count].
    stats = xp.stack([xp.sum((y != 0) & ~pos), xp.sum(xp.isnan(s)), xp.sum(pos)])
    stats = stats.get() if hasattr(stats, "get") else stats
    bad, nans, n_pos = (int(v) for v in stats)
    n_neg = s.size - n_pos
    if bad:
        raise ValueError(f"{op}: 'labels' must be binary (0 or 1); {bad} are not")
    if nans:
        raise ValueError(f"{op}: 'scores' contain {nans} NaN values")
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"{op}: only one class present in 'labels'; ROC AUC is not "
                         f"defined in that case")
    # One sort; the groups of equal scores in ascending order; per group its positives
    # and negatives. A positive ranks above the negatives of lower groups and ties with
    # half of its own group's: the numerator sum_g pos_g (neg_below_g + neg_g / 2) is a
    # sum of integers and halves, exact in float64 (below 2**53).
    order = xp.argsort(s)
    ss, yy = s[order], pos[order]
    starts = xp.empty(ss.size, dtype=bool)
    starts[0] = True
    xp.not_equal(ss[1:], ss[:-1], out=starts[1:])
    group = xp.cumsum(starts) - 1
    pos_g = xp.bincount(group, weights=yy.astype(xp.float64))
    neg_g = xp.bincount(group).astype(xp.float64) - pos_g
    below = xp.cumsum(neg_g) - neg_g
    wins = float(xp.sum(pos_g * (below + 0.5 * neg_g)))
    return wins / (float(n_pos) * float(n_neg))


# ----------------------------------------------------------------------------- losses (issue 16)

# The loss kinds of loss_forward_backward, by the codes of csrc/fastmlp.h's LossKind.
LOSS_KINDS = {"mse": 0, "mae": 1, "huber": 2, "bce_logits": 3, "bce_probs": 4,
              "cce_logits": 5, "cce_probs": 6}
_CCE_KINDS = ("cce_logits", "cce_probs")
_SMOOTHED_KINDS = ("bce_logits", "bce_probs", "cce_logits", "cce_probs")


def loss_forward_backward(kind, pred, target, *, sample_weight=None, delta=1.0,
                          label_smoothing=0.0, backward=True, out=None, check_labels=True):
    """A loss and its gradient in one kernel pass: ``(loss, dpred)``.

    ``kind`` is a name of :data:`LOSS_KINDS`; ``pred`` (rows, cols) float32; ``target``
    float32 rows of the same shape, or for ``"cce_logits"`` / ``"cce_probs"`` also
    (rows,) int32 / int64 class indices. Per row a loss L_r (Keras / PyTorch
    semantics: the mean over the columns for mse, mae, huber (``delta``) and the two
    binary cross-entropies; ``"*_logits"`` take logits, ``"*_probs"`` probabilities
    clamped to [1e-7, 1 - 1e-7] as Keras' ``from_logits=False``; ``label_smoothing``
    as Keras for the cross-entropies). ``loss = sum_r w_r * L_r / rows`` (a Python
    float; ``sample_weight`` (rows,) float32 w_r, default 1) and, with ``backward``,
    ``dpred = d loss / d pred`` (written into ``out`` when given; it must not overlap
    ``pred``), else ``dpred`` is None. A label outside [0, cols) raises ValueError
    naming its row (unless ``check_labels=False``: that row's loss is NaN).
    """
    op = "loss_forward_backward"
    if not isinstance(kind, str) or kind not in LOSS_KINDS:
        raise ValueError(f"{op}: 'kind' must be one of {', '.join(map(repr, LOSS_KINDS))}, "
                         f"got {kind!r}")
    ck = Checker(op)
    pred = ck.f32(pred, "pred", ndim=2)
    rows, cols = pred.shape
    if kind in _CCE_KINDS:
        lab, label_kind = _labels(ck, target, rows, cols)
        lab_name = "labels"
    else:
        lab = ck.f32(target, "target", shape=(rows, cols))
        label_kind, lab_name = _LABEL_ONEHOT, "target"
    if rows > 0 and cols == 0:
        raise ValueError(f"{op}: 'pred' has 0 columns")
    if sample_weight is not None:
        sample_weight = ck.f32(sample_weight, "sample_weight", shape=(rows,))
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real):
        raise TypeError(f"{op}: 'delta' must be a number, got {type(delta).__name__}")
    if kind == "huber" and not (np.isfinite(delta) and delta > 0):
        raise ValueError(f"{op}: 'delta' must be a finite number > 0, got {delta!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"{op}: 'label_smoothing' must be a number, "
                        f"got {type(label_smoothing).__name__}")
    if not 0.0 <= float(np.float32(label_smoothing)) < 1.0:
        raise ValueError(f"{op}: 'label_smoothing' must be in [0, 1), got {label_smoothing!r}")
    if label_smoothing and kind not in _SMOOTHED_KINDS:
        raise ValueError(f"{op}: label_smoothing applies to {', '.join(_SMOOTHED_KINDS)}, "
                         f"not {kind!r}")
    dpred = None
    if backward:
        dpred = ck.out(out, "out", (rows, cols), like=pred)
        ck.no_overlap(dpred, "out", (pred, "pred"), (lab, lab_name),
                      (sample_weight, "sample_weight"))
    elif out is not None:
        raise ValueError(f"{op}: out= was given with backward=False")
    row_loss = ck.empty((rows,), np.float32, like=pred)
    loss = ck.empty((1,), np.float32, like=pred)
    bad_row = ck.empty((1,), np.int64, like=pred)
    mod, extra, ctx = ck.backend(pred)
    with ctx, _nvtx.annotate(op):
        mod.loss_fused(address(pred), address(lab), label_kind, _addr(sample_weight),
                       _addr(dpred), address(row_loss), address(loss), address(bad_row),
                       rows, cols, LOSS_KINDS[kind], float(delta), float(label_smoothing),
                       *extra)
    if check_labels and label_kind != _LABEL_ONEHOT and int(bad_row[0]) >= 0:
        _raise_bad_label(op, lab, bad_row[0], cols)
    return float(loss[0]), dpred
# --------------------------------------------------------------------------- RMSprop, clipping


def rmsprop_step(param, grad, square_avg, momentum_buffer, grad_avg, *, lr, alpha=0.99,
                 eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, l1=0.0, l2=0.0,
                 clip_scale=None, clipvalue=0.0, penalty_out=None, noise_std=None,
                 noise_seed=0, noise_step=1, noise_offset=0):
    """One in-place torch.optim.RMSprop step. Returns ``param``.

    ``square_avg`` (always), ``momentum_buffer`` (when ``momentum > 0``, else may be
    None) and ``grad_avg`` (when ``centered``, else may be None) start at zeros.
    """
    op = "rmsprop_step"
    ck = Checker(op)
    param = ck.f32(param, "param", writable=True)
    grad = ck.f32(grad, "grad", shape=param.shape)
    square_avg = ck.f32(square_avg, "square_avg", shape=param.shape, writable=True)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{op}: 'alpha' must be in [0, 1], got {alpha}")
    if not momentum >= 0.0:
        raise ValueError(f"{op}: 'momentum' must be >= 0, got {momentum}")
    if momentum != 0.0:
        if momentum_buffer is None:
            raise ValueError(f"{op}: momentum != 0 needs 'momentum_buffer' (a zero-initialised "
                             "array shaped like 'param')")
        momentum_buffer = ck.f32(momentum_buffer, "momentum_buffer", shape=param.shape,
                                 writable=True)
    else:
        momentum_buffer = None
    if centered:
        if grad_avg is None:
            raise ValueError(f"{op}: centered=True needs 'grad_avg' (a zero-initialised array "
                             "shaped like 'param')")
        grad_avg = ck.f32(grad_avg, "grad_avg", shape=param.shape, writable=True)
    else:
        grad_avg = None
    ck.disjoint((param, "param"), (grad, "grad"), (square_avg, "square_avg"),
                (momentum_buffer, "momentum_buffer"), (grad_avg, "grad_avg"))
    tr, work = _transform(ck, op, param, grad, l1, l2, clip_scale, clipvalue, penalty_out,
                          noise_std, noise_seed, noise_step, noise_offset)
    mod, extra, ctx = ck.backend(param)
    with ctx, _nvtx.annotate(op):
        mod.rmsprop_step(address(param), address(grad), address(square_avg),
                         _addr(momentum_buffer), _addr(grad_avg), param.size, float(lr),
                         float(alpha), float(eps), float(weight_decay), float(momentum),
                         bool(centered), tr, *extra)
    del work  # the penalty's scratch and the noise step: held until the kernel was launched
    return param


rmsprop_step.__doc__ += _TRANSFORM_DOC

_CLIP_MODES = {"per_tensor": 0, "global": 1, 0: 0, 1: 1}


def grad_clip_scale(params_flat, grads_flat, offsets, l1l2=None, *, mode, max_norm, out=None):
    """The clip-by-norm scales of the segments of flat parameter / gradient arrays.

    Segment k is ``[offsets[k], offsets[k+1])`` (``offsets``: nseg + 1 int64,
    non-decreasing, on the arrays' device); ``l1l2`` (2 * nseg float32 ``l1_k, l2_k``,
    or None) adds the regularizer gradient ``l1_k sign(w) + 2 l2_k w`` first. With
    ``s_k`` the sum of squares of the segment's (regularized) gradient, in double:
    ``mode="per_tensor"`` (0, Keras ``clipnorm``) gives
    ``scale[k] = min(1, max_norm / (sqrt(s_k) + 1e-6))``; ``mode="global"`` (1,
    ``torch.nn.utils.clip_grad_norm_`` / Keras ``global_clipnorm``) the same of
    ``sum_k s_k`` for every k. Returns the (nseg,) float32 scales (``out`` if given).
    """
    op = "grad_clip_scale"
    if mode not in _CLIP_MODES:
        raise ValueError(f"{op}: mode must be 'per_tensor' or 'global', got {mode!r}")
    mode = _CLIP_MODES[mode]
    max_norm = float(max_norm)
    if not max_norm > 0.0:
        raise ValueError(f"{op}: 'max_norm' must be > 0, got {max_norm}")
    ck = Checker(op)
    params_flat = ck.f32(params_flat, "params_flat", ndim=1)
    grads_flat = ck.f32(grads_flat, "grads_flat", shape=params_flat.shape)
    offsets = ck.array(offsets, "offsets", dtypes=(np.int64,), ndim=1)
    nseg = offsets.shape[0] - 1
    if nseg < 0:
        raise ValueError(f"{op}: 'offsets' needs at least one element (nseg + 1), got 0")
    host_off = np.asarray(offsets.get() if hasattr(offsets, "get") else offsets)
    if nseg >= 0 and host_off.size and (host_off[0] < 0 or np.any(np.diff(host_off) < 0)
                                        or host_off[-1] > params_flat.size):
        raise ValueError(f"{op}: 'offsets' must be non-decreasing within [0, "
                         f"{params_flat.size}], got {host_off.tolist()}")
    if l1l2 is not None:
        l1l2 = ck.f32(l1l2, "l1l2", shape=(2 * nseg,))
    out = ck.out(out, "out", (nseg,), like=params_flat)
    mod, extra, ctx = ck.backend(params_flat)
    n_work = mod.grad_clip_work_doubles(params_flat.size, nseg)
    work = None
    if n_work:
        with ctx:
            work = ck.empty((n_work,), np.float64, params_flat)
    with ctx, _nvtx.annotate(op):
        mod.grad_clip_scale(address(params_flat), address(grads_flat), address(offsets),
                            _addr(l1l2), nseg, mode, max_norm, address(out), _addr(work),
                            *extra)
    return out


# --------------------------------------------------------------------------- DP-SGD [issue 17]


def dp_row_sqnorms(x, dz, *, bias=True, out=None, accumulate=False):
    """One Dense layer's per-example squared gradient norms (DP-SGD's "ghost norms").

    x (n, in) is the layer's input and dz (n, out) the gradient of its
    pre-activation. Example r's weight gradient is the outer product
    ``x[r] dz[r]^T``, so its squared norm is ``||x[r]||^2 ||dz[r]||^2``; the bias
    gradient (``bias=True``) adds ``||dz[r]||^2``. Returns the (n,) float32
    ``out[r] = (out[r] if accumulate else 0) + (||x[r]||^2 + bias) * ||dz[r]||^2``
    (sums in double, rounded to float once), ``out`` if given. ``accumulate=True``
    adds to ``out`` (required then): the layers' contributions summed in a fixed
    order give the whole example's squared gradient norm.
    """
    op = "dp_row_sqnorms"
    ck = Checker(op)
    x = ck.f32(x, "x", ndim=2)
    dz = ck.f32(dz, "dz", ndim=2)
    if dz.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: 'dz' must have {x.shape[0]} rows like 'x' of shape "
                         f"{tuple(x.shape)}, got shape {tuple(dz.shape)}")
    if accumulate and out is None:
        raise ValueError(f"{op}: accumulate=True needs 'out' (the running sums to add to)")
    out = ck.out(out, "out", (x.shape[0],), like=x)
    ck.no_overlap(out, "out", (x, "x"), (dz, "dz"))
    mod, extra, ctx = ck.backend(x)
    with ctx, _nvtx.annotate(op):
        mod.dp_row_sqnorms(address(x), address(dz), address(out), x.shape[0], x.shape[1],
                           dz.shape[1], bool(bias), bool(accumulate), *extra)
    return out


def _positive(op, name, value, allow_zero=False):
    """``value`` as a float, or ValueError when it is not > 0 (>= 0) or is NaN."""
    v = float(value)
    if not (v >= 0.0 if allow_zero else v > 0.0) or v == float("inf"):
        raise ValueError(f"{op}: '{name}' must be a finite number {'>=' if allow_zero else '>'}"
                         f" 0, got {value!r}")
    return v


def dp_clip_factors(sqnorms, *, clip, noise_multiplier=0.0, grad_scale, divisor, std_out=None):
    """DP-SGD's per-example gradient scales, in place on ``sqnorms``; returns it.

    ``sqnorms`` (n,) float32 holds each example's squared gradient norm (of the
    gradient divided by ``grad_scale``, e.g. :func:`dp_row_sqnorms` of a mean loss's
    gradients with ``grad_scale = n``). Each becomes
    ``c_r * grad_scale / divisor`` with ``norm_r = grad_scale * sqrt(sqnorms[r])`` and
    ``c_r = min(1, clip / (norm_r + 1e-6))`` (Opacus's clip factor), in double,
    rounded to float. ``std_out`` (a (1,) float32 array on the same device), when
    given, receives the noise standard deviation ``noise_multiplier * clip / divisor``.
    ``clip``, ``grad_scale``, ``divisor`` > 0, ``noise_multiplier`` >= 0. A NaN
    norm gives a NaN scale.
    """
    op = "dp_clip_factors"
    clip = _positive(op, "clip", clip)
    noise_multiplier = _positive(op, "noise_multiplier", noise_multiplier, allow_zero=True)
    grad_scale = _positive(op, "grad_scale", grad_scale)
    divisor = _positive(op, "divisor", divisor)
    ck = Checker(op)
    sqnorms = ck.f32(sqnorms, "sqnorms", ndim=1, writable=True)
    if std_out is not None:
        std_out = ck.f32(std_out, "std_out", shape=(1,), writable=True)
        ck.no_overlap(std_out, "std_out", (sqnorms, "sqnorms"))
    mod, extra, ctx = ck.backend(sqnorms)
    with ctx, _nvtx.annotate(op):
        mod.dp_clip_factors(address(sqnorms), sqnorms.shape[0], clip, noise_multiplier,
                            grad_scale, divisor, _addr(std_out), *extra)
    return sqnorms


# --------------------------------------------------------------- explain, adversarial [issue 18]

_OUTPUT_TRANSFORMS = {"none": 0, "sigmoid": 1, "softmax": 2}


def _step_arg(ck, step, like):
    """``(int64 (1,) array on like's device holding the step, its value or None)``:
    ``step`` is an int >= 0 or a 1-element int64 array on the data's device (read by
    the kernel, so an engine can pass a view of its step counter; see Dropout.step)."""
    op = ck.op
    if isinstance(step, numbers.Integral) and not isinstance(step, bool):
        s = int(step)
        if s < 0:
            raise ValueError(f"{op}: 'step' must be >= 0, got {s}")
        arr = ck.empty((1,), np.int64, like)
        arr[...] = s
        return arr, s
    if isinstance(step, (bool, numbers.Number)):
        raise ValueError(f"{op}: 'step' must be an integer or a (1,) int64 array, got {step!r}")
    return ck.array(step, "step", dtypes=(np.int64,), shape=(1,)), None


def _zeros_out(ck, out, name, shape, dtype, like):
    """``out`` checked (dtype, shape, writable), or a new zero-filled array."""
    if out is None:
        arr = ck.empty(shape, dtype, like)
        arr.fill(0)
        return arr
    return ck.array(out, name, dtypes=(dtype,), shape=shape, writable=True)


def _size(op, name, value, default):
    """An optional size argument: ``default`` when None, else an int >= 0."""
    if value is None:
        return default
    v = _int(op, value, f"'{name}'")
    if v < 0:
        raise ValueError(f"{op}: '{name}' must be >= 0, got {v}")
    return v


def target_seed(logits, targets, *, transform="none", out=None):
    """The gradient seed of an explanation: ``out[r, j] = d f(z_r)[t_r] / d z_r[j]``.

    ``logits`` (n, c) float32 holds the model's last pre-transform values z, ``targets``
    (n,) int32 the class t_r explained in each row, ``transform`` the output transform
    f: ``"none"`` (out is one-hot at t), ``"sigmoid"`` (``sigmoid'(z[t])`` at t, 0
    elsewhere) or ``"softmax"`` (``p_t ((j == t) - p_j)`` with p the row softmax).
    Backpropagating ``out`` through the model gives the gradient of the explained
    output with respect to the input. A target outside [0, c) is a ValueError naming
    the first bad row. Returns the (n, c) float32 ``out``.
    """
    op = "target_seed"
    code = _OUTPUT_TRANSFORMS.get(transform) if isinstance(transform, str) else None
    if code is None:
        raise ValueError(f"{op}: 'transform' must be one of {sorted(_OUTPUT_TRANSFORMS)}, "
                         f"got {transform!r}")
    ck = Checker(op)
    logits = ck.f32(logits, "logits", ndim=2)
    n, c = logits.shape
    targets = ck.array(targets, "targets", dtypes=(np.int32,), shape=(n,))
    host = targets.get() if is_cupy(targets) else targets
    bad = np.flatnonzero((host < 0) | (host >= c))
    if bad.size:
        r = int(bad[0])
        raise ValueError(f"{op}: targets[{r}] = {int(host[r])} is outside [0, {c})")
    out = ck.out(out, "out", (n, c), like=logits)
    ck.no_overlap(out, "out", (logits, "logits"), (targets, "targets"))
    mod, extra, ctx = ck.backend(logits)
    with ctx, _nvtx.annotate(op):
        mod.target_seed(address(logits), address(targets), address(out), n, c, code, *extra)
    return out


def ig_interpolate(x, alphas, *, baseline=None, targets=None, step=0, batch=None, rows=None,
                   out=None, targets_out=None):
    """Integrated gradients' path points ``baseline + alpha (x - baseline)``.

    ``x`` (images, cols) float32, ``alphas`` (steps,) float32 (the quadrature's
    points), ``baseline`` (images, cols) or None (zeros: then ``alpha * x``). Virtual
    row v of ``images * steps`` is image ``v // steps`` at ``alphas[v % steps]``; this
    call writes ``rows`` rows of ``out`` (rows, cols), virtual rows ``step * batch``
    on (a row past the end is left untouched). ``batch`` defaults to
    ``images * steps``; ``rows`` to what is left of the batch (``step`` an int), or
    ``min(batch, images * steps)`` when ``step`` is a (1,) int64 array (read by the
    kernel). Each operation is rounded to float32 (Captum's formula). With
    ``targets`` ((images,) int32), ``targets_out[r]`` (rows,) int32 gets the row's
    image's target, and ``(out, targets_out)`` is returned; else ``out``.
    """
    op = "ig_interpolate"
    ck = Checker(op)
    x = ck.f32(x, "x", ndim=2)
    images, cols = x.shape
    alphas = ck.f32(alphas, "alphas", ndim=1)
    steps = alphas.shape[0]
    if steps < 1:
        raise ValueError(f"{op}: 'alphas' must hold at least one path point, got shape (0,)")
    if baseline is not None:
        baseline = ck.f32(baseline, "baseline", shape=(images, cols))
    if targets is not None:
        targets = ck.array(targets, "targets", dtypes=(np.int32,), shape=(images,))
    total = images * steps
    batch = _size(op, "batch", batch, total)
    step_arr, s = _step_arg(ck, step, x)
    left = total if s is None else max(0, total - s * batch)
    rows = _size(op, "rows", rows, min(batch, left))
    out = _zeros_out(ck, out, "out", (rows, cols), np.float32, x)
    ck.no_overlap(out, "out", (x, "x"), (baseline, "baseline"), (alphas, "alphas"),
                  (step_arr, "step"), (targets, "targets"))
    if targets is not None:
        targets_out = _zeros_out(ck, targets_out, "targets_out", (rows,), np.int32, x)
        ck.no_overlap(targets_out, "targets_out", (targets, "targets"), (out, "out"),
                      (step_arr, "step"))
    elif targets_out is not None:
        raise ValueError(f"{op}: 'targets_out' given without 'targets'")
    mod, extra, ctx = ck.backend(x)
    with ctx, _nvtx.annotate(op):
        mod.ig_interpolate(address(x), _addr(baseline), address(alphas), _addr(targets),
                           address(out), _addr(targets_out), images, cols, steps,
                           address(step_arr), batch, rows, *extra)
    return out if targets is None else (out, targets_out)


def ig_accumulate(grads, x, weights, *, baseline=None, multiply=True, absolute=False, step=0,
                  batch=None, out=None):
    """The attributions from the gradients at the path points :func:`ig_interpolate` made.

    ``grads`` (rows, cols) float32 are the gradients at the ``rows`` path points of the
    call with the same ``step`` and ``batch`` (``batch`` defaults to ``rows``); both
    must be multiples of ``steps = len(weights)``. For each image i of the call
    (``step * batch / steps`` on) and column c: ``s = sum_m weights[m] *
    grads[k * steps + m, c]`` (float32, in m order), then ``a = (x - baseline) * s``
    with ``multiply`` (baseline None: zeros), else ``a = s``, and ``out[i, c] = |a|``
    with ``absolute``, else ``a``. Saliency: steps 1, weights [1], multiply False,
    absolute True; gradient x input: steps 1, weights [1]. ``out`` (images, cols)
    float32, zeros when None; images past the end are skipped. Returns ``out``.
    """
    op = "ig_accumulate"
    ck = Checker(op)
    grads = ck.f32(grads, "grads", ndim=2)
    rows, cols = grads.shape
    x = ck.f32(x, "x", ndim=2)
    images = x.shape[0]
    if x.shape[1] != cols:
        raise ValueError(f"{op}: 'x' must have {cols} columns like 'grads' of shape "
                         f"{tuple(grads.shape)}, got shape {tuple(x.shape)}")
    weights = ck.f32(weights, "weights", ndim=1)
    steps = weights.shape[0]
    if steps < 1:
        raise ValueError(f"{op}: 'weights' must hold at least one weight, got shape (0,)")
    if baseline is not None:
        baseline = ck.f32(baseline, "baseline", shape=x.shape)
    batch = _size(op, "batch", batch, rows)
    if rows % steps or batch % steps:
        raise ValueError(f"{op}: the rows of 'grads' ({rows}) and batch ({batch}) must be "
                         f"multiples of steps = len(weights) = {steps}")
    step_arr, _ = _step_arg(ck, step, x)
    out = _zeros_out(ck, out, "out", (images, cols), np.float32, x)
    ck.no_overlap(out, "out", (grads, "grads"), (x, "x"), (baseline, "baseline"),
                  (weights, "weights"), (step_arr, "step"))
    mod, extra, ctx = ck.backend(x)
    with ctx, _nvtx.annotate(op):
        mod.ig_accumulate(address(grads), address(x), _addr(baseline), address(weights),
                          address(out), images, cols, steps, address(step_arr), batch, rows,
                          bool(multiply), bool(absolute), *extra)
    return out


def _finite_nonneg(op, name, value):
    """``value`` as a float, or ValueError when it is not a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{op}: '{name}' must be a finite number >= 0, got {value!r}")
    v = float(value)
    if not (0.0 <= v < float("inf")):  # also refuses NaN
        raise ValueError(f"{op}: '{name}' must be a finite number >= 0, got {value!r}")
    return v


def _clip_range(op, clip):
    """``(lo, hi)`` of ``clip``: None -> no clipping (-inf, inf); else a pair whose ends
    are numbers (None: unbounded) with lo <= hi."""
    if clip is None:
        return float("-inf"), float("inf")
    if not isinstance(clip, (tuple, list)) or len(clip) != 2:
        raise ValueError(f"{op}: 'clip' must be None or a pair (lo, hi), got {clip!r}")
    lo = float("-inf") if clip[0] is None else float(clip[0])
    hi = float("inf") if clip[1] is None else float(clip[1])
    if not lo <= hi:  # also refuses NaN
        raise ValueError(f"{op}: 'clip' must have lo <= hi, got {clip!r}")
    return lo, hi


def adversarial_init(x, *, eps, clip=(0.0, 1.0), seed=None, step=0, out=None):
    """The starting point of an attack: ``clip(x + eps * u)``.

    Without ``seed`` (FGSM, PGD without random start) a clipped copy of ``x``; with
    it, ``u`` is uniform in (-1, 1) per element, drawn from Philox under
    ``_C.adversarial_key(seed)`` at ``step`` (an int or a (1,) int64 array on the
    data's device), the same numbers on the CPU and the GPU. ``clip`` = (lo, hi)
    (torch.clamp; None: no clipping). ``eps`` a finite number >= 0. ``x`` float32
    of any shape; ``out`` (like x, may be x itself) is returned.
    """
    op = "adversarial_init"
    eps = _finite_nonneg(op, "eps", eps)
    lo, hi = _clip_range(op, clip)
    ck = Checker(op)
    x = ck.f32(x, "x")
    rows, cols = _rows_cols(x)
    out = ck.out(out, "out", x.shape, like=x)
    ck.no_overlap(out, "out", (x, "x"), allow_same=True)
    step_arr, k0, k1 = None, 0, 0
    if seed is not None:
        seed = _int(op, seed, "seed") & (2**64 - 1)
        step_arr, _ = _step_arg(ck, step, x)
        k0, k1 = _C.adversarial_key(seed)
    mod, extra, ctx = ck.backend(x)
    with ctx, _nvtx.annotate(op):
        mod.adv_init(address(x), address(out), rows, cols, eps, lo, hi, _addr(step_arr), k0, k1,
                     *extra)
    return out


def adversarial_step(x, adv, grad, *, eps, alpha, clip=(0.0, 1.0), project=True):
    """One FGSM / PGD step, in place on ``adv``; returns it.

    ``adv = clip(t)`` with ``t = adv + alpha * sign(grad)`` and, with ``project``,
    ``t = x + clamp(t - x, -eps, eps)`` (torchattacks' PGD; sign(NaN) = NaN).
    ``x``, ``adv``, ``grad`` float32 of one shape; ``adv`` must not overlap ``x`` or
    ``grad``. ``eps``, ``alpha`` finite numbers >= 0; ``clip`` as
    :func:`adversarial_init`. FGSM = ``adversarial_init`` without seed, then one
    step with ``alpha = eps, project=False``.
    """
    op = "adversarial_step"
    eps = _finite_nonneg(op, "eps", eps)
    alpha = _finite_nonneg(op, "alpha", alpha)
    lo, hi = _clip_range(op, clip)
    ck = Checker(op)
    x = ck.f32(x, "x")
    adv = ck.f32(adv, "adv", shape=x.shape, writable=True)
    grad = ck.f32(grad, "grad", shape=x.shape)
    ck.no_overlap(adv, "adv", (x, "x"), (grad, "grad"))
    rows, cols = _rows_cols(x)
    mod, extra, ctx = ck.backend(x)
    with ctx, _nvtx.annotate(op):
        mod.adv_step(address(x), address(adv), address(grad), rows, cols, eps, alpha, lo, hi,
                     bool(project), *extra)
    return adv
