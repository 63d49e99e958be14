"""Reference implementations of every fastmlp op, written once against the array module.

Each function here has the same name and signature as its kernel counterpart in
``fastmlp.ops``, but is plain array code: ``xp`` is CuPy for CuPy arrays and NumPy
otherwise, so the same lines verify both the C++ and the CUDA kernels. Any float
dtype works; the tests run these in float64 and compare the float32 kernels with
the result.

The reference favours clarity over speed and follows the semantics the kernels
promise:

* ``gemm``: BLAS semantics. When ``beta == 0`` the old contents of ``out`` are
  never read (so NaN in ``out`` does not propagate); ``out=None`` means a fresh
  array and ``beta`` is ignored.
* NaN and Inf propagate as in PyTorch: ``relu`` is ``x < 0 ? 0 : x``
  (``torch.relu``: ``relu(NaN) == NaN``, ``relu(-0.0) == -0.0``) and
  ``relu_backward`` is ``y <= 0 ? 0 : dy`` (torch's ``threshold_backward``: where
  ``y`` is NaN, ``dy`` passes).
* softmax cross-entropy subtracts the row max and uses log-sum-exp, so logits of
  +-1000 give finite results; the loss is the mean over rows.
* ``sgd_step`` / ``adam_step`` / ``rmsprop_step`` follow ``torch.optim.SGD``
  (dampening 0), ``torch.optim.Adam`` / ``AdamW`` and ``torch.optim.RMSprop`` line by
  line and update in place, after the gradient transform (l1 / l2 regularizer
  gradients, clip-by-norm scale, clipvalue; ``grad_clip_scale`` makes the scales).
"""

from __future__ import annotations

import math

import numpy as np

from . import _act_codes

__all__ = [
    "gemm",
    "dense_forward",
    "dense_backward_input",
    "dense_backward_weight",
    "bias_add",
    "bias_grad",
    "relu",
    "relu_backward",
    "softmax_cross_entropy",
    "softmax_cross_entropy_backward",
    "softmax_cross_entropy_fused",
    "random_permutation",
    "philox4x32_10",
    "sgd_step",
    "adam_step",
    "rmsprop_step",
    "grad_clip_scale",
    "batch_norm_forward",
    "batch_norm_backward",
    "layer_norm_forward",
    "layer_norm_backward",
    "ACTIVATIONS",
    "dropout_key",
    "dropout_mask",
    "activation",
    "activation_backward",
    "dropout",
    "dropout_backward",
    "metric_sums",
    "LOSS_KINDS",
    "loss_forward_backward",
    "dp_row_sqnorms",
    "dp_clip_factors",
    "target_seed",
    "ig_interpolate",
    "ig_accumulate",
    "adversarial_key",
    "adversarial_uniform",
    "adversarial_init",
    "adversarial_step",
    "model_predict",
    "model_input_gradient",
    "saliency",
    "gradient_x_input",
    "integrated_gradients",
]

_cupy = None  # the cupy module once imported; False when it cannot be imported


def _cupy_module():
    """CuPy if it imports, else None (imported lazily: CuPy is optional)."""
    global _cupy
    if _cupy is None:
        try:
            import cupy  # noqa: PLC0415 (optional dependency)

            _cupy = cupy
        except Exception:  # ImportError, or a CuPy that cannot find its CUDA libraries
            _cupy = False
    return _cupy or None


def _xp(*arrays):
    """The array module (numpy or cupy) of ``arrays``; ``None`` entries are ignored."""
    cp = _cupy_module()
    if cp is None:
        return np
    return cp.get_array_module(*[a for a in arrays if a is not None])


def _check_out(out, shape, name="out"):
    if out is not None and tuple(out.shape) != tuple(shape):
        raise ValueError(f"'{name}' must have shape {tuple(shape)}, got {tuple(out.shape)}")


def _store(result, out):
    """Return ``result``, or copy it into ``out`` (which may alias an input) and return ``out``."""
    if out is None:
        return result
    _check_out(out, result.shape)
    out[...] = result
    return out


# --------------------------------------------------------------------------- GEMM


def gemm(a, b, *, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, out=None,
         precision=None, row_scale_k=None):
    """C = alpha * op(a) @ op(b) + beta * out, with op(x) = x.T when trans_x.

    ``precision`` is accepted for signature parity and ignored: the reference
    is exact in the inputs' dtype. ``row_scale_k`` (k,): op(b)'s rows scaled
    first, C = alpha * op(a) @ diag(s) @ op(b) + beta * out.
    """
    xp = _xp(a, b, out)
    if a.ndim != 2:
        raise ValueError(f"'a' must be 2-D, got {a.ndim}-D with shape {tuple(a.shape)}")
    if b.ndim != 2:
        raise ValueError(f"'b' must be 2-D, got {b.ndim}-D with shape {tuple(b.shape)}")
    opa = a.T if trans_a else a
    opb = b.T if trans_b else b
    if opa.shape[1] != opb.shape[0]:
        raise ValueError(
            f"'b' must have {opa.shape[1]} rows in op(b) to match op(a) of shape "
            f"{tuple(opa.shape)}, got op(b) of shape {tuple(opb.shape)}"
        )
    m, n = opa.shape[0], opb.shape[1]
    if row_scale_k is not None:
        if row_scale_k.shape != (opb.shape[0],):
            raise ValueError(f"'row_scale_k' must have shape ({opb.shape[0]},), "
                             f"got {tuple(row_scale_k.shape)}")
        opb = row_scale_k[:, None] * opb
    prod = xp.matmul(opa, opb)  # k == 0 gives zeros, as an empty sum should
    if out is None:
        if beta != 0:
            raise ValueError("gemm: beta != 0 accumulates into 'out'; pass out=")
        return (alpha * prod).astype(prod.dtype, copy=False)
    _check_out(out, (m, n))
    if beta == 0:
        # BLAS: beta == 0 means C is write-only, so NaN/Inf already in it must not leak.
        out[...] = alpha * prod
    else:
        out[...] = alpha * prod + beta * out
    return out


def dense_forward(x, w, b=None, *, activation=None, dropout=None, preact_out=None, out=None,
                  precision=None):
    """act(x @ w + b) * dropout mask; preact_out receives x @ w + b when given."""
    z = gemm(x, w)
    if b is not None:
        z = bias_add(z, b)
    if preact_out is not None:
        _store(z, preact_out)
    if activation in (None, "linear", "relu") and dropout is None:
        return _store(relu(z) if activation == "relu" else z, out)
    return _store(_act_fwd(z, _code(activation), dropout), out)


def dense_backward_input(dy, w, *, relu_output=None, activation=None, saved=None,
                         saved_is_input=False, dropout=None, out=None, precision=None):
    """act_grad((dy @ w.T) * mask, saved); relu_output=y is activation="relu", saved=y."""
    if relu_output is not None:
        activation, saved = "relu", relu_output
    dx = gemm(dy, w, trans_b=True)
    return _store(_act_bwd(dx, saved, _code(activation), saved_is_input, dropout), out)


def dense_backward_weight(x, dy, *, row_scale=None, out=None, bias_out=None, bias=True,
                          precision=None):
    """(x.T @ dy, dy.sum(0)) -- the second is None with bias=False.

    row_scale (n,): per-example factors s, (x.T @ (s[:, None] * dy), (s[:, None] * dy).sum(0)),
    computed in the dtype of the arrays (float64 in, float64 out)."""
    if row_scale is not None:
        if row_scale.shape != (dy.shape[0],):
            raise ValueError(f"'row_scale' must have shape ({dy.shape[0]},), "
                             f"got {tuple(row_scale.shape)}")
        dy = row_scale[:, None] * dy
    dw = _store(gemm(x, dy, trans_a=True), out)
    db = _store(bias_grad(dy), bias_out) if bias else None
    return dw, db


# --------------------------------------------------------------------------- bias


