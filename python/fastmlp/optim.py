"""Optimizers: torch.optim's update rules and defaults, run by the fused step kernels.

An optimizer is created without parameters (as in Keras) and bound to a
model's parameters by ``Model.compile`` / ``fit``. Its state (momentum buffers,
Adam moments, the step count) lives on the parameters' device and is saved with
the model, so a resumed run continues exactly.

>>> opt = fm.optim.Adam(lr=1e-3)
>>> opt = fm.optim.SGD(lr=0.1, momentum=0.9, nesterov=True)
>>> opt = fm.optim.AdamW(lr=1e-3, weight_decay=1e-2)

``opt.lr`` may be changed between epochs (e.g. by a callback).
"""
from __future__ import annotations

from . import ops

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "get"]


class Optimizer:
    """Base class: hyper-parameters, per-parameter state buffers and a step counter.

    Subclasses name their buffers in ``_buffers`` and implement ``_update``,
    one call of a fused kernel per parameter.
    """

    _buffers: tuple[str, ...] = ()

    def __init__(self, lr: float):
        if not lr >= 0.0:
            raise ValueError(f"{type(self).__name__}: 'lr' must be >= 0, got {lr}")
        self.lr = float(lr)
        self.iterations = 0          # steps taken (Adam's bias correction counts from 1)
        self.state: list[dict] = []  # per parameter: buffer name -> array

    # -- configuration ------------------------------------------------------------------
    def get_config(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    # -- state --------------------------------------------------------------------------
    def build(self, params) -> None:
        """Allocate zeroed state buffers like ``params`` (on their device)."""
        self.state = [{name: _zeros_like(p) for name in self._buffers} for p in params]

    def step(self, params, grads) -> None:
        """One update of every parameter, in place, from its gradient."""
        if len(self.state) != len(params):
            self.build(params)
        self.iterations += 1
        for p, g, s in zip(params, grads, self.state):
            self._update(p, g, s)

    def _update(self, param, grad, state) -> None:
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

    def __init__(self, lr: float = 1e-3, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0):
        super().__init__(lr)
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
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay}

    def _update(self, param, grad, state) -> None:
        ops.sgd_step(param, grad, state.get("momentum_buffer"), lr=self.lr,
                     momentum=self.momentum, nesterov=self.nesterov,
                     weight_decay=self.weight_decay)


class Adam(Optimizer):
    """torch.optim.Adam: bias-corrected moments, eps outside the square root,
    coupled (L2) weight decay."""

    _buffers = ("exp_avg", "exp_avg_sq")
    _decoupled = False

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(lr)
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
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay}

    def _update(self, param, grad, state) -> None:
        ops.adam_step(param, grad, state["exp_avg"], state["exp_avg_sq"],
                      step=self.iterations, lr=self.lr, beta1=self.betas[0],
                      beta2=self.betas[1], eps=self.eps, weight_decay=self.weight_decay,
                      decoupled=self._decoupled)


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay (default 1e-2)."""

    _decoupled = True

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(lr, betas, eps, weight_decay)


_BY_NAME = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def get(identifier) -> Optimizer:
    """An optimizer from an instance or a name ("sgd", "adam", "adamw", with defaults)."""
    if isinstance(identifier, Optimizer):
        return identifier
    if isinstance(identifier, str) and identifier.lower() in _BY_NAME:
        return _BY_NAME[identifier.lower()]()
    raise ValueError(f"unknown optimizer {identifier!r}: pass an fm.optim.Optimizer or one of "
                     f"{sorted(_BY_NAME)}")


def from_config(name: str, config: dict) -> Optimizer:
    if name.lower() not in _BY_NAME:
        raise ValueError(f"unknown optimizer class {name!r}")
    return _BY_NAME[name.lower()].from_config(config)
