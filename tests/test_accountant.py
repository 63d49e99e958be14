"""The DP-SGD privacy accountant (fastmlp._accountant, issue 17).

Held to Google's dp_accounting (an independent implementation, in the ``test`` extra):
its RDP of the Poisson-subsampled Gaussian at integer orders (closed form in both), its
RDP-to-epsilon conversion, its PLD accountant (close to the tight epsilon, which RDP
accounting must never beat); to a quadrature of the RDP's defining integral at
fractional orders; to the tight epsilon of the plain Gaussian mechanism; and to
published epsilons (TensorFlow Privacy's MNIST tutorial, Abadi et al. 2016).
"""
import json
import math

import numpy as np
import pytest

from fastmlp import _accountant as acc

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant as pld_acc
from dp_accounting.rdp import rdp_privacy_accountant as rdp_acc

SIGMAS = [0.5, 0.8, 1.0, 2.0, 4.0, 10.0]
RATES = [1e-4, 1e-3, 0.01, 0.1, 0.5, 1.0]
STEPS = [1, 10, 1000, 100000]
INT_ORDERS = list(range(2, 64)) + [128, 256, 512, 1024]


def _dp_rdp(sigma, q, orders, steps=1):
    a = rdp_acc.RdpAccountant(orders=list(orders))
    a.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
              steps)
    return np.array(a._rdp), a


def _quadrature_rdp(sigma, q, alpha):
    """RDP at ``alpha`` straight from its definition, log E_{z~N(0,s^2)}[(1 - q + q
    exp((2z-1)/(2s^2)))^alpha] / (alpha-1), by the trapezoid rule on a fine grid (the
    integrand is smooth and decays like a Gaussian on both sides: the rule converges
    geometrically), independent of the series the module sums."""
    z = np.linspace(-40 * sigma, alpha + 40 * sigma, 400001)
    log_f = (alpha * np.log1p(q * np.expm1((2 * z - 1) / (2 * sigma ** 2)))
             - z * z / (2 * sigma ** 2) - math.log(sigma * math.sqrt(2 * math.pi)))
    m = log_f.max()
    return (m + math.log(np.sum(np.exp(log_f - m)) * (z[1] - z[0]))) / (alpha - 1)


def _classic_epsilon(orders, rdp, delta):
    """Mironov 2017 Prop. 3: min over orders of rdp + log(1/delta)/(alpha-1)."""
    o = np.asarray(orders, dtype=float)
    return float(np.min(rdp + math.log(1 / delta) / (o - 1)))