def bias_add(x, bias, *, out=None):
    """y = x + bias, broadcasting bias (f,) over the rows of x (n, f)."""
    if x.ndim != 2:
        raise ValueError(f"'x' must be 2-D, got shape {tuple(x.shape)}")
    if bias.shape != (x.shape[1],):
        raise ValueError(f"'bias' must have shape ({x.shape[1]},), got {tuple(bias.shape)}")
    return _store(x + bias[None, :], out)


def bias_grad(dy, *, out=None):
    """Column sums of dy (n, f) -> (f,): the gradient of the bias. n == 0 gives zeros."""
    xp = _xp(dy, out)
    if dy.ndim != 2:
        raise ValueError(f"'dy' must be 2-D, got shape {tuple(dy.shape)}")
    return _store(xp.sum(dy, axis=0), out)


# --------------------------------------------------------------------------- ReLU


def relu(x, *, out=None):
    """x < 0 ? 0 : x, as torch.relu and the kernels: NaN and +Inf pass, -0.0 stays -0.0."""
    xp = _xp(x, out)
    return _store(xp.where(x < 0, xp.zeros((), dtype=x.dtype), x), out)


def relu_backward(dy, y, *, out=None):
    """dx = y <= 0 ? 0 : dy (torch's threshold_backward): a NaN in dy where y <= 0 gives 0,
    and where y is NaN, dy passes."""
    xp = _xp(dy, y, out)
    if dy.shape != y.shape:
        raise ValueError(f"'y' must have the shape of 'dy' {tuple(dy.shape)}, got {tuple(y.shape)}")
    return _store(xp.where(y <= 0, xp.zeros((), dtype=dy.dtype), dy), out)


# --------------------------------------------------------------------------- softmax CE


