"""Differential privacy: DP-SGD (Abadi et al. 2016) at nearly the cost of ordinary training,
and its privacy accountant.

>>> opt = fm.privacy.DPSGD(lr=0.1, momentum=0.9, l2_norm_clip=1.0, noise_multiplier=1.1)
>>> model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
>>> history = model.fit(x, y, epochs=10, batch_size=256)     # history["epsilon"] per epoch
>>> fm.privacy.epsilon(noise_multiplier=1.1, sample_rate=256 / 60000, steps=2350, delta=1e-5)

A DP optimizer's step uses the gradient ``(sum_i clip_C(g_i) + N(0, (sigma C)^2 I)) / B``
where ``g_i`` is example i's gradient over all parameters (one global L2 norm per
example), ``clip_C(g) = g * min(1, C / (||g|| + 1e-6))`` (Opacus's factor), ``C =
l2_norm_clip``, ``sigma = noise_multiplier`` and ``B`` the batch's rows (with
``fit(poisson_sampling=True)``, the expected batch size, as Opacus); then the usual
SGD / Adam update. Nothing per example is materialised: for a Dense layer example i's
weight gradient is the outer product ``x_i dz_i^T``, so its squared norm is
``||x_i||^2 ||dz_i||^2`` (plus ``||dz_i||^2`` for the bias); the norms come from what
the backward pass already holds, and the clipped sum is the ordinary weight-gradient
GEMM with dz's rows scaled by the clip factors inside the GEMM. The noise is drawn in
the optimizer kernel from the counter-based Philox generator (the same numbers on the
CPU and the GPU). Dense, Activation and Dropout layers are covered; BatchNormalization
and LayerNormalization raise a ValueError at compile/fit time.

Privacy accounting (:func:`epsilon`): the Renyi-DP accountant of the Poisson-subsampled
Gaussian mechanism (Mironov 2017; Mironov, Talwar and Zhang 2019) over a dense set of
orders, converted to (epsilon, delta) with Balle et al. 2020's bound. ``fit`` with a DP
optimizer records ``epsilon`` in the History after every epoch, for the optimizer's
``delta`` (default 1 / the training rows). The accountant assumes Poisson sampling
(each example joins each step independently with probability ``sample_rate =
batch_size / rows``): ``fit(..., poisson_sampling=True)`` samples exactly so (batches of
variable size); the default, shuffled fixed-size batches, is the common approximation
(Opacus's and TF Privacy's tutorials report epsilon for it the same way).

The noise seed: by default a DP optimizer draws a fresh 64-bit seed from the operating
system (``secrets``), because the guarantee assumes the noise is unknown to whoever
sees the model; it is not saved with the model. ``seed=`` makes runs reproducible (for
tests and debugging) and is saved. Philox is not a cryptographically secure generator,
and the floating-point Gaussian has the known weaknesses of every float implementation
(Mironov 2012); as in Opacus's default mode, neither is addressed here.
"""
from __future__ import annotations

import math
import secrets

from . import optim
from ._accountant import DEFAULT_ORDERS, RDPAccountant
from ._accountant import epsilon as _epsilon

__all__ = ["DPSGD", "DPAdam", "epsilon", "is_private", "DEFAULT_ORDERS"]


def epsilon(*, noise_multiplier, sample_rate, steps, delta, orders=DEFAULT_ORDERS) -> float:
    """The epsilon of ``steps`` steps of DP-SGD with noise multiplier ``noise_multiplier``
    and Poisson sampling rate ``sample_rate`` (batch / rows), at ``delta``: the RDP
    accountant (Mironov et al. 2019) with Balle et al. 2020's conversion, minimised over
    ``orders``."""
    return _epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps,
                    delta=delta, orders=orders)