def _gaussian_tight_epsilon(mu, delta):
    """The exact epsilon of the Gaussian mechanism of sensitivity/noise ratio ``mu``
    (Balle & Wang 2018, Thm. 8): the root of
    delta(eps) = Phi(-eps/mu + mu/2) - exp(eps) Phi(-eps/mu - mu/2), by bisection."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    dlt = lambda e: phi(-e / mu + mu / 2) - math.exp(e) * phi(-e / mu - mu / 2)  # noqa: E731
    lo, hi = 0.0, 1.0
    while dlt(hi) > delta:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if dlt(mid) > delta else (lo, mid)
    return hi


# ------------------------------------------------------------------ RDP values
@pytest.mark.parametrize("sigma", SIGMAS)
def test_rdp_integer_orders_match_dp_accounting(sigma):
    for q in RATES:
        mine = acc.rdp_subsampled_gaussian(sigma, q, 1, INT_ORDERS)
        theirs, _ = _dp_rdp(sigma, q, INT_ORDERS)
        # both sum log A (A >= 1) in float64: exact to ~1e-16 absolute, so RDP to that
        # over alpha - 1 (the atol), relatively to ~1e-10 where it is not tiny
        np.testing.assert_allclose(mine, theirs, rtol=1e-10, atol=1e-15, err_msg=f"q={q}")
        for steps in STEPS:  # composition is linear in steps
            np.testing.assert_allclose(
                acc.rdp_subsampled_gaussian(sigma, q, steps, INT_ORDERS), steps * theirs,
                rtol=1e-10, atol=steps * 1e-15)


@pytest.mark.parametrize("sigma,q", [(0.5, 1e-3), (0.8, 0.01), (1.0, 0.01), (1.0, 0.5),
                                     (2.0, 0.1), (4.0, 1e-4), (10.0, 0.5), (10.0, 0.9)])
def test_rdp_fractional_orders_match_quadrature(sigma, q):
    orders = [1.01, 1.1, 1.5, 2.5, 3.7, 7.3, 10.9]
    mine = acc.rdp_subsampled_gaussian(sigma, q, 1, orders)
    want = [_quadrature_rdp(sigma, q, a) for a in orders]
    # compared as log A = RDP * (alpha - 1), the quantity both compute: a float64 sum
    # (400001 points here) is exact to ~1e-12 absolute in it
    scale = np.array(orders) - 1
    np.testing.assert_allclose(mine * scale, np.array(want) * scale, rtol=1e-7, atol=2e-11)


@pytest.mark.parametrize("sigma,q", [(0.5, 0.01), (1.0, 1e-3), (2.0, 0.1), (10.0, 1e-4)])
def test_rdp_fractional_orders_within_dp_accounting(sigma, q):
    # dp_accounting (0.6) adds the series' terms in absolute value (its log-space sum has
    # no sign), an upper bound on the signed series: ours is never above it, and equal
    # at orders whose terms are all positive (the integer ones, checked above)
    orders = [1 + x / 10.0 for x in range(1, 100) if x % 10]
    mine = acc.rdp_subsampled_gaussian(sigma, q, 1, orders)
    theirs, _ = _dp_rdp(sigma, q, orders)
    assert np.all(mine <= theirs * (1 + 1e-12) + 1e-15)   # 1e-15: see the integer test
    assert np.all(mine > 0)


def test_series_matches_closed_form_at_integer_orders():
    # the fractional-order series, fed an integer order, terminates and must equal the
    # binomial closed form
    orders = np.array([2.0, 3.0, 5.0, 8.0, 17.0, 40.0])
    for sigma, q in [(0.7, 0.02), (1.0, 0.3), (3.0, 0.9), (6.0, 1e-3)]:
        series = acc._log_a_series(q, sigma, orders)
        closed = acc._log_a_int(q, sigma, orders)
        np.testing.assert_allclose(series, closed, rtol=1e-10, atol=1e-14)


def test_rdp_special_cases():
    orders = np.array(acc.DEFAULT_ORDERS)
    for sigma in [0.3, 1.0, 7.0]:
        np.testing.assert_allclose(acc.rdp_subsampled_gaussian(sigma, 1.0, 25),
                                   25 * orders / (2 * sigma ** 2), rtol=1e-14)
    assert np.all(np.isinf(acc.rdp_subsampled_gaussian(0.0, 0.01, 3)))
    assert np.all(acc.rdp_subsampled_gaussian(1.0, 0.01, 0) == 0)
    assert np.all(acc.rdp_subsampled_gaussian(0.0, 0.01, 0) == 0)


def test_rdp_negligible_is_not_negative():
    # RDP ~ q^2 alpha / sigma^2 ~ 1e-21 here, far below float64's resolution of log A:
    # never rounded below 0, and its epsilon is that of nothing (0 at a large delta)
    for sigma in [50.0, 1e4]:
        rdp = acc.rdp_subsampled_gaussian(sigma, 1e-9, 1000)
        assert np.all(rdp >= 0) and np.all(rdp < 1e-9)
        assert acc.epsilon(noise_multiplier=sigma, sample_rate=1e-9, steps=1000,
                           delta=0.5) == 0.0


def test_default_orders():
    o = acc.DEFAULT_ORDERS
    assert list(o) == sorted(set(o)) and o[0] > 1 and max(o) >= 512
    for their in (rdp_acc.DEFAULT_RDP_ORDERS,
                  [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))):
        assert set(their) <= set(o)
    assert any(a < 1.1 for a in o)


# ------------------------------------------------------------------ epsilon
def test_conversion_matches_dp_accounting():
    # the same RDP curves through both conversions (Balle et al. 2020); dp_accounting
    # returns 0 where the KL bound delta >= sqrt(1 - exp(-rdp)) applies and skips orders
    # <= 1.01: compared where neither matters
    orders = rdp_acc.DEFAULT_RDP_ORDERS
    for sigma, q in [(0.8, 0.01), (1.1, 256 / 60000), (4.0, 0.1), (2.0, 1.0)]:
        one, _ = _dp_rdp(sigma, q, orders)
        for steps in STEPS:
            for delta in [1e-3, 1e-5, 1e-9]:
                theirs, t_order = rdp_acc.compute_epsilon(orders, steps * one, delta)
                mine, m_order = acc.epsilon_from_rdp(orders, steps * one, delta)
                if theirs > 0:
                    assert mine == pytest.approx(theirs, rel=1e-12)
                    assert m_order == t_order
                else:
                    assert mine >= 0


@pytest.mark.parametrize("sigma", SIGMAS)
def test_epsilon_at_integer_orders_matches_dp_accounting(sigma):
    for q in RATES:
        one, _ = _dp_rdp(sigma, q, INT_ORDERS)
        for steps in STEPS:
            # what their RdpAccountant.get_epsilon returns after composing `steps` times
            theirs, _ = rdp_acc.compute_epsilon(INT_ORDERS, steps * one, 1e-5)
            mine = acc.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps,
                               delta=1e-5, orders=INT_ORDERS)
            if theirs > 0:
                assert mine == pytest.approx(theirs, rel=1e-9), (q, steps)


@pytest.mark.parametrize("sigma,q", [(0.5, 0.01), (1.0, 0.004), (2.0, 0.1), (10.0, 1e-3)])
def test_epsilon_default_orders_not_above_dp_accounting(sigma, q):
    # more orders and the exact (signed) fractional series: never above dp_accounting's
    one, _ = _dp_rdp(sigma, q, rdp_acc.DEFAULT_RDP_ORDERS)
    for steps in STEPS:
        theirs, _ = rdp_acc.compute_epsilon(rdp_acc.DEFAULT_RDP_ORDERS, steps * one, 1e-5)
        mine = acc.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5)
        assert mine <= theirs * (1 + 1e-12) + 1e-12
        if theirs < 20:   # the same accounting, not a different one (at large epsilons
            assert mine >= 0.8 * theirs   # our orders between 64 and 128 matter more)


@pytest.mark.parametrize("sigma,q,steps", [(0.8, 0.01, 1000), (1.0, 0.004, 10000),
                                           (2.0, 0.1, 100), (10.0, 0.5, 50),
                                           (0.6, 0.05, 300)])
def test_epsilon_never_below_pld(sigma, q, steps):
    # The PLD accountant is close to the tight epsilon, which an RDP bound can never
    # beat. PLD is itself an upper bound (pessimistic discretisation of the privacy loss
    # at 1e-3): over these settings it is above its 1e-4-discretised value by at most
    # 0.007, so an RDP epsilon below PLD's by more than 0.01 would be below the tight
    # value, i.e. wrong.
    a = pld_acc.PLDAccountant(value_discretization_interval=1e-3)
    a.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
              steps)
    tight = a.get_epsilon(1e-5)
    mine = acc.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5)
    assert mine >= tight - 0.01


@pytest.mark.parametrize("sigma,steps", [(0.8, 1), (1.0, 10), (2.0, 100), (5.0, 3),
                                         (20.0, 1000)])
def test_epsilon_never_below_exact_gaussian(sigma, steps):
    # q = 1: steps compositions of the Gaussian mechanism are one Gaussian mechanism with
    # mu = sqrt(steps)/sigma, whose epsilon is known exactly
    for delta in [1e-3, 1e-5, 1e-8]:
        exact = _gaussian_tight_epsilon(math.sqrt(steps) / sigma, delta)
        rdp = acc.rdp_subsampled_gaussian(sigma, 1.0, steps)
        mine = acc.epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=steps, delta=delta)
        assert exact <= mine <= _classic_epsilon(acc.DEFAULT_ORDERS, rdp, delta)


def test_published_tf_privacy_mnist_tutorial():
    # TensorFlow Privacy's tutorials/mnist_dpsgd_tutorial.py (2019): N = 60000,
    # batch 256 (q = 256/60000), noise_multiplier 1.12, steps = epoch * (60000 // 256),
    # orders [1.1, 1.2, ..., 10.9] + 12..63, delta 1e-5, Mironov's classic conversion;
    # tutorials/README.md prints "For delta=1e-5, the current epsilon is: 1.00" after 1
    # epoch, 1.04 after 2 and 2.92 after 60, and its parameter table lists noise 1.2 for
    # 10 epochs at 1.20 (its noise 0.6 / 30 epochs row reads 9.74; this RDP gives 9.747,
    # not compared).
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    for sigma, epochs, printed in [(1.12, 1, 1.00), (1.12, 2, 1.04), (1.12, 60, 2.92),
                                   (1.2, 10, 1.20)]:
        rdp = acc.rdp_subsampled_gaussian(sigma, 256 / 60000, epochs * (60000 // 256), orders)
        classic = _classic_epsilon(orders, rdp, 1e-5)
        assert round(classic, 2) == printed
        improved, _ = acc.epsilon_from_rdp(orders, rdp, 1e-5)
        assert improved <= classic
        # the default orders only add candidates
        assert acc.epsilon(noise_multiplier=sigma, sample_rate=256 / 60000,
                           steps=epochs * (60000 // 256), delta=1e-5) <= improved


def test_published_abadi_2016():
    # Abadi et al. 2016, "Deep Learning with Differential Privacy", Sec. 3.1: q = 0.01,
    # sigma = 4, delta = 1e-5, T = 10000 steps give "eps ~ 1.26 using the moments
    # accountant" (log moments at integer lambda <= 32, i.e. RDP orders lambda + 1, and
    # the tail bound, i.e. the classic conversion).
    orders = list(range(2, 34))
    rdp = acc.rdp_subsampled_gaussian(4.0, 0.01, 10000, orders)
    assert round(_classic_epsilon(orders, rdp, 1e-5), 2) == 1.26
    assert acc.epsilon(noise_multiplier=4.0, sample_rate=0.01, steps=10000,
                       delta=1e-5) < 1.26


def test_epsilon_monotone():
    kw = dict(sample_rate=0.01, delta=1e-5)
    by_steps = [acc.epsilon(noise_multiplier=1.0, steps=s, **kw)
                for s in [0, 1, 10, 100, 1000, 10000, 100000]]
    assert by_steps[0] == 0.0 and all(np.diff(by_steps) > 0)
    by_sigma = [acc.epsilon(noise_multiplier=s, steps=1000, **kw)
                for s in [0.5, 0.7, 1.0, 1.5, 3.0, 10.0]]
    assert all(np.diff(by_sigma) < 0)
    by_q = [acc.epsilon(noise_multiplier=1.0, sample_rate=q, steps=1000, delta=1e-5)
            for q in [1e-4, 1e-3, 0.01, 0.1, 0.5, 1.0]]
    assert all(np.diff(by_q) > 0)
    by_delta = [acc.epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=d)
                for d in [1e-10, 1e-7, 1e-5, 1e-3, 0.1]]
    assert all(np.diff(by_delta) < 0)


def test_epsilon_edge_cases():
    assert acc.epsilon(noise_multiplier=0.0, sample_rate=0.1, steps=1, delta=1e-5) == math.inf
    assert acc.epsilon(noise_multiplier=0.0, sample_rate=0.1, steps=0, delta=1e-5) == 0.0
    assert acc.epsilon_from_rdp([2.0, 3.0], [math.inf, math.inf], 1e-5)[0] == math.inf
    # a tiny RDP is clamped at 0, never negative
    assert acc.epsilon(noise_multiplier=100.0, sample_rate=1e-4, steps=1, delta=0.5) == 0.0
    with pytest.raises(TypeError):  # keyword-only, as fm.privacy.epsilon
        acc.epsilon(1.0, 0.01, 10, 1e-5)


@pytest.mark.parametrize("kwargs,name", [
    (dict(noise_multiplier=-1.0), "noise_multiplier"),
    (dict(noise_multiplier=float("nan")), "noise_multiplier"),
    (dict(noise_multiplier="1"), "noise_multiplier"),
    (dict(sample_rate=0.0), "sample_rate"),
    (dict(sample_rate=1.5), "sample_rate"),
    (dict(steps=-1), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(steps=True), "steps"),
    (dict(delta=0.0), "delta"),
    (dict(delta=1.0), "delta"),
    (dict(delta=-1e-5), "delta"),
])
def test_epsilon_validation(kwargs, name):
    args = dict(noise_multiplier=1.0, sample_rate=0.01, steps=10, delta=1e-5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        acc.epsilon(**args)
    if name != "delta":
        rest = {k: v for k, v in args.items() if k != "delta"}
        with pytest.raises(ValueError, match=name):
            acc.rdp_subsampled_gaussian(**rest)
        with pytest.raises(ValueError, match=name):
            acc.RDPAccountant().step(**rest)


def test_orders_and_rdp_validation():
    with pytest.raises(ValueError, match="orders"):
        acc.rdp_subsampled_gaussian(1.0, 0.1, 1, [1.0, 2.0])
    with pytest.raises(ValueError, match="orders"):
        acc.RDPAccountant(orders=[])
    with pytest.raises(ValueError, match="rdp"):
        acc.epsilon_from_rdp([2.0, 3.0], [0.1], 1e-5)
    with pytest.raises(ValueError, match="rdp"):
        acc.epsilon_from_rdp([2.0, 3.0], [0.1, -0.1], 1e-5)


# ------------------------------------------------------------------ RDPAccountant
def test_accountant_merges_and_composes():
    a = acc.RDPAccountant()
    assert a.history == [] and a.epsilon(1e-5) == 0.0
    a.step(1.1, 0.01, steps=100)
    a.step(1.1, 0.01)
    a.step(1.1, 0.01, steps=0)         # records nothing
    assert a.history == [[1.1, 0.01, 101]]
    assert a.epsilon(1e-5) == acc.epsilon(noise_multiplier=1.1, sample_rate=0.01,
                                          steps=101, delta=1e-5)
    a.step(2.0, 0.05, steps=30)
    a.step(1.1, 0.01, steps=5)         # not consecutive: a new run
    assert a.history == [[1.1, 0.01, 101], [2.0, 0.05, 30], [1.1, 0.01, 5]]
    want = (acc.rdp_subsampled_gaussian(1.1, 0.01, 106)
            + acc.rdp_subsampled_gaussian(2.0, 0.05, 30))
    np.testing.assert_allclose(a.rdp(), want, rtol=1e-12)
    assert a.epsilon(1e-5) == pytest.approx(acc.epsilon_from_rdp(acc.DEFAULT_ORDERS, want,
                                                                 1e-5)[0], rel=1e-12)
    # composing more never lowers epsilon
    assert a.epsilon(1e-5) > acc.epsilon(noise_multiplier=1.1, sample_rate=0.01,
                                         steps=106, delta=1e-5)
    a.history.append([9.0, 0.5, 1])   # a copy: the accountant is unchanged
    assert len(a.history) == 3


def test_accountant_config_round_trip():
    a = acc.RDPAccountant(orders=[1.5, 2, 4, 8, 16, 32])
    a.step(0.9, 0.02, 50)
    a.step(np.float32(1.3), np.float64(0.001), np.int64(7))
    text = json.dumps(a.get_config())
    b = acc.RDPAccountant.from_config(json.loads(text))
    assert b.history == a.history and b.orders == a.orders
    assert b.epsilon(1e-6) == a.epsilon(1e-6)
    assert json.loads(json.dumps(b.get_config())) == json.loads(text)
    with pytest.raises(ValueError, match="history"):
        acc.RDPAccountant.from_config({"history": [[1.0, 0.1]]})
