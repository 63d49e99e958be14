"""The privacy accountant of DP-SGD: Renyi DP of the Poisson-subsampled Gaussian mechanism.

One DP-SGD step samples each example with probability ``q`` (the sample rate), clips
each per-example gradient to norm ``C`` and adds ``N(0, (sigma*C)^2)`` noise to their
sum: the Poisson-subsampled Gaussian mechanism with noise multiplier ``sigma``. Its
Renyi differential privacy (RDP, Mironov 2017, "Renyi Differential Privacy") at order
``alpha > 1`` is

    RDP(alpha) = log(A_alpha) / (alpha - 1),
    A_alpha    = E_{z ~ N(0, sigma^2)} [ (1 - q + q * exp((2z - 1) / (2 sigma^2)))^alpha ]

(Mironov, Talwar, Zhang 2019, "Renyi Differential Privacy of the Sampled Gaussian
Mechanism", Sec. 3.3; the add/remove-one relation). ``steps`` compositions add:
``steps * RDP(alpha)``. ``A_alpha`` is evaluated

* for an integer ``alpha`` in closed form, by the binomial expansion (their Sec. 3.3,
  Eq. for integer orders):
  ``A = sum_{k=0}^{alpha} C(alpha,k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2))``;
* for a fractional ``alpha`` by their series: split the expectation at ``z0``, where
  ``q * exp((2 z0 - 1)/(2 sigma^2)) = 1 - q``; below it expand the power in powers of
  ``q exp(..) / (1 - q)``, above it in powers of ``(1 - q) / (q exp(..))`` (both ratios
  are <= 1 there, so the generalised binomial series converge), and take each term's
  Gaussian expectation over its half line, a Gaussian tail ``erfc``:

      A = sum_{k>=0} C(alpha,k) [ q^k (1-q)^(alpha-k) exp((k^2-k)/(2 sigma^2)) erfc((k-z0)/(sqrt2 sigma))/2
                               + q^(alpha-k) (1-q)^k exp((j^2-j)/(2 sigma^2)) erfc((z0-j)/(sqrt2 sigma))/2 ],
      j = alpha - k.

  ``C(alpha, k)`` alternates in sign for ``k > alpha`` and the terms decay like a power
  of ``k``, so the sum runs until the tail is below 1e-14 of the sum (for an
  alternating series of decreasing terms the remainder is below the first omitted
  term).

Everything is summed in log space (a term's log magnitude and its sign), so no term
overflows or underflows before the sum.

RDP converts to (epsilon, delta)-DP by the conversion of Balle, Barthe, Gaboardi, Hsu,
Sato 2020 ("Hypothesis Testing Interpretations and Renyi Differential Privacy",
Thm. 21), tighter than Mironov's ``rdp + log(1/delta)/(alpha-1)``:

    epsilon = min_alpha  rdp(alpha) + log((alpha-1)/alpha) - (log(delta) + log(alpha)) / (alpha-1),

clamped at 0. The result is an upper bound on the mechanism's true epsilon (RDP
accounting is never below the tight value; a privacy-loss-distribution accountant gets
closer).

Pure NumPy (no SciPy): ``log C(alpha, k)`` is a running sum of ``log|alpha-i| -
log(i+1)``, ``log erfc`` comes from :func:`math.erfc` where it is representable and
its asymptotic expansion beyond.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["DEFAULT_ORDERS", "rdp_subsampled_gaussian", "epsilon_from_rdp", "epsilon",
           "RDPAccountant"]

# The Renyi orders the minimum is taken over: fine below 11 (every order Opacus,
# TF-Privacy and dp_accounting use: 1.1, 1.2, ..., 10.9 and 11..63, written the same
# way so the floats are equal), a few closer to 1 (small epsilons, many steps), every
# integer to 64, then sparser to 1024 (large epsilons, few steps).
DEFAULT_ORDERS = tuple(
    [1.01, 1.02, 1.03, 1.05, 1.075]
    + [1 + x / 10.0 for x in range(1, 100)]
    + list(range(11, 65))
    + [80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 768, 1024])

_LOG_HALF = math.log(0.5)
# the series stops when a chunk of its terms is below this fraction of the sum (A >= 1,
# so log A and RDP * (alpha - 1) are exact to about this much)
_LOG_TAIL = math.log(1e-14)
_MAX_TERMS = 1 << 22


# ------------------------------------------------------------------ log-space helpers
def _log_erfc(x: np.ndarray) -> np.ndarray:
    """log(erfc(x)) elementwise, without underflow for large x (float64)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    big = x >= 10.0
    low = x <= -10.0           # erfc(x) = 2 - erfc(-x), erfc(10) ~ 2e-45: log(2)
    mid = ~(big | low)
    if mid.any():
        out[mid] = np.log([math.erfc(v) for v in x[mid]])
    out[low] = math.log(2.0)
    if big.any():
        # erfc(x) = exp(-x^2) / (x sqrt(pi)) * (1 + sum_n (-1)^n (2n-1)!! / (2x^2)^n):
        # at x >= 10 twelve terms leave a relative error below 1e-16
        xb = x[big]
        inv = 1.0 / (2.0 * xb * xb)
        series = np.ones_like(xb)
        term = np.ones_like(xb)
        for n in range(1, 13):
            term = term * (-(2 * n - 1)) * inv
            series += term
        out[big] = -xb * xb - np.log(xb * math.sqrt(math.pi)) + np.log(series)
    return out