def _check_labels(xp, labels, n, c):
    """Validate labels against logits/probs of shape (n, c); return True for integer labels."""
    if labels.dtype.kind in "iu":
        if labels.shape != (n,):
            raise ValueError(
                f"'labels' (integer class indices) must have shape ({n},), "
                f"got {tuple(labels.shape)}"
            )
        if n:
            bad = xp.nonzero((labels < 0) | (labels >= c))[0]
            if bad.size:
                row = int(bad[0])
                value = int(labels[row])
                raise ValueError(
                    f"'labels' must lie in [0, {c}): got label {value} at row {row} "
                    f"({int(bad.size)} bad label(s) in all)"
                )
        return True
    if labels.dtype.kind == "f":
        if labels.shape != (n, c):
            raise ValueError(
                f"'labels' (class distributions) must have shape ({n}, {c}), "
                f"got {tuple(labels.shape)}"
            )
        return False
    raise TypeError(
        f"'labels' must be integer class indices or float rows, got dtype {labels.dtype}"
    )


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of softmax(logits) against labels, and the softmax probabilities.

    labels are integer class indices (n,) or float rows (n, c) (one-hot or any
    distribution: row loss = -sum_c y_c * log_softmax(logits)_c). Returns
    ``(loss, probs)`` with ``loss`` a 0-d array; n == 0 gives loss 0.
    """
    xp = _xp(logits, labels)
    if logits.ndim != 2:
        raise ValueError(f"'logits' must be 2-D, got shape {tuple(logits.shape)}")
    n, c = logits.shape
    is_int = _check_labels(xp, labels, n, c)
    if n == 0:
        return xp.zeros((), dtype=logits.dtype), xp.empty((0, c), dtype=logits.dtype)
    # Subtracting the row max makes every exponent <= 0: exp cannot overflow, and the
    # largest term is exp(0) = 1, so the log of the sum is finite for logits of +-1000.
    shifted = logits - xp.max(logits, axis=1, keepdims=True)
    lse = xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))
    logp = shifted - lse
    probs = xp.exp(logp)
    if is_int:
        rows = xp.arange(n)
        per_row = -logp[rows, labels.astype(xp.int64)]
    else:
        per_row = -xp.sum(labels.astype(logits.dtype) * logp, axis=1)
    loss = xp.asarray(xp.sum(per_row) / n, dtype=logits.dtype)
    return loss, probs


def softmax_cross_entropy_backward(probs, labels, *, out=None):
    """d(mean loss)/d(logits) = (probs - onehot(labels)) / n (or (probs - labels) / n)."""
    xp = _xp(probs, labels, out)
    if probs.ndim != 2:
        raise ValueError(f"'probs' must be 2-D, got shape {tuple(probs.shape)}")
    n, c = probs.shape
    is_int = _check_labels(xp, labels, n, c)
    if is_int:
        target = xp.zeros_like(probs)
        if n:
            target[xp.arange(n), labels.astype(xp.int64)] = 1
    else:
        target = labels.astype(probs.dtype)
    grad = (probs - target) / max(n, 1)
    return _store(grad, out)


def softmax_cross_entropy_fused(logits, labels, *, backward=True, out=None):
    """The training step's loss in one call: ``(loss, out, hits)`` where ``out`` is
    d(mean loss)/d(logits) with ``backward`` (else the probabilities) and ``hits``
    counts the rows whose arg-max (the first maximum) equals the label (for float
    rows: the label row's arg-max)."""
    xp = _xp(logits, labels, out)
    loss, probs = softmax_cross_entropy(logits, labels)
    result = softmax_cross_entropy_backward(probs, labels) if backward else probs
    n = logits.shape[0]
    truth = labels if labels.dtype.kind in "iu" else xp.argmax(labels, axis=1)
    hits = int(xp.sum(xp.argmax(logits, axis=1) == truth)) if n else 0
    return loss, _store(result, out), xp.asarray(hits, dtype=xp.int64)


# --------------------------------------------------------------------------- random

_M32 = 0xFFFFFFFF


def philox4x32_10(counter, key):
    """Philox4x32-10 (Salmon et al., SC'11) of the four 32-bit words ``counter`` under
    the two words ``key``, on NumPy uint32 arrays of any (matching) shape: a tuple of
    four arrays."""
    c = [np.asarray(v, dtype=np.uint64) & _M32 for v in counter]
    k0, k1 = (np.asarray(v, dtype=np.uint64) & _M32 for v in key)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & np.uint64(_M32),
             (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & np.uint64(_M32)]
        k0 = (k0 + np.uint64(0x9E3779B9)) & np.uint64(_M32)
        k1 = (k1 + np.uint64(0xBB67AE85)) & np.uint64(_M32)
    return tuple(v.astype(np.uint32) for v in c)


def random_permutation(n, seed, counter, *, xp=np):
    """The permutation of [0, n) numbered ``counter`` of stream ``seed``: a 4-round
    Feistel network whose round function is Philox, with cycle-walking (see
    kernel_math.h, ``permute_index``), written out in array code."""
    n, seed, counter = int(n), int(seed) & (2**64 - 1), int(counter) & (2**64 - 1)
    if n == 0:
        return xp.zeros((0,), dtype=xp.int64)
    k = philox4x32_10((counter & _M32, counter >> 32, 0x5348554F, 0),
                      (seed & _M32, seed >> 32))
    k0, k1 = int(k[0]), int(k[1])
    bits = max(0, (n - 1).bit_length())
    half = 1 if bits < 2 else (bits + 1) // 2
    mask = np.uint64((1 << half) - 1)

    def encrypt(x):
        left, right = (x >> np.uint64(half)) & mask, x & mask
        for r in range(4):
            f = philox4x32_10((right, r, 0, 0), (k0, k1))[0].astype(np.uint64)
            left, right = right, left ^ (f & mask)
        return (left << np.uint64(half)) | right

    x = encrypt(np.arange(n, dtype=np.uint64))
    while True:  # cycle-walking: re-encrypt what landed outside [0, n)
        out = x >= np.uint64(n)
        if not out.any():
            break
        x[out] = encrypt(x[out])
    return xp.asarray(x.astype(np.int64))


# --------------------------------------------------------------------------- optimizers


def noise_key(seed):
    """The DP-SGD noise key (k0, k1) of ``seed`` (kernel_math.h noise_key)."""
    seed = int(seed) & (2**64 - 1)
    k = philox4x32_10((0, 0, 0x4E4F4953, 0), (seed & _M32, seed >> 32))
    return int(k[0]), int(k[1])


def gaussian_noise(size, seed, step, offset=0, *, xp=np):
    """Numbers ``offset .. offset + size - 1`` of the Gaussian stream (seed, step), in
    float64: Philox4x32-10 of counter (e // 4 as two words, step as two words) under
    noise_key(seed) gives words v0..v3; with u = ((v >> 8) + 0.5) 2^-24 (exact in
    float64), Box-Muller in float64 maps (v0, v1) to z0 = r cos(2 pi u1'), z1 = r
    sin(2 pi u1') with r = sqrt(-2 log u0), (v2, v3) to z2, z3; element e is z_(e % 4).
    The kernels compute the same numbers in float32 (kernel_math.h gaussian_noise)."""
    size, offset = int(size), int(offset)
    step = int(step) & (2**64 - 1)
    k0, k1 = noise_key(seed)
    if size == 0:
        return xp.zeros((0,), dtype=xp.float64)
    b_first, b_last = offset // 4, (offset + size - 1) // 4
    b = xp.arange(b_last - b_first + 1, dtype=xp.uint64) + xp.uint64(b_first)
    v = _xp_philox(xp, (b, b >> xp.uint64(32), step & _M32, step >> 32), (k0, k1))
    nb = b.size
    u = [((xp.broadcast_to(w, (nb,)) >> xp.uint64(8)).astype(xp.float64) + 0.5) * 2.0**-24
         for w in v]
    r01, r23 = xp.sqrt(-2.0 * xp.log(u[0])), xp.sqrt(-2.0 * xp.log(u[2]))
    a01, a23 = 2.0 * math.pi * u[1], 2.0 * math.pi * u[3]
    z = xp.stack([r01 * xp.cos(a01), r01 * xp.sin(a01), r23 * xp.cos(a23), r23 * xp.sin(a23)],
                 axis=1).reshape(-1)
    start = offset - 4 * b_first
    return z[start:start + size]


def _transform_grad(param, grad, l1=0.0, l2=0.0, clip_scale=None, clipvalue=0.0,
                    penalty_out=None, noise_std=None, noise_seed=0, noise_step=1,
                    noise_offset=0):
    """The optimizers' gradient transform (w: the parameter before the update):
    ``g + noise_std[0] z`` (z: :func:`gaussian_noise` of the flat elements from
    ``noise_offset``, when noise_std is given), ``+ l1 sign(w) + 2 l2 w``, times
    ``clip_scale[0]``, clipped to +-clipvalue when clipvalue > 0;
    ``penalty_out[0] = l1 sum|w| + l2 sum w^2`` in float64."""
    xp = _xp(param, grad)
    if penalty_out is not None:
        w = param.astype(np.float64)
        penalty_out[...] = l1 * xp.abs(w).sum() + l2 * (w * w).sum()
    g = grad
    if noise_std is not None:
        z = gaussian_noise(grad.size, noise_seed, noise_step, noise_offset, xp=xp)
        g = g + noise_std.reshape(-1)[0] * z.reshape(grad.shape)
    if l1 != 0:
        g = g + l1 * xp.sign(param)
    if l2 != 0:
        g = g + 2 * l2 * param
    if clip_scale is not None:
        g = g * clip_scale.reshape(-1)[0]
    if clipvalue > 0:
        g = xp.clip(g, -clipvalue, clipvalue)
    return g


def sgd_step(param, grad, buf, *, lr, momentum=0.0, nesterov=False, weight_decay=0.0,
             l1=0.0, l2=0.0, clip_scale=None, clipvalue=0.0, penalty_out=None,
             noise_std=None, noise_seed=0, noise_step=1, noise_offset=0):
    """One torch.optim.SGD step (dampening 0), in place on param (and buf); returns param.

    buf starts at zeros: momentum * 0 + g == g, which is torch's first-step buf = g.
    l1, l2, clip_scale, clipvalue, penalty_out, noise_*: the gradient transform, first.
    """
    if grad.shape != param.shape:
        raise ValueError(
            f"'grad' must have the shape of 'param' {tuple(param.shape)}, got {tuple(grad.shape)}"
        )
    if nesterov and momentum == 0:
        raise ValueError("nesterov momentum needs 'momentum' > 0, got 0")
    g = _transform_grad(param, grad, l1, l2, clip_scale, clipvalue, penalty_out,
                        noise_std, noise_seed, noise_step, noise_offset)
    if weight_decay != 0:
        g = g + weight_decay * param
    if momentum != 0:
        if buf is None:
            raise ValueError(
                "'buf' must be an array of the shape of 'param' when momentum != 0, got None"
            )
        if buf.shape != param.shape:
            raise ValueError(
                f"'buf' must have the shape of 'param' {tuple(param.shape)}, got {tuple(buf.shape)}"
            )
        buf[...] = momentum * buf + g
        g = g + momentum * buf if nesterov else buf
    param[...] = param - lr * g
    return param


def adam_step(
    param,
    grad,
    m,
    v,
    *,
    step,
    lr,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    decoupled=False,
    l1=0.0,
    l2=0.0,
    clip_scale=None,
    clipvalue=0.0,
    penalty_out=None,
    noise_std=None,
    noise_seed=0,
    noise_step=1,
    noise_offset=0,
):
    """One torch.optim.Adam (decoupled=False) / AdamW (decoupled=True) step in place; returns param.

    step is the 1-based count of steps including this one (it sets the bias corrections).
    l1, l2, clip_scale, clipvalue, penalty_out, noise_*: the gradient transform, first.
    """
    xp = _xp(param, grad, m, v)
    for name, arr in (("grad", grad), ("m", m), ("v", v)):
        if arr.shape != param.shape:
            raise ValueError(
                f"'{name}' must have the shape of 'param' {tuple(param.shape)}, "
                f"got {tuple(arr.shape)}"
            )
    if int(step) < 1:
        raise ValueError(f"'step' must be >= 1 (1-based), got {step}")
    g = _transform_grad(param, grad, l1, l2, clip_scale, clipvalue, penalty_out,
                        noise_std, noise_seed, noise_step, noise_offset)
    if weight_decay != 0:
        if decoupled:
            param[...] = param * (1 - lr * weight_decay)  # AdamW: decay the weights themselves
        else:
            g = g + weight_decay * param  # Adam: L2 penalty folded into the gradient
    m[...] = m + (1 - beta1) * (g - m)  # torch's exp_avg.lerp_(grad, 1 - beta1)
    v[...] = v * beta2 + (1 - beta2) * g * g
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    # eps goes outside the square root and after the bias correction, as in torch.
    denom = xp.sqrt(v) / math.sqrt(bias_correction2) + eps
    param[...] = param - step_size * (m / denom)
    return param


def rmsprop_step(param, grad, square_avg, momentum_buffer, grad_avg, *, lr, alpha=0.99,
                 eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, l1=0.0, l2=0.0,
                 clip_scale=None, clipvalue=0.0, penalty_out=None, noise_std=None,
                 noise_seed=0, noise_step=1, noise_offset=0):
    """One torch.optim.RMSprop step in place (the buffers start at zeros); returns param.

    momentum_buffer is used when momentum > 0, grad_avg when centered (else may be None).
    l1, l2, clip_scale, clipvalue, penalty_out, noise_*: the gradient transform, first.
    """
    xp = _xp(param, grad, square_avg)
    if momentum and momentum_buffer is None:
        raise ValueError("'momentum_buffer' is needed when momentum > 0, got None")
    if centered and grad_avg is None:
        raise ValueError("'grad_avg' is needed when centered, got None")
    for name, arr in (("grad", grad), ("square_avg", square_avg),
                      ("momentum_buffer", momentum_buffer if momentum else None),
                      ("grad_avg", grad_avg if centered else None)):
        if arr is not None and arr.shape != param.shape:
            raise ValueError(f"'{name}' must have the shape of 'param' {tuple(param.shape)}, "
                             f"got {tuple(arr.shape)}")
    g = _transform_grad(param, grad, l1, l2, clip_scale, clipvalue, penalty_out,
                        noise_std, noise_seed, noise_step, noise_offset)
    if weight_decay != 0:
        g = g + weight_decay * param
    square_avg[...] = square_avg * alpha + (1 - alpha) * g * g
    if centered:
        grad_avg[...] = grad_avg + (1 - alpha) * (g - grad_avg)  # grad_avg.lerp_(g, 1 - alpha)
        avg = xp.sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        avg = xp.sqrt(square_avg) + eps
    if momentum > 0:
        momentum_buffer[...] = momentum_buffer * momentum + g / avg
        param[...] = param - lr * momentum_buffer
    else:
        param[...] = param - lr * (g / avg)
    return param


def grad_clip_scale(params_flat, grads_flat, offsets, l1l2=None, *, mode, max_norm, out=None):
    """Clip-by-norm scales of the segments [offsets[k], offsets[k+1]) (float64 sums):
    per tensor (mode "per_tensor" / 0) min(1, max_norm / (||g_k|| + 1e-6)) with g_k the
    segment's gradient plus l1_k sign(w) + 2 l2_k w; global (mode "global" / 1) the same
    of the norm over all segments, for every k."""
    xp = _xp(params_flat, grads_flat)
    if mode not in ("per_tensor", "global", 0, 1):
        raise ValueError(f"mode must be 'per_tensor' or 'global', got {mode!r}")
    glob = mode in ("global", 1)
    off = [int(o) for o in (offsets.get() if hasattr(offsets, "get") else offsets)]
    nseg = len(off) - 1
    coef = None if l1l2 is None else [float(c) for c in
                                      (l1l2.get() if hasattr(l1l2, "get") else l1l2)]
    sums = []
    for k in range(nseg):
        w = params_flat[off[k]:off[k + 1]].astype(np.float64)
        g = grads_flat[off[k]:off[k + 1]].astype(np.float64)
        if coef is not None:
            g = g + coef[2 * k] * xp.sign(w) + 2 * coef[2 * k + 1] * w
        sums.append(float((g * g).sum()))
    if glob:
        norms = [math.sqrt(sum(sums))] * nseg
    else:
        norms = [math.sqrt(s) for s in sums]
    scales = xp.asarray([min(1.0, max_norm / (n + 1e-6)) for n in norms], dtype=np.float32)
    if out is not None:
        _check_out(out, (nseg,))
        out[...] = scales
        return out
    return scales


# --------------------------------------------------------------------------- normalisation


def _affine(xhat, gamma, beta):
    """xhat * gamma + beta, either of them None (Keras' scale / center off)."""
    y = xhat if gamma is None else xhat * gamma[None, :]
    return y if beta is None else y + beta[None, :]


def batch_norm_forward(x, gamma, beta, moving_mean, moving_var, *, training, momentum=0.99,
                       epsilon=1e-3, out=None, save_mean=None, save_invstd=None):
    """Keras BatchNormalization per column of x (n, f): ``(y, save_mean, save_invstd)`` in
    training (batch mean and biased variance; the moving statistics updated in place as
    ``moving * momentum + batch * (1 - momentum)``), ``(y, None, None)`` in inference (the
    moving statistics normalise). n == 0 in training: nothing is updated, save_* are NaN."""
    xp = _xp(x, gamma, beta, moving_mean, moving_var)
    if x.ndim != 2:
        raise ValueError(f"'x' must be 2-D, got shape {tuple(x.shape)}")
    if not epsilon > 0:
        raise ValueError(f"'epsilon' must be > 0, got {epsilon!r}")
    if not 0 <= momentum <= 1:
        raise ValueError(f"'momentum' must be in [0, 1], got {momentum!r}")
    n, f = x.shape
    if not training:
        invstd = 1 / xp.sqrt(moving_var + epsilon)
        y = _affine((x - moving_mean[None, :]) * invstd[None, :], gamma, beta)
        return _store(y.astype(x.dtype, copy=False), out), None, None
    if n == 0:
        mean = xp.full((f,), xp.nan, dtype=x.dtype)
        invstd = mean.copy()
        y = xp.empty((0, f), dtype=x.dtype)
    else:
        mean = xp.mean(x, axis=0)
        var = xp.mean((x - mean[None, :]) ** 2, axis=0)  # biased, as Keras and torch's forward
        invstd = 1 / xp.sqrt(var + epsilon)
        y = _affine((x - mean[None, :]) * invstd[None, :], gamma, beta)
        moving_mean[...] = moving_mean * momentum + mean * (1 - momentum)
        moving_var[...] = moving_var * momentum + var * (1 - momentum)
    return (_store(y, out), _store(mean, save_mean), _store(invstd, save_invstd))


def batch_norm_backward(dy, x, gamma, save_mean, save_invstd, *, out=None, dgamma_out=None,
                        dbeta_out=None):
    """Gradients of the training forward: ``(dx, dgamma, dbeta)`` with xhat = (x - mean) *
    invstd, dbeta = sum_r dy, dgamma = sum_r dy * xhat and
    dx = gamma * invstd / n * (n * dy - dbeta - xhat * dgamma)."""
    xp = _xp(dy, x, gamma, save_mean, save_invstd)
    n = dy.shape[0]
    xhat = (x - save_mean[None, :]) * save_invstd[None, :]
    dbeta = xp.sum(dy, axis=0)
    dgamma = xp.sum(dy * xhat, axis=0)
    scale = save_invstd if gamma is None else gamma * save_invstd
    dx = scale[None, :] / max(n, 1) * (n * dy - dbeta[None, :] - xhat * dgamma[None, :])
    return _store(dx, out), _store(dgamma, dgamma_out), _store(dbeta, dbeta_out)


def layer_norm_forward(x, gamma, beta, *, epsilon=1e-3, out=None, save_mean=None,
                       save_invstd=None):
    """Keras LayerNormalization over the last axis of x (n, f): ``(y, save_mean,
    save_invstd)`` with the per-row mean and 1 / sqrt(biased var + epsilon), (n,) each.
    f == 0: save_* are NaN."""
    xp = _xp(x, gamma, beta)
    if x.ndim != 2:
        raise ValueError(f"'x' must be 2-D, got shape {tuple(x.shape)}")
    if not epsilon > 0:
        raise ValueError(f"'epsilon' must be > 0, got {epsilon!r}")
    n, f = x.shape
    if f == 0:
        mean = xp.full((n,), xp.nan, dtype=x.dtype)
        return _store(xp.empty((n, 0), dtype=x.dtype), out), _store(mean, save_mean), \
            _store(mean.copy(), save_invstd)
    mean = xp.mean(x, axis=1)
    var = xp.mean((x - mean[:, None]) ** 2, axis=1)
    invstd = 1 / xp.sqrt(var + epsilon)
    y = _affine((x - mean[:, None]) * invstd[:, None], gamma, beta)
    return _store(y, out), _store(mean, save_mean), _store(invstd, save_invstd)


def layer_norm_backward(dy, x, gamma, save_mean, save_invstd, *, out=None, dgamma_out=None,
                        dbeta_out=None):
    """Gradients of layer_norm_forward: ``(dx, dgamma, dbeta)`` with g = dy * gamma,
    dx = invstd / f * (f * g - sum_c g - xhat * sum_c g * xhat), dgamma = sum_r dy * xhat,
    dbeta = sum_r dy."""
    xp = _xp(dy, x, gamma, save_mean, save_invstd)
    f = dy.shape[1]
    xhat = (x - save_mean[:, None]) * save_invstd[:, None]
    g = dy if gamma is None else dy * gamma[None, :]
    sg = xp.sum(g, axis=1, keepdims=True)
    sgx = xp.sum(g * xhat, axis=1, keepdims=True)
    dx = save_invstd[:, None] / max(f, 1) * (f * g - sg - xhat * sgx)
    return (_store(dx, out), _store(xp.sum(dy * xhat, axis=0), dgamma_out),
            _store(xp.sum(dy, axis=0), dbeta_out))
# --------------------------------------------------------------------------- activations
# (issue 15) The elementwise activations of kernel_math.h, in the input's dtype
# (the tests use float64), and inverted dropout with the kernels' Philox mask.

ACTIVATIONS = _act_codes.ACTIVATIONS
_NEEDS_INPUT = _act_codes.NEEDS_INPUT
_LEAKY_SLOPE = 0.2


def _code(name):
    if name is None:
        return 0
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected None or one of "
                         + ", ".join(repr(k) for k in ACTIVATIONS))
    return ACTIVATIONS[name]


