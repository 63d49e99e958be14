"""Optimizers: torch.optim's update rules and defaults, run by the fused step kernels.

An optimizer is created without parameters (as in Keras) and bound to a
model's parameters by ``Model.compile`` / ``fit``. Its state (momentum buffers,
Adam moments, the step count) lives on the parameters' device and is saved with
the model, so a resumed run continues exactly.

>>> opt = fm.optim.Adam(lr=1e-3)
>>> opt = fm.optim.SGD(lr=0.1, momentum=0.9, nesterov=True)
>>> opt = fm.optim.AdamW(lr=1e-3, weight_decay=1e-2)
>>> opt = fm.optim.RMSprop(lr=1e-2, momentum=0.9, centered=True)
>>> opt = fm.optim.Adam(lr=1e-3, clipnorm=1.0)          # Keras' gradient clipping

``opt.lr`` may be changed between epochs (e.g. by a callback). It may also be a
learning-rate schedule: any callable of the 0-based step returning the rate
(``fm.optim.schedules``); :meth:`Optimizer.lr_at` gives the rate of a step.

Gradient clipping (Keras' names, each > 0 or None): ``clipnorm`` scales each
parameter's gradient to an L2 norm of at most clipnorm, ``global_clipnorm`` all of
them together to a global norm of at most global_clipnorm
(``torch.nn.utils.clip_grad_norm_``), ``clipvalue`` clips every gradient element to
[-clipvalue, clipvalue] (after the norm clipping). Scale = min(1, max_norm / (norm +
1e-6)), as torch.
"""
from __future__ import annotations

import math

from . import ops, schedules

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "get"]

_CLIP_KEYS = ("clipnorm", "global_clipnorm", "clipvalue")


