"""fm.reference on its own, in float64: its gradients against central finite differences,
its numerics (+-1000 logits, n == 0, BLAS out semantics), analytic optimizer steps, and
torch where torch imports. The kernels are tested against this module, so it must be right."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import onehot, soft_labels

from fastmlp import reference as ref

H = 1e-6  # central-difference step: truncation O(H^2) ~ 1e-12, roundoff ~ 1e-16/H ~ 1e-10


def central_diff(f, x, h=H):
    """d f / d x by central differences, one coordinate at a time (x is perturbed in place)."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        fp = f()
        x[i] = old - h
        fm_ = f()
        x[i] = old
        g[i] = (fp - fm_) / (2 * h)
    return g


def _assert_grad(analytic, numeric, what):
    # FD error ~1e-9 for O(1) functions; 1e-7 absolute + 1e-6 relative leaves room for
    # round-off, while a wrong formula (a missing 1/n, a transpose) is off by O(1).
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-7, err_msg=what)
    assert np.abs(numeric).max() > 1e-3, f"{what}: the gradient is ~0, the check is weak"


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", ["int32", "int64", "onehot", "soft"])
@pytest.mark.parametrize("n,c", [(1, 2), (5, 3), (7, 13)])
def test_softmax_xent_backward_matches_fd(n, c, kind):
    rng = np.random.default_rng(n * 100 + c)
    logits = rng.standard_normal((n, c)) * 2
    idx = rng.integers(0, c, n)
    labels = {
        "int32": idx.astype(np.int32),
        "int64": idx.astype(np.int64),
        "onehot": onehot(idx, c, np.float64),
        "soft": soft_labels(rng, n, c).astype(np.float64),
    }[kind]
    loss, probs = ref.softmax_cross_entropy(logits, labels)
    analytic = ref.softmax_cross_entropy_backward(probs, labels)
    numeric = central_diff(lambda: float(ref.softmax_cross_entropy(logits, labels)[0]), logits)
    _assert_grad(analytic, numeric, "d loss / d logits")


def test_dense_backward_matches_fd():
    """dW = X^T dY, dX = dY W^T, db = column sums of dY for f = sum(dY * (X @ W + b))."""
    rng = np.random.default_rng(1)
    n, fin, fout = 6, 5, 4
    x, w, b, dy = (rng.standard_normal(s) for s in ((n, fin), (fin, fout), (fout,), (n, fout)))

    def f():
        return float(np.sum(dy * ref.bias_add(ref.gemm(x, w), b)))

    _assert_grad(ref.gemm(x, dy, trans_a=True), central_diff(f, w), "dW")
    _assert_grad(ref.gemm(dy, w, trans_b=True), central_diff(f, x), "dX")
    _assert_grad(ref.bias_grad(dy), central_diff(f, b), "db")


def test_relu_backward_matches_fd():
    rng = np.random.default_rng(2)
    x = rng.uniform(0.01, 2, (7, 9)) * rng.choice([-1, 1], (7, 9))  # |x| >= 0.01 >> H: no kink
    dy = rng.standard_normal((7, 9))
    numeric = central_diff(lambda: float(np.sum(dy * ref.relu(x))), x)
    _assert_grad(ref.relu_backward(dy, ref.relu(x)), numeric, "relu")


def test_mlp_backward_matches_fd():
    """The whole chain (Dense relu -> Dense -> softmax CE) as fit composes it."""
    rng = np.random.default_rng(3)
    n, d, h, c = 5, 4, 6, 3
    x = rng.standard_normal((n, d))
    w1, b1 = rng.standard_normal((d, h)), rng.standard_normal(h) * 0.1
    w2, b2 = rng.standard_normal((h, c)), rng.standard_normal(c) * 0.1
    y = rng.integers(0, c, n)

    def forward():
        z1 = ref.bias_add(ref.gemm(x, w1), b1)
        a1 = ref.relu(z1)
        loss, p = ref.softmax_cross_entropy(ref.bias_add(ref.gemm(a1, w2), b2), y)
        return z1, a1, loss, p

    z1, a1, loss, p = forward()
    assert np.abs(z1).min() > 1e-3, "a pre-activation at relu's kink would make FD meaningless"
    dz2 = ref.softmax_cross_entropy_backward(p, y)
    dz1 = ref.relu_backward(ref.gemm(dz2, w2, trans_b=True), a1)
    f = lambda: float(forward()[2])  # noqa: E731
    _assert_grad(ref.gemm(a1, dz2, trans_a=True), central_diff(f, w2), "dW2")
    _assert_grad(ref.bias_grad(dz2), central_diff(f, b2), "db2")
    _assert_grad(ref.gemm(x, dz1, trans_a=True), central_diff(f, w1), "dW1")
    _assert_grad(ref.bias_grad(dz1), central_diff(f, b1), "db1")