def _erf(xp, x):
    """erf elementwise: SciPy / cupyx when present, else math.erf per element (float64)."""
    if xp is not np:
        from cupyx.scipy.special import erf  # noqa: PLC0415

        return erf(x)
    try:
        from scipy.special import erf  # noqa: PLC0415

        return erf(x)
    except ImportError:
        return np.vectorize(math.erf, otypes=[np.float64])(x).astype(x.dtype, copy=False)


def _sigmoid(xp, x):
    # exp(-x) overflows to inf for x < -709 (float64): 1 / inf = 0 is the right limit.
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + xp.exp(-x))


def _act(xp, x, code):
    zero = xp.zeros((), dtype=x.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        if code == 1:
            return xp.where(x < 0, zero, x)
        if code == 2:
            return _sigmoid(xp, x)
        if code == 3:
            return xp.tanh(x)
        if code == 4:
            return 0.5 * x * (1.0 + _erf(xp, x / math.sqrt(2.0)))
        if code == 5:
            return x * _sigmoid(xp, x)
        if code == 6:
            return xp.where(x > 0, x, xp.expm1(xp.minimum(x, zero)))
        if code == 7:
            return xp.maximum(x, zero) + xp.log1p(xp.exp(-xp.abs(x)))
        if code == 8:
            return xp.where(x > 0, x, x * _LEAKY_SLOPE)
    return x


def _grad_from_output(xp, dy, y, code):
    zero = xp.zeros((), dtype=dy.dtype)
    if code == 1:
        return xp.where(y <= 0, zero, dy)
    if code == 2:
        return dy * (1.0 - y) * y
    if code == 3:
        return dy * (1.0 - y * y)
    if code == 6:
        return xp.where(y <= 0, dy * (y + 1.0), dy)  # torch: where y is NaN, dy passes
    if code == 8:
        return xp.where(y > 0, dy, dy * _LEAKY_SLOPE)
    return dy


def _grad_from_input(xp, dy, z, code):
    with np.errstate(over="ignore", invalid="ignore"):
        if code == 4:
            cdf = 0.5 * (1.0 + _erf(xp, z / math.sqrt(2.0)))
            pdf = xp.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
            return dy * (cdf + z * pdf)
        if code == 5:
            s = _sigmoid(xp, z)
            return dy * (s * (1.0 + z * (1.0 - s)))
        if code == 7:
            return dy * _sigmoid(xp, z)
        return _grad_from_output(xp, dy, _act(xp, z, code), code)


def _xp_philox(xp, counter, key):
    """Philox4x32-10 (as :func:`philox4x32_10`) on arrays of the module xp (uint64 lanes)."""
    m32 = xp.uint64(_M32)
    c = [xp.asarray(v, dtype=xp.uint64) & m32 for v in counter]
    k0, k1 = (xp.asarray(v, dtype=xp.uint64) & m32 for v in key)
    for _ in range(10):
        p0 = xp.uint64(0xD2511F53) * c[0]
        p1 = xp.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> xp.uint64(32)) ^ c[1] ^ k0, p1 & m32,
             (p0 >> xp.uint64(32)) ^ c[3] ^ k1, p0 & m32]
        k0 = (k0 + xp.uint64(0x9E3779B9)) & m32
        k1 = (k1 + xp.uint64(0xBB67AE85)) & m32
    return c


