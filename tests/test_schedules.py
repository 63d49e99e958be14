"""Learning-rate schedules (fastmlp.schedules): Keras 3's formulas at chosen steps,
derived by hand here; config round trips; PyTorch's schedulers where they agree."""
import json
import math

import pytest

from fastmlp import schedules as S


# ----------------------------------------------------------------- ExponentialDecay

def test_exponential_decay_closed_form():
    s = S.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    assert s(0) == 0.1
    assert s(10) == pytest.approx(0.05, rel=1e-15)       # one full decay period
    assert s(20) == pytest.approx(0.025, rel=1e-15)
    assert s(5) == pytest.approx(0.1 / math.sqrt(2.0), rel=1e-15)  # half a period
    assert isinstance(s(3), float)


def test_exponential_decay_staircase():
    s = S.ExponentialDecay(1.0, decay_steps=4, decay_rate=0.1, staircase=True)
    # floor(step / 4): constant within a period, drops exactly at the multiples of 4
    assert [s(k) for k in (0, 1, 3)] == [1.0, 1.0, 1.0]
    assert s(4) == pytest.approx(0.1, rel=1e-15) and s(7) == s(4)
    assert s(8) == pytest.approx(0.01, rel=1e-15)


def test_exponential_decay_matches_torch_exponential_lr():
    torch = pytest.importorskip("torch")
    lr0, gamma = 0.3, 0.9
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=lr0)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
    mine = S.ExponentialDecay(lr0, decay_steps=1, decay_rate=gamma)
    for step in range(30):
        assert mine(step) == pytest.approx(sched.get_last_lr()[0], rel=1e-12)
        opt.step()
        sched.step()


# ----------------------------------------------------------------- CosineDecay

def test_cosine_decay_without_warmup():
    lr0, n, alpha = 0.2, 100, 0.1
    s = S.CosineDecay(lr0, n, alpha=alpha)
    assert s(0) == pytest.approx(lr0, rel=1e-15)
    # the midpoint: cos(pi/2) = 0, so the cosine factor is 1/2
    assert s(50) == pytest.approx(lr0 * ((1 - alpha) * 0.5 + alpha), rel=1e-12)
    assert s(25) == pytest.approx(lr0 * ((1 - alpha) * 0.5 * (1 + math.sqrt(0.5)) + alpha),
                                  rel=1e-12)
    assert s(n) == pytest.approx(alpha * lr0, rel=1e-12)
    assert s(n + 1) == s(n) == s(10 * n)   # clamped past decay_steps


def test_cosine_decay_warmup():
    lr0, target, w, n, alpha = 0.0, 1.0, 10, 20, 0.0
    s = S.CosineDecay(lr0, n, alpha=alpha, warmup_target=target, warmup_steps=w)
    assert s(0) == lr0
    assert s(5) == pytest.approx(0.5, rel=1e-15)         # linear: halfway up
    assert s(9) == pytest.approx(0.9, rel=1e-15)
    assert s(w) == pytest.approx(target, rel=1e-15)      # the peak, the cosine's start
    assert s(w + n // 2) == pytest.approx(0.5 * target, rel=1e-12)  # cosine midpoint
    assert s(w + n) == pytest.approx(0.0, abs=1e-15)
    assert s(w + n + 5) == s(w + n)                      # clamped
    # a nonzero start and alpha
    s2 = S.CosineDecay(0.1, 8, alpha=0.5, warmup_target=0.3, warmup_steps=4)
    assert s2(2) == pytest.approx(0.2, rel=1e-14)
    assert s2(4 + 8) == pytest.approx(0.15, rel=1e-14)
    # warmup_target without warmup_steps: the cosine starts at the target
    s3 = S.CosineDecay(0.1, 10, warmup_target=0.4)
    assert s3(0) == pytest.approx(0.4, rel=1e-15)
    # warmup_steps without warmup_target is ignored (as Keras)
    assert S.CosineDecay(0.1, 10, warmup_steps=5)(3) == S.CosineDecay(0.1, 10)(3)


def test_cosine_decay_matches_torch_cosine_annealing():
    torch = pytest.importorskip("torch")
    lr0, n, alpha = 0.05, 16, 0.2
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=lr0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n, eta_min=alpha * lr0)
    mine = S.CosineDecay(lr0, n, alpha=alpha)
    for step in range(n + 1):  # torch's cosine rises again past T_max; Keras' clamps
        assert mine(step) == pytest.approx(sched.get_last_lr()[0], rel=1e-9)
        opt.step()
        sched.step()


def test_cosine_warmup_matches_torch_linear_lr():
    torch = pytest.importorskip("torch")
    lr0, target, w = 0.01, 0.1, 8
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=target)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=lr0 / target,
                                              end_factor=1.0, total_iters=w)
    mine = S.CosineDecay(lr0, 100, warmup_target=target, warmup_steps=w)
    for step in range(w + 1):
        assert mine(step) == pytest.approx(sched.get_last_lr()[0], rel=1e-9)
        opt.step()
        sched.step()


