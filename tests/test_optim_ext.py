"""RMSprop, gradient clipping and the l1 / l2 gradient transform of the optimizer kernels.

Against torch.optim (RMSprop step by step; clipnorm / global_clipnorm / clipvalue as
torch.nn.utils.clip_grad_norm_ / clip_grad_value_ before the torch optimizer's step;
l1 / l2 as the gradient of a regularizer added to the loss), against fm.reference, and
for determinism (the penalty and the clip scales do not depend on the thread count).
Every test runs on the CPU and, with CuPy and a GPU, on the CUDA kernels (`backend`).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from helpers import assert_close, normal

import fastmlp as fm
from fastmlp import reference as ref

torch = pytest.importorskip("torch")

ULP = 2.0**-23


def _grads(rng, size, steps):
    """Gradients of varied magnitude (so RMSprop's eps and square_avg's range matter)."""
    scales = np.exp(rng.uniform(np.log(1e-3), np.log(10.0), size=size))
    return [(rng.standard_normal(size) * scales).astype(np.float32) for _ in range(steps)]


def _ulp(x):
    """One float32 ulp of |x| (elementwise, float64)."""
    return np.spacing(np.abs(np.asarray(x, np.float32))).astype(np.float64)


# ------------------------------------------------------------------------ RMSprop vs torch

RMSPROP_CONFIGS = {
    f"mom{m}-{'c' if c else 'nc'}-wd{wd}-a{a}": dict(momentum=m, centered=c, weight_decay=wd,
                                                    alpha=a)
    for m, c, wd, a in itertools.product((0.0, 0.9), (False, True), (0.0, 0.01), (0.99, 0.3))
}


@pytest.mark.parametrize("cfg", RMSPROP_CONFIGS.values(), ids=RMSPROP_CONFIGS.keys())
@pytest.mark.parametrize("size", [1, 97, 4099])
def test_rmsprop_vs_torch_step_by_step(backend, rng, size, cfg):
    """20 steps; before each, torch's state is set to ours, so each step is compared alone.

    The rule follows torch's single-tensor path op for op (kernel_math.h), so square_avg
    and grad_avg are bit-exact. param and the momentum buffer are within 1 ulp (plus one
    ulp of the step term): torch's vectorised CPU sqrt is not always correctly rounded
    (ours is), which moves avg by 1 ulp in ~15% of the elements.
    """
    lr, steps = 0.01, 20
    momentum, centered = cfg["momentum"], cfg["centered"]
    p0 = normal(rng, size)
    xp = backend.xp
    P, SQ = backend.to(p0), xp.zeros(size, np.float32)
    BUF = xp.zeros(size, np.float32) if momentum else None
    GA = xp.zeros(size, np.float32) if centered else None
    tp = torch.tensor(p0.copy())
    opt = torch.optim.RMSprop([tp], lr=lr, eps=1e-8, **cfg)
    moved = 0
    for g in _grads(rng, size, steps):
        # torch's state := ours (after its first step has created the buffers)
        if opt.state:
            st = opt.state[tp]
            tp.data.copy_(torch.from_numpy(backend.host(P).copy()))
            st["square_avg"].copy_(torch.from_numpy(backend.host(SQ).copy()))
            if momentum:
                st["momentum_buffer"].copy_(torch.from_numpy(backend.host(BUF).copy()))
            if centered:
                st["grad_avg"].copy_(torch.from_numpy(backend.host(GA).copy()))
        before = backend.host(P).copy()
        buf_before = backend.host(BUF).astype(np.float64) if momentum else None
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        fm.ops.rmsprop_step(P, backend.to(g), SQ, BUF, GA, lr=lr, eps=1e-8, **cfg)
        st = opt.state[tp]
        np.testing.assert_array_equal(backend.host(SQ), st["square_avg"].numpy(), "square_avg")
        if centered:
            np.testing.assert_array_equal(backend.host(GA), st["grad_avg"].numpy(), "grad_avg")
        want = tp.numpy().astype(np.float64)
        if momentum:
            # buf = buf * momentum + g / avg: 1 ulp of buf, and g / avg 1 ulp apart;
            # p = p - lr * buf carries lr times that (p may cancel: |p| << lr |buf|)
            wb = st["momentum_buffer"].numpy().astype(np.float64)
            q = np.abs(wb - momentum * buf_before)
            tol_b = _ulp(wb) + 2 * _ulp(q)
            assert_close(backend.host(BUF), wb, tol_b, "momentum_buffer")
            tol_p = _ulp(want) + lr * tol_b
        else:
            # p + (-lr g) / avg: the quotient 1 ulp apart, then one rounding
            tol_p = _ulp(want) + 2 * _ulp(np.abs(want - before))
        assert_close(backend.host(P), want, tol_p, "param")
        moved += int(np.count_nonzero(want != before))
    assert moved > 0, "the parameters did not move: degenerate test"


@pytest.mark.parametrize("cfg", [dict(), dict(momentum=0.9, centered=True, weight_decay=0.1)],
                         ids=["plain", "all"])
def test_rmsprop_trajectory_vs_reference(backend, rng, cfg):
    """50 steps against fm.reference in float64: the float32 kernel stays close to exact
    arithmetic (a wrong rule, e.g. a missing centering, is off by far more)."""
    size, lr = 1000, 1e-3
    p0 = normal(rng, size)
    P, SQ = backend.to(p0), backend.xp.zeros(size, np.float32)
    BUF, GA = backend.xp.zeros(size, np.float32), backend.xp.zeros(size, np.float32)
    p, sq, buf, ga = (p0.astype(np.float64), np.zeros(size), np.zeros(size), np.zeros(size))
    for g in _grads(rng, size, 50):
        fm.ops.rmsprop_step(P, backend.to(g), SQ, BUF, GA, lr=lr, **cfg)
        ref.rmsprop_step(p, g.astype(np.float64), sq, buf, ga, lr=lr, **cfg)
    assert not np.allclose(p, p0), "degenerate test"
    # each step moves p by ~lr (|g| / sqrt(square_avg) ~ 1), with a few ulp of relative
    # error in the step and of |p| per step
    assert_close(backend.host(P), p, 50 * (8 * ULP * lr * 10 + 2 * ULP * np.abs(p)), "param")
    assert_close(backend.host(SQ), sq, 1e-5 * sq + 1e-30, "square_avg")


def test_rmsprop_checks(backend):
    z = backend.xp.zeros(4, np.float32)
    with pytest.raises(ValueError, match="momentum_buffer"):
        fm.ops.rmsprop_step(z, z.copy(), z.copy(), None, None, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="grad_avg"):
        fm.ops.rmsprop_step(z, z.copy(), z.copy(), None, None, lr=0.1, centered=True)
    with pytest.raises(ValueError, match="alpha"):
        fm.ops.rmsprop_step(z, z.copy(), z.copy(), None, None, lr=0.1, alpha=1.5)
    with pytest.raises(ValueError, match="clip_scale"):
        fm.ops.rmsprop_step(z, z.copy(), z.copy(), None, None, lr=0.1,
                            clip_scale=backend.xp.ones(2, np.float32))
    with pytest.raises(ValueError, match="'l1' must be >= 0"):
        fm.ops.sgd_step(z, z.copy(), None, lr=0.1, l1=-1.0)


# ------------------------------------------------------------- clipping through Optimizer.step

SHAPES = [(13, 7), (7,), (7, 3), (3,)]


def _torch_opt(name, params, lr):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    return torch.optim.RMSprop(params, lr=lr, momentum=0.5, centered=True)


def _fm_opt(name, lr, **clip):
    if name == "sgd":
        return fm.optim.SGD(lr=lr, momentum=0.9, **clip)
    if name == "adam":
        return fm.optim.Adam(lr=lr, **clip)
    if name == "adamw":
        return fm.optim.AdamW(lr=lr, weight_decay=0.1, **clip)
    return fm.optim.RMSprop(lr=lr, momentum=0.5, centered=True, **clip)


def _torch_clip(params, kind, value):
    if kind == "clipnorm":
        for p in params:
            torch.nn.utils.clip_grad_norm_([p], value)
    elif kind == "global_clipnorm":
        torch.nn.utils.clip_grad_norm_(params, value)
    elif kind == "clipvalue":
        torch.nn.utils.clip_grad_value_(params, value)
    else:  # clipnorm and clipvalue: the norm first, as the transform
        for p in params:
            torch.nn.utils.clip_grad_norm_([p], value)
        torch.nn.utils.clip_grad_value_(params, value / 4)


def _fm_clip_kwargs(kind, value):
    if kind == "clipnorm+clipvalue":
        return dict(clipnorm=value, clipvalue=value / 4)
    return {kind: value}


@pytest.mark.parametrize("kind", ["clipnorm", "global_clipnorm", "clipvalue",
                                  "clipnorm+clipvalue"])
@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_clipping_vs_torch(backend, rng, name, kind):
    """5 steps of fm.optim.<name>(<kind>=...).step against torch's clipping utilities
    followed by the torch optimizer's step. The clip coefficient is computed in double
    here and in float32 by torch (~1e-7 relative); the rest agrees to a few ulp."""
    lr, value, steps = 0.05, 1.0, 5
    p0 = [normal(rng, s) for s in SHAPES]
    # gradient norms from ~0.3 to ~30: some tensors clipped, some not
    grads = [[normal(rng, s, scale=sc) for s, sc in zip(SHAPES, (3.0, 0.1, 1.0, 0.05))]
             for _ in range(steps)]
    P = [backend.to(p) for p in p0]
    opt = _fm_opt(name, lr, **_fm_clip_kwargs(kind, value))
    tps = [torch.tensor(p.copy(), dtype=torch.float32) for p in p0]
    topt = _torch_opt(name, tps, lr)
    plain = [torch.tensor(p.copy()) for p in p0]  # the same without clipping
    popt = _torch_opt(name, plain, lr)
    for gs in grads:
        opt.step(P, [backend.to(g) for g in gs])
        for t, q, g in zip(tps, plain, gs):
            t.grad, q.grad = torch.from_numpy(g.copy()), torch.from_numpy(g.copy())
        _torch_clip(tps, kind, value)
        topt.step()
        popt.step()
    for i, (t, q) in enumerate(zip(tps, plain)):
        want = t.numpy().astype(np.float64)
        got = backend.host(P[i])
        tol = 2e-6 * (np.abs(want) + lr) + 1e-7
        assert_close(got, want, tol, f"param {i}")
    # clipping changed the trajectory by far more than the tolerance
    diff = max(float(np.max(np.abs(t.numpy() - q.numpy()))) for t, q in zip(tps, plain))
    assert diff > 1e-3, f"clipping did not change the result ({diff}): degenerate test"


def test_clip_settings_validation_and_config():
    with pytest.raises(ValueError, match="clipnorm.*global_clipnorm"):
        fm.optim.Adam(clipnorm=1.0, global_clipnorm=1.0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="'clipvalue' must be > 0 or None"):
            fm.optim.SGD(clipvalue=bad)
    opt = fm.optim.RMSprop(lr=0.1, momentum=0.9, global_clipnorm=2.0, clipvalue=0.5)
    cfg = opt.get_config()
    assert cfg["global_clipnorm"] == 2.0 and cfg["clipvalue"] == 0.5 and "clipnorm" not in cfg
    again = fm.optim.from_config("RMSprop", cfg)
    assert again.get_config() == cfg
    assert again.global_clipnorm == 2.0 and again.clipvalue == 0.5 and again.clipnorm is None
    assert fm.optim.RMSprop().get_config() == {
        "lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0,
        "centered": False}  # torch's defaults
    assert isinstance(fm.optim.get("rmsprop"), fm.optim.RMSprop)
    assert fm.optim.RMSprop(momentum=0.9, centered=True)._buffers == (
        "square_avg", "momentum_buffer", "grad_avg")
    assert fm.optim.RMSprop()._buffers == ("square_avg",)


# ------------------------------------------------------------------------ schedules as lr


def test_lr_schedule_callable(backend, rng):
    """A callable lr is evaluated at the 0-based step: SGD with lr(step) equals SGD with
    the float lr set before each step."""
    sched = lambda step: 0.1 / (1 + step)  # noqa: E731
    p0, gs = normal(rng, 50), [normal(rng, 50) for _ in range(4)]
    a, b = [backend.to(p0)], [backend.to(p0)]
    oa, ob = fm.optim.SGD(lr=sched, momentum=0.9), fm.optim.SGD(lr=1.0, momentum=0.9)
    for step, g in enumerate(gs):
        assert oa.lr_at(step) == sched(step)
        ob.lr = sched(step)
        oa.step(a, [backend.to(g)])
        ob.step(b, [backend.to(g)])
    np.testing.assert_array_equal(backend.host(a[0]), backend.host(b[0]))
    assert not np.array_equal(backend.host(a[0]), p0)
    assert ob.lr_at(7) == sched(3)
    with pytest.raises(ValueError, match="'lr' must be >= 0"):
        fm.optim.Adam(lr=-1.0)


@pytest.mark.parametrize("schedule", [
    fm.optim.schedules.ExponentialDecay(0.5, 4, 0.5, staircase=True),
    fm.optim.schedules.CosineDecay(0.1, 10, alpha=0.1, warmup_target=0.5, warmup_steps=3),
    fm.optim.schedules.PiecewiseConstantDecay([2, 5], [0.5, 0.25, 0.1])])
def test_lr_schedule_config_round_trip(schedule):
    """get_config emits schedules.serialize(lr), from_config restores an equal schedule."""
    opt = fm.optim.Adam(lr=schedule, clipnorm=1.0)
    cfg = opt.get_config()
    assert cfg["lr"] == fm.optim.schedules.serialize(schedule)
    again = fm.optim.from_config("Adam", cfg)
    assert again.lr == schedule and again.lr is not schedule
    assert [again.lr_at(s) for s in range(12)] == [schedule(s) for s in range(12)]
    assert again.clipnorm == 1.0


def test_a_plain_callable_lr_trains_but_is_not_saved():
    """Any callable of the step is a schedule for training; only fm.optim.schedules
    classes serialize (as Keras)."""
    opt = fm.optim.SGD(lr=lambda step: 0.1 / (1 + step))
    assert opt.lr_at(4) == pytest.approx(0.02)
    with pytest.raises(TypeError, match="LearningRateSchedule"):
        opt.get_config()


# -------------------------------------------------------------------- l1 / l2 and the penalty

# float32 values (the kernels take float l1 / l2), so the float64 penalty compares tightly
L1L2 = {"l1": dict(l1=2**-7), "l2": dict(l2=2**-6), "l1l2": dict(l1=2**-7, l2=2**-6)}


@pytest.mark.parametrize("reg", L1L2.values(), ids=L1L2.keys())
@pytest.mark.parametrize("name", ["sgd", "adam", "rmsprop"])
def test_l1_l2_vs_torch_regularized_loss(backend, rng, name, reg):
    """The transform's l1 / l2 equal torch's optimizer on loss + l1 sum|w| + l2 sum w^2
    (its gradient by autograd), over 5 steps; penalty_out equals that added loss."""
    size, lr, steps = 300, 0.05, 5
    p0 = normal(rng, size)
    p0[:5] = 0.0  # sign(0) = 0: torch's abs' gradient at 0
    l1, l2 = reg.get("l1", 0.0), reg.get("l2", 0.0)
    P = backend.to(p0)
    xp = backend.xp
    state = [xp.zeros(size, np.float32) for _ in range(3)]
    pen = xp.zeros(1, np.float64)
    Q = backend.to(p0)  # the same steps without the regularizer
    qstate = [xp.zeros(size, np.float32) for _ in range(3)]
    tp = torch.tensor(p0.copy(), requires_grad=True)
    topt = {"sgd": lambda: torch.optim.SGD([tp], lr=lr, momentum=0.9),
            "adam": lambda: torch.optim.Adam([tp], lr=lr),
            "rmsprop": lambda: torch.optim.RMSprop([tp], lr=lr)}[name]()

    def fm_step(param, st, t, g, **kw):
        if name == "sgd":
            fm.ops.sgd_step(param, g, st[0], lr=lr, momentum=0.9, **kw)
        elif name == "adam":
            fm.ops.adam_step(param, g, st[0], st[1], step=t, lr=lr, **kw)
        else:
            fm.ops.rmsprop_step(param, g, st[0], None, None, lr=lr, **kw)

    for t, g in enumerate(_grads(rng, size, steps), start=1):
        topt.zero_grad()
        penalty = l1 * tp.abs().sum() + l2 * (tp * tp).sum()
        (torch.sum(tp * torch.from_numpy(g)) + penalty).backward()
        topt.step()
        w = backend.host(P).astype(np.float64)  # penalty_out: of the pre-update w
        want_pen = l1 * np.abs(w).sum() + l2 * (w * w).sum()
        fm_step(P, state, t, backend.to(g), penalty_out=pen, **reg)
        fm_step(Q, qstate, t, backend.to(g))
        assert_close(backend.host(pen), [want_pen], 1e-12 * want_pen, "penalty")
    want = tp.detach().numpy().astype(np.float64)
    assert_close(backend.host(P), want, 1e-5 * (np.abs(want) + lr), "param")
    # the regularizer mattered: without it the result is far off
    assert np.max(np.abs(backend.host(Q) - want)) > 1e-3, "degenerate test"


@pytest.mark.parametrize("size", [1, 97, 70001])
def test_transform_vs_reference(backend, rng, size):
    """All transform steps at once (l1, l2, clip scale, clipvalue, penalty) on SGD with
    momentum and Adam, against fm.reference in float64."""
    xp = backend.xp
    p0, g = normal(rng, size), normal(rng, size, scale=3.0)
    p0[: min(3, size - 1)] = 0.0  # sign(0) = 0; one nonzero element left for the penalty
    tr = dict(l1=2**-7, l2=2**-4, clipvalue=0.5)  # float32 values: see L1L2
    scale = np.array([0.7], np.float32)
    for opt in ("sgd", "adam"):
        P, B, V = backend.to(p0), xp.zeros(size, np.float32), xp.zeros(size, np.float32)
        pen = xp.full(1, np.nan)
        p, b, v, pen64 = (p0.astype(np.float64), np.zeros(size), np.zeros(size), np.zeros(1))
        if opt == "sgd":
            fm.ops.sgd_step(P, backend.to(g), B, lr=0.1, momentum=0.9,
                            clip_scale=backend.to(scale), penalty_out=pen, **tr)
            ref.sgd_step(p, g.astype(np.float64), b, lr=0.1, momentum=0.9,
                         clip_scale=scale.astype(np.float64), penalty_out=pen64, **tr)
        else:
            fm.ops.adam_step(P, backend.to(g), B, V, step=1, lr=0.1,
                             clip_scale=backend.to(scale), penalty_out=pen, **tr)
            ref.adam_step(p, g.astype(np.float64), b, v, step=1, lr=0.1,
                          clip_scale=scale.astype(np.float64), penalty_out=pen64, **tr)
        # the clipped transformed gradient is within 0.5 of 0, a few ulp off; sgd moves
        # p by lr * g, Adam by lr * sign(g) at step 1 (m / sqrt(v) = +-1)
        assert_close(backend.host(P), p, 4 * ULP * (np.abs(p) + 0.1) + 1e-30, f"{opt} param")
        assert_close(backend.host(pen), pen64, 1e-12 * pen64, f"{opt} penalty")
        assert pen64[0] > 0


def test_penalty_of_empty_param_is_zero(backend):
    z = backend.xp.zeros(0, np.float32)
    pen = backend.xp.full(1, np.nan)
    fm.ops.rmsprop_step(z, z.copy(), z.copy(), None, None, lr=0.1, l1=0.5, penalty_out=pen)
    assert backend.host(pen)[0] == 0.0


# ---------------------------------------------------------------------------- grad_clip_scale

SEGMENTS = {"one": [5], "mixed": [13 * 7, 0, 1, 7, 40000], "big": [70001, 3]}


@pytest.mark.parametrize("with_l1l2", [False, True], ids=["plain", "l1l2"])
@pytest.mark.parametrize("mode", ["per_tensor", "global"])
@pytest.mark.parametrize("segs", SEGMENTS.values(), ids=SEGMENTS.keys())
def test_grad_clip_scale_vs_reference(backend, rng, segs, mode, with_l1l2):
    offsets = np.cumsum([0] + segs).astype(np.int64)
    n = int(offsets[-1])
    w, g = normal(rng, n), normal(rng, n)
    for k in range(len(segs)):  # norms 0.5, the last one 50: only the last is clipped
        seg = slice(offsets[k], offsets[k + 1])
        if segs[k]:
            g[seg] *= np.float32((50.0 if k == len(segs) - 1 else 0.5) / np.linalg.norm(g[seg]))
    l1l2 = rng.uniform(0.0, 5e-4, 2 * len(segs)).astype(np.float32) if with_l1l2 else None
    got = fm.ops.grad_clip_scale(backend.to(w), backend.to(g), backend.to(offsets),
                                 None if l1l2 is None else backend.to(l1l2), mode=mode,
                                 max_norm=1.5)
    want = ref.grad_clip_scale(w, g, offsets, l1l2, mode=mode, max_norm=1.5)
    got = backend.host(got)
    # float results of double math summed in another order: at most 1 ulp apart
    assert_close(got, want, _ulp(want), "scale")
    assert np.all(want <= 1.0) and np.any(want < 1.0), "no segment clipped: degenerate test"
    if mode == "per_tensor" and len(segs) > 1:
        assert np.any(want == 1.0), "every segment clipped: degenerate test"
    out = backend.xp.full(len(segs), np.nan, np.float32)
    fm.ops.grad_clip_scale(backend.to(w), backend.to(g), backend.to(offsets),
                           None if l1l2 is None else backend.to(l1l2), mode=mode,
                           max_norm=1.5, out=out)
    np.testing.assert_array_equal(backend.host(out), got)


def test_grad_clip_scale_checks(backend):
    xp = backend.xp
    w = xp.zeros(4, np.float32)
    with pytest.raises(ValueError, match="mode"):
        fm.ops.grad_clip_scale(w, w, backend.to(np.array([0, 4], np.int64)), mode="x",
                               max_norm=1.0)
    with pytest.raises(ValueError, match="offsets"):
        fm.ops.grad_clip_scale(w, w, backend.to(np.array([0, 5], np.int64)),
                               mode="global", max_norm=1.0)
    with pytest.raises(ValueError, match="max_norm"):
        fm.ops.grad_clip_scale(w, w, backend.to(np.array([0, 4], np.int64)),
                               mode="global", max_norm=0.0)


# ------------------------------------------------------------------------------ determinism


def test_thread_count_determinism(rng):
    """The penalty, the clip scales and the updates repeat bit for bit with 1, 2 and 3
    threads (fixed blocks, fixed summation order)."""
    n = 300_001
    p0, g = normal(rng, n), normal(rng, n)
    offsets = np.array([0, 1000, 200_000, n], np.int64)
    l1l2 = np.array([0.01, 0.02, 0.0, 0.1, 0.03, 0.0], np.float32)
    old = fm.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            fm.set_num_threads(threads)
            p, sq, buf = p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
            pen = np.zeros(1)
            scales = fm.ops.grad_clip_scale(p, g, offsets, l1l2, mode="global", max_norm=1.0)
            per = fm.ops.grad_clip_scale(p, g, offsets, l1l2, mode="per_tensor", max_norm=1.0)
            fm.ops.rmsprop_step(p, g, sq, buf, None, lr=0.01, momentum=0.9, l1=0.01, l2=0.02,
                                clip_scale=scales[:1], clipvalue=0.3, penalty_out=pen)
            results.append((p.tobytes(), sq.tobytes(), pen.tobytes(), scales.tobytes(),
                            per.tobytes()))
    finally:
        fm.set_num_threads(old)
    assert results[0] == results[1] == results[2]
    assert np.frombuffer(results[0][2])[0] > 0


@pytest.mark.gpu
def test_gpu_repeats_and_matches_cpu(gpu, rng):
    """On the GPU the penalty and the scales repeat bit for bit; the RMSprop update with
    the transform equals the CPU's bit for bit (explicit roundings in kernel_math.h), the
    penalty and scales to double rounding (another summation order)."""
    n = 300_001
    p0, g = normal(rng, n), normal(rng, n)
    offsets = np.array([0, 1000, 200_000, n], np.int64)
    runs = []
    for _ in range(2):
        P, SQ, BUF, GA = (gpu.to(p0), gpu.xp.zeros(n, np.float32), gpu.xp.zeros(n, np.float32),
                          gpu.xp.zeros(n, np.float32))
        pen = gpu.xp.zeros(1)
        sc = fm.ops.grad_clip_scale(P, gpu.to(g), gpu.to(offsets), mode="global", max_norm=1.0)
        fm.ops.rmsprop_step(P, gpu.to(g), SQ, BUF, GA, lr=0.01, momentum=0.9, centered=True,
                            weight_decay=0.01, l1=0.01, l2=0.02, clip_scale=sc[:1],
                            clipvalue=0.3, penalty_out=pen)
        runs.append((gpu.host(P), gpu.host(pen), gpu.host(sc)))
    for a, b in zip(runs[0], runs[1]):
        np.testing.assert_array_equal(a, b)
    p, sq, buf, ga, pen = (p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32),
                           np.zeros(n, np.float32), np.zeros(1))
    sc = fm.ops.grad_clip_scale(p, g, offsets, mode="global", max_norm=1.0)
    assert_close(runs[0][2], sc, _ulp(sc), "scale")
    sc_gpu = runs[0][2][:1].copy()
    fm.ops.rmsprop_step(p, g, sq, buf, ga, lr=0.01, momentum=0.9, centered=True,
                        weight_decay=0.01, l1=0.01, l2=0.02, clip_scale=sc_gpu,
                        clipvalue=0.3, penalty_out=pen)
    np.testing.assert_array_equal(runs[0][0], p)
    assert_close(runs[0][1], pen, 1e-12 * pen, "penalty")