def dropout_key(seed, layer):
    """The dropout key (k0, k1) of layer ``layer`` under ``seed`` (kernel_math.h)."""
    seed, layer = int(seed) & (2**64 - 1), int(layer) & (2**64 - 1)
    k = philox4x32_10((layer & _M32, layer >> 32, 0x44524F50, 0), (seed & _M32, seed >> 32))
    return int(k[0]), int(k[1])


def _dropout_constants(rate):
    r = float(rate)
    if isinstance(rate, bool) or not (0.0 <= r < 1.0):
        raise ValueError(f"dropout rate must be in [0, 1), got {rate!r}")
    return min(round(r * 2.0**32), 2**32 - 1), float(np.float32(1.0 / (1.0 - r)))


def dropout_mask(size, rate, seed, step, layer=0, *, xp=np, dtype=np.float64):
    """The multipliers (0 or scale) of elements 0..size-1: element e is dropped when
    Philox4x32-10 of counter (e // 4 as two words, step as two words) under
    dropout_key(seed, layer), lane e % 4, is below the threshold."""
    threshold, scale = _dropout_constants(rate)
    if threshold == 0:
        return xp.ones((size,), dtype=dtype)
    step = int(step[0]) if hasattr(step, "shape") else int(step)
    step &= 2**64 - 1
    k0, k1 = dropout_key(seed, layer)
    nb = (size + 3) // 4
    b = xp.arange(nb, dtype=xp.uint64)
    r = _xp_philox(xp, (b, b >> xp.uint64(32), step & _M32, step >> 32), (k0, k1))
    bits = xp.stack([xp.broadcast_to(v, (nb,)) for v in r], axis=1).reshape(-1)[:size]
    return xp.where(bits < xp.uint64(threshold), xp.zeros((), dtype), xp.asarray(scale, dtype))


def _mask_like(xp, t, d):
    rate, seed, step = d[0], d[1], d[2]
    layer = d[3] if len(d) > 3 else 0
    return dropout_mask(t.size, rate, seed, step, layer, xp=xp, dtype=t.dtype).reshape(t.shape)


def _act_fwd(z, code, dropout):
    xp = _xp(z)
    y = _act(xp, z, code)
    if dropout is not None:
        y = y * _mask_like(xp, y, dropout)  # t * m, as the kernels: NaN stays NaN
    return y


def _act_bwd(dy, saved, code, saved_is_input, dropout):
    xp = _xp(dy, saved)
    g = dy
    if dropout is not None:
        g = g * _mask_like(xp, g, dropout)
    if code == 0:
        return g
    if code in _NEEDS_INPUT and not saved_is_input:
        raise ValueError("the derivative of this activation needs its input (saved_is_input)")
    return _grad_from_input(xp, g, saved, code) if saved_is_input \
        else _grad_from_output(xp, g, saved, code)


def activation(x, name, *, dropout=None, out=None):
    """act(x) * dropout mask (element index: the flat C-order index)."""
    return _store(_act_fwd(x, _code(name), dropout), out)


def activation_backward(dy, saved, name, *, saved_is_input=False, dropout=None, out=None):
    """act_grad(dy * mask, saved), saved the output (default) or the input."""
    return _store(_act_bwd(dy, saved, _code(name), saved_is_input, dropout), out)


def dropout(x, rate, *, seed, step, layer=0, out=None):
    """x * mask, mask 0 (probability rate) or float32(1 / (1 - rate))."""
    return activation(x, "linear", dropout=(rate, seed, step, layer), out=out)


def dropout_backward(dy, rate, *, seed, step, layer=0, out=None):
    """dy * the forward's mask."""
    return activation_backward(dy, None, "linear", dropout=(rate, seed, step, layer), out=out)


# ------------------------------------------------------------------ [issue 16] metrics

_METRIC_ORDER = ("argmax", "binary", "top_k", "abs", "sq")   # fastmlp.ops.METRIC_FLAGS


