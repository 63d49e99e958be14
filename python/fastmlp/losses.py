"""Losses. Both are softmax cross-entropy, the mean over the batch, computed by the
fused softmax-cross-entropy kernels on the logits.

The loss always works on logits: when the last Dense layer has
``activation="softmax"`` the model feeds the loss that layer's pre-activation
(the softmax and the log are fused; there is no double softmax), otherwise the
last layer's output is taken as logits -- as ``torch.nn.CrossEntropyLoss`` or
Keras' ``from_logits=True``.

* ``sparse_categorical_crossentropy``: integer class indices, shape (n,).
* ``categorical_crossentropy``: float rows, shape (n, classes) -- one-hot, or any
  probability distribution (label smoothing).
"""
from __future__ import annotations

import numpy as np

from . import ops

__all__ = ["Loss", "SparseCategoricalCrossentropy", "CategoricalCrossentropy", "get"]


class Loss:
    name = ""
    sparse = True

    def __call__(self, y_true, logits):
        """The mean loss of ``logits`` against ``y_true``, as a Python float."""
        loss, _ = ops.softmax_cross_entropy(logits, self.labels(y_true, len(logits),
                                                                logits.shape[1]))
        return float(loss)

    def labels(self, y, n: int, classes: int, where: str = "y"):
        """``y`` checked and converted to what the kernels take (int32 / float32)."""
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"


def _xp(a):
    from ._interop import cupy_module, is_cupy

    return cupy_module() if is_cupy(a) else np


class SparseCategoricalCrossentropy(Loss):
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


class CategoricalCrossentropy(Loss):
    name = "categorical_crossentropy"
    sparse = False

    def labels(self, y, n, classes, where="y"):
        xp = _xp(y)
        y = xp.asarray(y)
        if y.shape != (n, classes):
            hint = (" (integer class indices need loss='sparse_categorical_crossentropy')"
                    if y.ndim == 1 else "")
            raise ValueError(f"{self.name}: '{where}' must be one-hot rows of shape "
                             f"({n}, {classes}), got {tuple(y.shape)}{hint}")
        return xp.ascontiguousarray(y.astype(np.float32))


_BY_NAME = {cls.name: cls for cls in (SparseCategoricalCrossentropy, CategoricalCrossentropy)}


def get(identifier) -> Loss:
    """A loss from an instance or its name."""
    if isinstance(identifier, Loss):
        return identifier
    if isinstance(identifier, str) and identifier in _BY_NAME:
        return _BY_NAME[identifier]()
    raise ValueError(f"unknown loss {identifier!r}: pass an fm.losses.Loss or one of "
                     f"{sorted(_BY_NAME)}")