class Optimizer:
    """Base class: hyper-parameters, per-parameter state buffers and a step counter.

    Subclasses name their buffers in ``_buffers`` and implement ``_update``,
    one call of a fused kernel per parameter.
    """

    _buffers: tuple[str, ...] = ()

    def __init__(self, lr, *, clipnorm=None, global_clipnorm=None, clipvalue=None):
        name = type(self).__name__
        if callable(lr):
            self.lr = lr             # a schedule: lr(step) -> float
        else:
            if not lr >= 0.0:
                raise ValueError(f"{name}: 'lr' must be >= 0, got {lr}")
            self.lr = float(lr)
        for key, val in (("clipnorm", clipnorm), ("global_clipnorm", global_clipnorm),
                         ("clipvalue", clipvalue)):
            if val is not None and not (float(val) > 0.0 and math.isfinite(float(val))):
                raise ValueError(f"{name}: '{key}' must be > 0 or None, got {val}")
        if clipnorm is not None and global_clipnorm is not None:
            raise ValueError(f"{name}: cannot set both 'clipnorm' and 'global_clipnorm', "
                             "choose one")
        self.clipnorm = None if clipnorm is None else float(clipnorm)
        self.global_clipnorm = None if global_clipnorm is None else float(global_clipnorm)
        self.clipvalue = None if clipvalue is None else float(clipvalue)
        self.iterations = 0          # steps taken (Adam's bias correction counts from 1)
        self.state: list[dict] = []  # per parameter: buffer name -> array

    # -- learning rate ----------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """The learning rate of the 0-based ``step``: the schedule's value, or the float."""
        return float(self.lr(int(step))) if callable(self.lr) else float(self.lr)

    def _current_lr(self) -> float:
        """The rate of the step being taken (``iterations`` already counts it)."""
        return self.lr_at(max(self.iterations - 1, 0))

    # -- configuration ------------------------------------------------------------------
    def get_config(self) -> dict:
        raise NotImplementedError

    def _base_config(self) -> dict:
        """lr (a schedule serialized) and the clipping settings that are set."""
        lr = self.lr
        if callable(lr):
            lr = schedules.serialize(lr)
        config = {"lr": lr}
        config.update({k: getattr(self, k) for k in _CLIP_KEYS if getattr(self, k) is not None})
        return config

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        if isinstance(config.get("lr"), dict):  # a serialized schedule
            try:
                config["lr"] = schedules.deserialize(config["lr"])
            except (ValueError, TypeError):
                raise
            except Exception as e:  # a malformed entry: a clear ValueError, as other settings
                raise ValueError(f"{cls.__name__}: bad learning-rate schedule "
                                 f"{config['lr']!r}: {type(e).__name__}: {e}") from None
        return cls(**config)

    _repr_hidden: tuple[str, ...] = ()  # configuration keys repr leaves out (state, not settings)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items()
                         if k not in self._repr_hidden)
        return f"{type(self).__name__}({args})"

    # -- state --------------------------------------------------------------------------
    def build(self, params) -> None:
        """Allocate zeroed state buffers like ``params`` (on their device)."""
        self.state = [{name: _zeros_like(p) for name in self._buffers} for p in params]

    def step(self, params, grads) -> None:
        """One update of every parameter, in place, from its gradient (clipped first
        when clipnorm / global_clipnorm / clipvalue is set)."""
        if len(self.state) != len(params):
            self.build(params)
        self.iterations += 1
        scales = self._clip_scales(params, grads)
        for i, (p, g, s) in enumerate(zip(params, grads, self.state)):
            transform = {}
            if scales is not None:
                transform["clip_scale"] = scales[i:i + 1]
            if self.clipvalue is not None:
                transform["clipvalue"] = self.clipvalue
            self._update(p, g, s, **transform)

    def _clip_scales(self, params, grads):
        """The (len(params),) float32 clip-by-norm scales on the parameters' device
        (ops.grad_clip_scale over the flattened gradients), or None without clipnorm /
        global_clipnorm."""
        max_norm = self.clipnorm if self.clipnorm is not None else self.global_clipnorm
        if max_norm is None or not params:
            return None
        from ._interop import cupy_module, is_cupy
        import numpy as np

        xp = cupy_module() if is_cupy(params[0]) else np
        flat_p = xp.concatenate([xp.ravel(p) for p in params])
        flat_g = xp.concatenate([xp.ravel(g) for g in grads])
        offsets = xp.asarray(np.cumsum([0] + [int(p.size) for p in params]), dtype=np.int64)
        mode = "per_tensor" if self.clipnorm is not None else "global"
        return ops.grad_clip_scale(flat_p, flat_g, offsets, mode=mode, max_norm=max_norm)

    def _update(self, param, grad, state, **transform) -> None:
        """One parameter's update; ``transform``: the ops' gradient transform keywords
        (l1, l2, clip_scale, clipvalue, penalty_out), forwarded to the kernel."""
        raise NotImplementedError

    def _built_for(self, params) -> bool:
        """Whether the state holds this optimizer's buffers for ``params`` (shapes)."""
        return len(self.state) == len(params) and all(
            set(s) == set(self._buffers) and all(tuple(a.shape) == tuple(p.shape)
                                                 for a in s.values())
            for s, p in zip(self.state, params))

    def state_arrays(self, params=None) -> dict:
        """``{"<param index>.<buffer>": array}`` -- the state, for saving. The state is
        built on the first step; before it, given ``params``, the zeros it starts from."""
        state = self.state
        if params is not None and not self._built_for(params):
            state = [{name: _zeros_like(p) for name in self._buffers} for p in params]
        return {f"{i}.{name}": arr for i, s in enumerate(state) for name, arr in s.items()}

    def load_state_arrays(self, arrays: dict, params, iterations: int, convert) -> None:
        """Restore the state saved by :meth:`state_arrays`; ``convert`` moves an array
        to the parameters' device. A state already built for ``params`` is overwritten in
        place (an engine may hold views of it). At step 0 a file without any state
        (saved before the first step by fastmlp 0.1) restores the zeros it started from."""
        iterations = int(iterations)
        for i, p in enumerate(params):
            for name in self._buffers:
                key = f"{i}.{name}"
                if key not in arrays:
                    if iterations == 0 and not arrays:
                        continue
                    raise ValueError(f"optimizer state '{key}' is missing")
                if tuple(arrays[key].shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state '{key}' has shape "
                                     f"{tuple(arrays[key].shape)}, the parameter has "
                                     f"{tuple(p.shape)}")
        if not self._built_for(params):
            self.build(params)
        for i, s in enumerate(self.state):
            for name, arr in s.items():
                key = f"{i}.{name}"
                arr[...] = convert(arrays[key]) if key in arrays else 0
        self.iterations = iterations

    def to(self, convert) -> None:
        """Move the state with ``convert`` (a device transfer)."""
        self.state = [{k: convert(v) for k, v in s.items()} for s in self.state]


def _zeros_like(p):
    from ._interop import cupy_module, is_cupy

    if is_cupy(p):
        return cupy_module().zeros_like(p)
    import numpy as np

    return np.zeros_like(p)