# ----------------------------------------------------------------------------- gemm semantics


@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_gemm_transposes_and_scaling(ta, tb):
    rng = np.random.default_rng(4)
    m, k, n = 5, 7, 3
    a = rng.standard_normal((k, m) if ta else (m, k))
    b = rng.standard_normal((n, k) if tb else (k, n))
    oa, ob = (a.T if ta else a), (b.T if tb else b)
    expect = np.einsum("ik,kj->ij", oa, ob)
    np.testing.assert_allclose(ref.gemm(a, b, trans_a=ta, trans_b=tb), expect, rtol=1e-13)
    c0 = rng.standard_normal((m, n))
    out = c0.copy()
    res = ref.gemm(a, b, trans_a=ta, trans_b=tb, alpha=-0.5, beta=2.0, out=out)
    assert res is out
    np.testing.assert_allclose(out, -0.5 * expect + 2.0 * c0, rtol=1e-13)


def test_gemm_beta_zero_ignores_nan_out():
    a, b = np.ones((2, 3)), np.ones((3, 4))
    out = np.full((2, 4), np.nan)
    ref.gemm(a, b, alpha=2.0, beta=0.0, out=out)
    assert np.array_equal(out, np.full((2, 4), 6.0))


def test_gemm_empty_inner_dim():
    out = np.full((3, 2), 5.0)
    ref.gemm(np.zeros((3, 0)), np.zeros((0, 2)), beta=0.5, out=out)
    assert np.array_equal(out, np.full((3, 2), 2.5))
    assert np.array_equal(ref.gemm(np.zeros((3, 0)), np.zeros((0, 2))), np.zeros((3, 2)))


