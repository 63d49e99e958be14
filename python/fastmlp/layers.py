"""Layers: Dense, Activation, Dropout, BatchNormalization, LayerNormalization.

A layer holds its configuration and its weights (NumPy or CuPy arrays, float32, on
the model's device); it computes nothing during ``fit``: :mod:`fastmlp.plan` turns
each layer class into its kernel calls (one place per class, ``_emit_*`` there).
Every layer is also callable on its own, as in Keras: ``layer(x, training=False)``
runs it through :mod:`fastmlp.ops` (NumPy in, NumPy out; CuPy in, CuPy out).

Weights, in Keras order (``get_weights``, save files ``layers.<i>.<name>``):

* Dense: ``kernel`` (in, out), ``bias`` (out,) -- ``y = act(x @ kernel + bias)``;
* BatchNormalization: ``gamma``, ``beta``, ``moving_mean``, ``moving_variance``
  (the last two are not trained: the forward pass updates them);
* LayerNormalization: ``gamma``, ``beta``;
* Activation, Dropout: none.
"""
from __future__ import annotations

import math

import numpy as np

from . import _act_codes, regularizers
from ._random import generator

__all__ = ["Layer", "Dense", "Activation", "Dropout", "BatchNormalization",
           "LayerNormalization", "ACTIVATIONS", "initializers", "from_config"]

# The activations of Dense(activation=...) and Activation(...): the elementwise ones
# (codes of csrc/kernel_math.h ActCode, also fastmlp.ops.ACTIVATIONS) and softmax
# (the model's output only: fused with the cross-entropy loss).
ACTIVATIONS = tuple(_act_codes.ACTIVATIONS) + ("softmax",)


def _activation_arg(activation, where: str):
    """The canonical name (None for linear, "silu" for "swish") or ValueError listing
    the valid names."""
    if activation is None:
        return None
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"{where}: unknown activation {activation!r}; use one of "
                         f"{list(ACTIVATIONS)} or None")
    return {"linear": None, "swish": "silu"}.get(activation, activation)


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


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _positive_int(value, name: str, where: str, optional: bool = False):
    if value is None and optional:
        return None
    if not _is_int(value) or value < 1:
        raise ValueError(f"{where}: {name!r} must be a positive integer, got {_show(value)}")
    return int(value)


def _show(value) -> str:
    """repr for a message; a huge integer (a corrupt file's) by its size instead (its
    repr may exceed Python's digit limit and raise)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)


def _number(value, name: str, where: str, lo: float, hi: float, lo_open=False, hi_open=True):
    """A real number in [lo, hi) (the bounds' openness as given) or ValueError."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) \
        and not isinstance(value, (bool, np.bool_))
    if ok:
        try:
            ok = math.isfinite(value)
        except OverflowError:  # an int beyond float's range
            ok = False
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{where}: {name!r} must be a number in {interval}, got "
                         f"{_show(value)}")
    return float(value)


