"""The fused loss kernels (issue 16): fm.ops.loss_forward_backward (csrc loss_fused) for
every loss kind, against the float64 reference, PyTorch's losses and autograd, Keras'
formulas for the probability losses, and float64 finite differences; on the CPU and (the
`gpu` twins through the `backend` fixture) on the GPU.

Tolerances. A row loss is a float32 sum of `cols` terms, each a few float32 operations
(exp / log / log1p within a few ulp), then a double sum over the rows: its error is a few
ulp of the terms' magnitudes, LOSS_RTOL = 1e-5 of (|loss| + the mean row scale) is ~20x
that for the widest rows here, yet 100x below a float16-grade or a wrong-by-one-term
result. A gradient element is a few float32 operations times the row's scale w / rows;
the cancellations (sigmoid(z) - y', softmax - t, g - sum g u) cost an absolute error of a
few ulp of the row's largest term, so GRAD_RTOL = 1e-5 of (|want| + the row's largest
|want|).
"""
from __future__ import annotations

import numpy as np
import pytest

import fastmlp as fm
from fastmlp import ops
from fastmlp import reference as ref
from helpers import assert_close, assert_meaningful, f64, normal, onehot, shape_id, soft_labels

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-5

KINDS = list(ops.LOSS_KINDS)
ELEMENTWISE = ["mse", "mae", "huber", "bce_logits", "bce_probs"]
SMOOTHED = ["bce_logits", "bce_probs", "cce_logits", "cce_probs"]
CCE = ["cce_logits", "cce_probs"]
DELTA = 0.7  # Huber: both branches are hit by N(0, 2) differences

SHAPES = [(r, c) for r in (0, 1, 7, 300) for c in (1, 3, 10)] + [(7, 65), (33, 1000)]


def _cases():
    """(kind, label form, label_smoothing) of every supported combination."""
    out = []
    for kind in KINDS:
        labels = ["float", "int32", "int64"] if kind in CCE else ["float"]
        for lab in labels:
            for ls in ((0.0, 0.1) if kind in SMOOTHED else (0.0,)):
                out.append((kind, lab, ls))
    return out


CASES = _cases()


def make_pred(rng, kind, shape):
    n, c = shape
    if kind == "bce_probs":
        p = rng.uniform(0.0, 1.0, size=shape)
        # a few values at and beyond the clamp: their gradient is 0
        p.ravel()[5::7] = 0.0
        p.ravel()[3::11] = 1.0
        return p.astype(np.float32)
    if kind == "cce_probs":
        p = rng.uniform(0.05, 1.0, size=shape)
        if c > 1:
            p.ravel()[::5] = 0.0  # clamped to 1e-7 after the normalisation
            p[:, 0] = np.maximum(p[:, 0], 0.5)  # no all-zero row
        return p.astype(np.float32)
    return normal(rng, shape, scale=2.0 if kind in ("mse", "mae", "huber") else 3.0)


def make_target(rng, kind, lab, shape):
    n, c = shape
    if lab == "int32":
        return rng.integers(0, c, size=n).astype(np.int32)
    if lab == "int64":
        return rng.integers(0, c, size=n).astype(np.int64)
    if kind in ("mse", "mae", "huber"):
        return normal(rng, shape, scale=2.0)
    if kind in ("bce_logits", "bce_probs"):
        y = rng.uniform(0.0, 1.0, size=shape)
        y[::2] = np.round(y[::2])  # hard 0/1 labels in every other row
        return y.astype(np.float32)
    # cross-entropy float rows: one-hot rows and soft distributions
    y = soft_labels(rng, n, c)
    if n:
        y[::2] = onehot(rng.integers(0, c, size=y[::2].shape[0]), c)
    return y


def make_data(rng, kind, lab, shape):
    """(pred, target); for cce_probs with class indices the label's own probability is
    kept off the clamp (a clamped label entry gives the row an all-zero gradient)."""
    pred = make_pred(rng, kind, shape)
    target = make_target(rng, kind, lab, shape)
    if kind == "cce_probs" and lab != "float" and shape[0]:
        rows = np.arange(shape[0])
        pred[rows, target] = np.maximum(pred[rows, target], 0.3)
    return pred, target


def make_weights(rng, n):
    w = rng.uniform(0.0, 2.0, size=n).astype(np.float32)
    if n > 2:
        w[1] = 0.0
    return w


def _ref_target(t):
    return f64(t) if t.dtype.kind == "f" else t


