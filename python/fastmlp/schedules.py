"""Learning-rate schedules (``fm.optim.schedules``), Keras 3's formulas.

A schedule maps the optimizer step (0-based: the number of updates taken before this
one) to the learning rate of that step, a Python float computed in float64:

>>> s = ExponentialDecay(0.1, decay_steps=1000, decay_rate=0.5)
>>> s(0), s(1000)
(0.1, 0.05)

* :class:`ExponentialDecay` -- ``lr0 * decay_rate ** (step / decay_steps)`` (the exponent
  floored with ``staircase=True``);
* :class:`CosineDecay` -- an optional linear warmup from ``lr0`` to ``warmup_target`` over
  ``warmup_steps``, then a cosine from that peak to ``alpha * peak`` over ``decay_steps``,
  constant afterwards;
* :class:`PiecewiseConstantDecay` -- ``values[i]`` for ``boundaries[i-1] < step <=
  boundaries[i]``.

:func:`serialize` / :func:`deserialize` turn a schedule into ``{"class_name": ...,
"config": {...}}`` (JSON) and back, for these classes.
"""
from __future__ import annotations

import bisect
import math
import numbers

__all__ = ["LearningRateSchedule", "ExponentialDecay", "CosineDecay",
           "PiecewiseConstantDecay", "serialize", "deserialize"]


def _real(value, name: str, where: str, *, positive: bool = False, optional=False):
    """A finite real number >= 0 (> 0 with ``positive``), returned unchanged (an int
    stays an int: the config keeps what the user wrote), or ValueError."""
    if value is None and optional:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        try:
            ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
        except OverflowError:  # an int beyond float's range
            ok = False
    if not ok:
        raise ValueError(f"{where}: {name!r} must be a finite number "
                         f"{'> 0' if positive else '>= 0'}, got {value!r}")
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _step(step) -> float:
    """The step as a float64, or ValueError (a schedule is called with the step count)."""
    s = float(step)
    if not s >= 0.0 or math.isinf(s):
        raise ValueError(f"a learning-rate schedule needs a finite step >= 0, got {step!r}")
    return s


class LearningRateSchedule:
    """The base class: ``schedule(step) -> float``, the learning rate of the 0-based
    optimizer step. Subclasses implement ``__call__`` and ``get_config`` (the
    constructor's arguments, JSON types); ``from_config`` calls the constructor."""

    def __call__(self, step) -> float:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(step)")

    def get_config(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must implement get_config()")

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        """The same schedule: the same class and configuration (a restored one equals
        the one that was saved)."""
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash(repr(self))


class ExponentialDecay(LearningRateSchedule):
    """``initial_learning_rate * decay_rate ** (step / decay_steps)``; with
    ``staircase=True`` the exponent is ``floor(step / decay_steps)`` (the rate drops
    every ``decay_steps`` steps). As ``keras.optimizers.schedules.ExponentialDecay``."""

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=False):
        where = "ExponentialDecay"
        self.initial_learning_rate = _real(initial_learning_rate, "initial_learning_rate",
                                           where)
        self.decay_steps = _real(decay_steps, "decay_steps", where, positive=True)
        self.decay_rate = _real(decay_rate, "decay_rate", where, positive=True)
        if not isinstance(staircase, bool):
            raise ValueError(f"{where}: 'staircase' must be True or False, got {staircase!r}")
        self.staircase = staircase

    def __call__(self, step) -> float:
        p = _step(step) / float(self.decay_steps)
        if self.staircase:
            p = math.floor(p)
        return float(self.initial_learning_rate) * float(self.decay_rate) ** p

    def get_config(self) -> dict:
        return {"initial_learning_rate": self.initial_learning_rate,
                "decay_steps": self.decay_steps, "decay_rate": self.decay_rate,
                "staircase": self.staircase}


