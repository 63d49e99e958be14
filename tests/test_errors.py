"""The error contract of fm.ops, on the CPU: bad input gets a clear TypeError / ValueError
that names the argument, the expected and the actual value -- never a crash or a wrong
number. (The GPU-only cases, mixed devices and device-side label checks, are in test_gpu.py.)
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import fastmlp as fm

o = fm.ops
f32 = np.float32


def z(*shape, dtype=f32):
    return np.zeros(shape, dtype=dtype)


def _readonly(*shape):
    a = z(*shape)
    a.flags.writeable = False
    return a


# (id, call, exception, regexes that must all appear in the message)
CASES = [
    # --- not an array / wrong dtype -> TypeError naming the argument and both dtypes
    ("gemm-a-list", lambda: o.gemm([[1.0]], z(1, 1)), TypeError, ["'a'", "list"]),
    ("gemm-b-str", lambda: o.gemm(z(1, 1), "b"), TypeError, ["'b'", "str"]),
    (
        "gemm-a-float64",
        lambda: o.gemm(z(2, 3, dtype=np.float64), z(3, 2)),
        TypeError,
        ["'a'", "float32", "float64"],
    ),
    (
        "gemm-b-int32",
        lambda: o.gemm(z(2, 3), z(3, 2, dtype=np.int32)),
        TypeError,
        ["'b'", "float32", "int32"],
    ),
    (
        "gemm-out-float64",
        lambda: o.gemm(z(2, 3), z(3, 2), out=z(2, 2, dtype=np.float64)),
        TypeError,
        ["'out'", "float32", "float64"],
    ),
    ("gemm-out-list", lambda: o.gemm(z(2, 3), z(3, 2), out=[[0, 0], [0, 0]]), TypeError, ["'out'"]),
    (
        "bias_add-bias-float16",
        lambda: o.bias_add(z(2, 3), z(3, dtype=np.float16)),
        TypeError,
        ["'bias'", "float32", "float16"],
    ),
    ("bias_grad-dy-none", lambda: o.bias_grad(None), TypeError, ["'dy'"]),
    (
        "relu-x-float64",
        lambda: o.relu(z(4, dtype=np.float64)),
        TypeError,
        ["'x'", "float32", "float64"],
    ),
    ("relu-x-scalar", lambda: o.relu(3.0), TypeError, ["'x'"]),
    (
        "relu_backward-y-int64",
        lambda: o.relu_backward(z(4), z(4, dtype=np.int64)),
        TypeError,
        ["'y'", "int64"],
    ),
    (
        "sce-logits-float64",
        lambda: o.softmax_cross_entropy(z(3, 4, dtype=np.float64), z(3, dtype=np.int64)),
        TypeError,
        ["'logits'", "float64"],
    ),
    (
        "sce-labels-float64",
        lambda: o.softmax_cross_entropy(z(3, 4), z(3, 4, dtype=np.float64)),
        TypeError,
        ["'labels'", "float64"],
    ),
    (
        "sce-labels-int16",
        lambda: o.softmax_cross_entropy(z(3, 4), z(3, dtype=np.int16)),
        TypeError,
        ["'labels'", "int16"],
    ),
    (
        "sce-labels-list",
        lambda: o.softmax_cross_entropy(z(3, 4), [0, 1, 2]),
        TypeError,
        ["'labels'"],
    ),
    (
        "sceb-probs-float64",
        lambda: o.softmax_cross_entropy_backward(z(3, 4, dtype=np.float64), z(3, dtype=np.int64)),
        TypeError,
        ["'probs'", "float64"],
    ),
    (
        "sgd-grad-float64",
        lambda: o.sgd_step(z(4), z(4, dtype=np.float64), None, lr=0.1),
        TypeError,
        ["'grad'", "float64"],
    ),
    (
        "sgd-buf-float64",
        lambda: o.sgd_step(z(4), z(4), z(4, dtype=np.float64), lr=0.1, momentum=0.9),
        TypeError,
        ["'buf'", "float64"],
    ),
    (
        "adam-param-float64",
        lambda: o.adam_step(z(4, dtype=np.float64), z(4), z(4), z(4), step=1, lr=0.1),
        TypeError,
        ["'param'", "float64"],
    ),
    (
        "adam-v-float64",
        lambda: o.adam_step(z(4), z(4), z(4), z(4, dtype=np.float64), step=1, lr=0.1),
        TypeError,
        ["'v'", "float64"],
    ),
    # --- wrong rank -> ValueError naming the argument, the expected rank and the shape
    ("gemm-a-1d", lambda: o.gemm(z(3), z(3, 2)), ValueError, ["'a'", "2", r"\(3,\)"]),
    ("gemm-b-3d", lambda: o.gemm(z(2, 3), z(3, 2, 1)), ValueError, ["'b'", r"\(3, 2, 1\)"]),
    ("bias_add-x-1d", lambda: o.bias_add(z(4), z(4)), ValueError, ["'x'", r"\(4,\)"]),
    (
        "bias_add-bias-2d",
        lambda: o.bias_add(z(2, 4), z(1, 4)),
        ValueError,
        ["'bias'", r"\(4,\)", r"\(1, 4\)"],
    ),
    ("bias_grad-dy-1d", lambda: o.bias_grad(z(4)), ValueError, ["'dy'", r"\(4,\)"]),
    (
        "sce-logits-1d",
        lambda: o.softmax_cross_entropy(z(4), z(4, dtype=np.int64)),
        ValueError,
        ["'logits'", r"\(4,\)"],
    ),
    (
        "sce-labels-2d-int",
        lambda: o.softmax_cross_entropy(z(3, 4), z(3, 1, dtype=np.int64)),
        ValueError,
        ["'labels'", r"\(3,\)", r"\(3, 1\)"],
    ),
    (
        "sceb-probs-3d",
        lambda: o.softmax_cross_entropy_backward(z(3, 4, 1), z(3, dtype=np.int64)),
        ValueError,
        ["'probs'"],
    ),
    # --- wrong shape -> ValueError naming the argument, the expected and the actual shape
    (
        "gemm-inner-mismatch",
        lambda: o.gemm(z(3, 4), z(5, 2)),
        ValueError,
        [r"'b'|op\(b\)", r"\b4\b", r"\b5\b"],
    ),
    (
        "gemm-inner-mismatch-tn",
        lambda: o.gemm(z(4, 3), z(5, 2), trans_a=True),
        ValueError,
        [r"'b'|op\(b\)", r"\b4\b", r"\b5\b"],
    ),
    (
        "gemm-inner-mismatch-nt",
        lambda: o.gemm(z(3, 4), z(2, 5), trans_b=True),
        ValueError,
        [r"'b'|op\(b\)", r"\b4\b", r"\b5\b"],
    ),
    (
        "gemm-out-shape",
        lambda: o.gemm(z(3, 4), z(4, 2), out=z(3, 3)),
        ValueError,
        ["'out'", r"\(3, 2\)", r"\(3, 3\)"],
    ),
    (
        "gemm-out-shape-t",
        lambda: o.gemm(z(4, 3), z(2, 4), trans_a=True, trans_b=True, out=z(2, 3)),
        ValueError,
        ["'out'", r"\(3, 2\)", r"\(2, 3\)"],
    ),
    (
        "bias_add-bias-len",
        lambda: o.bias_add(z(2, 4), z(5)),
        ValueError,
        ["'bias'", r"\(4,\)", r"\(5,\)"],
    ),
    (
        "bias_add-out-shape",
        lambda: o.bias_add(z(2, 4), z(4), out=z(4, 2)),
        ValueError,
        ["'out'", r"\(2, 4\)", r"\(4, 2\)"],
    ),
    (
        "bias_grad-out-shape",
        lambda: o.bias_grad(z(2, 4), out=z(2)),
        ValueError,
        ["'out'", r"\(4,\)", r"\(2,\)"],
    ),
    ("relu-out-shape", lambda: o.relu(z(4), out=z(5)), ValueError, ["'out'", r"\(4,\)", r"\(5,\)"]),
    (
        "relu-out-same-size",
        lambda: o.relu(z(2, 3), out=z(3, 2)),
        ValueError,
        ["'out'", r"\(2, 3\)", r"\(3, 2\)"],
    ),
    (
        "relu_backward-y-shape",
        lambda: o.relu_backward(z(4), z(5)),
        ValueError,
        ["'y'", r"\(4,\)", r"\(5,\)"],
    ),
    (
        "relu_backward-out-shape",
        lambda: o.relu_backward(z(4), z(4), out=z(3)),
        ValueError,
        ["'out'", r"\(4,\)", r"\(3,\)"],
    ),
    (
        "sce-labels-len",
        lambda: o.softmax_cross_entropy(z(3, 4), z(4, dtype=np.int64)),
        ValueError,
        ["'labels'", r"\(3,\)", r"\(4,\)"],
    ),
    (
        "sce-onehot-shape",
        lambda: o.softmax_cross_entropy(z(3, 4), z(3, 5)),
        ValueError,
        ["'labels'", r"\(3, 4\)", r"\(3, 5\)"],
    ),
    (
        "sceb-labels-len",
        lambda: o.softmax_cross_entropy_backward(z(3, 4), z(2, dtype=np.int32)),
        ValueError,
        ["'labels'", r"\(3,\)", r"\(2,\)"],
    ),
    (
        "sceb-out-shape",
        lambda: o.softmax_cross_entropy_backward(z(3, 4), z(3, dtype=np.int32), out=z(3, 5)),
        ValueError,
        ["'out'", r"\(3, 4\)", r"\(3, 5\)"],
    ),
    (
        "sgd-grad-shape",
        lambda: o.sgd_step(z(4), z(5), None, lr=0.1),
        ValueError,
        ["'grad'", r"\(4,\)", r"\(5,\)"],
    ),
    (
        "sgd-buf-shape",
        lambda: o.sgd_step(z(4), z(4), z(3), lr=0.1, momentum=0.9),
        ValueError,
        ["'buf'", r"\(4,\)", r"\(3,\)"],
    ),
    (
        "sgd-buf-missing",
        lambda: o.sgd_step(z(4), z(4), None, lr=0.1, momentum=0.9),
        ValueError,
        ["'buf'"],
    ),
    (
        "adam-grad-shape",
        lambda: o.adam_step(z(4), z(2, 2), z(4), z(4), step=1, lr=0.1),
        ValueError,
        ["'grad'", r"\(4,\)", r"\(2, 2\)"],
    ),
    (
        "adam-m-shape",
        lambda: o.adam_step(z(4), z(4), z(3), z(4), step=1, lr=0.1),
        ValueError,
        ["'m'", r"\(4,\)", r"\(3,\)"],
    ),
    (
        "adam-v-shape",
        lambda: o.adam_step(z(4), z(4), z(4), z(5), step=1, lr=0.1),
        ValueError,
        ["'v'", r"\(4,\)", r"\(5,\)"],
    ),
    (
        "adam-step-0",
        lambda: o.adam_step(z(4), z(4), z(4), z(4), step=0, lr=0.1),
        ValueError,
        ["'step'", r"\b0\b"],
    ),
    (
        "adam-step-negative",
        lambda: o.adam_step(z(4), z(4), z(4), z(4), step=-3, lr=0.1),
        ValueError,
        ["'step'", "-3"],
    ),
    # --- non-contiguous -> ValueError naming the argument
    ("gemm-a-strided", lambda: o.gemm(z(3, 8)[:, ::2], z(4, 2)), ValueError, ["'a'", "contiguous"]),
    ("gemm-a-fortran", lambda: o.gemm(z(4, 3).T, z(4, 2)), ValueError, ["'a'", "contiguous"]),
    ("gemm-b-fortran", lambda: o.gemm(z(3, 4), z(2, 4).T), ValueError, ["'b'", "contiguous"]),
    (
        "gemm-out-strided",
        lambda: o.gemm(z(3, 4), z(4, 2), out=z(3, 4)[:, ::2]),
        ValueError,
        ["'out'", "contiguous"],
    ),
    (
        "bias_add-bias-strided",
        lambda: o.bias_add(z(2, 4), z(8)[::2]),
        ValueError,
        ["'bias'", "contiguous"],
    ),
    ("bias_grad-dy-fortran", lambda: o.bias_grad(z(4, 2).T), ValueError, ["'dy'", "contiguous"]),
    ("relu-x-strided", lambda: o.relu(z(8)[::2]), ValueError, ["'x'", "contiguous"]),
    (
        "relu_backward-y-strided",
        lambda: o.relu_backward(z(4), z(8)[::2]),
        ValueError,
        ["'y'", "contiguous"],
    ),
    (
        "sce-logits-fortran",
        lambda: o.softmax_cross_entropy(z(4, 3).T, z(3, dtype=np.int64)),
        ValueError,
        ["'logits'", "contiguous"],
    ),
    (
        "sce-labels-strided",
        lambda: o.softmax_cross_entropy(z(3, 4), z(6, dtype=np.int64)[::2]),
        ValueError,
        ["'labels'", "contiguous"],
    ),
    (
        "sgd-param-strided",
        lambda: o.sgd_step(z(8)[::2], z(4), None, lr=0.1),
        ValueError,
        ["'param'", "contiguous"],
    ),
    (
        "adam-m-strided",
        lambda: o.adam_step(z(4), z(4), z(8)[::2], z(4), step=1, lr=0.1),
        ValueError,
        ["'m'", "contiguous"],
    ),
    # --- outputs written in place must be writable
    ("relu-out-readonly", lambda: o.relu(z(4), out=_readonly(4)), ValueError, ["'out'"]),
    (
        "sgd-param-readonly",
        lambda: o.sgd_step(_readonly(4), z(4), None, lr=0.1),
        ValueError,
        ["'param'"],
    ),
]


@pytest.mark.parametrize("call,exc,patterns", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_named(call, exc, patterns):
    with pytest.raises(exc, match=patterns[0]) as info:
        call()
    msg = str(info.value)
    for pat in patterns[1:]:
        assert re.search(pat, msg), f"message {msg!r} lacks {pat!r}"


def test_failed_call_leaves_out_untouched():
    """A rejected call fails before any kernel runs: out keeps its contents."""
    out = np.full((3, 2), 7.0, f32)
    with pytest.raises(ValueError):
        o.gemm(z(3, 4), z(5, 2), out=out)
    assert (out == 7.0).all()
    param = np.ones(4, f32)
    with pytest.raises(ValueError):
        o.sgd_step(param, np.ones(5, f32), None, lr=1.0)
    assert (param == 1.0).all()


# --- labels outside [0, classes): ValueError naming the bad value (and the row)

BAD_LABELS = [
    ("negative", np.int64, -1),
    ("eq-classes", np.int64, 4),
    ("huge-int64", np.int64, 2**40),
    ("min-int64", np.int64, -(2**63)),
    ("negative-int32", np.int32, -7),
    ("eq-classes-int32", np.int32, 4),
    ("max-int32", np.int32, 2**31 - 1),
]


@pytest.mark.parametrize("dtype,bad", [c[1:] for c in BAD_LABELS], ids=[c[0] for c in BAD_LABELS])
@pytest.mark.parametrize("row", [1, 5])
def test_bad_label_value_is_named(dtype, bad, row):
    labels = np.array([0, 0, 2, 3, 2, 0], dtype=dtype)
    labels[row] = bad
    value = rf"(?<![\d-]){re.escape(str(bad))}(?!\d)"
    with pytest.raises(ValueError, match=value) as info:
        o.softmax_cross_entropy(np.ones((6, 4), f32), labels)
    # the row too (1 and 5 appear nowhere else once the value is taken out)
    assert re.search(rf"\b{row}\b", str(info.value).replace(str(bad), "")), (
        f"row {row} not named: {info.value}"
    )
    with pytest.raises(ValueError, match=value):
        o.softmax_cross_entropy_backward(np.full((6, 4), 0.25, f32), labels)


def test_first_bad_label_is_reported():
    labels = np.array([0, 5, 1, -2, 9], np.int64)
    with pytest.raises(ValueError, match=r"(?<!\d)5(?!\d)"):
        o.softmax_cross_entropy(np.ones((5, 4), f32), labels)


def test_nan_inf_are_data_not_errors():
    """NaN / Inf inputs propagate as IEEE values; they raise nothing."""
    x = np.array([[np.nan, 1.0], [np.inf, -np.inf]], f32)
    assert np.isnan(o.gemm(x, np.eye(2, dtype=f32))[0]).all()
    assert np.isnan(o.bias_add(x, np.zeros(2, f32))[0, 0])
    loss, probs = o.softmax_cross_entropy(np.array([[np.nan, 0.0]], f32), np.array([1], np.int64))
    assert np.isnan(float(loss)) and np.isnan(probs).all()
    logits = np.array([[np.inf, 0.0], [1.0, 2.0]], f32)
    loss, probs = o.softmax_cross_entropy(logits, np.array([0, 1], np.int64))
    with np.errstate(invalid="ignore"):
        want_loss, want_probs = fm.reference.softmax_cross_entropy(
            logits.astype(np.float64), np.array([0, 1])
        )
    # row 0: max = inf and inf - inf = NaN, as IEEE says; row 1 is unaffected
    assert np.array_equal(np.isnan(probs), np.isnan(want_probs)) and np.isnan(probs[0]).all()
    assert np.isfinite(probs[1]).all() and np.isnan(float(loss)) == np.isnan(float(want_loss))
    p = np.array([1.0, 2.0], f32)
    o.sgd_step(p, np.array([np.nan, 1.0], f32), None, lr=0.1)
    assert np.isnan(p[0]) and p[1] == np.float32(2.0) - np.float32(0.1)


@pytest.mark.parametrize("impl", [fm.ops, fm.reference], ids=["ops", "reference"])
def test_gemm_beta_without_out_is_an_error(impl):
    # beta != 0 means "accumulate into out": without out there is nothing to
    # accumulate into, so both implementations refuse instead of ignoring beta.
    a = np.ones((2, 3), np.float32)
    b = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="beta != 0"):
        impl.gemm(a, b, beta=1.0)


def test_partial_overlap_of_out_and_input_is_refused():
    # Exactly the input is fine for elementwise ops (each element is read
    # before it is written); a shifted view of it would make the result depend
    # on thread order, so it is refused by name.
    buf = np.arange(1, 11, dtype=np.float32)
    x = buf[:8].reshape(2, 4)
    assert np.shares_memory(fm.ops.relu(x, out=x), x)
    with pytest.raises(ValueError, match="'out' partially overlaps 'x'"):
        fm.ops.relu(x, out=buf[2:10].reshape(2, 4))
    bias = buf[:4]
    with pytest.raises(ValueError, match="'out' overlaps 'bias'"):
        fm.ops.bias_add(x, bias, out=x)
    with pytest.raises(ValueError, match="'out' overlaps 'dy'"):
        fm.ops.bias_grad(x, out=buf[:4])


def test_optimizer_state_must_not_alias():
    p = np.ones(8, np.float32)
    g = np.ones(8, np.float32)
    m = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="'m' overlaps 'v'"):
        fm.ops.adam_step(p, g, m, m, step=1, lr=1e-3)
    with pytest.raises(ValueError, match="'param' overlaps 'buf'"):
        fm.ops.sgd_step(p, g, p, lr=0.1, momentum=0.9)
