"""sgd_step / adam_step kernels over 100 steps: against fm.reference in float32 (same
operations, so agreement is tight) and against torch.optim itself when torch imports."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close, normal

import fastmlp as fm
from fastmlp import reference as ref

STEPS = 100
SIZES = [1, 7, 63, 97, 1000, 4099]
# 100 steps each: only sizes 1 and 63 join the "small" (compute-sanitizer) subset
SIZE_IDS = [f"small-{s}" if s in (1, 63) else str(s) for s in SIZES]

SGD_CONFIGS = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.05, momentum=0.9),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True),
    "wd": dict(lr=0.1, weight_decay=0.01),
    "momentum-wd": dict(lr=0.02, momentum=0.5, weight_decay=1e-3),
    "nesterov-wd": dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.05),
}

ADAM_CONFIGS = {
    "adam": dict(lr=1e-3),
    "adam-hyper": dict(lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6),
    "adam-wd": dict(lr=1e-3, weight_decay=0.01),
    "adamw": dict(lr=1e-3, weight_decay=0.01, decoupled=True),
    "adamw-strong": dict(lr=5e-3, weight_decay=0.5, decoupled=True, beta1=0.5),
}


def _grads(rng, size):
    """Per-step gradients of varied magnitude (so Adam's eps and v's range both matter)."""
    scales = np.exp(rng.uniform(np.log(1e-3), np.log(10.0), size=size))
    return [(rng.standard_normal(size) * scales).astype(np.float32) for _ in range(STEPS)]


# Tolerances: a float32 step combines a handful of operands in a handful of roundings, and
# two correct implementations may round differently (an FMA instead of a multiply and an
# add: nvcc contracts by default, and torch's vectorised add(alpha=) does). Each step can
# thus differ by ~2 ulp of the magnitudes it combines, and such differences add up over
# the 100 steps; a momentum buffer carries its own for ~1/(1 - momentum) steps. So the bound
# is 4 ulp x (the sum over the trajectory of those magnitudes), from a float64 run: loose
# against rounding (the typical difference is ~sqrt(100) times smaller) yet tight against a
# wrong rule (a missing weight-decay or momentum term is off by ~lr * wd * |p| every step).
ULP = 2.0**-23


def _sgd_trajectory_tol(p0, grads, cfg):
    """(tolerance on param, tolerance on buf) for 100 SGD steps from p0, per element."""
    mu = cfg.get("momentum", 0.0)
    lr = cfg["lr"]
    wd = cfg.get("weight_decay", 0.0)
    carry = (1.0 + mu) / (1.0 - mu)  # a buffer error lives ~1/(1-mu) steps; nesterov adds mu*buf
    p, buf = p0.astype(np.float64), np.zeros(p0.shape)
    acc_p, acc_b = np.zeros(p0.shape), np.zeros(p0.shape)
    for g in grads:
        prev = p.copy()
        ref.sgd_step(p, g.astype(np.float64), buf, **cfg)
        gmag = np.abs(g) + wd * np.abs(prev)
        acc_b += gmag + mu * np.abs(buf)
        acc_p += np.abs(prev) + np.abs(p - prev) + lr * carry * (gmag + np.abs(buf))
    return 4 * ULP * acc_p + 1e-30, 4 * ULP * carry * acc_b + 1e-30


def _adam_trajectory_tol(p0, grads, cfg):
    """(tol param, tol m, tol v). The update m / (sqrt(v) + eps) is a ratio of quantities that
    are each a few ulp off, so |dp_t| <= step_size * |m/denom| carries a few ulp relative, plus
    those of |p| itself; m and v are running averages, their error bounded by a few ulp of
    the largest |g| (g^2) they averaged."""
    c = dict(
        lr=cfg["lr"],
        beta1=cfg.get("beta1", 0.9),
        beta2=cfg.get("beta2", 0.999),
        eps=cfg.get("eps", 1e-8),
    )
    wd = cfg.get("weight_decay", 0.0)
    p = p0.astype(np.float64)
    m, v = np.zeros(p.shape), np.zeros(p.shape)
    acc_p = np.zeros(p.shape)
    gmax = np.zeros(p.shape)
    for t, g in enumerate(grads, start=1):
        prev = p.copy()
        ref.adam_step(
            p,
            g.astype(np.float64),
            m,
            v,
            step=t,
            weight_decay=wd,
            decoupled=cfg.get("decoupled", False),
            **c,
        )
        step_size = c["lr"] / (1 - c["beta1"] ** t)
        denom = np.sqrt(v) / np.sqrt(1 - c["beta2"] ** t) + c["eps"]
        gmax = np.maximum(gmax, np.abs(g) + wd * np.abs(prev))
        # |m| may cancel towards 0 while its rounding stays at the scale of the |g| averaged
        acc_p += np.abs(prev) + np.abs(p - prev) + step_size * gmax / denom
    return 4 * ULP * acc_p + 1e-30, 8 * ULP * gmax + 1e-30, 8 * ULP * gmax**2 + 1e-30


def _run_sgd_kernel(backend, p0, grads, buf_needed, cfg):
    P = backend.to(p0.copy())
    buf = backend.xp.zeros_like(P) if buf_needed else None
    for g in grads:
        res = fm.ops.sgd_step(P, backend.to(g), buf, **cfg)
        assert res is P or backend.host(res).tobytes() == backend.host(P).tobytes()
    return backend.host(P), (None if buf is None else backend.host(buf))


def _run_sgd_ref(p0, grads, dtype, cfg):
    p = p0.astype(dtype)
    buf = np.zeros_like(p)
    for g in grads:
        ref.sgd_step(p, g.astype(dtype), buf, **cfg)
    return p, buf


@pytest.mark.parametrize("cfg", SGD_CONFIGS.values(), ids=SGD_CONFIGS.keys())
@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_sgd_step_vs_reference(backend, rng, size, cfg):
    p0 = normal(rng, size)
    grads = _grads(rng, size)
    momentum = cfg.get("momentum", 0.0) != 0
    got_p, got_buf = _run_sgd_kernel(backend, p0, grads, momentum, cfg)
    want_p, want_buf = _run_sgd_ref(p0, grads, np.float32, cfg)
    assert not np.array_equal(want_p, p0), "the parameters did not move: degenerate test"
    tol_p, tol_b = _sgd_trajectory_tol(p0, grads, cfg)
    assert_close(got_p, want_p, tol_p, "param")
    if momentum:
        assert_close(got_buf, want_buf, tol_b, "momentum buffer")
    # and the float32 run stays close to exact (float64) arithmetic
    want64, _ = _run_sgd_ref(p0, grads, np.float64, cfg)
    assert_close(got_p, want64, tol_p, "param vs float64")


def _run_adam_kernel(backend, p0, grads, cfg):
    P = backend.to(p0.copy())
    M, V = backend.xp.zeros_like(P), backend.xp.zeros_like(P)
    for t, g in enumerate(grads, start=1):
        fm.ops.adam_step(P, backend.to(g), M, V, step=t, **cfg)
    return backend.host(P), backend.host(M), backend.host(V)


def _run_adam_ref(p0, grads, dtype, cfg):
    p = p0.astype(dtype)
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        ref.adam_step(p, g.astype(dtype), m, v, step=t, **cfg)
    return p, m, v


@pytest.mark.parametrize("cfg", ADAM_CONFIGS.values(), ids=ADAM_CONFIGS.keys())
@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_adam_step_vs_reference(backend, rng, size, cfg):
    p0 = normal(rng, size)
    grads = _grads(rng, size)
    got = _run_adam_kernel(backend, p0, grads, cfg)
    want = _run_adam_ref(p0, grads, np.float32, cfg)
    assert not np.array_equal(want[0], p0), "the parameters did not move: degenerate test"
    tols = _adam_trajectory_tol(p0, grads, cfg)
    for g, w, tol, name in zip(got, want, tols, ("param", "m", "v")):
        assert np.count_nonzero(w) == w.size, (
            f"{name}: reference has zeros, the check would be weak"
        )
        assert_close(g, w, tol, name)
    want64 = _run_adam_ref(p0, grads, np.float64, cfg)
    assert_close(got[0], want64[0], tols[0], "param vs float64")


def test_sgd_no_buffer_without_momentum(backend, rng):
    p0, g = normal(rng, 31), normal(rng, 31)
    P = backend.to(p0.copy())
    fm.ops.sgd_step(P, backend.to(g), None, lr=0.5)
    assert_close(
        backend.host(P),
        p0.astype(np.float64) - 0.5 * g.astype(np.float64),
        2 * 2**-24 * (np.abs(p0) + 0.5 * np.abs(g)) + 1e-45,
    )


def test_optimizer_2d_params(backend, rng):
    """Parameters of any shape (a (in, out) kernel) update elementwise."""
    p0, g = normal(rng, (13, 7)), normal(rng, (13, 7))
    P, M, V = (
        backend.to(p0.copy()),
        backend.xp.zeros((13, 7), np.float32),
        backend.xp.zeros((13, 7), np.float32),
    )
    fm.ops.adam_step(P, backend.to(g), M, V, step=1, lr=0.01)
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    ref.adam_step(p, g, m, v, step=1, lr=0.01)
    assert_close(backend.host(P), p, _adam_trajectory_tol(p0, [g], dict(lr=0.01))[0], "param")


def test_zero_size_params(backend):
    P = backend.xp.zeros((0,), np.float32)
    fm.ops.sgd_step(
        P,
        backend.xp.zeros((0,), np.float32),
        backend.xp.zeros((0,), np.float32),
        lr=0.1,
        momentum=0.9,
    )
    fm.ops.adam_step(
        P,
        backend.xp.zeros((0,), np.float32),
        backend.xp.zeros((0,), np.float32),
        backend.xp.zeros((0,), np.float32),
        step=1,
        lr=0.1,
    )
    assert P.shape == (0,)


# ----------------------------------------------------------------------------- torch.optim

TORCH_SIZES = [7, 1000]


def _torch():
    return pytest.importorskip(
        "torch", reason="torch is not installed: the comparison with torch.optim needs it"
    )


@pytest.mark.parametrize("cfg", SGD_CONFIGS.values(), ids=SGD_CONFIGS.keys())
@pytest.mark.parametrize("size", TORCH_SIZES, ids=[str(s) for s in TORCH_SIZES])
def test_sgd_step_vs_torch(backend, rng, size, cfg):
    torch = _torch()
    p0 = normal(rng, size)
    grads = _grads(rng, size)
    tp = torch.nn.Parameter(torch.tensor(p0))
    opt = torch.optim.SGD([tp], **cfg)
    for g in grads:
        tp.grad = torch.tensor(g)
        opt.step()
    want = tp.detach().numpy().astype(np.float64)
    got, _ = _run_sgd_kernel(backend, p0, grads, cfg.get("momentum", 0.0) != 0, cfg)
    assert not np.array_equal(want, p0)
    assert_close(got, want, _sgd_trajectory_tol(p0, grads, cfg)[0], f"sgd {cfg} vs torch")


@pytest.mark.parametrize("cfg", ADAM_CONFIGS.values(), ids=ADAM_CONFIGS.keys())
@pytest.mark.parametrize("size", TORCH_SIZES, ids=[str(s) for s in TORCH_SIZES])
def test_adam_step_vs_torch(backend, rng, size, cfg):
    torch = _torch()
    p0 = normal(rng, size)
    grads = _grads(rng, size)
    cfg_t = dict(cfg)
    decoupled = cfg_t.pop("decoupled", False)
    betas = (cfg_t.pop("beta1", 0.9), cfg_t.pop("beta2", 0.999))
    tp = torch.nn.Parameter(torch.tensor(p0))
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    cfg_t.setdefault("weight_decay", 0.0)  # AdamW's default is 0.01: be explicit
    opt = cls([tp], betas=betas, foreach=False, **cfg_t)
    for g in grads:
        tp.grad = torch.tensor(g)
        opt.step()
    want = tp.detach().numpy().astype(np.float64)
    state = opt.state[tp]
    got = _run_adam_kernel(backend, p0, grads, cfg)
    assert not np.array_equal(want, p0)
    tols = _adam_trajectory_tol(p0, grads, cfg)
    assert_close(got[0], want, tols[0], f"adam {cfg} vs torch: param")
    for g, key, tol in ((got[1], "exp_avg", tols[1]), (got[2], "exp_avg_sq", tols[2])):
        assert_close(g, state[key].numpy().astype(np.float64), tol, f"adam {cfg} vs torch: {key}")