class CosineDecay(LearningRateSchedule):
    """Keras 3's CosineDecay with its optional linear warmup.

    Without ``warmup_target`` (``warmup_steps`` is then ignored, as in Keras), with
    ``t = min(step, decay_steps)``::

        lr = initial_learning_rate * ((1 - alpha) * 0.5 * (1 + cos(pi * t / decay_steps)) + alpha)

    With ``warmup_target``, the step is first clamped to ``warmup_steps + decay_steps``;
    below ``warmup_steps`` the rate rises linearly, ``initial_learning_rate +
    (warmup_target - initial_learning_rate) * step / warmup_steps``, then the cosine
    above runs from ``warmup_target`` on ``t = step - warmup_steps``. ``alpha`` (in
    [0, 1]) is the final rate as a fraction of the peak.
    """

    def __init__(self, initial_learning_rate, decay_steps, alpha=0.0, warmup_target=None,
                 warmup_steps=0):
        where = "CosineDecay"
        self.initial_learning_rate = _real(initial_learning_rate, "initial_learning_rate",
                                           where)
        self.decay_steps = _real(decay_steps, "decay_steps", where, positive=True)
        self.alpha = _real(alpha, "alpha", where)
        if self.alpha > 1:
            raise ValueError(f"{where}: 'alpha' must be in [0, 1] (the final rate as a "
                             f"fraction of the peak), got {alpha!r}")
        self.warmup_target = _real(warmup_target, "warmup_target", where, optional=True)
        self.warmup_steps = _real(warmup_steps, "warmup_steps", where)

    def _decay(self, t: float, peak: float) -> float:
        alpha = float(self.alpha)
        cosine = 0.5 * (1.0 + math.cos(math.pi * (t / float(self.decay_steps))))
        return peak * ((1.0 - alpha) * cosine + alpha)

    def __call__(self, step) -> float:
        s = _step(step)
        decay_steps = float(self.decay_steps)
        lr0 = float(self.initial_learning_rate)
        if self.warmup_target is None:
            return self._decay(min(s, decay_steps), lr0)
        warmup_steps, target = float(self.warmup_steps), float(self.warmup_target)
        s = min(s, decay_steps + warmup_steps)
        if s < warmup_steps:
            return (target - lr0) * (s / warmup_steps) + lr0
        return self._decay(s - warmup_steps, target)

    def get_config(self) -> dict:
        return {"initial_learning_rate": self.initial_learning_rate,
                "decay_steps": self.decay_steps, "alpha": self.alpha,
                "warmup_target": self.warmup_target, "warmup_steps": self.warmup_steps}


class PiecewiseConstantDecay(LearningRateSchedule):
    """``values[0]`` while ``step <= boundaries[0]``, ``values[i]`` while
    ``boundaries[i-1] < step <= boundaries[i]``, ``values[-1]`` after the last boundary
    (Keras' rule: a boundary step still gets the value before it). ``boundaries``
    strictly increasing; ``len(values) == len(boundaries) + 1``."""

    def __init__(self, boundaries, values):
        where = "PiecewiseConstantDecay"
        if isinstance(boundaries, (str, bytes)) or isinstance(values, (str, bytes)):
            raise ValueError(f"{where}: 'boundaries' and 'values' must be lists of numbers")
        try:
            boundaries, values = list(boundaries), list(values)
        except TypeError:
            raise ValueError(f"{where}: 'boundaries' and 'values' must be lists of "
                             f"numbers, got {boundaries!r} and {values!r}") from None
        if len(values) != len(boundaries) + 1:
            raise ValueError(f"{where}: needs one more value than boundaries, got "
                             f"{len(boundaries)} boundaries and {len(values)} values")
        self.boundaries = [_real(b, f"boundaries[{i}]", where) for i, b in enumerate(boundaries)]
        if any(a >= b for a, b in zip(self.boundaries, self.boundaries[1:])):
            raise ValueError(f"{where}: 'boundaries' must be strictly increasing, got "
                             f"{self.boundaries}")
        self.values = [_real(v, f"values[{i}]", where) for i, v in enumerate(values)]
        self._floats = [float(b) for b in self.boundaries]

    def __call__(self, step) -> float:
        # bisect_left counts the boundaries < step: the index of step's interval.
        return float(self.values[bisect.bisect_left(self._floats, _step(step))])

    def get_config(self) -> dict:
        return {"boundaries": list(self.boundaries), "values": list(self.values)}


_CLASSES = {c.__name__: c for c in (ExponentialDecay, CosineDecay, PiecewiseConstantDecay)}


def serialize(schedule) -> dict:
    """``{"class_name": ..., "config": schedule.get_config()}`` (JSON types). Only
    fastmlp's schedules: another class could not be deserialized (ValueError)."""
    if not isinstance(schedule, LearningRateSchedule):
        raise TypeError(f"serialize: not a LearningRateSchedule: {type(schedule).__name__}")
    name = type(schedule).__name__
    if _CLASSES.get(name) is not type(schedule):
        raise ValueError(f"serialize: cannot serialize the schedule class {name!r}; "
                         f"fastmlp serializes {sorted(_CLASSES)}")
    return {"class_name": name, "config": schedule.get_config()}


def deserialize(config: dict) -> LearningRateSchedule:
    """The schedule a :func:`serialize` dict describes (ValueError for an unknown class
    or bad arguments)."""
    if not isinstance(config, dict) or "class_name" not in config \
            or not isinstance(config.get("config", {}), dict):
        raise ValueError(f"deserialize: need {{'class_name': str, 'config': dict}}, got "
                         f"{config!r}")
    name = config["class_name"]
    if not isinstance(name, str) or name not in _CLASSES:
        raise ValueError(f"deserialize: unknown schedule class {name!r}; fastmlp has "
                         f"{sorted(_CLASSES)}")
    try:
        return _CLASSES[name].from_config(config.get("config", {}))
    except TypeError as e:  # missing or unexpected arguments
        raise ValueError(f"deserialize: bad config for {name}: {e}") from None