# ----------------------------------------------------------------- PiecewiseConstantDecay

def test_piecewise_constant_boundaries():
    s = S.PiecewiseConstantDecay([10, 20], [1.0, 0.5, 0.1])
    # values[0] up to and including the first boundary (Keras' <= rule)
    assert [s(k) for k in (0, 9, 10)] == [1.0, 1.0, 1.0]
    assert [s(k) for k in (11, 15, 20)] == [0.5, 0.5, 0.5]
    assert [s(k) for k in (21, 1000)] == [0.1, 0.1]
    assert S.PiecewiseConstantDecay([], [0.3])(5) == 0.3


def test_piecewise_matches_torch_multistep():
    torch = pytest.importorskip("torch")
    # torch drops at step == milestone, Keras after the boundary: milestones = b + 1
    lr0, gamma, bounds = 0.4, 0.5, [3, 7, 12]
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=lr0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[b + 1 for b in bounds],
                                                 gamma=gamma)
    mine = S.PiecewiseConstantDecay(bounds, [lr0 * gamma ** i for i in range(4)])
    for step in range(20):
        assert mine(step) == pytest.approx(sched.get_last_lr()[0], rel=1e-12)
        opt.step()
        sched.step()


# ----------------------------------------------------------------- configs

SCHEDULES = [
    S.ExponentialDecay(0.1, 100, 0.96, staircase=True),
    S.CosineDecay(0.0, 50, alpha=0.01, warmup_target=0.1, warmup_steps=5),
    S.CosineDecay(0.3, 7),
    S.PiecewiseConstantDecay([5, 10], [0.1, 0.01, 0.001]),
]


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: type(s).__name__)
def test_config_round_trip(s):
    again = type(s).from_config(s.get_config())
    assert again.get_config() == s.get_config()
    d = json.loads(json.dumps(S.serialize(s)))  # JSON-safe
    assert d["class_name"] == type(s).__name__
    back = S.deserialize(d)
    assert type(back) is type(s) and back.get_config() == s.get_config()
    assert [back(k) for k in range(0, 80, 3)] == [s(k) for k in range(0, 80, 3)]
    assert repr(s).startswith(type(s).__name__ + "(") and "=" in repr(s)


def test_serialize_errors():
    with pytest.raises(ValueError, match="unknown schedule class 'Polynomial'"):
        S.deserialize({"class_name": "Polynomial", "config": {}})
    with pytest.raises(ValueError, match="class_name"):
        S.deserialize({"config": {}})
    with pytest.raises(ValueError, match="bad config for ExponentialDecay"):
        S.deserialize({"class_name": "ExponentialDecay", "config": {"decay_steps": 3}})

    class Mine(S.LearningRateSchedule):
        def __call__(self, step):
            return 0.1

        def get_config(self):
            return {}

    assert Mine()(3) == 0.1
    with pytest.raises(ValueError, match="cannot serialize"):
        S.serialize(Mine())
    with pytest.raises(TypeError):
        S.serialize(0.1)


def test_validation():
    with pytest.raises(ValueError, match="'decay_steps' must be a finite number > 0"):
        S.ExponentialDecay(0.1, 0, 0.5)
    with pytest.raises(ValueError, match="'decay_steps'"):
        S.CosineDecay(0.1, -3)
    with pytest.raises(ValueError, match="'initial_learning_rate'"):
        S.ExponentialDecay(float("nan"), 10, 0.5)
    with pytest.raises(ValueError, match="'decay_rate'"):
        S.ExponentialDecay(0.1, 10, -0.5)
    with pytest.raises(ValueError, match="'staircase'"):
        S.ExponentialDecay(0.1, 10, 0.5, staircase="yes")
    with pytest.raises(ValueError, match="'alpha' must be in"):
        S.CosineDecay(0.1, 10, alpha=1.5)
    with pytest.raises(ValueError, match="'warmup_target'"):
        S.CosineDecay(0.1, 10, warmup_target=-1.0)
    with pytest.raises(ValueError, match="'warmup_steps'"):
        S.CosineDecay(0.1, 10, warmup_target=1.0, warmup_steps=-2)
    with pytest.raises(ValueError, match="one more value than boundaries"):
        S.PiecewiseConstantDecay([1, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="strictly increasing"):
        S.PiecewiseConstantDecay([5, 5], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"values\[1\]"):
        S.PiecewiseConstantDecay([5], [0.1, math.inf])
    with pytest.raises(ValueError, match="step >= 0"):
        S.CosineDecay(0.1, 10)(-1)
    with pytest.raises(NotImplementedError):
        S.LearningRateSchedule()(0)
