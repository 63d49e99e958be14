"""Metrics: the names ``compile(metrics=[...])`` takes, resolved against the loss and
the model's output into what the step plan computes on the device.

Each metric but ``auc`` is a per-step sum in engine memory (the metrics kernel, or the
cross-entropy kernel's arg-max hits), read once per pass and divided by the samples
seen; ``auc`` stores the pass's predictions and targets on the device and is the exact
ROC AUC over them (:func:`fastmlp.ops.roc_auc`), computed once at the end of the pass.
Metrics are unweighted (``sample_weight`` weights the loss only, as Keras' ``metrics``).

* ``"accuracy"`` / ``"acc"``: resolved from the loss and the output as Keras does:
  binary accuracy (threshold 0.5) for binary cross-entropy or one output unit with
  another float-target loss, else the arg-max accuracy (sparse or categorical);
* ``"binary_accuracy"``: mean over the outputs of ``(p > 0.5) == (y > 0.5)``;
* ``"sparse_top_k_categorical_accuracy"``: the label among the 5 largest outputs
  (ties at the boundary count as in, as ``tf.math.in_top_k``);
* ``"mae"`` / ``"mean_absolute_error"``, ``"mse"`` / ``"mean_squared_error"``;
* ``"auc"``: ROC AUC of the outputs against 0/1 targets (all outputs together when
  there are several: micro-average).

The predictions p are the model's outputs: the probabilities of a softmax or sigmoid
output layer, whose activation the loss fuses.
"""
from __future__ import annotations

from dataclasses import dataclass

from .ops import METRIC_FLAGS

__all__ = ["Metric", "NAMES", "resolve", "check_names"]

# The metrics kernel's flags (ops.METRIC_FLAGS, fastmlp.h MetricFlag) and each kind's
# slot among its sums (the flags' bit order).
FLAGS = METRIC_FLAGS
SLOTS = {kind: i for i, kind in enumerate(sorted(FLAGS, key=FLAGS.get))}
TOP_K = 5

NAMES = ("accuracy", "acc", "binary_accuracy", "sparse_top_k_categorical_accuracy", "mae",
         "mean_absolute_error", "mse", "mean_squared_error", "auc")


@dataclass(frozen=True)
class Metric:
    """``name``: the key in the logs (as the user wrote it); ``kind``: "argmax",
    "binary", "top_k", "abs", "sq" or "auc"."""
    name: str
    kind: str


def check_names(metrics) -> list:
    metrics = list(metrics or [])
    for m in metrics:
        if not isinstance(m, str) or m not in NAMES:
            raise ValueError(f"compile: unknown metric {m!r}; supported: {list(NAMES)}")
    if len(set(metrics)) != len(metrics):
        raise ValueError(f"compile: a metric is listed twice in {metrics}")
    return metrics


def resolve(metrics, loss, outputs: int) -> tuple:
    """The metrics as :class:`Metric` kinds for ``loss`` and a model of ``outputs``
    output units; ValueError for a metric the targets cannot give."""
    out = []
    for name in check_names(metrics):
        if name in ("accuracy", "acc"):
            if loss.family == "binary" or (loss.family == "regression" and outputs == 1):
                kind = "binary"
            else:
                kind = "argmax"
        elif name == "binary_accuracy":
            kind = "binary"
        elif name == "sparse_top_k_categorical_accuracy":
            kind = "top_k"
            if not loss.sparse:
                raise ValueError(f"compile: metric {name!r} needs integer class labels "
                                 "(loss='sparse_categorical_crossentropy')")
        elif name in ("mae", "mean_absolute_error"):
            kind = "abs"
        elif name in ("mse", "mean_squared_error"):
            kind = "sq"
        else:
            kind = "auc"
        if kind in ("binary", "abs", "sq", "auc") and loss.sparse:
            raise ValueError(f"compile: metric {name!r} needs float targets shaped like the "
                             f"output; loss {loss.name!r} takes integer class labels")
        out.append(Metric(name, kind))
    return tuple(out)
