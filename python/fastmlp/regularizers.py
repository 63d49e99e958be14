"""Weight regularizers (``fm.regularizers``), Keras 3's L1 / L2 / L1L2.

A regularizer adds ``l1 * sum(|w|) + l2 * sum(w ** 2)`` to the loss for a weight ``w``
(``Dense(kernel_regularizer=..., bias_regularizer=...)``). Every regularizer has the
float attributes ``l1`` and ``l2`` (0 where it has no such term): the training step
reads them, so only these penalties exist (no custom regularizer classes).

>>> fm.Dense(64, kernel_regularizer=fm.regularizers.L2(1e-4))
>>> fm.Dense(64, kernel_regularizer="l1_l2")      # l1 = l2 = 0.01

``regularizer(w)`` computes the penalty of a NumPy or CuPy array as a Python float
(summed in float64).

Names as in Keras: the classes ``L1(l1=0.01)``, ``L2(l2=0.01)``, ``L1L2(l1=0.0,
l2=0.0)``; ``l1`` and ``l2`` are aliases of ``L1`` and ``L2``; ``l1_l2(l1=0.01,
l2=0.01)`` is a function (its defaults are those of the string ``"l1_l2"``, as
Keras documents them; the class ``L1L2`` defaults to no penalty).
"""
from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["Regularizer", "L1", "L2", "L1L2", "l1", "l2", "l1_l2", "get", "serialize",
           "deserialize"]


def _coefficient(value, name: str, where: str) -> float:
    """A finite number >= 0 as a float, or ValueError."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        try:
            ok = math.isfinite(value) and value >= 0
        except OverflowError:
            ok = False
    if not ok:
        raise ValueError(f"{where}: {name!r} must be a finite number >= 0, got {value!r}")
    return float(value)


class Regularizer:
    """The base class: no penalty (``l1 = l2 = 0``). ``regularizer(w)`` ->
    ``l1 * sum(|w|) + l2 * sum(w ** 2)`` as a float, a term skipped when its
    coefficient is 0 (as Keras: a non-finite weight then adds nothing)."""

    l1 = 0.0
    l2 = 0.0

    def __call__(self, w) -> float:
        from ._interop import cupy_module, is_cupy

        xp = cupy_module() if is_cupy(w) else np
        w = xp.asarray(w).astype(xp.float64)
        penalty = 0.0
        if self.l1:
            penalty += self.l1 * float(xp.sum(xp.abs(w)))
        if self.l2:
            penalty += self.l2 * float(xp.sum(xp.square(w)))
        return penalty

    def get_config(self) -> dict:
        return {}

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class L1(Regularizer):
    """``l1 * sum(|w|)`` (``l1=None`` means the default 0.01, as Keras)."""

    def __init__(self, l1=0.01):
        self.l1 = _coefficient(0.01 if l1 is None else l1, "l1", "L1")

    def get_config(self) -> dict:
        return {"l1": self.l1}


class L2(Regularizer):
    """``l2 * sum(w ** 2)`` (``l2=None`` means the default 0.01, as Keras)."""

    def __init__(self, l2=0.01):
        self.l2 = _coefficient(0.01 if l2 is None else l2, "l2", "L2")

    def get_config(self) -> dict:
        return {"l2": self.l2}


class L1L2(Regularizer):
    """``l1 * sum(|w|) + l2 * sum(w ** 2)`` (None means 0, as Keras)."""

    def __init__(self, l1=0.0, l2=0.0):
        self.l1 = _coefficient(0.0 if l1 is None else l1, "l1", "L1L2")
        self.l2 = _coefficient(0.0 if l2 is None else l2, "l2", "L1L2")

    def get_config(self) -> dict:
        return {"l1": self.l1, "l2": self.l2}


l1 = L1
l2 = L2


def l1_l2(l1=0.01, l2=0.01) -> L1L2:
    """An :class:`L1L2` with both penalties (default 0.01 each)."""
    return L1L2(l1=l1, l2=l2)


_CLASSES = {c.__name__: c for c in (Regularizer, L1, L2, L1L2)}
# String identifiers (Keras' snake-case names) -> the regularizer they make.
_BY_NAME = {"l1": L1, "l2": L2, "l1_l2": l1_l2, "regularizer": Regularizer}


def serialize(regularizer) -> dict | None:
    """``{"class_name": ..., "config": {...}}`` (JSON types); None stays None."""
    if regularizer is None:
        return None
    if type(regularizer) not in _CLASSES.values():
        raise ValueError(f"serialize: not a fastmlp regularizer: {regularizer!r}")
    return {"class_name": type(regularizer).__name__, "config": regularizer.get_config()}


def deserialize(config: dict) -> Regularizer:
    """The regularizer a :func:`serialize` dict describes (extra keys such as Keras'
    ``module`` are ignored); ValueError for an unknown class or bad arguments."""
    if not isinstance(config, dict) or not isinstance(config.get("class_name"), str) \
            or not isinstance(config.get("config", {}), dict):
        raise ValueError(f"deserialize: need {{'class_name': str, 'config': dict}}, got "
                         f"{config!r}")
    name = config["class_name"]
    if name not in _CLASSES:
        raise ValueError(f"deserialize: unknown regularizer class {name!r}; fastmlp has "
                         f"{sorted(_CLASSES)}")
    try:
        return _CLASSES[name].from_config(config.get("config", {}))
    except TypeError as e:  # missing or unexpected arguments
        raise ValueError(f"deserialize: bad config for {name}: {e}") from None


def get(identifier) -> Regularizer | None:
    """A regularizer from None (-> None), an instance, a name ("l1", "l2", "l1_l2" with
    their defaults, or a class name "L1", "L2", "L1L2") or a :func:`serialize` dict."""
    if identifier is None:
        return None
    if isinstance(identifier, Regularizer):
        if type(identifier) not in _CLASSES.values():
            raise ValueError(f"unsupported regularizer {type(identifier).__name__}: "
                             "fastmlp's training step applies only the l1 / l2 penalties "
                             f"of {sorted(_CLASSES)}")
        return identifier
    if isinstance(identifier, dict):
        return deserialize(identifier)
    if isinstance(identifier, str):
        make = _BY_NAME.get(identifier) or _CLASSES.get(identifier)
        if make is not None:
            return make()
    raise ValueError(f"could not interpret regularizer identifier {identifier!r}: use None, "
                     f"an fm.regularizers.Regularizer, one of {sorted(_BY_NAME)} or a "
                     "{'class_name': ..., 'config': ...} dict")