class _DP:
    """What the DP optimizers add to their base class: the clip norm, the noise
    multiplier, delta, the noise seed and the accountant (the steps taken so far, with
    their sampling rate)."""

    _repr_hidden = ("accounting",)  # the accountant's history: state, not a setting

    def _init_dp(self, l2_norm_clip, noise_multiplier, delta, seed, accounting):
        name = type(self).__name__
        if not (float(l2_norm_clip) > 0.0 and math.isfinite(float(l2_norm_clip))):
            raise ValueError(f"{name}: 'l2_norm_clip' must be a finite number > 0, got "
                             f"{l2_norm_clip!r}")
        if not (float(noise_multiplier) >= 0.0 and math.isfinite(float(noise_multiplier))):
            raise ValueError(f"{name}: 'noise_multiplier' must be a finite number >= 0, got "
                             f"{noise_multiplier!r}")
        if delta is not None and not 0.0 < float(delta) < 1.0:
            raise ValueError(f"{name}: 'delta' must be in (0, 1) or None, got {delta!r}")
        if seed is not None and (isinstance(seed, bool) or int(seed) != seed or seed < 0):
            raise ValueError(f"{name}: 'seed' must be an integer >= 0 or None, got {seed!r}")
        self.l2_norm_clip = float(l2_norm_clip)
        self.noise_multiplier = float(noise_multiplier)
        self.delta = None if delta is None else float(delta)
        self.seed = None if seed is None else int(seed)
        # the noise stream's seed: the user's, or a secret one (see the module doc)
        self._noise_seed = self.seed if self.seed is not None else secrets.randbits(63)
        self.accountant = (RDPAccountant.from_config(accounting) if accounting is not None
                           else RDPAccountant())

    def _dp_config(self) -> dict:
        config = {"l2_norm_clip": self.l2_norm_clip, "noise_multiplier": self.noise_multiplier,
                  "delta": self.delta, "accounting": self.accountant.get_config()}
        if self.seed is not None:
            config["seed"] = self.seed
        return config

    def epsilon(self, delta) -> float:
        """The privacy spent by the steps taken so far, at ``delta``."""
        return float(self.accountant.epsilon(delta))

    def step(self, params, grads) -> None:
        raise TypeError(f"{type(self).__name__}.step: DP-SGD needs each example's gradient; "
                        "it runs inside Model.fit (compile the model with this optimizer)")


class DPSGD(_DP, optim.SGD):
    """SGD (torch.optim.SGD's rule: momentum, dampening 0, Nesterov, coupled weight
    decay) on the DP-SGD gradient: each example's gradient clipped to
    ``l2_norm_clip``, Gaussian noise of std ``noise_multiplier * l2_norm_clip`` added to
    the sum, divided by the batch size. ``delta``: the delta of the epsilon that ``fit``
    reports (None: 1 / the training rows); ``seed``: the noise's (None: secret)."""

    def __init__(self, lr, momentum: float = 0.0, l2_norm_clip: float = 1.0,
                 noise_multiplier: float = 1.0, *, nesterov: bool = False,
                 weight_decay: float = 0.0, delta=None, seed=None, accounting=None):
        optim.SGD.__init__(self, lr, momentum=momentum, nesterov=nesterov,
                           weight_decay=weight_decay)
        self._init_dp(l2_norm_clip, noise_multiplier, delta, seed, accounting)

    def get_config(self) -> dict:
        return {**optim.SGD.get_config(self), **self._dp_config()}


class DPAdam(_DP, optim.Adam):
    """Adam (torch.optim.Adam's rule) on the DP-SGD gradient (see :class:`DPSGD`)."""

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 l2_norm_clip: float = 1.0, noise_multiplier: float = 1.0, *,
                 weight_decay: float = 0.0, delta=None, seed=None, accounting=None):
        optim.Adam.__init__(self, lr, betas, eps, weight_decay)
        self._init_dp(l2_norm_clip, noise_multiplier, delta, seed, accounting)

    def get_config(self) -> dict:
        return {**optim.Adam.get_config(self), **self._dp_config()}


def is_private(optimizer) -> bool:
    return isinstance(optimizer, _DP)
