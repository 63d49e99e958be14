"""Attributions: which input features a model's output depends on.

For a dense network every method here is built on the gradient of one output column
with respect to the input, which the backward kernels compute when the first layer's
input gradient is switched on (the training step skips it). An attribution call is one
engine pass (:data:`fastmlp.plan.ATTRIBUTE`): the path points of a batch of rows, the
forward pass in inference mode (dropout off, BatchNormalization's moving statistics),
the gradient of each row's target output (``target_seed``), backward down to the
input, and the weighted sum of the gradients per row (``ig_sum``) -- with no Python
per row or per integration step.

* :func:`saliency` -- ``|d f_t / d x|`` (Simonyan et al. 2014; Captum's ``Saliency``).
* :func:`gradient_x_input` -- ``x * d f_t / d x`` (Captum's ``InputXGradient``).
* :func:`integrated_gradients` -- ``(x - x') * int_0^1 d f_t(x' + a (x - x')) / d x da``
  (Sundararajan et al. 2017) with Captum's quadrature rules.
* :func:`plot` -- attribution heat maps beside the inputs.

``f_t`` is column ``target`` of :meth:`Sequential.predict`'s output: the probabilities
after a softmax (or sigmoid) output layer, the raw outputs otherwise.
"""
from __future__ import annotations

import numbers

import numpy as np

from ._interop import cupy_module, is_cupy

__all__ = ["saliency", "gradient_x_input", "integrated_gradients", "plot", "quadrature",
           "METHODS"]

METHODS = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right",
           "riemann_middle")


def quadrature(method: str, steps: int):
    """``(alphas, weights)`` (float64, ``steps`` each) of an integration rule over [0, 1],
    as Captum defines them: ``"gausslegendre"`` (Gauss-Legendre nodes and weights mapped
    to [0, 1]), ``"riemann_left"`` / ``"riemann_right"`` / ``"riemann_middle"`` (points
    ``k / n``, ``(k + 1) / n``, ``(k + 1/2) / n``, weights ``1 / n``) and
    ``"riemann_trapezoid"`` (points ``k / (n - 1)``, weights ``1 / n`` halved at both
    ends). The Riemann rules need ``steps >= 2``."""
    if method not in METHODS:
        raise ValueError(f"integrated_gradients: unknown method {method!r}; expected one of "
                         + ", ".join(repr(m) for m in METHODS))
    if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, numbers.Integral) \
            or steps < (1 if method == "gausslegendre" else 2):
        raise ValueError(f"integrated_gradients: 'steps' must be an integer >= "
                         f"{1 if method == 'gausslegendre' else 2} for {method!r}, got "
                         f"{steps!r}")
    n = int(steps)
    if method == "gausslegendre":
        nodes, w = np.polynomial.legendre.leggauss(n)
        return 0.5 * (1.0 + nodes), 0.5 * w
    weights = np.full(n, 1.0 / n)
    if method == "riemann_trapezoid":
        weights[0] /= 2
        weights[-1] /= 2
        return np.linspace(0.0, 1.0, n), weights
    k = np.arange(n, dtype=np.float64)
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[method]
    return (k + offset) / n, weights


def _check_model(model, where):
    from .model import Sequential

    if not isinstance(model, Sequential):
        raise TypeError(f"{where}: 'model' must be a fm.Sequential, got {type(model).__name__}")
    model._require_built(where)


def _rows(model, x, where):
    """(x as float32 on the model's device, whether the caller gave CuPy)."""
    from .model import _as_input, _check_finite

    want_cupy = is_cupy(_as_input(x, "x"))
    x = model._place(model._prepare_x(x, "x"), np.float32)
    _check_finite(x, "x", where)
    return x, want_cupy


def _targets(model, x, target, where):
    """The (n,) int32 target column of each row on the model's device: an int for all
    rows, one per row, or None (the predicted class: the arg-max of predict's output,
    column 0 for a single output)."""
    n, classes = len(x), model.output_dim
    xp = cupy_module() if model.device == "cuda" else np
    if target is None:
        if classes == 1:
            return xp.zeros((n,), np.int32)
        return xp.argmax(model.predict(x), axis=1).astype(np.int32)
    if isinstance(target, (numbers.Integral, np.integer)) and not isinstance(target, bool):
        t = np.full((n,), int(target), np.int64)
    else:
        t = cupy_module().asnumpy(target) if is_cupy(target) else np.asarray(target)
        if t.dtype.kind not in "iu" or t.ndim != 1 or len(t) != n:
            raise ValueError(f"{where}: 'target' must be an integer or {n} integers (one per "
                             f"row), got {target!r:.80}")
    bad = np.flatnonzero((t < 0) | (t >= classes))
    if bad.size:
        raise ValueError(f"{where}: target {int(t[bad[0]])} (row {int(bad[0])}) is not an "
                         f"output column of the model, which has {classes}")
    return xp.asarray(t.astype(np.int32))


def _result(out, want_cupy):
    if want_cupy:
        return out if is_cupy(out) else cupy_module().asarray(out)
    return cupy_module().asnumpy(out) if is_cupy(out) else out


def _attribute(model, x, target, where, *, baseline=None, alphas=(1.0,), weights=(1.0,),
               multiply, absolute, batch_size=None):
    from . import trainer

    _check_model(model, where)
    x, want_cupy = _rows(model, x, where)
    targets = _targets(model, x, target, where)
    base = None
    if baseline is not None:
        base = _baseline(model, x, baseline, where)
    xp = cupy_module() if model.device == "cuda" else np
    alphas = xp.asarray(np.asarray(alphas, np.float32))
    weights = xp.asarray(np.asarray(weights, np.float32))
    rows = trainer.EVAL_BATCH
    if batch_size is not None:
        from .model import _int_arg

        rows = _int_arg(batch_size, "batch_size", where, 1) * len(alphas)
    out = trainer.attribute(model, x, targets, base, alphas, weights, multiply=multiply,
                            absolute=absolute, batch_rows=rows)
    return _result(out, want_cupy)


