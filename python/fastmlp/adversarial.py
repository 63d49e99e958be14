"""Adversarial examples and adversarial training (L-infinity attacks).

* :func:`fgsm` -- the fast gradient sign method (Goodfellow et al. 2015):
  ``clip(x + eps * sign(d loss / d x))``.
* :func:`pgd` -- projected gradient descent (Madry et al. 2018): from ``x`` (plus
  uniform noise in the eps-ball with ``random_start``), ``steps`` times
  ``x' = clip(x + clamp(x' + alpha * sign(d loss / d x') - x, -eps, eps))`` (the update
  of torchattacks' PGD).
* :class:`FGSM` / :class:`PGD` -- the same attacks as configurations:
  ``model.fit(..., adversarial=PGD(...))`` trains on the adversarial rows of every
  batch (made inside the training step, on the device, with the current weights),
  ``model.evaluate(..., adversarial=PGD(...))`` reports robust loss and accuracy.

The loss is the model's compiled loss, its gradient taken with the model in inference
mode (dropout off, BatchNormalization's moving statistics: PyTorch's ``model.eval()``).
``clip`` is the valid input range (``(0, 1)`` for images scaled to [0, 1]; None: no
clipping). The random start draws from a counter-based generator keyed by ``seed``
(drawn from fastmlp's generator when None, so :func:`fastmlp.set_seed` repeats runs):
in training a fresh draw at every optimizer step.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from ._random import generator
from .plan import AttackSpec

__all__ = ["FGSM", "PGD", "fgsm", "pgd"]


def _number(where, name, value, positive=False):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) \
            or not math.isfinite(float(value)) or float(value) < 0 \
            or (positive and float(value) == 0):
        raise ValueError(f"{where}: '{name}' must be a finite number "
                         f"{'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _clip(where, clip):
    if clip is None:
        return -math.inf, math.inf
    try:
        lo, hi = (float(v) for v in clip)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: 'clip' must be (low, high) or None, got {clip!r}") from None
    if not lo < hi or math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"{where}: 'clip' must be (low, high) with low < high, got {clip!r}")
    return lo, hi


class _Attack:
    """An attack's settings (see the module docstring)."""

    def spec(self) -> AttackSpec:
        raise NotImplementedError


class FGSM(_Attack):
    """The fast gradient sign method: one step of size ``eps`` from ``x``."""

    def __init__(self, eps, clip=(0.0, 1.0)):
        self.eps = _number("FGSM", "eps", eps)
        self.clip = None if clip is None else _clip("FGSM", clip)

    def spec(self):
        lo, hi = _clip("FGSM", self.clip)
        return AttackSpec(self.eps, self.eps, 1, lo, hi, random_start=False, project=False)

    def __repr__(self):
        return f"FGSM(eps={self.eps}, clip={self.clip})"


class PGD(_Attack):
    """Projected gradient descent: ``steps`` sign steps of size ``alpha`` inside the
    L-infinity ball of radius ``eps`` around ``x`` (from a uniform random point of it
    with ``random_start``)."""

    def __init__(self, eps, alpha, steps=10, clip=(0.0, 1.0), random_start=True, seed=None):
        self.eps = _number("PGD", "eps", eps)
        self.alpha = _number("PGD", "alpha", alpha, positive=True)
        if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, numbers.Integral) \
                or steps < 1:
            raise ValueError(f"PGD: 'steps' must be an integer >= 1, got {steps!r}")
        self.steps = int(steps)
        self.clip = None if clip is None else _clip("PGD", clip)
        self.random_start = bool(random_start)
        self.seed = int(generator().integers(2**63)) if seed is None else int(seed)

    def spec(self):
        lo, hi = _clip("PGD", self.clip)
        return AttackSpec(self.eps, self.alpha, self.steps, lo, hi,
                          random_start=self.random_start, project=True, seed=self.seed)

    def __repr__(self):
        return (f"PGD(eps={self.eps}, alpha={self.alpha}, steps={self.steps}, "
                f"clip={self.clip}, random_start={self.random_start})")


def as_spec(attack, where):
    """An :class:`AttackSpec` from an FGSM / PGD configuration (None stays None)."""
    if attack is None:
        return None
    if not isinstance(attack, _Attack):
        raise TypeError(f"{where}: 'adversarial' must be fm.adversarial.FGSM(...) or "
                        f"fm.adversarial.PGD(...), got {type(attack).__name__}")
    return attack.spec()


def _run(model, x, y, attack, where, batch_size, check_finite):
    from . import trainer
    from ._interop import cupy_module, is_cupy
    from .model import _as_input

    if not hasattr(model, "_require_compiled"):
        raise TypeError(f"{where}: 'model' must be a fm.Sequential, got {type(model).__name__}")
    model._require_compiled(where)
    want_cupy = is_cupy(_as_input(x, "x"))
    x, y = model._prepare_xy(x, y, "x", "y", where, check_finite)
    x = model._place(x, np.float32)
    batch = model._batch_arg(batch_size, where)
    out = trainer.attack(model, x, y, attack.spec(), batch)
    if want_cupy:
        return out if is_cupy(out) else cupy_module().asarray(out)
    return cupy_module().asnumpy(out) if is_cupy(out) else out


def fgsm(model, x, y, eps, clip=(0.0, 1.0), batch_size=None, check_finite=True):
    """FGSM adversarial examples of the rows of ``x`` with labels ``y`` (as ``fit`` takes
    them): ``clip(x + eps * sign(d loss / d x), *clip)`` with the model's compiled loss.
    NumPy in, NumPy out; CuPy in, CuPy out."""
    return _run(model, x, y, FGSM(eps, clip), "fgsm", batch_size, check_finite)


def pgd(model, x, y, eps, alpha, steps=10, clip=(0.0, 1.0), random_start=True, seed=None,
        batch_size=None, check_finite=True):
    """PGD adversarial examples (Madry et al. 2018) of the rows of ``x`` with labels
    ``y``: ``steps`` sign steps of size ``alpha`` projected onto the L-infinity ball of
    radius ``eps`` around ``x`` and clipped to ``clip``; ``random_start``: from a
    uniform point of the ball (``seed``: its stream; None: drawn from fastmlp's
    generator). NumPy in, NumPy out; CuPy in, CuPy out."""
    return _run(model, x, y, PGD(eps, alpha, steps, clip, random_start, seed), "pgd",
                batch_size, check_finite)