def _bool(value, name: str, where: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{where}: {name!r} must be True or False, got {_show(value)}")
    return bool(value)


# ------------------------------------------------------------------------- the base


class Layer:
    """What every layer has: a name, its input width once built, its weights by name
    (Keras order), which of them the optimizer trains, and ``layer(x, training)``."""

    def __init__(self, name: str | None = None, input_dim: int | None = None):
        if name is not None and not isinstance(name, str):
            raise ValueError(f"{type(self).__name__}: 'name' must be a string, got {name!r}")
        self.name = name
        self.input_dim = _positive_int(input_dim, "input_dim", type(self).__name__, True)
        self._built = False

    # -- structure --------------------------------------------------------------------------
    @property
    def built(self) -> bool:
        return self._built

    @property
    def output_dim(self):
        """Features per sample of the output (None until the input width is known)."""
        return self.input_dim

    def weight_names(self) -> tuple:
        """The weights, in Keras order."""
        return ()

    def trainable_names(self) -> tuple:
        """The weights the optimizer updates (a prefix-preserving subset, in order)."""
        return self.weight_names()

    def weight_shapes(self) -> dict:
        """{name: shape} of every weight, from the configuration and the input width."""
        return {}

    def build(self, input_dim: int) -> None:
        """Create the weights for inputs of ``input_dim`` features (float32, host)."""
        if self.input_dim is not None and input_dim != self.input_dim:
            raise ValueError(f"{self!r}: built with input_dim={self.input_dim} but receives "
                             f"{input_dim} features")
        self.input_dim = int(input_dim)
        self._create_weights()
        self._built = True

    def _create_weights(self) -> None:
        pass

    def weights(self) -> list:
        return [getattr(self, n) for n in self.weight_names()]

    def set_weight_arrays(self, arrays) -> None:
        for n, a in zip(self.weight_names(), arrays):
            setattr(self, n, a)

    def params(self) -> list:
        """The trainable arrays (what the optimizer updates), in order."""
        return [getattr(self, n) for n in self.trainable_names()]

    def set_params(self, arrays) -> None:
        for n, a in zip(self.trainable_names(), arrays):
            setattr(self, n, a)

    def count_params(self) -> int:
        if self.input_dim is None:
            return 0
        return sum(math.prod(s) for s in self.weight_shapes().values())

    # -- configuration ----------------------------------------------------------------------
    def get_config(self) -> dict:
        return {"class": type(self).__name__, "name": self.name, "input_dim": self.input_dim}

    def signature(self) -> tuple:
        """What the weights' meaning and the step plan depend on (not names or
        initialisers): BackupAndRestore and the plan cache compare these."""
        config = self.get_config()
        for key in ("name", "kernel_initializer", "bias_initializer"):
            config.pop(key, None)
        return tuple(sorted(config.items()))

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        name = config.pop("class", cls.__name__)
        if name != cls.__name__:
            raise ValueError(f"{cls.__name__}.from_config: a config of class {name!r}")
        return cls(**config)

    # -- calling ----------------------------------------------------------------------------
    def __call__(self, x, training: bool = False):
        """The layer's output for ``x`` (samples, features): NumPy in, NumPy out; CuPy in,
        CuPy out. Builds the layer on its first call, as Keras does. ``training``:
        Dropout drops and BatchNormalization uses (and updates) the batch statistics."""
        from ._interop import cupy_module, is_cupy

        training = _bool(training, "training", f"{type(self).__name__}.__call__")
        xp = cupy_module() if is_cupy(x) else np
        x = xp.ascontiguousarray(xp.asarray(x), dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"{self!r}: the input must be 2-D (samples, features), got shape "
                             f"{tuple(x.shape)}")
        if not self.weight_names():
            pass  # Activation, Dropout: any width, as in Keras
        elif not self.built:
            self.build(x.shape[1])
        if self.weight_names() and x.shape[1] != self.input_dim:
            raise ValueError(f"{self!r}: the input has {x.shape[1]} features, the layer takes "
                             f"{self.input_dim}")
        weights = {n: xp.ascontiguousarray(xp.asarray(getattr(self, n)))
                   for n in self.weight_names()}
        out = self._call(xp, x, weights, training)
        for n in self.weight_names():  # moving statistics updated on another device's copy
            mine = getattr(self, n)
            if n not in self.trainable_names() and weights[n] is not mine:
                mine[...] = weights[n] if is_cupy(mine) == is_cupy(weights[n]) else (
                    cupy_module().asnumpy(weights[n]) if is_cupy(weights[n])
                    else cupy_module().asarray(weights[n]))
        return out

    def _call(self, xp, x, weights, training):
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"


def _softmax(x):
    """Row softmax on the softmax-cross-entropy kernel (the labels, zeros, are unused)."""
    from . import ops
    from ._interop import cupy_module, is_cupy

    xp = cupy_module() if is_cupy(x) else np
    zeros = xp.zeros((x.shape[0],), np.int32)
    return ops.softmax_cross_entropy_fused(x, zeros, backward=False, check_labels=False)[1]


# ------------------------------------------------------------------------- Dense


def _regularizer(identifier, what):
    """``regularizers.get(identifier)``, its ValueError naming the Dense argument."""
    try:
        return regularizers.get(identifier)
    except ValueError as e:
        raise ValueError(f"Dense: {what!r}: {e}") from None


class Dense(Layer):
    """A fully connected layer: ``y = activation(x @ kernel + bias)``.

    ``activation``: None / "linear", "relu", "sigmoid", "tanh", "gelu" (exact erf form),
    "silu" (= "swish"), "elu", "softplus", "leaky_relu" (slope 0.2), or "softmax" (last
    layer only; with a cross-entropy loss it is fused into softmax-cross-entropy on the
    logits). The activation runs in the GEMM's epilogue, its derivative in the
    next layer's backward GEMM. ``kernel_initializer``: "glorot_uniform" (default, as
    Keras), "glorot_normal", "he_uniform", "he_normal", "lecun_uniform", "lecun_normal",
    "zeros", "ones", or a callable ``f(shape, rng) -> array`` drawing from the NumPy
    Generator it is given. ``kernel_regularizer`` / ``bias_regularizer``: None, an
    :mod:`fastmlp.regularizers` object, "l1", "l2", "l1_l2" or a serialized one -- adds
    ``l1 * sum(|w|) + l2 * sum(w ** 2)`` of that weight to the training loss.
    """

    def __init__(self, units: int, activation=None, input_dim: int | None = None,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 use_bias: bool = True, name: str | None = None,
                 kernel_regularizer=None, bias_regularizer=None):
        if isinstance(units, bool) or not isinstance(units, (int, np.integer)) or units < 1:
            raise ValueError(f"Dense: 'units' must be a positive integer, got {units!r}")
        if input_dim is not None and (isinstance(input_dim, bool) or input_dim < 1):
            raise ValueError(f"Dense: 'input_dim' must be a positive integer, got {input_dim!r}")
        super().__init__(name, input_dim)
        self.units = int(units)
        self.activation = _activation_arg(activation, "Dense")
        self.kernel_initializer = kernel_initializer
        self.bias_initializer = bias_initializer
        self._kernel_init = _initializer(kernel_initializer, "kernel_initializer")
        self._bias_init = _initializer(bias_initializer, "bias_initializer")
        self.use_bias = bool(use_bias)
        self.kernel_regularizer = _regularizer(kernel_regularizer, "kernel_regularizer")
        self.bias_regularizer = _regularizer(bias_regularizer, "bias_regularizer")
        self.kernel = None
        self.bias = None

    @property
    def output_dim(self):
        return self.units

    def weight_names(self):
        return ("kernel", "bias") if self.use_bias else ("kernel",)

    def weight_shapes(self):
        shapes = {"kernel": (self.input_dim, self.units)}
        if self.use_bias:
            shapes["bias"] = (self.units,)
        return shapes

    @property
    def built(self) -> bool:
        return self.kernel is not None

    def _create_weights(self) -> None:
        """Draw the initial weights (float32, on the host) from fastmlp's generator."""
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

    def get_config(self) -> dict:
        # A callable initialiser cannot be saved; the weights are, so the config names
        # the default in its place (it only matters for a model rebuilt from scratch).
        kinit = self.kernel_initializer if isinstance(self.kernel_initializer, str) \
            else "glorot_uniform"
        binit = self.bias_initializer if isinstance(self.bias_initializer, str) else "zeros"
        return {"class": "Dense", "units": self.units, "activation": self.activation,
                "input_dim": self.input_dim, "use_bias": self.use_bias, "name": self.name,
                "kernel_initializer": kinit, "bias_initializer": binit,
                "kernel_regularizer": regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": regularizers.serialize(self.bias_regularizer)}

    def signature(self) -> tuple:
        # The regularizers by their (l1, l2) coefficients (the plan's penalty terms).
        sig = dict(super().signature())
        for key in ("kernel_regularizer", "bias_regularizer"):
            reg = getattr(self, key)
            sig[key] = None if reg is None else (reg.l1, reg.l2)
        return tuple(sorted(sig.items()))

    def _call(self, xp, x, w, training):
        from . import ops

        act = self.activation
        y = ops.dense_forward(x, w["kernel"], w.get("bias"),
                              activation=None if act == "softmax" else act)
        return _softmax(y) if act == "softmax" else y

    def __repr__(self):
        act = f", activation={self.activation!r}" if self.activation else ""
        dim = f", input_dim={self.input_dim}" if self.input_dim else ""
        return f"Dense({self.units}{act}{dim})"


# ------------------------------------------------------------------------- Activation


class Activation(Layer):
    """``y = activation(x)`` elementwise (or softmax per row, as the model's output).
    The names of :class:`Dense`'s ``activation``."""

    def __init__(self, activation, name: str | None = None, input_dim: int | None = None):
        if activation is None:
            raise ValueError(f"Activation: unknown activation None; use one of "
                             f"{list(ACTIVATIONS)}")
        super().__init__(name, input_dim)
        self.activation = _activation_arg(activation, "Activation")

    @property
    def built(self) -> bool:
        return self.input_dim is not None

    def get_config(self) -> dict:
        return {**super().get_config(), "activation": self.activation or "linear"}

    def _call(self, xp, x, w, training):
        if self.activation == "softmax":
            return _softmax(x)
        from . import ops

        return ops.activation(x, self.activation or "linear")

    def __repr__(self):
        return f"Activation({self.activation or 'linear'!r})"


# ------------------------------------------------------------------------- Dropout


class Dropout(Layer):
    """Inverted dropout: in training each value is zeroed with probability ``rate`` and
    the kept ones are scaled by 1 / (1 - rate); ``predict`` and ``evaluate`` pass the
    input through. The mask is a counter-based draw (Philox) of the model's seed (or
    ``seed``), the layer's position and the optimizer step, the same on the CPU and the
    GPU: a seeded run repeats exactly. After a Dense layer it runs in that layer's GEMM
    epilogue, and the backward pass regenerates the mask instead of storing it."""

    def __init__(self, rate: float, seed: int | None = None, name: str | None = None,
                 input_dim: int | None = None):
        super().__init__(name, input_dim)
        self.rate = _number(rate, "rate", "Dropout", 0.0, 1.0)
        if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**64):
            raise ValueError(f"Dropout: 'seed' must be None or an integer in [0, 2**64), got "
                             f"{_show(seed)}")
        self.seed = None if seed is None else int(seed)
        # Standalone calls (layer(x, training=True)) draw from their own counter, under
        # a seed drawn at the first such call (so merely making a Dropout does not move
        # fastmlp's generator, hence the other layers' initial weights).
        self._call_seed = self.seed
        self._calls = 0

    @property
    def built(self) -> bool:
        return self.input_dim is not None

    def get_config(self) -> dict:
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}

    def _call(self, xp, x, w, training):
        if not training or self.rate == 0.0:
            return x
        from . import ops

        if self._call_seed is None:
            self._call_seed = int(generator().integers(2**63))
        self._calls += 1
        return ops.dropout(x, self.rate, seed=self._call_seed, step=self._calls)

    def __repr__(self):
        return f"Dropout({self.rate})"