def _log_abs_binom(alpha: np.ndarray, start: int, stop: int, log_c: np.ndarray,
                   sign: np.ndarray):
    """(log|C(alpha, k)|, sign of C(alpha, k)) for each row's order ``alpha[r]`` and
    k = start..stop-1: two (len(alpha), stop-start) float64 arrays, given ``log_c,
    sign`` of C(alpha, start) per row (0 and 1 for start 0).

    By the recurrence C(alpha, k+1) = C(alpha, k) (alpha - k) / (k + 1); for an integer
    alpha the coefficients past alpha are 0 (log -inf)."""
    k = np.arange(start, stop - 1, dtype=np.float64)
    ratio = alpha[:, None] - k
    with np.errstate(divide="ignore"):
        steps = np.log(np.abs(ratio)) - np.log(k + 1.0)
    logs = np.concatenate((log_c[:, None], log_c[:, None] + np.cumsum(steps, axis=1)),
                          axis=1)
    signs = np.concatenate((sign[:, None], sign[:, None] * np.cumprod(np.sign(ratio), axis=1)),
                           axis=1)
    return logs, signs


def _log_a_int(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log A_alpha for integer orders (one value per entry of ``alphas``), by the
    closed-form binomial sum, every term positive; all orders in one (orders, k) array,
    the coefficients past an order being 0 (log -inf)."""
    n = int(np.max(alphas)) + 1
    k = np.arange(n, dtype=np.float64)
    log_c, _ = _log_abs_binom(alphas, 0, n, np.zeros(alphas.size), np.ones(alphas.size))
    with np.errstate(invalid="ignore"):   # -inf coefficients times (alpha - k) < 0
        log_terms = (log_c + k * math.log(q) + (alphas[:, None] - k) * math.log1p(-q)
                     + (k * k - k) / (2.0 * sigma * sigma))
    log_terms[k > alphas[:, None]] = -math.inf
    m = np.max(log_terms, axis=1)
    return m + np.log(np.sum(np.exp(log_terms - m[:, None]), axis=1))


def _log_a_series(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log A_alpha for orders > 1 (one value per entry of ``alphas``) by the two-sided
    series of Mironov, Talwar, Zhang 2019 (it terminates by itself at an integer order).

    The terms of all orders are computed together in chunks along k, each chunk as long
    as everything before it, into a running signed log-sum-exp per order (``big``: the
    largest log term so far, ``acc``: the sum scaled by exp(-big)). An order is done once
    a whole chunk lies below ``_TAIL`` times its sum: past ``k > alpha`` the terms
    alternate in sign and decrease (like a power of k), so the rest of its series is
    below its first term."""
    s2 = 2.0 * sigma * sigma
    log_q, log_1mq = math.log(q), math.log1p(-q)
    z0 = sigma * sigma * (log_1mq - log_q) + 0.5
    scale = math.sqrt(2.0) * sigma
    out = np.empty(alphas.size)
    rows = np.arange(alphas.size)          # the orders not yet converged
    log_c = np.zeros(alphas.size)          # log|C(alpha, start)| and its sign
    sign = np.ones(alphas.size)
    big = np.full(alphas.size, -math.inf)
    acc = np.zeros(alphas.size)
    start, stop = 0, max(64, 2 * math.ceil(float(np.max(alphas))))
    while True:
        al = alphas[rows][:, None]
        k = np.arange(start, stop, dtype=np.float64)
        j = al - k
        lc, sg = _log_abs_binom(alphas[rows], start, stop, log_c[rows], sign[rows])
        log_s0 = (lc + k * log_q + j * log_1mq + (k * k - k) / s2
                  + _LOG_HALF + _log_erfc((k - z0) / scale))
        log_s1 = (lc + j * log_q + k * log_1mq + (j * j - j) / s2
                  + _LOG_HALF + _log_erfc((z0 - j) / scale))
        chunk_max = np.maximum(np.max(log_s0, axis=1), np.max(log_s1, axis=1))
        new_big = np.maximum(big[rows], chunk_max)
        acc[rows] = (acc[rows] * np.exp(big[rows] - new_big)
                     + np.sum(sg * (np.exp(log_s0 - new_big[:, None])
                                    + np.exp(log_s1 - new_big[:, None])), axis=1))
        big[rows] = new_big
        if not np.all(acc[rows] > 0):
            raise ArithmeticError("the RDP series lost its precision (a non-positive sum)")
        log_a = new_big + np.log(acc[rows])
        done = chunk_max < log_a + _LOG_TAIL
        out[rows[done]] = log_a[done]
        if done.all():
            return out
        if stop >= _MAX_TERMS:
            raise ArithmeticError(
                f"the RDP series (sigma {sigma}, q {q}) did not converge in {stop} terms "
                f"at orders {alphas[rows[~done]].tolist()}")
        # C(alpha, stop) from C(alpha, stop - 1), for the rows that go on
        ratio = alphas[rows] - (stop - 1)
        with np.errstate(divide="ignore"):
            log_c[rows] = lc[:, -1] + np.log(np.abs(ratio)) - math.log(stop)
        sign[rows] = sg[:, -1] * np.sign(ratio)
        rows = rows[~done]
        start, stop = stop, 2 * stop


# ------------------------------------------------------------------ argument checks
def _check_real(value, name, *, low, high=None, low_open=False, high_open=False):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = math.isfinite(v) and (v > low if low_open else v >= low)
        if ok and high is not None:
            ok = v < high if high_open else v <= high
    if not ok:
        lo = ("(" if low_open else "[") + f"{low}"
        hi = (f"{high}" + (")" if high_open else "]")) if high is not None else "inf)"
        raise ValueError(f"{name} must be a real number in {lo}, {hi}, got {value!r}")
    return float(value)


def _check_steps(steps) -> int:
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    return int(steps)


def _check_orders(orders) -> np.ndarray:
    arr = np.asarray(orders, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr <= 1):
        raise ValueError(f"orders must be a non-empty 1-D sequence of finite reals > 1, "
                         f"got {orders!r}")
    return arr


# ------------------------------------------------------------------ public functions
def rdp_subsampled_gaussian(noise_multiplier, sample_rate, steps,
                            orders=DEFAULT_ORDERS) -> np.ndarray:
    """RDP at each of ``orders`` of ``steps`` compositions of the Poisson-subsampled
    Gaussian mechanism (noise multiplier ``sigma``, sample rate ``q``): a float64 array.

    ``q == 1`` is the plain Gaussian, ``steps * alpha / (2 sigma^2)``; ``sigma == 0``
    (no noise) is ``inf``; ``steps == 0`` is 0."""
    sigma = _check_real(noise_multiplier, "noise_multiplier", low=0.0)
    q = _check_real(sample_rate, "sample_rate", low=0.0, high=1.0, low_open=True)
    steps = _check_steps(steps)
    alphas = _check_orders(orders)
    if steps == 0:
        return np.zeros_like(alphas)
    if sigma == 0.0:
        return np.full_like(alphas, math.inf)
    if q == 1.0:
        return steps * alphas / (2.0 * sigma * sigma)
    log_a = np.empty_like(alphas)
    integer = alphas == np.floor(alphas)
    if integer.any():
        log_a[integer] = _log_a_int(q, sigma, alphas[integer])
    if not integer.all():
        log_a[~integer] = _log_a_series(q, sigma, alphas[~integer])
    # A >= 1 (Jensen): a float64 sum is exact to ~1e-16 in log A, which can round a
    # negligible RDP (huge sigma, tiny q) below 0
    return steps * (np.maximum(log_a, 0.0) / (alphas - 1.0))


def epsilon_from_rdp(orders, rdp, delta):
    """(epsilon, best_order): the smallest epsilon over ``orders`` such that the RDP
    curve ``rdp`` gives (epsilon, delta)-DP, by Balle et al. 2020's conversion
    ``rdp + log((alpha-1)/alpha) - (log(delta) + log(alpha)) / (alpha-1)``, never below
    0. With every order infinite it is ``(inf, nan)``."""
    alphas = _check_orders(orders)
    rdp = np.asarray(rdp, dtype=np.float64)
    if rdp.shape != alphas.shape:
        raise ValueError(f"rdp must have one value per order ({alphas.size}), "
                         f"got shape {rdp.shape}")
    if np.any(np.isnan(rdp)) or np.any(rdp < 0):
        raise ValueError("rdp must hold values >= 0 (inf allowed)")
    delta = _check_real(delta, "delta", low=0.0, high=1.0, low_open=True, high_open=True)
    eps = (rdp + np.log1p(-1.0 / alphas)
           - (math.log(delta) + np.log(alphas)) / (alphas - 1.0))
    i = int(np.argmin(eps))
    if not math.isfinite(eps[i]):
        return math.inf, math.nan
    return max(0.0, float(eps[i])), float(alphas[i])


def epsilon(*, noise_multiplier, sample_rate, steps, delta, orders=DEFAULT_ORDERS) -> float:
    """The epsilon of ``steps`` DP-SGD steps with noise multiplier ``noise_multiplier``
    and Poisson sample rate ``sample_rate`` (batch size / dataset size) at ``delta``:
    RDP accounting over ``orders`` with Balle et al. 2020's conversion. ``steps == 0``
    gives 0.0; no noise gives inf.

    >>> round(epsilon(noise_multiplier=1.0, sample_rate=1.0, steps=1, delta=1e-5), 3)
    4.729
    """
    _check_real(delta, "delta", low=0.0, high=1.0, low_open=True, high_open=True)
    rdp = rdp_subsampled_gaussian(noise_multiplier, sample_rate, steps, orders)
    if _check_steps(steps) == 0:
        return 0.0
    return epsilon_from_rdp(orders, rdp, delta)[0]


class RDPAccountant:
    """Accumulates DP-SGD steps and reports their epsilon.

    >>> acc = RDPAccountant()
    >>> acc.step(noise_multiplier=1.1, sample_rate=0.01, steps=100)
    >>> acc.step(noise_multiplier=1.1, sample_rate=0.01)
    >>> acc.history
    [[1.1, 0.01, 101]]

    ``history`` lists ``[noise_multiplier, sample_rate, steps]`` runs (consecutive steps
    with the same settings merge); the RDP of different settings adds.
    :meth:`get_config` / :meth:`from_config` round-trip through JSON.
    """

    def __init__(self, orders=DEFAULT_ORDERS):
        self._orders = tuple(float(a) for a in _check_orders(orders))
        self._history: list[list] = []
        self._cache: dict = {}   # (sigma, q) -> RDP of one step

    @property
    def orders(self) -> tuple:
        return self._orders

    @property
    def history(self) -> list:
        """A copy of the ``[noise_multiplier, sample_rate, steps]`` runs."""
        return [list(h) for h in self._history]

    def step(self, noise_multiplier, sample_rate, steps=1) -> None:
        """Record ``steps`` steps with these settings."""
        sigma = _check_real(noise_multiplier, "noise_multiplier", low=0.0)
        q = _check_real(sample_rate, "sample_rate", low=0.0, high=1.0, low_open=True)
        steps = _check_steps(steps)
        if steps == 0:
            return
        if self._history and self._history[-1][:2] == [sigma, q]:
            self._history[-1][2] += steps
        else:
            self._history.append([sigma, q, steps])

    def rdp(self) -> np.ndarray:
        """The RDP at each order of everything recorded."""
        total = np.zeros(len(self._orders))
        for sigma, q, steps in self._history:
            one = self._cache.get((sigma, q))
            if one is None:
                one = rdp_subsampled_gaussian(sigma, q, 1, self._orders)
                self._cache[(sigma, q)] = one
            total += steps * one
        return total

    def epsilon(self, delta) -> float:
        """The epsilon of everything recorded, at ``delta``; 0.0 before any step."""
        _check_real(delta, "delta", low=0.0, high=1.0, low_open=True, high_open=True)
        if not self._history:
            return 0.0
        return epsilon_from_rdp(self._orders, self.rdp(), delta)[0]

    def get_config(self) -> dict:
        """{"history": ...}, and "orders" when they are not DEFAULT_ORDERS."""
        config = {"history": self.history}
        if tuple(self._orders) != tuple(DEFAULT_ORDERS):
            config["orders"] = list(self._orders)
        return config

    @classmethod
    def from_config(cls, config: dict) -> "RDPAccountant":
        acc = cls(orders=config.get("orders", DEFAULT_ORDERS))
        for entry in config.get("history", []):
            if not isinstance(entry, (list, tuple)) or len(entry) != 3:
                raise ValueError(f"history entries must be [noise_multiplier, "
                                 f"sample_rate, steps], got {entry!r}")
            acc.step(*entry)
        return acc
