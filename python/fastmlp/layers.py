"""Dense layers and their initialisers.

A Dense layer holds ``kernel`` of shape (in, out) and ``bias`` of shape (out,), as
in Keras: ``y = act(x @ kernel + bias)``. Its forward and backward passes are
composed from :mod:`fastmlp.ops` by the model (see :mod:`fastmlp.model`), which
owns the per-batch workspaces.
"""
from __future__ import annotations

import math

import numpy as np

from ._random import generator

__all__ = ["Dense", "initializers"]

ACTIVATIONS = (None, "linear", "relu", "softmax")


def _truncated_normal(rng, shape, std):
    """Normal(0, std) redrawn outside two standard deviations (Keras' truncated normal)."""
    out = rng.normal(0.0, std, size=shape)
    bad = np.abs(out) > 2.0 * std
    while bad.any():
        out[bad] = rng.normal(0.0, std, size=int(bad.sum()))
        bad = np.abs(out) > 2.0 * std
    return out


# The stddev of a unit normal truncated at +-2, so that the truncated draws have the
# variance the scheme asks for (as Keras' VarianceScaling does).
_TRUNC_STD = 0.87962566103423978


def _variance_scaling(scale, mode, distribution):
    def init(shape, rng):
        fan_in, fan_out = shape[0], shape[1]
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
        var = scale / max(1.0, fan)
        if distribution == "uniform":
            limit = math.sqrt(3.0 * var)
            return rng.uniform(-limit, limit, size=shape)
        return _truncated_normal(rng, shape, math.sqrt(var) / _TRUNC_STD)
    return init


initializers = {
    "glorot_uniform": _variance_scaling(1.0, "fan_avg", "uniform"),
    "glorot_normal": _variance_scaling(1.0, "fan_avg", "normal"),
    "he_uniform": _variance_scaling(2.0, "fan_in", "uniform"),
    "he_normal": _variance_scaling(2.0, "fan_in", "normal"),
    "lecun_uniform": _variance_scaling(1.0, "fan_in", "uniform"),
    "lecun_normal": _variance_scaling(1.0, "fan_in", "normal"),
    "zeros": lambda shape, rng: np.zeros(shape),
    "ones": lambda shape, rng: np.ones(shape),
}


def _initializer(spec, what):
    if callable(spec):
        return spec
    if isinstance(spec, str) and spec in initializers:
        return initializers[spec]
    raise ValueError(f"Dense: unknown {what} {spec!r}; use one of {sorted(initializers)} or a "
                     "callable (shape, numpy Generator) -> array")


class Dense:
    """A fully connected layer: ``y = activation(x @ kernel + bias)``.

    ``activation``: None (or "linear"), "relu", or "softmax" (last layer only; with a
    cross-entropy loss it is fused into softmax-cross-entropy on the logits).
    ``kernel_initializer``: "glorot_uniform" (default, as Keras), "glorot_normal",
    "he_uniform", "he_normal", "lecun_uniform", "lecun_normal", "zeros", "ones", or a
    callable ``f(shape, rng) -> array`` drawing from the NumPy Generator it is given.
    """

    def __init__(self, units: int, activation=None, input_dim: int | None = None,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 use_bias: bool = True, name: str | None = None):
        if isinstance(units, bool) or not isinstance(units, (int, np.integer)) or units < 1:
            raise ValueError(f"Dense: 'units' must be a positive integer, got {units!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"Dense: unknown activation {activation!r}; use one of "
                             f"{[a for a in ACTIVATIONS if a]} or None")
        if input_dim is not None and (isinstance(input_dim, bool) or input_dim < 1):
            raise ValueError(f"Dense: 'input_dim' must be a positive integer, got {input_dim!r}")
        self.units = int(units)
        self.activation = None if activation == "linear" else activation
        self.input_dim = None if input_dim is None else int(input_dim)
        self.kernel_initializer = kernel_initializer
        self.bias_initializer = bias_initializer
        self._kernel_init = _initializer(kernel_initializer, "kernel_initializer")
        self._bias_init = _initializer(bias_initializer, "bias_initializer")
        self.use_bias = bool(use_bias)
        self.name = name
        self.kernel = None
        self.bias = None

    @property
    def built(self) -> bool:
        return self.kernel is not None

    def build(self, input_dim: int) -> None:
        """Draw the initial weights (float32, on the host) from fastmlp's generator."""
        if self.input_dim is not None and input_dim != self.input_dim:
            raise ValueError(f"Dense({self.units}): built with input_dim={self.input_dim} but "
                             f"receives {input_dim} features")
        self.input_dim = int(input_dim)
        rng = generator()
        shape = (self.input_dim, self.units)
        self.kernel = np.ascontiguousarray(self._kernel_init(shape, rng), dtype=np.float32)
        if self.kernel.shape != shape:
            raise ValueError(f"Dense: kernel_initializer returned shape {self.kernel.shape}, "
                             f"expected {shape}")
        if self.use_bias:
            self.bias = np.ascontiguousarray(
                np.broadcast_to(self._bias_init((self.units,), rng), (self.units,)),
                dtype=np.float32)

    def params(self) -> list:
        """[kernel, bias] (or [kernel] without bias): the arrays the optimizer updates."""
        return [self.kernel] + ([self.bias] if self.use_bias else [])

    def set_params(self, arrays) -> None:
        self.kernel = arrays[0]
        if self.use_bias:
            self.bias = arrays[1]

    def count_params(self) -> int:
        if self.input_dim is None:
            return 0
        return self.input_dim * self.units + (self.units if self.use_bias else 0)

    def get_config(self) -> dict:
        # A callable initialiser cannot be saved; the weights are, so the config names
        # the default in its place (it only matters for a model rebuilt from scratch).
        kinit = self.kernel_initializer if isinstance(self.kernel_initializer, str) \
            else "glorot_uniform"
        binit = self.bias_initializer if isinstance(self.bias_initializer, str) else "zeros"
        return {"class": "Dense", "units": self.units, "activation": self.activation,
                "input_dim": self.input_dim, "use_bias": self.use_bias, "name": self.name,
                "kernel_initializer": kinit, "bias_initializer": binit}

    @classmethod
    def from_config(cls, config: dict) -> "Dense":
        config = dict(config)
        if config.pop("class", "Dense") != "Dense":
            raise ValueError(f"unknown layer class in config: {config}")
        return cls(**config)

    def __repr__(self):
        act = f", activation={self.activation!r}" if self.activation else ""
        dim = f", input_dim={self.input_dim}" if self.input_dim else ""
        return f"Dense({self.units}{act}{dim})"
