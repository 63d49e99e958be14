"""Losses: Keras' names and semantics, computed by fused loss kernels (forward and
backward in one pass over the model's output).

* ``"sparse_categorical_crossentropy"``: integer class indices, shape (n,);
* ``"categorical_crossentropy"``: float rows (n, classes): one-hot or any distribution;
* ``"binary_crossentropy"``: float targets in [0, 1], shape (n, outputs) (or (n,) for
  one output);
* ``"mse"`` / ``"mean_squared_error"``, ``"mae"`` / ``"mean_absolute_error"``,
  ``"huber"`` (delta 1.0): float targets shaped like the output.

The reduction is Keras' and PyTorch's mean: the per-sample loss (the mean over its
outputs for the elementwise losses) times its sample weight, summed and divided by
the number of samples.

Output convention. A softmax (cross-entropy) or sigmoid (binary cross-entropy)
output layer is fused with its loss: the loss kernel reads the layer's
pre-activation, so the log of the probabilities is never formed (stable, no double
softmax). Any other output is taken as logits, as ``torch.nn.CrossEntropyLoss`` /
``BCEWithLogitsLoss`` or Keras' ``from_logits=True``. The cross-entropy classes take
``from_logits``: ``None`` (auto, the rule above), ``True`` (the output is logits: an
error on a softmax / sigmoid output, whose values are probabilities) or ``False``
(the output is probabilities: a softmax / sigmoid output is still fused; any other
output is clipped to [1e-7, 1 - 1e-7] as Keras does).
"""
from __future__ import annotations

import numpy as np

from . import ops

__all__ = ["Loss", "MeanSquaredError", "MeanAbsoluteError", "Huber", "BinaryCrossentropy",
           "CategoricalCrossentropy", "SparseCategoricalCrossentropy", "get", "from_config"]


def _xp(a):
    from ._interop import cupy_module, is_cupy

    return cupy_module() if is_cupy(a) else np


class Loss:
    """Base class. ``family``: "regression" (mse / mae / huber), "binary" or
    "categorical"; ``sparse``: integer class labels."""
    name = ""
    family = "regression"
    sparse = False
    kernel_kind = ""          # ops.LOSS_KINDS key of the elementwise losses

    def __init__(self):
        self.from_logits = None
        self.label_smoothing = 0.0
        self.delta = 1.0

    # -- configuration ------------------------------------------------------------------
    def get_config(self) -> dict:
        return {}

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def signature(self) -> tuple:
        """What the training plan depends on."""
        return (type(self).__name__,) + tuple(sorted(self.get_config().items()))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    # -- kernels ------------------------------------------------------------------------
    def kernel(self, output_activation) -> tuple[str, str | None]:
        """(ops.LOSS_KINDS key, fused output activation or None) for a model whose last
        layer applies ``output_activation`` (a name or None)."""
        return self.kernel_kind, None

    def __call__(self, y_true, y_pred, sample_weight=None):
        """The mean loss of ``y_pred`` (the model's output, or logits per
        ``from_logits``) against ``y_true``, as a Python float."""
        y_pred = _xp(y_pred).ascontiguousarray(_xp(y_pred).asarray(y_pred, dtype=np.float32))
        if y_pred.ndim == 1:
            y_pred = y_pred.reshape(-1, 1)
        kind, _ = self.kernel(None)
        y = self.labels(y_true, len(y_pred), y_pred.shape[1])
        loss, _ = ops.loss_forward_backward(kind, y_pred, y, sample_weight=sample_weight,
                                            delta=self.delta,
                                            label_smoothing=self.label_smoothing,
                                            backward=False)
        return float(loss)

    # -- labels -------------------------------------------------------------------------
    def labels(self, y, n: int, outputs: int, where: str = "y"):
        """``y`` checked and converted to what the kernels take: float32 (n, outputs)
        targets (a (n,) vector for one output is accepted, as in Keras)."""
        xp = _xp(y)
        y = xp.asarray(y)
        if y.ndim == 1 and outputs == 1:
            y = y.reshape(-1, 1)
        if y.shape != (n, outputs):
            raise ValueError(f"{self.name}: '{where}' must have shape ({n}, {outputs}) like the "
                             f"model's output, got {tuple(y.shape)}")
        if y.dtype.kind not in "fiub":
            raise TypeError(f"{self.name}: '{where}' must hold numbers, got {y.dtype}")
        return xp.ascontiguousarray(y.astype(np.float32))


class MeanSquaredError(Loss):
    name = "mean_squared_error"
    kernel_kind = "mse"


class MeanAbsoluteError(Loss):
    name = "mean_absolute_error"
    kernel_kind = "mae"