def metric_sums(pred, labels, metrics, *, transform="none", k=5, threshold=0.5, probs_out=None):
    """fastmlp.ops.metric_sums in float64: a dict name -> sum over rows of the per-row
    values (argmax, binary, top_k, abs, sq; the rules in the op's docstring).

    p = transform(pred) in float64 (stored as float32 in ``probs_out`` when given); argmax
    and top_k compare ``pred``; the threshold is taken as float32, as the kernel's."""
    if isinstance(metrics, str):
        metrics = [metrics]
    names = list(metrics)
    for name in names:
        if name not in _METRIC_ORDER:
            raise ValueError(f"unknown metric {name!r}")
    if transform not in ("none", "sigmoid", "softmax"):
        raise ValueError(f"unknown transform {transform!r}")
    xp = _xp(pred, labels, probs_out)
    if pred.ndim != 2:
        raise ValueError(f"'pred' must be 2-D, got shape {tuple(pred.shape)}")
    n, c = pred.shape
    is_int = labels.dtype.kind in "iu"
    if is_int and any(name in ("binary", "abs", "sq") for name in names):
        raise ValueError("binary / abs / sq need float label rows")
    if n == 0:
        return {name: 0.0 for name in names}
    z = pred.astype(xp.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        if transform == "sigmoid":
            p = _sigmoid(xp, z)
        elif transform == "softmax":
            e = xp.exp(z - xp.max(z, axis=1, keepdims=True))   # every exponent <= 0
            p = e / xp.sum(e, axis=1, keepdims=True)
        else:
            p = z
    if probs_out is not None:
        _store(p.astype(xp.float32), probs_out)

    # The label as a class index t, valid where it exists; a NaN in pred or in the
    # float label row makes the row a miss for the hit metrics.
    rows = xp.arange(n)
    if is_int:
        lab = labels.astype(xp.int64)
        valid = (lab >= 0) & (lab < c)
        t = xp.where(valid, lab, 0)
    else:
        y = labels.astype(xp.float64)
        valid = ~xp.any(xp.isnan(y), axis=1)
        t = xp.argmax(xp.where(xp.isnan(y), -xp.inf, y), axis=1)   # the first maximum
    ok = valid & ~xp.any(xp.isnan(z), axis=1)
    out = {}
    for name in names:
        if name == "argmax":
            v = ok & (xp.argmax(z, axis=1) == t)
        elif name == "top_k":
            greater = xp.sum(z > z[rows, t][:, None], axis=1)
            v = ok & (greater < k)
        elif name == "binary":
            thr = float(np.float32(threshold))
            v = xp.mean(((p > thr) == (y > 0.5)).astype(xp.float64), axis=1)
        elif name == "abs":
            v = xp.mean(xp.abs(p - y), axis=1)
        else:
            v = xp.mean((p - y) ** 2, axis=1)
        out[name] = float(xp.sum(v.astype(xp.float64)))
    return out
# --------------------------------------------------------------------------- losses (issue 16)

LOSS_KINDS = ("mse", "mae", "huber", "bce_logits", "bce_probs", "cce_logits", "cce_probs")

# Keras' backend epsilon as float32, and the upper clamp float32(1 - 1e-7) (= 1 - 2**-23
# rounded: 0.99999988), where the probability losses clamp.
_PROB_LO = float(np.float32(1e-7))
_PROB_HI = float(np.float32(1.0 - 1e-7))


def _loss_rows(xp, kind, p, y, delta, ls):
    """Per-row losses L (n,) and dL/dp (n, c) of one kind, in p's (float64) dtype.

    p, y: (n, c); y is the float target rows (for the cross-entropies: the one-hot
    or float rows before smoothing). See fastmlp.ops.loss_forward_backward."""
    c = p.shape[1]
    if kind in ("mse", "mae", "huber", "bce_logits", "bce_probs"):
        d = p - y
        if kind == "mse":
            el, g = d * d, 2 * d
        elif kind == "mae":
            el, g = xp.abs(d), xp.sign(d)
        elif kind == "huber":
            small = xp.abs(d) <= delta
            el = xp.where(small, 0.5 * d * d, delta * (xp.abs(d) - 0.5 * delta))
            g = xp.where(small, d, delta * xp.sign(d))
        elif kind == "bce_logits":
            t = y * (1 - ls) + 0.5 * ls
            el = xp.maximum(p, 0) - p * t + xp.log1p(xp.exp(-xp.abs(p)))
            g = 1 / (1 + xp.exp(-p)) - t
        else:  # bce_probs, Keras from_logits=False
            t = y * (1 - ls) + 0.5 * ls
            q = xp.clip(p, _PROB_LO, _PROB_HI)
            el = -(t * xp.log(q) + (1 - t) * xp.log(1 - q))
            inside = (p >= _PROB_LO) & (p <= _PROB_HI)
            g = xp.where(inside, (q - t) / (q * (1 - q)), 0.0)
        return el.mean(axis=1), g / c
    t = (1 - ls) * y + ls / c
    if kind == "cce_logits":
        shifted = p - xp.max(p, axis=1, keepdims=True)
        logp = shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))
        # the exact gradient of -sum t log softmax: softmax * sum(t) - t
        return -xp.sum(t * logp, axis=1), xp.exp(logp) * t.sum(axis=1, keepdims=True) - t
    # cce_probs, Keras from_logits=False: normalise, clamp, log
    s = p.sum(axis=1, keepdims=True)
    u = p / s
    q = xp.clip(u, _PROB_LO, _PROB_HI)
    gq = xp.where((u >= _PROB_LO) & (u <= _PROB_HI), -t / q, 0.0)
    grad = (gq - xp.sum(gq * u, axis=1, keepdims=True)) / s
    return -xp.sum(t * xp.log(q), axis=1), grad