def test_gemm_shape_mismatch():
    with pytest.raises(ValueError, match="'b'"):
        ref.gemm(np.zeros((3, 4)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="'out'"):
        ref.gemm(np.zeros((3, 4)), np.zeros((4, 2)), out=np.zeros((2, 3)))


def test_float32_stays_float32():
    a = np.ones((2, 3), np.float32)
    assert ref.gemm(a, a, trans_b=True, alpha=0.5).dtype == np.float32
    assert ref.relu(a).dtype == np.float32
    assert ref.bias_add(a, np.ones(3, np.float32)).dtype == np.float32
    loss, p = ref.softmax_cross_entropy(a, np.zeros(2, np.int64))
    assert loss.dtype == np.float32 and p.dtype == np.float32 and loss.shape == ()


# ----------------------------------------------------------------------------- elementwise


def test_bias_and_relu_values():
    x = np.array([[1.0, -2.0, 0.0], [np.nan, np.inf, -np.inf]])
    assert np.array_equal(ref.relu(x), [[1.0, 0.0, 0.0], [np.nan, np.inf, 0.0]], equal_nan=True)
    assert np.array_equal(
        ref.relu_backward(np.array([np.nan, 2.0, 3.0, 4.0]), np.array([0.0, 1.0, -1.0, np.nan])),
        [0.0, 2.0, 0.0, 4.0])
    assert np.array_equal(
        ref.bias_add(np.zeros((2, 3)), np.array([1.0, 2.0, 3.0])), [[1, 2, 3], [1, 2, 3]]
    )
    assert np.array_equal(ref.bias_grad(np.arange(6.0).reshape(2, 3)), [3.0, 5.0, 7.0])
    assert np.array_equal(ref.bias_grad(np.zeros((0, 4))), np.zeros(4))


def test_out_may_alias_input():
    x = np.array([[-1.0, 2.0]])
    assert ref.relu(x, out=x) is x and np.array_equal(x, [[0.0, 2.0]])
    assert ref.bias_add(x, np.array([1.0, 1.0]), out=x) is x and np.array_equal(x, [[1.0, 3.0]])
    p = np.array([[0.25, 0.75]])
    assert ref.softmax_cross_entropy_backward(p, np.array([1]), out=p) is p
    assert np.allclose(p, [[0.25, -0.25]])


# ----------------------------------------------------------------------------- softmax CE


def test_softmax_xent_small_values():
    logits = np.array([[0.0, np.log(3.0)]])
    loss, p = ref.softmax_cross_entropy(logits, np.array([1]))
    np.testing.assert_allclose(p, [[0.25, 0.75]], rtol=1e-14)
    np.testing.assert_allclose(loss, -np.log(0.75), rtol=1e-14)
    assert isinstance(loss, np.ndarray) and loss.shape == ()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_xent_extreme_logits(dtype):
    logits = np.array(
        [[1000.0, -1000.0, 0.0], [-1000.0, -1000.0, -1000.0], [1000.0, 1000.0, -1000.0]],
        dtype=dtype,
    )
    labels = np.array([1, 2, 0])
    loss, p = ref.softmax_cross_entropy(logits, labels)
    assert np.isfinite(p).all() and np.isfinite(loss)
    np.testing.assert_allclose(p[1], [1 / 3] * 3, rtol=1e-6)
    np.testing.assert_allclose(p[2], [0.5, 0.5, 0.0], atol=1e-7)
    # row losses: 2000, log 3, log 2
    np.testing.assert_allclose(loss, (2000 + np.log(3) + np.log(2)) / 3, rtol=1e-6)
    # one-hot labels give the same, including the row where p[label] underflows to 0
    loss_oh, _ = ref.softmax_cross_entropy(logits, onehot(labels, 3, dtype))
    np.testing.assert_allclose(loss_oh, loss, rtol=1e-6)
    assert np.isfinite(ref.softmax_cross_entropy_backward(p, labels)).all()


def test_softmax_xent_label_forms_agree():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((9, 4))
    idx = rng.integers(0, 4, 9)
    l32, p32 = ref.softmax_cross_entropy(logits, idx.astype(np.int32))
    l64, _ = ref.softmax_cross_entropy(logits, idx.astype(np.int64))
    loh, _ = ref.softmax_cross_entropy(logits, onehot(idx, 4, np.float64))
    assert l32 == l64
    np.testing.assert_allclose(loh, l32, rtol=1e-14)
    g = ref.softmax_cross_entropy_backward(p32, idx)
    np.testing.assert_allclose(
        g, ref.softmax_cross_entropy_backward(p32, onehot(idx, 4, np.float64)), rtol=1e-14
    )
    np.testing.assert_allclose(g.sum(axis=1), 0.0, atol=1e-15)  # each row of p - onehot sums to 0


def test_softmax_xent_empty():
    loss, p = ref.softmax_cross_entropy(np.zeros((0, 5)), np.zeros(0, np.int64))
    assert loss.shape == () and float(loss) == 0.0 and p.shape == (0, 5)
    assert ref.softmax_cross_entropy_backward(p, np.zeros(0, np.int64)).shape == (0, 5)
    loss, _ = ref.softmax_cross_entropy(np.zeros((0, 5), np.float32), np.zeros((0, 5), np.float32))
    assert float(loss) == 0.0


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("bad", [-1, 4, 2**40], ids=["negative", "eq-classes", "huge"])
def test_softmax_xent_bad_labels(dtype, bad):
    if dtype == np.int32 and bad > 2**31:
        bad = 2**31 - 1
    labels = np.array([0, 1, 2, bad, 3], dtype=dtype)
    with pytest.raises(ValueError, match=rf"label {bad} at row 3"):
        ref.softmax_cross_entropy(np.zeros((5, 4)), labels)
    with pytest.raises(ValueError, match=rf"label {bad} at row 3"):
        ref.softmax_cross_entropy_backward(np.full((5, 4), 0.25), labels)


def test_softmax_xent_label_shape_errors():
    with pytest.raises(ValueError, match="'labels'"):
        ref.softmax_cross_entropy(np.zeros((5, 4)), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="'labels'"):
        ref.softmax_cross_entropy(np.zeros((5, 4)), np.zeros((5, 3)))
    with pytest.raises(TypeError, match="'labels'"):
        ref.softmax_cross_entropy(np.zeros((5, 4)), np.zeros(5, bool))


# ----------------------------------------------------------------------------- optimizers


def test_sgd_analytic():
    """Constant gradient g, momentum mu: buf_t = g (1 - mu^t) / (1 - mu)."""
    p, g, buf = np.array([1.0, -2.0]), np.array([0.5, 1.0]), np.zeros(2)
    mu, lr = 0.9, 0.1
    total = np.zeros(2)
    for t in range(1, 6):
        ref.sgd_step(p, g, buf, lr=lr, momentum=mu)
        np.testing.assert_allclose(buf, g * (1 - mu**t) / (1 - mu), rtol=1e-14)
        total += lr * buf
    np.testing.assert_allclose(p, np.array([1.0, -2.0]) - total, rtol=1e-14)
    # plain SGD with weight decay: p <- p - lr (g + wd p)
    p = np.array([2.0])
    ref.sgd_step(p, np.array([1.0]), None, lr=0.5, weight_decay=0.1)
    np.testing.assert_allclose(p, 2.0 - 0.5 * (1.0 + 0.2), rtol=1e-15)
    # nesterov first step: buf = g, update g + mu * g
    p, buf = np.array([0.0]), np.zeros(1)
    ref.sgd_step(p, np.array([1.0]), buf, lr=1.0, momentum=0.5, nesterov=True)
    np.testing.assert_allclose(p, [-1.5], rtol=1e-15)


def test_adam_first_step_analytic():
    """At step 1 the bias corrections cancel: p1 = p0 - lr * g / (|g| + eps)."""
    p0, g = np.array([1.0, -1.0, 0.5, 3.0]), np.array([0.3, -2.0, 1e-9, 0.0])
    p, m, v = p0.copy(), np.zeros(4), np.zeros(4)
    ref.adam_step(p, g, m, v, step=1, lr=0.01)
    np.testing.assert_allclose(p, p0 - 0.01 * g / (np.abs(g) + 1e-8), rtol=1e-12)
    np.testing.assert_allclose(m, 0.1 * g, rtol=1e-14)
    np.testing.assert_allclose(v, 0.001 * g * g, rtol=1e-12)
    # AdamW scales p by (1 - lr wd) before the Adam update; Adam adds wd p to g
    p, m, v = p0.copy(), np.zeros(4), np.zeros(4)
    ref.adam_step(p, g, m, v, step=1, lr=0.01, weight_decay=0.5, decoupled=True)
    np.testing.assert_allclose(p, p0 * (1 - 0.005) - 0.01 * g / (np.abs(g) + 1e-8), rtol=1e-12)
    p, m, v = p0.copy(), np.zeros(4), np.zeros(4)
    ref.adam_step(p, g, m, v, step=1, lr=0.01, weight_decay=0.5)
    gg = g + 0.5 * p0
    np.testing.assert_allclose(p, p0 - 0.01 * gg / (np.abs(gg) + 1e-8), rtol=1e-12)


def test_adam_rejects_step_zero():
    z = np.zeros(3)
    with pytest.raises(ValueError, match="'step'"):
        ref.adam_step(z, z, z.copy(), z.copy(), step=0, lr=0.1)


def _torch():
    return pytest.importorskip(
        "torch", reason="torch is not installed: the comparison with torch needs it"
    )


@pytest.mark.parametrize(
    "cfg",
    [
        dict(lr=0.1),
        dict(lr=0.05, momentum=0.9),
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
        dict(lr=0.1, weight_decay=0.1),
    ],
    ids=["plain", "momentum", "nesterov-wd", "wd"],
)
def test_sgd_reference_vs_torch_float64(cfg):
    torch = _torch()
    rng = np.random.default_rng(6)
    p0 = rng.standard_normal(50)
    grads = [rng.standard_normal(50) for _ in range(100)]
    tp = torch.nn.Parameter(torch.tensor(p0))
    opt = torch.optim.SGD([tp], **cfg)
    p, buf = p0.copy(), np.zeros(50)
    for g in grads:
        tp.grad = torch.tensor(g)
        opt.step()
        ref.sgd_step(p, g, buf, **cfg)
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(lr=1e-2),
        dict(lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6),
        dict(lr=1e-2, weight_decay=0.1),
        dict(lr=1e-2, weight_decay=0.1, decoupled=True),
    ],
    ids=["adam", "adam-hyper", "adam-wd", "adamw"],
)
def test_adam_reference_vs_torch_float64(cfg):
    torch = _torch()
    rng = np.random.default_rng(7)
    p0 = rng.standard_normal(50)
    grads = [rng.standard_normal(50) * np.exp(rng.uniform(-8, 2)) for _ in range(100)]
    c = dict(cfg)
    cls = torch.optim.AdamW if c.pop("decoupled", False) else torch.optim.Adam
    betas = (c.pop("beta1", 0.9), c.pop("beta2", 0.999))
    c.setdefault("weight_decay", 0.0)
    tp = torch.nn.Parameter(torch.tensor(p0))
    opt = cls([tp], betas=betas, foreach=False, **c)
    p, m, v = p0.copy(), np.zeros(50), np.zeros(50)
    for t, g in enumerate(grads, start=1):
        tp.grad = torch.tensor(g)
        opt.step()
        ref.adam_step(p, g, m, v, step=t, **cfg)
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(m, opt.state[tp]["exp_avg"].numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(v, opt.state[tp]["exp_avg_sq"].numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["int", "soft"])
def test_softmax_xent_vs_torch(kind):
    torch = _torch()
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((13, 7)) * 5
    labels = rng.integers(0, 7, 13)
    if kind == "soft":
        # rows summing to 1 in float64: torch's soft-label gradient is p * sum(y) - y
        labels = soft_labels(rng, 13, 7).astype(np.float64)
        labels /= labels.sum(axis=1, keepdims=True)
    loss, p = ref.softmax_cross_entropy(logits, labels)
    tl = torch.tensor(logits, requires_grad=True)
    tloss = torch.nn.functional.cross_entropy(tl, torch.tensor(labels))
    tloss.backward()
    np.testing.assert_allclose(loss, tloss.item(), rtol=1e-12)
    np.testing.assert_allclose(
        ref.softmax_cross_entropy_backward(p, labels), tl.grad.numpy(), rtol=1e-10, atol=1e-15
    )


# ----------------------------------------------------------------------------- on CuPy


@pytest.mark.gpu
def test_reference_runs_on_cupy(gpu):
    """The one reference serves both devices: on CuPy arrays it matches its NumPy self."""
    cp = gpu.xp
    rng = np.random.default_rng(9)
    a, b = rng.standard_normal((13, 7)), rng.standard_normal((7, 5))
    np.testing.assert_allclose(
        cp.asnumpy(ref.gemm(cp.asarray(a), cp.asarray(b))), ref.gemm(a, b), rtol=1e-12
    )
    labels = rng.integers(0, 5, 13)
    logits = rng.standard_normal((13, 5))
    loss, p = ref.softmax_cross_entropy(cp.asarray(logits), cp.asarray(labels))
    loss_h, p_h = ref.softmax_cross_entropy(logits, labels)
    assert isinstance(p, cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(p), p_h, rtol=1e-12)
    np.testing.assert_allclose(float(loss), float(loss_h), rtol=1e-12)
    g = ref.softmax_cross_entropy_backward(p, cp.asarray(labels))
    np.testing.assert_allclose(
        cp.asnumpy(g), ref.softmax_cross_entropy_backward(p_h, labels), rtol=1e-12
    )
    bad = cp.asarray(np.array([0, 9, 1]))
    with pytest.raises(ValueError, match="label 9 at row 1"):
        ref.softmax_cross_entropy(cp.zeros((3, 5)), bad)
    P, M, V = cp.asarray(a), cp.zeros_like(cp.asarray(a)), cp.zeros_like(cp.asarray(a))
    ph, mh, vh = a.copy(), np.zeros_like(a), np.zeros_like(a)
    ref.adam_step(P, cp.asarray(a * 0.5), M, V, step=1, lr=0.1)
    ref.adam_step(ph, a * 0.5, mh, vh, step=1, lr=0.1)
    np.testing.assert_allclose(cp.asnumpy(P), ph, rtol=1e-12)
