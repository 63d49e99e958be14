"""NaN and Inf propagate through every kernel as in PyTorch (issue 20).

Each op gets inputs with NaN, +Inf and -Inf scattered among ordinary values and is
compared with the same computation in PyTorch (float32, CPU): the NaN, +Inf and -Inf
positions must be identical, and the finite values close (sums may be ordered
differently). The shapes reach the GEMM's different paths (small, narrow n, split-k,
packed blocks). Runs on both backends; the torch comparisons skip when torch is absent.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastmlp as fm
from fastmlp import reference as ref



def _torch():
    return pytest.importorskip(
        "torch", reason="torch is not installed: the NaN/Inf comparison with PyTorch needs it")


SPECIALS = np.array([np.nan, np.inf, -np.inf], dtype=np.float32)


def poisoned(rng, shape, count):
    """Ordinary values in [-1, 1) with ``count`` NaN / +Inf / -Inf at random positions."""
    a = rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
    flat = a.reshape(-1)
    where = rng.choice(flat.size, size=min(count, flat.size), replace=False)
    flat[where] = SPECIALS[rng.integers(0, 3, size=len(where))]
    return a


def assert_same_nonfinite(got, want, what, rtol=2e-5, atol=2e-5):
    """Identical NaN / +Inf / -Inf positions; the finite values close."""
    got, want = np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    for name, test in (("NaN", np.isnan), ("+Inf", np.isposinf), ("-Inf", np.isneginf)):
        g, w = test(got), test(want)
        if not np.array_equal(g, w):
            idx = tuple(np.argwhere(g != w)[0])
            raise AssertionError(f"{what}: {name} positions differ from PyTorch ({int((g != w).sum())}"
                                 f" elements); first at {list(idx)}: got {got[idx]}, torch {want[idx]}")
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=rtol, atol=atol, err_msg=what)


def t(a):
    torch = _torch()
    return torch.from_numpy(np.ascontiguousarray(a))


# ----------------------------------------------------------------------------- elementwise


def test_relu_and_backward_vs_torch(backend, rng):
    torch = _torch()
    x = poisoned(rng, (37, 29), 120)
    x.reshape(-1)[:4] = [-0.0, 0.0, np.inf, -np.inf]
    got = backend.host(fm.ops.relu(backend.to(x)))
    want = torch.relu(t(x)).numpy()
    assert_same_nonfinite(got, want, "relu")
    assert np.array_equal(np.signbit(got), np.signbit(want)), "relu: signs of zeros differ from torch"
    y = torch.relu(t(poisoned(rng, (37, 29), 120))).numpy()  # a forward output: NaN, +Inf, 0, > 0
    dy = poisoned(rng, (37, 29), 120)
    got = backend.host(fm.ops.relu_backward(backend.to(dy), backend.to(y)))
    want = torch.ops.aten.threshold_backward(t(dy), t(y), 0.0).numpy()
    assert_same_nonfinite(got, want, "relu_backward")
    assert_same_nonfinite(got, ref.relu_backward(dy.astype(np.float64), y.astype(np.float64)),
                          "relu_backward vs fm.reference")


def test_bias_add_and_grad_vs_torch(backend, rng):
    x, b = poisoned(rng, (300, 70), 200), poisoned(rng, (70,), 6)
    got = backend.host(fm.ops.bias_add(backend.to(x), backend.to(b)))
    assert_same_nonfinite(got, (t(x) + t(b)).numpy(), "bias_add")
    dy = poisoned(rng, (3000, 70), 40)  # tall: the blocked partial sums of bias_grad
    got = backend.host(fm.ops.bias_grad(backend.to(dy)))
    assert_same_nonfinite(got, t(dy).sum(0).numpy(), "bias_grad", rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------------------- GEMM family

# (m, n, k): small, narrow n (one vector), a split-k shape (few rows, long k), packed blocks.
GEMM_SHAPES = [(5, 3, 7), (33, 10, 64), (16, 24, 3000), (130, 70, 300)]


@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True)])
def test_gemm_vs_torch(backend, rng, m, n, k, trans_a, trans_b):
    a = poisoned(rng, (k, m) if trans_a else (m, k), 3)
    b = poisoned(rng, (n, k) if trans_b else (k, n), 3)
    got = backend.host(fm.ops.gemm(backend.to(a), backend.to(b), trans_a=trans_a,
                                   trans_b=trans_b, precision="fp32"))
    ta, tb = t(a), t(b)
    want = ((ta.T if trans_a else ta) @ (tb.T if trans_b else tb)).numpy()
    assert_same_nonfinite(got, want, f"gemm {m}x{n}x{k} ta={trans_a} tb={trans_b}",
                          rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
def test_dense_forward_relu_vs_torch(backend, rng, m, n, k):
    """The fused bias + ReLU epilogue (vector and scalar paths)."""
    torch = _torch()
    x, w, b = poisoned(rng, (m, k), 3), poisoned(rng, (k, n), 2), poisoned(rng, (n,), 2)
    got = backend.host(fm.ops.dense_forward(backend.to(x), backend.to(w), backend.to(b),
                                            activation="relu", precision="fp32"))
    want = torch.relu(t(x) @ t(w) + t(b)).numpy()
    assert_same_nonfinite(got, want, f"dense_forward relu {m}x{n}x{k}", rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
def test_dense_backward_vs_torch(backend, rng, m, n, k):
    """dx = (dy w^T) masked by the ReLU output (the epilogue's relu_grad), gw = x^T dy, gb."""
    torch = _torch()
    dy, w = poisoned(rng, (m, n), 2), poisoned(rng, (k, n), 2)
    y = torch.relu(t(poisoned(rng, (m, k), 6))).numpy()
    got = backend.host(fm.ops.dense_backward_input(backend.to(dy), backend.to(w),
                                                   relu_output=backend.to(y), precision="fp32"))
    want = torch.ops.aten.threshold_backward(t(dy) @ t(w).T, t(y), 0.0).numpy()
    assert_same_nonfinite(got, want, f"dense_backward_input {m}x{n}x{k}", rtol=1e-4, atol=1e-3)
    x = poisoned(rng, (m, k), 3)
    gw, gb = fm.ops.dense_backward_weight(backend.to(x), backend.to(dy), precision="fp32")
    assert_same_nonfinite(backend.host(gw), (t(x).T @ t(dy)).numpy(), "dense_backward_weight gw",
                          rtol=1e-4, atol=1e-3)
    assert_same_nonfinite(backend.host(gb), t(dy).sum(0).numpy(), "dense_backward_weight gb",
                          rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------------------- softmax CE


def _xent_torch(z, labels):
    torch = _torch()
    tz = t(z).requires_grad_()
    loss = torch.nn.functional.cross_entropy(tz, t(labels).long())
    loss.backward()
    probs = torch.softmax(t(z), dim=1)
    return float(loss.detach()), probs.numpy(), tz.grad.numpy()


@pytest.mark.parametrize("case", ["nan", "+inf", "-inf", "-inf target", "all -inf", "mixed"])
def test_softmax_cross_entropy_vs_torch(backend, rng, case):
    """A NaN or +Inf logit makes its row NaN and the mean loss NaN (the max-reduction
    propagates NaN); -Inf logits are probabilities 0 (an -Inf at the label: loss +Inf)."""
    rows, cols = 9, 10
    z = rng.normal(size=(rows, cols)).astype(np.float32)
    labels = rng.integers(0, cols, size=rows).astype(np.int64)
    if case == "nan":
        z[2, 5] = np.nan
    elif case == "+inf":
        z[4, 0] = np.inf
    elif case == "-inf":
        z[3, (labels[3] + 1) % cols] = -np.inf
    elif case == "-inf target":
        z[6, labels[6]] = -np.inf
    elif case == "all -inf":
        z[1] = -np.inf
    else:
        z = poisoned(rng, (rows, cols), 8)
    loss_t, probs_t, grad_t = _xent_torch(z, labels)
    zd, yd = backend.to(z), backend.to(labels)
    loss, probs, _ = fm.ops.softmax_cross_entropy_forward(zd, yd)
    assert_same_nonfinite(backend.host(loss), np.float32(loss_t), f"{case}: loss", rtol=1e-5)
    assert_same_nonfinite(backend.host(probs), probs_t, f"{case}: probs")
    grad = fm.ops.softmax_cross_entropy_backward(probs, yd)
    assert_same_nonfinite(backend.host(grad), grad_t, f"{case}: dlogits")
    floss, out, _, _ = fm.ops.softmax_cross_entropy_fused(zd, yd, backward=True)
    assert_same_nonfinite(backend.host(floss), np.float32(loss_t), f"{case}: fused loss", rtol=1e-5)
    assert_same_nonfinite(backend.host(out), grad_t, f"{case}: fused dlogits")


# ----------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("opt", ["sgd", "sgd_momentum", "adam", "adamw"])
def test_optimizer_steps_vs_torch(backend, rng, opt):
    """A NaN or Inf gradient poisons exactly the entries torch.optim poisons."""
    torch = _torch()
    size = 5000
    p0 = rng.uniform(-1, 1, size).astype(np.float32)
    grads = [poisoned(rng, (size,), 40) for _ in range(3)]
    tp = torch.nn.Parameter(t(p0.copy()))
    if opt.startswith("sgd"):
        mom = 0.9 if opt == "sgd_momentum" else 0.0
        topt = torch.optim.SGD([tp], lr=0.1, momentum=mom)
    elif opt == "adam":
        topt = torch.optim.Adam([tp], lr=1e-2)
    else:
        topt = torch.optim.AdamW([tp], lr=1e-2, weight_decay=0.1)
    p = backend.to(p0)
    s0 = backend.to(np.zeros(size, np.float32))
    s1 = backend.to(np.zeros(size, np.float32))
    for step, g in enumerate(grads, start=1):
        tp.grad = t(g.copy())
        topt.step()
        if opt.startswith("sgd"):
            fm.ops.sgd_step(p, backend.to(g), s0 if mom else None, lr=0.1, momentum=mom)
        else:
            fm.ops.adam_step(p, backend.to(g), s0, s1, step=step, lr=1e-2,
                             weight_decay=0.1 if opt == "adamw" else 0.0,
                             decoupled=opt == "adamw")
    assert_same_nonfinite(backend.host(p), tp.detach().numpy(), opt, rtol=1e-5, atol=1e-6)