class Huber(Loss):
    """0.5 d^2 where |d| <= delta, else delta (|d| - 0.5 delta) (torch.nn.HuberLoss)."""
    name = "huber"
    kernel_kind = "huber"

    def __init__(self, delta: float = 1.0):
        super().__init__()
        if isinstance(delta, bool) or not np.isfinite(delta) or not delta > 0:
            raise ValueError(f"Huber: 'delta' must be a finite number > 0, got {delta!r}")
        self.delta = float(delta)

    def get_config(self):
        return {"delta": self.delta}


def _from_logits(name, value):
    if value is not None and not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: 'from_logits' must be None, True or False, got {value!r}")
    return None if value is None else bool(value)


def _smoothing(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: 'label_smoothing' must be a number in [0, 1), got {value!r}")
    return float(value)


class _Crossentropy(Loss):
    probs_kind = ""
    logits_kind = ""
    fused_activation = ""

    def __init__(self, from_logits=None, label_smoothing: float = 0.0):
        super().__init__()
        self.from_logits = _from_logits(type(self).__name__, from_logits)
        self.label_smoothing = _smoothing(type(self).__name__, label_smoothing)

    def get_config(self):
        return {"from_logits": self.from_logits, "label_smoothing": self.label_smoothing}

    def kernel(self, output_activation):
        if output_activation == self.fused_activation:
            if self.from_logits is True:
                raise ValueError(
                    f"{self.name}: from_logits=True, but the last layer applies "
                    f"{self.fused_activation}: its output is probabilities, not logits. Leave "
                    f"from_logits=None (the {self.fused_activation} is then fused with the "
                    "loss) or remove the activation")
            return self.logits_kind, self.fused_activation
        if self.from_logits is False:
            return self.probs_kind, None
        return self.logits_kind, None


class BinaryCrossentropy(_Crossentropy):
    name = "binary_crossentropy"
    family = "binary"
    probs_kind, logits_kind, fused_activation = "bce_probs", "bce_logits", "sigmoid"


class CategoricalCrossentropy(_Crossentropy):
    name = "categorical_crossentropy"
    family = "categorical"
    probs_kind, logits_kind, fused_activation = "cce_probs", "cce_logits", "softmax"

    def labels(self, y, n, classes, where="y"):
        xp = _xp(y)
        y = xp.asarray(y)
        if y.shape != (n, classes):
            hint = (" (integer class indices need loss='sparse_categorical_crossentropy')"
                    if y.ndim == 1 else "")
            raise ValueError(f"{self.name}: '{where}' must be one-hot rows of shape "
                             f"({n}, {classes}), got {tuple(y.shape)}{hint}")
        return xp.ascontiguousarray(y.astype(np.float32))


class SparseCategoricalCrossentropy(CategoricalCrossentropy):
    name = "sparse_categorical_crossentropy"
    sparse = True

    def labels(self, y, n, classes, where="y"):
        xp = _xp(y)
        y = xp.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:  # Keras accepts a column of labels
            y = y.reshape(-1)
        if y.ndim != 1 or len(y) != n:
            hint = (" (one-hot rows need loss='categorical_crossentropy')"
                    if y.ndim == 2 and y.shape[1] == classes else "")
            raise ValueError(f"{self.name}: '{where}' must hold {n} integer class indices, "
                             f"got shape {tuple(y.shape)}{hint}")
        if y.dtype.kind not in "iu":
            if y.dtype.kind == "f" and bool(xp.all(y == xp.floor(y))):
                pass  # integral floats, e.g. labels read with np.loadtxt
            else:
                raise TypeError(f"{self.name}: '{where}' must be integer class indices, got "
                                f"{y.dtype}")
        if n:
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= classes:
                bad = lo if lo < 0 else hi
                row = int(xp.argmax(y == bad))
                raise ValueError(f"{self.name}: label {bad} in row {row} of '{where}' is "
                                 f"outside [0, {classes}) (the model has {classes} outputs)")
        return xp.ascontiguousarray(y.astype(np.int32))


_CLASSES = (MeanSquaredError, MeanAbsoluteError, Huber, BinaryCrossentropy,
            CategoricalCrossentropy, SparseCategoricalCrossentropy)
_BY_NAME = {cls.name: cls for cls in _CLASSES}
_BY_NAME.update({"mse": MeanSquaredError, "mae": MeanAbsoluteError})


def get(identifier) -> Loss:
    """A loss from an instance or its name."""
    if isinstance(identifier, Loss):
        return identifier
    if isinstance(identifier, str) and identifier in _BY_NAME:
        return _BY_NAME[identifier]()
    raise ValueError(f"unknown loss {identifier!r}: pass an fm.losses.Loss or one of "
                     f"{sorted(_BY_NAME)}")


def from_config(name: str, config: dict | None) -> Loss:
    """The loss saved as (``name``, ``get_config()``)."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown loss {name!r}")
    return _BY_NAME[name](**(config or {}))