def _baseline(model, x, baseline, where):
    """The baseline as a (n, features) float32 array on the model's device: a number,
    one row for all, or one row per row of x."""
    xp = cupy_module() if model.device == "cuda" else np
    if isinstance(baseline, numbers.Real) and not isinstance(baseline, bool):
        return xp.full(x.shape, float(baseline), np.float32)
    b = baseline
    if not (isinstance(b, np.ndarray) or is_cupy(b)):
        b = np.asarray(b)
    if b.ndim == 1:
        b = b.reshape(1, -1)
    if b.ndim != 2 or b.shape[1] != x.shape[1] or b.shape[0] not in (1, len(x)):
        raise ValueError(f"{where}: 'baseline' must be a number, ({x.shape[1]},) or "
                         f"({len(x)}, {x.shape[1]}), got shape {tuple(b.shape)}")
    b = model._place(b, np.float32)
    if b.shape[0] != len(x):
        b = xp.ascontiguousarray(xp.broadcast_to(b, x.shape))
    from .model import _check_finite

    _check_finite(b, "baseline", where)
    return b


def saliency(model, x, target=None, abs=True, batch_size=None):
    """The gradient of output column ``target`` with respect to each row of ``x``
    (``(n, features)``, like ``x``), its absolute value with ``abs=True`` (Captum's
    ``Saliency``). ``target``: an int (every row), one int per row, or None (each
    row's predicted class). NumPy in, NumPy out; CuPy in, CuPy out."""
    return _attribute(model, x, target, "saliency", multiply=False, absolute=bool(abs),
                      batch_size=batch_size)


def gradient_x_input(model, x, target=None, batch_size=None):
    """``x * d f_target / d x`` per row (Captum's ``InputXGradient``)."""
    return _attribute(model, x, target, "gradient_x_input", multiply=True, absolute=False,
                      batch_size=batch_size)


def integrated_gradients(model, x, target=None, baseline=None, steps=50,
                         method="gausslegendre", batch_size=None):
    """Integrated gradients (Sundararajan et al. 2017) of output column ``target``:
    ``(x - baseline) * sum_m w_m * grad f_target(baseline + a_m (x - baseline))`` with
    the ``steps`` points ``a_m`` and weights ``w_m`` of ``method`` (Captum's rules: see
    :func:`quadrature`). ``baseline``: None (zeros), a number, one row, or one row per
    row of ``x``. All points of all rows run in one engine pass (about 1024 points per
    step; ``batch_size``: the rows per step instead). The attributions of a row sum to
    about ``f(x) - f(baseline)`` (completeness), up to the quadrature's error."""
    alphas, weights = quadrature(method, steps)
    return _attribute(model, x, target, "integrated_gradients", baseline=baseline,
                      alphas=alphas, weights=weights, multiply=True, absolute=False,
                      batch_size=batch_size)


def plot(attributions, images=None, shape=(28, 28), path=None, titles=None, cmap="RdBu_r"):
    """A matplotlib figure of attribution heat maps (a diverging colour map centred at
    0, one symmetric scale per map), with the input images beside them when ``images``
    is given (one row of the figure per example). ``shape``: the image shape of a row;
    ``path``: also write the figure there (PNG, SVG, ... by the suffix); ``titles``:
    one per example. Returns the figure. Needs matplotlib (``pip install
    fastmlp[bench]``)."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib is in the bench extra
        raise ImportError("fm.explain.plot needs matplotlib: pip install matplotlib") from e
    a = cupy_module().asnumpy(attributions) if is_cupy(attributions) \
        else np.asarray(attributions)
    if a.ndim == 1:
        a = a.reshape(1, -1)
    shape = tuple(shape)
    if a.ndim != 2 or a.shape[1] != int(np.prod(shape)):
        raise ValueError(f"plot: 'attributions' must be (n, {int(np.prod(shape))}) for images "
                         f"of shape {shape}, got {a.shape}")
    imgs = None
    if images is not None:
        imgs = cupy_module().asnumpy(images) if is_cupy(images) else np.asarray(images)
        imgs = imgs.reshape(len(imgs), -1)
        if imgs.shape != a.shape:
            raise ValueError(f"plot: 'images' must match the attributions' shape {a.shape}, "
                             f"got {imgs.shape}")
    if titles is not None and len(titles) != len(a):
        raise ValueError(f"plot: {len(a)} examples but {len(titles)} titles")
    n, cols = len(a), 2 if imgs is not None else 1
    fig, axes = plt.subplots(n, cols, figsize=(2.4 * cols + 0.6, 2.4 * n), squeeze=False)
    for r in range(n):
        if imgs is not None:
            ax = axes[r, 0]
            ax.imshow(imgs[r].reshape(shape), cmap="gray")
            ax.set_title("input" if titles is None else str(titles[r]), fontsize=9)
            ax.axis("off")
        ax = axes[r, cols - 1]
        lim = float(np.max(np.abs(a[r]))) or 1.0
        im = ax.imshow(a[r].reshape(shape), cmap=cmap, vmin=-lim, vmax=lim)
        ax.set_title("attribution" if titles is None or imgs is not None else str(titles[r]),
                     fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