def loss_forward_backward(kind, pred, target, *, sample_weight=None, delta=1.0,
                          label_smoothing=0.0, backward=True, out=None):
    """``(loss, dpred)`` of fastmlp.ops.loss_forward_backward, in float64.

    loss = sum_r w_r L_r / rows (a float; 0 for no rows) and, with ``backward``,
    dpred = d loss / d pred as float32 (``out`` written when given), else None.
    Integer labels (cross-entropy kinds) must lie in [0, cols)."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"'kind' must be one of {LOSS_KINDS}, got {kind!r}")
    xp = _xp(pred, target, sample_weight, out)
    if pred.ndim != 2:
        raise ValueError(f"'pred' must be 2-D, got shape {tuple(pred.shape)}")
    n, c = pred.shape
    p = pred.astype(xp.float64)
    if target.dtype.kind in "iu":
        if kind not in ("cce_logits", "cce_probs"):
            raise ValueError(f"loss {kind!r} needs float target rows, got integer labels")
        _check_labels(xp, target, n, c)
        y = xp.zeros((n, c), dtype=xp.float64)
        if n:
            y[xp.arange(n), target.astype(xp.int64)] = 1
    else:
        if tuple(target.shape) != (n, c):
            raise ValueError(f"'target' must have shape {(n, c)}, got {tuple(target.shape)}")
        y = target.astype(xp.float64)
    w = xp.ones(n) if sample_weight is None else sample_weight.astype(xp.float64)
    if n == 0:
        per_row, grad = xp.zeros(0), xp.zeros((0, c))
    else:
        per_row, grad = _loss_rows(xp, kind, p, y, float(delta), float(label_smoothing))
    loss = float(xp.sum(w * per_row) / n) if n else 0.0
    if not backward:
        return loss, None
    dpred = (grad * (w / max(n, 1))[:, None]).astype(xp.float32)
    return loss, _store(dpred, out)


# --------------------------------------------------------------------------- DP-SGD [issue 17]


def dp_row_sqnorms(x, dz, *, bias=True, out=None, accumulate=False):
    """Per-example squared gradient norms of one Dense layer: ``(out if accumulate else 0)
    + (||x[r]||^2 + bias) * ||dz[r]||^2`` per row r, computed in float64; the result has
    ``out``'s dtype (written in place) or, without ``out``, the inputs' float dtype."""
    xp = _xp(x, dz, out)
    if x.ndim != 2 or dz.ndim != 2 or x.shape[0] != dz.shape[0]:
        raise ValueError(f"'x' and 'dz' must be 2-D with the same rows, got shapes "
                         f"{tuple(x.shape)} and {tuple(dz.shape)}")
    if accumulate and out is None:
        raise ValueError("accumulate=True needs 'out'")
    _check_out(out, (x.shape[0],))
    sx = (x.astype(xp.float64) ** 2).sum(axis=1)
    sdz = (dz.astype(xp.float64) ** 2).sum(axis=1)
    v = (sx + (1.0 if bias else 0.0)) * sdz
    if accumulate:
        v = out.astype(xp.float64) + v
    if out is None:
        return v.astype(xp.result_type(x.dtype, dz.dtype))
    out[...] = v
    return out


def dp_clip_factors(sqnorms, *, clip, noise_multiplier=0.0, grad_scale, divisor, std_out=None):
    """In place: ``sqnorms[r]`` becomes ``min(1, clip / (grad_scale * sqrt(sqnorms[r]) + 1e-6))
    * grad_scale / divisor`` (Opacus's clip factor; float64 math, a NaN stays NaN); with
    ``std_out``, ``std_out[0] = noise_multiplier * clip / divisor``. Returns ``sqnorms``."""
    xp = _xp(sqnorms, std_out)
    norm = grad_scale * xp.sqrt(sqnorms.astype(xp.float64))
    c = clip / (norm + 1e-6)
    c = xp.where(c > 1.0, 1.0, c)  # NaN > 1 is False: a NaN norm keeps its NaN
    sqnorms[...] = c * grad_scale / divisor
    if std_out is not None:
        _check_out(std_out, (1,), "std_out")
        std_out[0] = noise_multiplier * clip / divisor
    return sqnorms


# --------------------------------------------------------------- explain, adversarial [issue 18]


def _step_value(step):
    """The int of a step given as an int or a 1-element array (NumPy or CuPy)."""
    return int(step[0]) if hasattr(step, "shape") else int(step)


def target_seed(logits, targets, *, transform="none", out=None):
    """``d f(z_r)[t_r] / d z_r`` per row r in float64 math: ``"none"`` one-hot at t,
    ``"sigmoid"`` ``s(z_t) s(-z_t)`` (= s (1 - s)) at t and 0 elsewhere, ``"softmax"``
    ``p_t (onehot - p)`` with p the max-subtracted row softmax. A row whose target is
    outside [0, c) is all zeros. The result has ``logits``' dtype (or ``out``'s)."""
    xp = _xp(logits, targets, out)
    if transform not in ("none", "sigmoid", "softmax"):
        raise ValueError(f"unknown transform {transform!r}")
    n, c = logits.shape
    _check_out(out, (n, c))
    z = logits.astype(xp.float64)
    t = targets.astype(xp.int64)
    valid = (t >= 0) & (t < c)
    onehot = (xp.arange(c)[None, :] == t[:, None]) & valid[:, None]
    g = xp.zeros((n, c), dtype=xp.float64)
    if n and c:
        tc = xp.where(valid, t, 0)
        zt = z[xp.arange(n), tc]
        if transform == "none":
            g = onehot.astype(xp.float64)
        elif transform == "sigmoid":
            q = xp.exp(-xp.abs(zt))  # s(z) s(-z) = e^-|z| / (1 + e^-|z|)^2: no overflow
            d = q / (1.0 + q) ** 2
            g = xp.where(onehot, d[:, None], 0.0)
        else:
            e = xp.exp(z - z.max(axis=1, keepdims=True))
            p = e / e.sum(axis=1, keepdims=True)
            pt = p[xp.arange(n), tc]
            g = xp.where(valid[:, None], pt[:, None] * (onehot - p), 0.0)
    if out is None:
        return g.astype(logits.dtype)
    out[...] = g
    return out


def ig_interpolate(x, alphas, *, baseline=None, targets=None, step=0, batch=None, rows=None,
                   out=None, targets_out=None):
    """Virtual rows ``step * batch`` .. (+ rows) of the path points of x: row v is image
    ``i = v // steps`` at ``a = alphas[v % steps]``, ``b + a * (x[i] - b)`` (baseline
    None: ``a * (x[i] - 0)``), each operation in float32 (NumPy's float32 arithmetic
    rounds each one correctly, as the kernels). Rows past ``images * steps`` stay as
    they were (zeros in a new ``out``). Returns out, or (out, targets_out) with targets."""
    xp = _xp(x, alphas, baseline, out)
    f32 = xp.float32
    images, cols = x.shape
    steps = alphas.shape[0]
    total = images * steps
    s = _step_value(step)
    batch = total if batch is None else int(batch)
    if rows is None:
        rows = min(batch, max(0, total - s * batch))
    if out is None:
        out = xp.zeros((rows, cols), dtype=f32)
    _check_out(out, (rows, cols))
    v = s * batch + xp.arange(rows, dtype=xp.int64)
    keep = (v >= 0) & (v < total)
    i, m = v[keep] // steps, v[keep] % steps
    xi = x.astype(f32)[i]
    a = alphas.astype(f32)[m][:, None]
    if baseline is None:
        pts = a * (xi - f32(0.0))
    else:
        b = baseline.astype(f32)[i]
        pts = b + a * (xi - b)
    out[keep] = pts
    if targets is None:
        return out
    if targets_out is None:
        targets_out = xp.zeros((rows,), dtype=xp.int32)
    _check_out(targets_out, (rows,), "targets_out")
    targets_out[keep] = targets[i]
    return out, targets_out


def ig_accumulate(grads, x, weights, *, baseline=None, multiply=True, absolute=False, step=0,
                  batch=None, out=None):
    """For images i0 = step * batch / steps .. (+ rows / steps, up to the last image):
    ``s = sum_m weights[m] * grads[k * steps + m]`` accumulated in float32 from 0 in m
    order, ``a = (x[i] - b) * s`` with multiply (b = baseline or 0) else s, ``|a|`` with
    absolute; written to ``out[i]`` (a new float32 zeros (images, cols) when None)."""
    xp = _xp(grads, x, weights, baseline, out)
    f32 = xp.float32
    rows, cols = grads.shape
    images, steps = x.shape[0], weights.shape[0]
    batch = rows if batch is None else int(batch)
    if rows % steps or batch % steps:
        raise ValueError(f"rows ({rows}) and batch ({batch}) must be multiples of steps ({steps})")
    i0 = _step_value(step) * (batch // steps)
    n = max(0, min(rows // steps, images - i0))
    if out is None:
        out = xp.zeros((images, cols), dtype=f32)
    _check_out(out, (images, cols))
    if n == 0:
        return out
    g = grads.astype(f32)[:n * steps].reshape(n, steps, cols)
    w = weights.astype(f32)
    s = xp.zeros((n, cols), dtype=f32)
    for m in range(steps):
        s = s + w[m] * g[:, m, :]
    a = s
    if multiply:
        xi = x.astype(f32)[i0:i0 + n]
        b = f32(0.0) if baseline is None else baseline.astype(f32)[i0:i0 + n]
        a = (xi - b) * s
    out[i0:i0 + n] = xp.abs(a) if absolute else a
    return out


def adversarial_key(seed):
    """The adversarial random start's key (k0, k1) of ``seed`` (kernel_math.h)."""
    seed = int(seed) & (2**64 - 1)
    k = philox4x32_10((0, 0, 0x41445653, 0), (seed & _M32, seed >> 32))
    return int(k[0]), int(k[1])


def _clamp(xp, t, lo, hi):
    """torch.clamp(t, lo, hi) in t's dtype: NaN stays NaN."""
    lo, hi = t.dtype.type(lo), t.dtype.type(hi)
    return xp.where(t < lo, lo, xp.where(t > hi, hi, t))