def _run(backend, kind, pred, target, w, ls, **kw):
    loss, dpred = ops.loss_forward_backward(
        kind, backend.to(pred), backend.to(target),
        sample_weight=None if w is None else backend.to(w), delta=DELTA, label_smoothing=ls,
        **kw)
    return loss, None if dpred is None else backend.host(dpred)


def _loss_tol(want, pred, w):
    n = pred.shape[0]
    if n == 0:
        return 0.0
    wm = 1.0 if w is None else float(np.mean(np.abs(w)))
    return LOSS_RTOL * (abs(want) + wm * (1.0 + float(np.mean(np.abs(f64(pred))))))


def _grad_tol(want, kind, w=None):
    """GRAD_RTOL of |want| + the row's largest |want| + the row's scale w / rows times
    the size of the terms a gradient subtracts where it cancels: softmax - t (<= 1)
    for the cross-entropies, (sigmoid(z) - y') / cols for bce_logits (a confident,
    correct row has a gradient far below the rounding of its terms)."""
    want = np.abs(f64(want))
    n, c = want.shape
    if want.size == 0:
        return 0.0
    row_max = want.max(axis=1, keepdims=True)
    unit = {"cce_logits": 1.0, "cce_probs": 1.0, "bce_logits": 1.0 / c}.get(kind, 0.0)
    wr = np.ones(n) if w is None else np.abs(f64(w))
    return GRAD_RTOL * (want + row_max + unit * (wr / n)[:, None])


def _check(got_loss, got_d, want_loss, want_d, pred, w, what, kind):
    assert abs(got_loss - want_loss) <= _loss_tol(want_loss, pred, w), (
        f"{what} loss: got {got_loss!r}, expected {want_loss!r}")
    assert_close(got_d, want_d, _grad_tol(want_d, kind, w), f"{what} dpred")


# ----------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(*s) for s in SHAPES])
@pytest.mark.parametrize("kind,lab,ls", CASES, ids=[f"{k}-{lb}-ls{s}" for k, lb, s in CASES])
def test_against_reference(backend, rng, kind, lab, ls, shape, weighted):
    n, c = shape
    pred, target = make_data(rng, kind, lab, shape)
    w = make_weights(rng, n) if weighted else None
    out = backend.nan(shape)
    loss, dpred = ops.loss_forward_backward(
        kind, backend.to(pred), backend.to(target),
        sample_weight=None if w is None else backend.to(w), delta=DELTA, label_smoothing=ls,
        out=out)
    assert dpred is out and isinstance(loss, float)
    want_loss, want_d = ref.loss_forward_backward(
        kind, f64(pred), _ref_target(target), sample_weight=None if w is None else f64(w),
        delta=DELTA, label_smoothing=ls)
    if n and not (kind in CCE and c == 1):
        # (one class: softmax is 1 and p / sum(p) is 1, clamped: dpred is exactly 0)
        assert_meaningful(want_d, f"{kind} reference dpred")
    if n and not (kind == "cce_logits" and c == 1):  # one class: log softmax 0
        assert want_loss != 0.0
    _check(loss, backend.host(out), want_loss, want_d, pred, w, kind, kind)
    if n == 0:
        assert loss == 0.0
    # forward only: the same loss (the same row arithmetic), no gradient
    loss_f, none = _run(backend, kind, pred, target, w, ls, backward=False)
    assert none is None and loss_f == loss


# ----------------------------------------------------------------------------- vs PyTorch

torch_cases = [("mse", "float", 0.0), ("mae", "float", 0.0), ("huber", "float", 0.0),
               ("bce_logits", "float", 0.0), ("bce_logits", "float", 0.1),
               ("cce_logits", "int64", 0.0), ("cce_logits", "int32", 0.1),
               ("cce_logits", "float", 0.0), ("cce_logits", "float", 0.1)]
TORCH_SHAPES = [(1, 1), (7, 3), (300, 10), (33, 1000)]


def _torch_loss(torch, kind, ls, n):
    nn = torch.nn
    if kind == "mse":
        return nn.MSELoss(reduction="none")
    if kind == "mae":
        return nn.L1Loss(reduction="none")
    if kind == "huber":
        return nn.HuberLoss(reduction="none", delta=DELTA)
    if kind == "bce_logits":
        bce = nn.BCEWithLogitsLoss(reduction="none")
        return lambda z, y: bce(z, y * (1 - ls) + 0.5 * ls)  # Keras' smoothing, by hand
    return nn.CrossEntropyLoss(reduction="none", label_smoothing=ls)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("shape", TORCH_SHAPES, ids=[shape_id(*s) for s in TORCH_SHAPES])