class SGD(Optimizer):
    """torch.optim.SGD: momentum (dampening 0), Nesterov, coupled weight decay."""

    def __init__(self, lr=1e-3, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, *, clipnorm=None,
                 global_clipnorm=None, clipvalue=None):
        super().__init__(lr, clipnorm=clipnorm, global_clipnorm=global_clipnorm,
                         clipvalue=clipvalue)
        if not momentum >= 0.0:
            raise ValueError(f"SGD: 'momentum' must be >= 0, got {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"SGD: 'weight_decay' must be >= 0, got {weight_decay}")
        if nesterov and momentum <= 0.0:
            raise ValueError("SGD: nesterov=True needs momentum > 0 (as in torch.optim.SGD)")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        self.weight_decay = float(weight_decay)
        self._buffers = ("momentum_buffer",) if self.momentum else ()

    def get_config(self) -> dict:
        return {**self._base_config(), "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay}

    def _update(self, param, grad, state, **transform) -> None:
        ops.sgd_step(param, grad, state.get("momentum_buffer"), lr=self._current_lr(),
                     momentum=self.momentum, nesterov=self.nesterov,
                     weight_decay=self.weight_decay, **transform)


class Adam(Optimizer):
    """torch.optim.Adam: bias-corrected moments, eps outside the square root,
    coupled (L2) weight decay."""

    _buffers = ("exp_avg", "exp_avg_sq")
    _decoupled = False

    def __init__(self, lr=1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, clipnorm=None,
                 global_clipnorm=None, clipvalue=None):
        super().__init__(lr, clipnorm=clipnorm, global_clipnorm=global_clipnorm,
                         clipvalue=clipvalue)
        name = type(self).__name__
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"{name}: 'betas' must be two numbers in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"{name}: 'eps' must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"{name}: 'weight_decay' must be >= 0, got {weight_decay}")
        self.betas, self.eps, self.weight_decay = betas, float(eps), float(weight_decay)

    def get_config(self) -> dict:
        return {**self._base_config(), "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay}

    def _update(self, param, grad, state, **transform) -> None:
        ops.adam_step(param, grad, state["exp_avg"], state["exp_avg_sq"],
                      step=self.iterations, lr=self._current_lr(), beta1=self.betas[0],
                      beta2=self.betas[1], eps=self.eps, weight_decay=self.weight_decay,
                      decoupled=self._decoupled, **transform)


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay (default 1e-2)."""

    _decoupled = True

    def __init__(self, lr=1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, clipnorm=None,
                 global_clipnorm=None, clipvalue=None):
        super().__init__(lr, betas, eps, weight_decay, clipnorm=clipnorm,
                         global_clipnorm=global_clipnorm, clipvalue=clipvalue)


class RMSprop(Optimizer):
    """torch.optim.RMSprop: square_avg = alpha * square_avg + (1 - alpha) * g^2, the
    step g / (sqrt(square_avg) + eps) (centered: square_avg minus the squared running
    mean of g), optional momentum and coupled weight decay; torch's defaults."""

    def __init__(self, lr=1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False,
                 *, clipnorm=None, global_clipnorm=None, clipvalue=None):
        super().__init__(lr, clipnorm=clipnorm, global_clipnorm=global_clipnorm,
                         clipvalue=clipvalue)
        for key, val in (("eps", eps), ("weight_decay", weight_decay), ("momentum", momentum)):
            if not val >= 0.0:
                raise ValueError(f"RMSprop: '{key}' must be >= 0, got {val}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"RMSprop: 'alpha' must be in [0, 1], got {alpha}")
        self.alpha, self.eps, self.weight_decay = float(alpha), float(eps), float(weight_decay)
        self.momentum, self.centered = float(momentum), bool(centered)
        self._buffers = (("square_avg",) + (("momentum_buffer",) if self.momentum else ())
                         + (("grad_avg",) if self.centered else ()))

    def get_config(self) -> dict:
        return {**self._base_config(), "alpha": self.alpha, "eps": self.eps,
                "weight_decay": self.weight_decay, "momentum": self.momentum,
                "centered": self.centered}

    def _update(self, param, grad, state, **transform) -> None:
        ops.rmsprop_step(param, grad, state["square_avg"], state.get("momentum_buffer"),
                         state.get("grad_avg"), lr=self._current_lr(), alpha=self.alpha,
                         eps=self.eps, weight_decay=self.weight_decay,
                         momentum=self.momentum, centered=self.centered, **transform)


_BY_NAME = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop}


def get(identifier) -> Optimizer:
    """An optimizer from an instance or a name ("sgd", "adam", "adamw", "rmsprop", with
    defaults)."""
    if isinstance(identifier, Optimizer):
        return identifier
    if isinstance(identifier, str) and identifier.lower() in _BY_NAME:
        return _BY_NAME[identifier.lower()]()
    raise ValueError(f"unknown optimizer {identifier!r}: pass an fm.optim.Optimizer or one of "
                     f"{sorted(_BY_NAME)}")


def from_config(name: str, config: dict) -> Optimizer:
    from . import privacy

    classes = {**_BY_NAME, "dpsgd": privacy.DPSGD, "dpadam": privacy.DPAdam}
    if name.lower() not in classes:
        raise ValueError(f"unknown optimizer class {name!r}")
    return classes[name.lower()].from_config(config)