# ------------------------------------------------------------------------- normalization


class _Normalization(Layer):
    def __init__(self, epsilon, center, scale, name, input_dim):
        super().__init__(name, input_dim)
        where = type(self).__name__
        self.epsilon = _number(epsilon, "epsilon", where, 0.0, math.inf, lo_open=True)
        self.center = _bool(center, "center", where)
        self.scale = _bool(scale, "scale", where)
        self.gamma = self.beta = None

    def _affine_names(self):
        return (("gamma",) if self.scale else ()) + (("beta",) if self.center else ())

    def weight_names(self):
        return self._affine_names()

    def weight_shapes(self):
        return {n: (self.input_dim,) for n in self.weight_names()}

    def _create_weights(self):
        d = self.input_dim
        if self.scale:
            self.gamma = np.ones((d,), np.float32)
        if self.center:
            self.beta = np.zeros((d,), np.float32)

    def get_config(self) -> dict:
        return {**super().get_config(), "epsilon": self.epsilon, "center": self.center,
                "scale": self.scale}


class BatchNormalization(_Normalization):
    """Keras' BatchNormalization over the features: in training, each feature is
    normalised with the batch's mean and (biased) variance, and the moving statistics
    follow ``moving = moving * momentum + batch * (1 - momentum)``; in inference the
    moving statistics are used. ``y = gamma * (x - mean) / sqrt(var + epsilon) + beta``
    (``center=False``: no beta; ``scale=False``: no gamma). Weights: gamma, beta,
    moving_mean, moving_variance."""

    def __init__(self, momentum: float = 0.99, epsilon: float = 1e-3, center: bool = True,
                 scale: bool = True, name: str | None = None, input_dim: int | None = None):
        super().__init__(epsilon, center, scale, name, input_dim)
        self.momentum = _number(momentum, "momentum", "BatchNormalization", 0.0, 1.0,
                                hi_open=False)
        self.moving_mean = self.moving_variance = None

    def weight_names(self):
        return self._affine_names() + ("moving_mean", "moving_variance")

    def trainable_names(self):
        return self._affine_names()

    def _create_weights(self):
        super()._create_weights()
        self.moving_mean = np.zeros((self.input_dim,), np.float32)
        self.moving_variance = np.ones((self.input_dim,), np.float32)

    def get_config(self) -> dict:
        return {**super().get_config(), "momentum": self.momentum}

    def _call(self, xp, x, w, training):
        from . import ops

        return ops.batch_norm_forward(x, w.get("gamma"), w.get("beta"), w["moving_mean"],
                                      w["moving_variance"], training=training,
                                      momentum=self.momentum, epsilon=self.epsilon)[0]

    def __repr__(self):
        return f"BatchNormalization(momentum={self.momentum}, epsilon={self.epsilon})"