@pytest.mark.parametrize("kind,lab,ls", torch_cases,
                         ids=[f"{k}-{lb}-ls{s}" for k, lb, s in torch_cases])
def test_against_torch(backend, rng, kind, lab, ls, shape, weighted):
    torch = pytest.importorskip("torch")
    n, c = shape
    pred, target = make_data(rng, kind, lab, shape)
    w = make_weights(rng, n) if weighted else np.ones(n, np.float32)
    loss, dpred = _run(backend, kind, pred, target, w if weighted else None, ls)

    z = torch.tensor(pred, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(target.astype(np.int64) if lab != "float" else f64(target))
    per = _torch_loss(torch, kind, ls, n)(z, y)
    if per.ndim == 2:  # elementwise: the mean over the columns
        per = per.mean(dim=1)
    total = (per * torch.tensor(f64(w))).sum() / n
    total.backward()
    _check(loss, dpred, float(total.detach()), z.grad.numpy(), pred, w, f"{kind} vs torch", kind)


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_cce_logits_unnormalized_rows_against_torch(backend, rng, ls):
    """Float target rows need not sum to 1: the gradient is softmax * sum(t) - t, the
    exact derivative (torch's), not softmax - t."""
    torch = pytest.importorskip("torch")
    n, c = 40, 7
    pred = normal(rng, (n, c), scale=3.0)
    target = rng.uniform(0.0, 2.0, size=(n, c)).astype(np.float32)
    loss, dpred = _run(backend, "cce_logits", pred, target, None, ls)
    z = torch.tensor(f64(pred), requires_grad=True)
    ce = torch.nn.CrossEntropyLoss(reduction="mean", label_smoothing=ls)
    total = ce(z, torch.tensor(f64(target)))
    total.backward()
    _check(loss, dpred, float(total.detach()), z.grad.numpy(), pred, None, "unnormalized rows",
           "cce_logits")


# ----------------------------------------------------------------------------- Keras' formulas


def _keras_bce_probs(xp_log, clip, t, p):
    """Keras 3 binary_crossentropy(from_logits=False), per row (mean over the last axis)."""
    q = clip(p)
    return -(t * xp_log(q) + (1 - t) * xp_log(1 - q)).mean(axis=-1)


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["bce_probs", "cce_probs"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_probability_losses_match_keras(backend, rng, kind, ls, weighted):
    """Keras' from_logits=False code in float32 NumPy (clip at epsilon 1e-7; cce
    normalises the rows first), and its gradient by torch autograd of the same formula
    (torch.clamp's derivative: 1 inside [lo, hi], 0 outside)."""
    torch = pytest.importorskip("torch")
    n, c = 50, 6
    pred = make_pred(rng, kind, (n, c))
    target = make_target(rng, kind, "float", (n, c))
    w = make_weights(rng, n) if weighted else np.ones(n, np.float32)
    loss, dpred = _run(backend, kind, pred, target, w if weighted else None, ls)

    eps = np.float32(1e-7)
    if kind == "bce_probs":
        t = target * np.float32(1 - ls) + np.float32(0.5 * ls)
        per = _keras_bce_probs(np.log, lambda p: np.clip(p, eps, np.float32(1) - eps), t, pred)
    else:
        t = target * np.float32(1 - ls) + np.float32(ls / c)
        q = np.clip(pred / pred.sum(axis=-1, keepdims=True), eps, np.float32(1) - eps)
        per = -(t * np.log(q)).sum(axis=-1)
    want = float(np.sum(f64(per) * f64(w)) / n)
    assert abs(loss - want) <= 1e-5 * abs(want) + 1e-6, (loss, want)

    z = torch.tensor(f64(pred), requires_grad=True)
    tt = torch.tensor(f64(t))
    lo, hi = float(eps), float(np.float32(1) - eps)
    if kind == "bce_probs":
        per_t = _keras_bce_probs(torch.log, lambda p: torch.clamp(p, lo, hi), tt, z)
    else:
        qt = torch.clamp(z / z.sum(dim=-1, keepdim=True), lo, hi)
        per_t = -(tt * torch.log(qt)).sum(dim=-1)
    ((per_t * torch.tensor(f64(w))).sum() / n).backward()
    assert_meaningful(z.grad.numpy())
    assert_close(dpred, z.grad.numpy(), _grad_tol(z.grad.numpy(), kind, w), f"{kind} vs Keras grad")


# ----------------------------------------------------------------------------- finite differences

FD_CASES = [("mse", "float", 0.0), ("mae", "float", 0.0), ("huber", "float", 0.0),
            ("bce_logits", "float", 0.1), ("bce_probs", "float", 0.1),
            ("cce_logits", "int64", 0.1), ("cce_logits", "float", 0.0),
            ("cce_probs", "int32", 0.1), ("cce_probs", "float", 0.0)]


@pytest.mark.parametrize("kind,lab,ls", FD_CASES, ids=[f"{k}-{lb}-ls{s}" for k, lb, s in FD_CASES])
def test_reference_gradient_finite_differences(rng, kind, lab, ls):
    """The reference's dpred is d loss / d pred: central differences in float64, on data
    away from the kinks (mae / huber at d = 0 / |d| = delta, the probability clamps)."""
    n, c = 5, 4
    if kind == "bce_probs":
        pred = rng.uniform(0.1, 0.9, size=(n, c))
    elif kind == "cce_probs":
        pred = rng.uniform(0.2, 1.0, size=(n, c))
    else:
        pred = rng.standard_normal((n, c)) * 2
    target = make_target(rng, kind, lab, (n, c))
    if kind in ("mae", "huber"):
        d = pred - target
        near = (np.abs(d) < 0.05) | (np.abs(np.abs(d) - DELTA) < 0.05)
        pred = np.where(near, pred + 0.2, pred)
    w = rng.uniform(0.5, 2.0, size=n)
    _, grad = ref.loss_forward_backward(kind, pred, _ref_target(target), sample_weight=w,
                                        delta=DELTA, label_smoothing=ls)
    h = 1e-6
    fd = np.zeros_like(pred)
    for i in np.ndindex(pred.shape):
        plus, minus = pred.copy(), pred.copy()
        plus[i] += h
        minus[i] -= h
        lp, _ = ref.loss_forward_backward(kind, plus, _ref_target(target), sample_weight=w,
                                          delta=DELTA, label_smoothing=ls, backward=False)
        lm, _ = ref.loss_forward_backward(kind, minus, _ref_target(target), sample_weight=w,
                                          delta=DELTA, label_smoothing=ls, backward=False)
        fd[i] = (lp - lm) / (2 * h)
    assert_meaningful(fd)
    # dpred is float32 (6e-8 relative); the differences are good to ~1e-9 here
    assert_close(grad, fd, 1e-6 * (np.abs(fd) + np.abs(fd).max()), f"{kind} finite differences")


# ----------------------------------------------------------------------------- errors, NaN


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("kind", CCE)
def test_bad_label_names_the_row(backend, rng, kind, dtype):
    n, c = 9, 4
    pred = make_pred(rng, kind, (n, c))
    labels = rng.integers(0, c, size=n).astype(dtype)
    labels[5] = c
    labels[7] = -1
    with pytest.raises(ValueError, match=r"label 4 in row 5 is outside \[0, 4\)"):
        _run(backend, kind, pred, labels, None, 0.0)
    # unchecked: the bad rows make the loss NaN, the gradient stays finite (no target)
    loss, dpred = _run(backend, kind, pred, labels, None, 0.1, check_labels=False)
    assert np.isnan(loss)
    assert np.isfinite(dpred).all()
    # the good rows' gradient is the reference's
    good = np.array([i for i in range(n) if i not in (5, 7)])
    _, want = ref.loss_forward_backward(kind, f64(pred[good]), labels[good],
                                        label_smoothing=0.1)
    want = want * len(good) / n  # the reference averaged over its own rows
    assert_close(dpred[good], want, _grad_tol(want, kind), "good rows")


@pytest.mark.parametrize("kind,lab,ls", CASES, ids=[f"{k}-{lb}-ls{s}" for k, lb, s in CASES])
def test_nan_pred_gives_nan_loss(backend, rng, kind, lab, ls):
    n, c = 6, 5
    pred, target = make_data(rng, kind, lab, (n, c))
    pred[3, 2] = np.nan
    loss, dpred = _run(backend, kind, pred, target, None, ls)
    assert np.isnan(loss)
    # the other rows are untouched by it
    rows = [0, 1, 2, 4, 5]
    _, want = ref.loss_forward_backward(kind, f64(pred[rows]), _ref_target(target[rows]),
                                        delta=DELTA, label_smoothing=ls)
    want = want * len(rows) / n
    assert_close(dpred[rows], want, _grad_tol(want, kind), "finite rows")
    assert np.isnan(dpred[3, 2])


@pytest.mark.parametrize("shape", [(5000, 10), (211, 1000)], ids=["narrow", "wide"])
@pytest.mark.parametrize("kind,lab,ls", CASES, ids=[f"{k}-{lb}-ls{s}" for k, lb, s in CASES])
def test_cpu_thread_count_does_not_change_bits(rng, kind, lab, ls, shape):
    """Above the parallel threshold: rows of 10 (blocks of whole rows) and of 1000
    (pieces of a row, fixed-order lane sums)."""
    pred, target = make_data(rng, kind, lab, shape)
    w = make_weights(rng, shape[0])
    before = fm.get_num_threads()
    try:
        fm.set_num_threads(1)
        l1, d1 = ops.loss_forward_backward(kind, pred, target, sample_weight=w, delta=DELTA,
                                           label_smoothing=ls)
        fm.set_num_threads(2)
        l2, d2 = ops.loss_forward_backward(kind, pred, target, sample_weight=w, delta=DELTA,
                                           label_smoothing=ls)
    finally:
        fm.set_num_threads(before)
    assert np.isfinite(l1) and l1 != 0.0
    assert l1 == l2
    assert np.array_equal(d1.view(np.uint32), d2.view(np.uint32))


def test_argument_errors(rng):
    f = ops.loss_forward_backward
    p = normal(rng, (4, 3))
    y = normal(rng, (4, 3))
    lab = np.array([0, 1, 2, 0], np.int64)
    with pytest.raises(ValueError, match="'kind' must be one of"):
        f("hinge", p, y)
    with pytest.raises(TypeError, match="'target' must be float32"):
        f("mse", p, lab)
    with pytest.raises(TypeError, match="'pred' must be float32"):
        f("mse", p.astype(np.float64), y)
    with pytest.raises(ValueError, match="'target' must have shape"):
        f("mse", p, y[:, :2])
    with pytest.raises(ValueError, match="integer 'labels' must have shape"):
        f("cce_logits", p, lab[:3])
    with pytest.raises(ValueError, match="C-contiguous"):
        f("mse", np.asfortranarray(p), y)
    with pytest.raises(ValueError, match="'sample_weight' must have shape"):
        f("mse", p, y, sample_weight=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="'delta' must be a finite number > 0"):
        f("huber", p, y, delta=0.0)
    with pytest.raises(ValueError, match=r"'label_smoothing' must be in \[0, 1\)"):
        f("cce_logits", p, lab, label_smoothing=1.0)
    with pytest.raises(ValueError, match="label_smoothing applies to"):
        f("mse", p, y, label_smoothing=0.1)
    with pytest.raises(ValueError, match="'out' overlaps 'pred'"):
        f("mse", p, y, out=p)
    with pytest.raises(ValueError, match="out= was given with backward=False"):
        f("mse", p, y, backward=False, out=np.empty_like(p))
    with pytest.raises(ValueError, match="0 columns"):
        f("mse", np.zeros((2, 0), np.float32), np.zeros((2, 0), np.float32))


def test_kernel_checks_label_kind():
    """The C++ contract: integer labels only for the cross-entropy kinds (-> ValueError)."""
    p = np.zeros((2, 3), np.float32)
    lab = np.zeros(2, np.int32)
    out = [np.empty(2, np.float32), np.empty(1, np.float32), np.empty(1, np.int64)]
    with pytest.raises(ValueError, match="needs float label rows"):
        fm._C.cpu.loss_fused(p.ctypes.data, lab.ctypes.data, 0, 0, 0, out[0].ctypes.data,
                             out[1].ctypes.data, out[2].ctypes.data, 2, 3, 0, 1.0, 0.0)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("kind,lab,ls", CASES, ids=[f"{k}-{lb}-ls{s}" for k, lb, s in CASES])
def test_gpu_matches_cpu_and_repeats(gpu, rng, kind, lab, ls):
    shape = (3000, 37)
    pred, target = make_data(rng, kind, lab, shape)
    w = make_weights(rng, shape[0])
    lc, dc = ops.loss_forward_backward(kind, pred, target, sample_weight=w, delta=DELTA,
                                       label_smoothing=ls)
    l1, d1 = _run(gpu, kind, pred, target, w, ls)
    l2, d2 = _run(gpu, kind, pred, target, w, ls)
    assert l1 == l2 and np.array_equal(d1.view(np.uint32), d2.view(np.uint32))
    assert abs(l1 - lc) <= _loss_tol(lc, pred, w)
    assert_close(d1, dc, _grad_tol(dc, kind, w), f"{kind} GPU vs CPU")