def _clip_pair(clip):
    if clip is None:
        return -np.inf, np.inf
    lo = -np.inf if clip[0] is None else float(clip[0])
    hi = np.inf if clip[1] is None else float(clip[1])
    return lo, hi


def adversarial_uniform(size, seed, step, *, xp=np):
    """The random start's uniforms of elements 0..size-1, float32 in (-1, 1): Philox4x32-10
    of counter (e // 4 as two words, step as two words) under adversarial_key(seed), lane
    e % 4 (dropout's layout), mapped to ``(2 (bits >> 8) + 1) 2^-24 - 1`` (exact)."""
    step = _step_value(step) & (2**64 - 1)
    k0, k1 = adversarial_key(seed)
    nb = (size + 3) // 4
    b = xp.arange(nb, dtype=xp.uint64)
    r = _xp_philox(xp, (b, b >> xp.uint64(32), step & _M32, step >> 32), (k0, k1))
    bits = xp.stack([xp.broadcast_to(v, (nb,)) for v in r], axis=1).reshape(-1)[:size]
    k = (2 * (bits >> xp.uint64(8)) + 1).astype(xp.int64) - 2**24
    return k.astype(xp.float32) * xp.float32(2.0**-24)


def adversarial_init(x, *, eps, clip=(0.0, 1.0), seed=None, step=0, out=None):
    """``clamp(x + eps * u, lo, hi)`` in float32 (u: :func:`adversarial_uniform`), or
    without seed the clipped copy ``clamp(x, lo, hi)``. Written to ``out`` when given."""
    xp = _xp(x, out)
    f32 = xp.float32
    lo, hi = _clip_pair(clip)
    t = x.astype(f32)
    if seed is not None:
        u = adversarial_uniform(t.size, seed, step, xp=xp).reshape(t.shape)
        t = t + f32(eps) * u
    return _store(_clamp(xp, t, lo, hi), out)


def adversarial_step(x, adv, grad, *, eps, alpha, clip=(0.0, 1.0), project=True):
    """In place: ``t = adv + alpha * sign(grad)`` (sign(NaN) = NaN), with project ``t = x +
    clamp(t - x, -eps, eps)`` (torchattacks' PGD), then ``adv = clamp(t, lo, hi)``; all in
    float32. Returns adv."""
    xp = _xp(x, adv, grad)
    f32 = xp.float32
    lo, hi = _clip_pair(clip)
    g = grad.astype(f32)
    sign = xp.where(g > 0, f32(1), xp.where(g < 0, f32(-1), xp.where(g == g, f32(0), g)))
    t = adv.astype(f32) + f32(alpha) * sign
    if project:
        xf = x.astype(f32)
        t = xf + _clamp(xp, t - xf, -float(f32(eps)), float(f32(eps)))
    adv[...] = _clamp(xp, t, lo, hi)
    return adv


# ---- Whole-model input gradients (issue 18: fm.explain's and fm.adversarial's checks) ----
# An independent float64 computation: the layers' inference-mode forward pass (dropout off,
# BatchNormalization's moving statistics, every activation applied, the softmax too), then
# the chain rule back to the input, layer by layer, with no kernel of fastmlp involved.


def _layer_weights(xp, layer):
    return {n: xp.asarray(w, dtype=xp.float64) for n, w in
            zip(layer.weight_names(), layer.weights())}


def _softmax_rows(xp, z):
    e = xp.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def model_predict(layers, x):
    """The output of a stack of fastmlp layers for the rows of ``x`` in float64, as
    ``Sequential.predict`` computes it in float32 (inference mode)."""
    return _model_forward(layers, x)[0]


def _model_forward(layers, x):
    from .layers import (Activation, BatchNormalization, Dense, Dropout,  # noqa: PLC0415
                         LayerNormalization)

    xp = _xp(x)
    a = xp.asarray(x, dtype=xp.float64)
    tape = []
    for layer in layers:
        w = _layer_weights(xp, layer)
        if isinstance(layer, Dropout):
            tape.append(("id", None))
            continue
        if isinstance(layer, Dense):
            z = a @ w["kernel"] + (w["bias"] if "bias" in w else 0.0)
            tape.append(("dense", (w["kernel"],)))
            a = z
            act = layer.activation
        elif isinstance(layer, Activation):
            act = layer.activation
        elif isinstance(layer, BatchNormalization):
            scale = w.get("gamma", 1.0) / xp.sqrt(w["moving_variance"] + layer.epsilon)
            a = (a - w["moving_mean"]) * scale + w.get("beta", 0.0)
            tape.append(("scale", (scale,)))
            continue
        elif isinstance(layer, LayerNormalization):
            mu = a.mean(axis=1, keepdims=True)
            inv = 1.0 / xp.sqrt(((a - mu) ** 2).mean(axis=1, keepdims=True) + layer.epsilon)
            xhat = (a - mu) * inv
            tape.append(("ln", (xhat, inv, w.get("gamma", None))))
            a = xhat * w.get("gamma", 1.0) + w.get("beta", 0.0)
            continue
        else:
            raise ValueError(f"reference: no rule for layer {layer!r}")
        if act == "softmax":
            a = _softmax_rows(xp, a)
            tape.append(("softmax", (a,)))
        elif act not in (None, "linear"):
            tape.append(("act", (a, _code(act))))
            a = _act(xp, a, _code(act))
    return a, tape


def model_input_gradient(layers, x, dout):
    """``d sum(output * dout) / d x`` in float64 for the rows of ``x``: the input
    gradient of the output seeded with ``dout`` (rows, outputs); ``output`` as
    :func:`model_predict`."""
    xp = _xp(x)
    _, tape = _model_forward(layers, x)
    g = xp.asarray(dout, dtype=xp.float64)
    for kind, saved in reversed(tape):
        if kind == "dense":
            g = g @ saved[0].T
        elif kind == "softmax":
            p = saved[0]
            g = p * (g - (g * p).sum(axis=1, keepdims=True))
        elif kind == "act":
            g = _grad_from_input(xp, g, saved[0], saved[1])
        elif kind == "scale":
            g = g * saved[0]
        elif kind == "ln":
            xhat, inv, gamma = saved
            gh = g * gamma if gamma is not None else g
            g = inv * (gh - gh.mean(axis=1, keepdims=True)
                       - xhat * (gh * xhat).mean(axis=1, keepdims=True))
    return g


def _target_seed64(xp, x, targets, classes):
    dout = xp.zeros((len(x), classes), dtype=xp.float64)
    dout[xp.arange(len(x)), xp.asarray(targets)] = 1.0
    return dout


def saliency(layers, x, targets, abs=True):
    """float64 ``d output[r, targets[r]] / d x[r]`` per row (absolute with ``abs``)."""
    xp = _xp(x)
    g = model_input_gradient(layers, x, _target_seed64(xp, x, targets,
                                                       layers[-1].output_dim))
    return xp.abs(g) if abs else g


def gradient_x_input(layers, x, targets):
    """float64 ``x * d output[r, targets[r]] / d x``."""
    return _f64(x) * saliency(layers, x, targets, abs=False)


def _f64(x):
    xp = _xp(x)
    return xp.asarray(x, dtype=xp.float64)


def integrated_gradients(layers, x, targets, alphas, weights, baseline=None):
    """float64 integrated gradients with the quadrature (alphas, weights): ``(x - b) *
    sum_m weights[m] * grad(b + alphas[m] (x - b))``, one gradient pass per point."""
    xp = _xp(x)
    x64 = _f64(x)
    b = xp.zeros_like(x64) if baseline is None else xp.broadcast_to(
        xp.asarray(baseline, dtype=xp.float64), x64.shape)
    total = xp.zeros_like(x64)
    for a, w in zip(alphas, weights):
        total += float(w) * saliency(layers, b + float(a) * (x64 - b), targets, abs=False)
    return (x64 - b) * total