class LayerNormalization(_Normalization):
    """Keras' LayerNormalization over the features of each sample:
    ``y = gamma * (x - mean) / sqrt(var + epsilon) + beta`` with the sample's mean and
    (biased) variance, the same in training and inference. Weights: gamma, beta."""

    def __init__(self, epsilon: float = 1e-3, center: bool = True, scale: bool = True,
                 name: str | None = None, input_dim: int | None = None):
        super().__init__(epsilon, center, scale, name, input_dim)

    def _call(self, xp, x, w, training):
        from . import ops

        return ops.layer_norm_forward(x, w.get("gamma"), w.get("beta"),
                                      epsilon=self.epsilon)[0]

    def __repr__(self):
        return f"LayerNormalization(epsilon={self.epsilon})"


# ------------------------------------------------------------------------- configs

CLASSES = {c.__name__: c for c in (Dense, Activation, Dropout, BatchNormalization,
                                   LayerNormalization)}


def from_config(config: dict) -> Layer:
    """The layer a ``get_config()`` dict describes (ValueError for an unknown class)."""
    if not isinstance(config, dict):
        raise ValueError(f"a layer configuration must be an object, got {type(config).__name__}")
    name = config.get("class", "Dense")
    if name not in CLASSES:
        raise ValueError(f"unknown layer class {name!r}; fastmlp has {sorted(CLASSES)}")
    return CLASSES[name].from_config(config)
