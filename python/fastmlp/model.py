"""The Keras-like model: ``Sequential`` with compile / fit / evaluate / predict / save.

Every forward and backward product runs through the kernels in :mod:`fastmlp.ops`:

    forward, per Dense layer     a = relu(x @ W + b)        (dense_forward: one GEMM with
                                                                the bias and ReLU fused in)
    loss                         softmax-cross-entropy on the logits (fused; one kernel)
    backward, last to first      dz = (probs - onehot) / n
                                 dW = a_prev^T @ dz, db = colsum(dz)   (dense_backward_weight)
                                 dz_prev = (dz @ W^T) * (a_prev > 0)   (dense_backward_input)
    update                       one fused SGD / Adam kernel per parameter

On the CPU, with the built-in optimizers, ``fit`` runs these same kernels from C++
(``fastmlp._C.cpu.train_steps``): one Python call per chunk of steps instead of ~10
per step, and the shuffled batch is gathered there too. The weights come out
bit-identical to the step-by-step path (``FASTMLP_LEAN_FIT=0`` selects that one).

The parameters, the optimizer state, the per-batch workspaces and (when it fits) the
whole dataset live on the model's device; batches are gathered there. On the GPU the
only device-to-host reads per epoch are the running loss and accuracy that the
progress bar shows (a few per second) and the epoch totals.
"""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from . import _nvtx, losses as _losses, ops
from . import optim as _optim
from ._interop import address as _address
from ._interop import cuda_status, cupy_module, is_cupy, require_cuda
from ._random import generator
from .callbacks import Callback, History
from .layers import Dense

__all__ = ["Sequential", "load_model"]

FORMAT = "fastmlp.sequential"
FORMAT_VERSION = 1
_METRICS = ("accuracy", "acc")
# evaluate / predict / validation batch when none is given: large enough to keep the
# GEMMs efficient, small enough that the workspaces stay a few MB for usual widths.
_EVAL_BATCH = 1024


# ------------------------------------------------------------------------- devices


def _xp_of(device: str):
    return cupy_module() if device == "cuda" else np


def _to_device(a, device: str):
    """``a`` (NumPy / CuPy) on ``device`` as a C-contiguous array (copied only if needed)."""
    if device == "cuda":
        return cupy_module().ascontiguousarray(cupy_module().asarray(a))
    if is_cupy(a):
        return cupy_module().asnumpy(a)
    return np.ascontiguousarray(a)


def _host(a):
    return cupy_module().asnumpy(a) if is_cupy(a) else np.asarray(a)


def _resolve_device(device: str, x) -> str:
    if device == "auto":
        if is_cupy(x):
            return "cuda"
        return "cuda" if cuda_status()[0] else "cpu"
    if device == "cuda":
        require_cuda("fit")
        return "cuda"
    if device == "cpu":
        return "cpu"
    raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")


def _as_input(x, where: str):
    """x as a NumPy or CuPy array (DLPack / CUDA-array-interface inputs shared, not copied)."""
    if isinstance(x, np.ndarray) or is_cupy(x):
        return x
    if hasattr(x, "__cuda_array_interface__") or hasattr(x, "__dlpack__"):
        from ._interop import as_array

        return as_array(x, where, "fit")
    return np.asarray(x)


# ------------------------------------------------------------------------- workspace


class _Workspace:
    """Per-batch buffers for ``capacity`` rows, reused every step (sliced to the batch)."""

    def __init__(self, layers, capacity: int, device: str):
        xp = _xp_of(device)
        self.capacity = capacity
        self.out = [xp.empty((capacity, l.units), np.float32) for l in layers]
        # gradient w.r.t. each hidden layer's output (the last layer's is the probs buffer)
        self.dout = [xp.empty((capacity, l.units), np.float32) for l in layers[:-1]]
        self.grads = [[xp.empty(p.shape, np.float32) for p in l.params()] for l in layers]
        self.zeros = xp.zeros((capacity,), np.int32)  # dummy labels for predict's softmax


def _fits_on_device(nbytes: int) -> bool:
    """Whether a dataset of ``nbytes`` may live on the GPU: at most half its free memory
    (counting what CuPy's pool holds), leaving room for workspaces and other work."""
    cp = cupy_module()
    free, _ = cp.cuda.runtime.memGetInfo()
    pool = cp.get_default_memory_pool()
    return nbytes <= 0.5 * (free + pool.free_bytes())


def _gather(xp, src, idx, out):
    if xp is np:  # mode="clip" lets NumPy write straight into out (idx is a permutation)
        return np.take(src, idx, axis=0, out=out, mode="clip")
    return xp.take(src, idx, axis=0, out=out)


class _Batcher:
    """Batches of (x, y) for the model's device.

    Data on the model's device: batches are row slices (no copy) or, shuffled, gathered
    there into reused buffers. Data too large for the GPU stays on the host: each batch
    is gathered on the host and copied into a reused device buffer.
    """

    def __init__(self, x, y, batch_size: int, device: str):
        self.x, self.y = x, y
        self.staged = device == "cuda" and not is_cupy(x)
        self.xp = np if self.staged or device == "cpu" else cupy_module()
        self.cap = max(1, min(batch_size, len(x)))
        self._bufs = None

    def _buffers(self):
        """(gather buffers, device buffers when staged), allocated on first use."""
        if self._bufs is None:
            x, y, xp, cap = self.x, self.y, self.xp, self.cap
            gather = (xp.empty((cap,) + x.shape[1:], x.dtype),
                      xp.empty((cap,) + y.shape[1:], y.dtype))
            dev = None
            if self.staged:
                cp = cupy_module()
                dev = (cp.empty(gather[0].shape, x.dtype), cp.empty(gather[1].shape, y.dtype))
            self._bufs = gather, dev
        return self._bufs

    def order(self, rng):
        """A fresh random order of the rows, on the side where the gathering happens."""
        perm = rng.permutation(len(self.x))
        return perm if self.xp is np else self.xp.asarray(perm)

    def batch(self, lo: int, hi: int, order=None):
        n = hi - lo
        if order is None:
            xb, yb = self.x[lo:hi], self.y[lo:hi]
            if not self.staged:
                return xb, yb  # row slices of C-contiguous arrays: contiguous, no copy
        else:
            (xbuf, ybuf), _ = self._buffers()
            xb = _gather(self.xp, self.x, order[lo:hi], xbuf[:n])
            yb = _gather(self.xp, self.y, order[lo:hi], ybuf[:n])
            if not self.staged:
                return xb, yb
        _, (xdev, ydev) = self._buffers()
        xdev[:n].set(np.ascontiguousarray(xb))
        ydev[:n].set(np.ascontiguousarray(yb))
        return xdev[:n], ydev[:n]


# ------------------------------------------------------------------------- model


class Sequential:
    """A stack of Dense layers trained with the hand-written kernels.

    >>> model = fm.Sequential([fm.Dense(128, activation="relu", input_dim=784),
    ...                        fm.Dense(10)])
    >>> model.compile(optimizer=fm.optim.Adam(lr=1e-3),
    ...               loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    >>> history = model.fit(x, y, epochs=10, batch_size=32, validation_split=0.1)
    """

    def __init__(self, layers=None, name: str | None = None):
        self.layers: list[Dense] = []
        self.name = name
        self.optimizer = None
        self.loss = None
        self.metrics: list[str] = []
        self.stop_training = False
        self.device = "cpu"
        self._ws = None
        # The model's own generator (shuffling) is drawn from fastmlp's, so set_seed makes
        # runs repeat; its state is saved with the model so a resumed run shuffles on.
        self._rng = np.random.default_rng(int(generator().integers(2**63)))
        for layer in layers or []:
            self.add(layer)

    # -- structure ----------------------------------------------------------------------
    def add(self, layer) -> None:
        if not isinstance(layer, Dense):
            raise TypeError(f"Sequential.add: expected an fm.Dense layer, got "
                            f"{type(layer).__name__}")
        if self.layers and self.layers[-1].activation == "softmax":
            raise ValueError("Sequential: activation='softmax' is only supported on the last "
                             "layer (it is fused with the cross-entropy loss)")
        if self.layers and layer.input_dim is not None \
                and layer.input_dim != self.layers[-1].units:
            raise ValueError(f"Sequential: {layer!r} has input_dim={layer.input_dim} but the "
                             f"previous layer has {self.layers[-1].units} units")
        self.layers.append(layer)
        self._ws = None
        if self.layers[0].input_dim is not None:
            self.build(self.layers[0].input_dim)

    @property
    def built(self) -> bool:
        return bool(self.layers) and all(l.built for l in self.layers)

    @property
    def input_dim(self):
        return self.layers[0].input_dim if self.layers else None

    def build(self, input_dim: int) -> None:
        """Create the weights for inputs of ``input_dim`` features (``fit`` does this when
        the first layer has no ``input_dim``). Layers already built keep their weights."""
        if not self.layers:
            raise ValueError("Sequential: the model has no layers")
        if self.layers[0].built and self.input_dim != input_dim:
            raise ValueError(f"Sequential: built for {self.input_dim} input features, "
                             f"got {input_dim}")
        dim = int(input_dim)
        for layer in self.layers:
            if not layer.built:
                layer.build(dim)  # drawn on the host from fastmlp's generator
                layer.set_params([_to_device(p, self.device) for p in layer.params()])
            dim = layer.units

    def _require_built(self, what: str):
        if not self.built:
            raise ValueError(f"{what}: the model is not built yet; give the first Dense an "
                             "input_dim, call model.build(input_dim), or fit it first")

    def params(self) -> list:
        return [p for layer in self.layers for p in layer.params()]

    def count_params(self) -> int:
        return sum(layer.count_params() for layer in self.layers)

    # -- compile ------------------------------------------------------------------------
    def compile(self, optimizer="adam", loss=None, metrics=None) -> None:
        """Set the optimizer (an fm.optim instance or "sgd" / "adam" / "adamw"), the loss
        ("sparse_categorical_crossentropy", "categorical_crossentropy" or an fm.losses
        instance) and the metrics (["accuracy"] or none)."""
        if not self.layers:
            raise ValueError("compile: the model has no layers")
        if loss is None:
            raise ValueError("compile: 'loss' is required: 'sparse_categorical_crossentropy' "
                             "(integer labels) or 'categorical_crossentropy' (one-hot rows)")
        self.optimizer = _optim.get(optimizer)
        self.loss = _losses.get(loss)
        metrics = list(metrics or [])
        for m in metrics:
            if m not in _METRICS:
                raise ValueError(f"compile: unknown metric {m!r}; supported: 'accuracy'")
        self.metrics = metrics

    def _require_compiled(self, what: str):
        if self.loss is None:
            raise ValueError(f"{what}: call model.compile(optimizer, loss, metrics) first")

    # -- device -------------------------------------------------------------------------
    def to(self, device: str) -> "Sequential":
        """Move the parameters and the optimizer state to "cpu" or "cuda"."""
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if device == "cuda":
            require_cuda("Sequential.to")
        if device != self.device:
            for layer in self.layers:
                if layer.built:
                    layer.set_params([_to_device(p, device) for p in layer.params()])
            if self.optimizer is not None:
                self.optimizer.to(lambda a: _to_device(a, device))
            self.device = device
            self._ws = None
        return self

    def _workspace(self, rows: int) -> _Workspace:
        if self._ws is None or self._ws.capacity < rows:
            self._ws = _Workspace(self.layers, rows, self.device)
        return self._ws

    # -- data ---------------------------------------------------------------------------
    def _prepare_x(self, x, where: str):
        x = _as_input(x, where)
        if x.ndim != 2:
            hint = (f"; flatten it first: {where}.reshape(len({where}), -1)"
                    if x.ndim > 2 else "")
            raise ValueError(f"'{where}' must be 2-D (samples, features), got shape "
                             f"{tuple(x.shape)}{hint}")
        if x.dtype.kind not in "fiub":
            raise TypeError(f"'{where}' must hold numbers, got {x.dtype}")
        if not self.built:
            self.build(x.shape[1])
        if x.shape[1] != self.input_dim:
            raise ValueError(f"'{where}' has {x.shape[1]} features per sample, the model "
                             f"takes {self.input_dim}")
        return x

    def _place(self, arr, dtype):
        """``arr`` as ``dtype`` on the model's device, C-contiguous."""
        if self.device == "cuda":
            cp = cupy_module()
            return cp.ascontiguousarray(cp.asarray(arr).astype(dtype, copy=False))
        if is_cupy(arr):
            arr = cupy_module().asnumpy(arr)
        return np.ascontiguousarray(arr, dtype=dtype)

    def _prepare_xy(self, x, y, wx: str, wy: str):
        x = self._prepare_x(x, wx)
        y = _as_input(y, wy)
        if len(y) != len(x):
            raise ValueError(f"'{wx}' has {len(x)} samples but '{wy}' has {len(y)}")
        # Checked once, on the whole set, before any step (no per-step label check).
        y = self.loss.labels(y, len(x), self.layers[-1].units, where=wy)
        if self.device == "cuda" and not is_cupy(x) \
                and not _fits_on_device(len(x) * (x.shape[1] * 4 + y.nbytes // max(1, len(y)))):
            # too large for the GPU: stays on the host, batches are copied over one by one
            return np.ascontiguousarray(x, dtype=np.float32), _host(y)
        return self._place(x, np.float32), self._place(y, y.dtype)

    # -- forward / backward -------------------------------------------------------------
    def _forward(self, x, n: int):
        """Run the layers on the n rows of ``x``; returns the last layer's output buffer
        (the logits when the last activation is softmax: it is applied by the loss)."""
        ws = self._workspace(n)
        a = x
        for i, layer in enumerate(self.layers):
            z = ws.out[i][:n]
            with _nvtx.annotate(f"layer{i}.forward"):
                ops.dense_forward(a, layer.kernel, layer.bias if layer.use_bias else None,
                                  activation="relu" if layer.activation == "relu" else None,
                                  out=z)
            a = z
        return a

    def _train_step(self, x, y, n: int):
        """One optimizer step on the n rows of (x, y). Returns (loss as a 0-d device array,
        the logits) -- nothing is read back to the host."""
        ws = self._workspace(n)
        with _nvtx.annotate("forward"):
            logits = self._forward(x, n)
        with _nvtx.annotate("loss"):
            loss, probs, _ = ops.softmax_cross_entropy_forward(logits, y, check_labels=False)
        with _nvtx.annotate("backward"):
            # d(loss)/d(logits), written over probs
            dz = ops.softmax_cross_entropy_backward(probs, y, out=probs, check_labels=False)
            if self.layers[-1].activation == "relu":
                ops.relu_backward(dz, ws.out[-1][:n], out=dz)
            for i in range(len(self.layers) - 1, -1, -1):
                layer = self.layers[i]
                with _nvtx.annotate(f"layer{i}.backward"):
                    a_prev = x if i == 0 else ws.out[i - 1][:n]
                    g = ws.grads[i]
                    # dW = a_prev^T dz and db = colsum(dz) in one pass
                    ops.dense_backward_weight(a_prev, dz, out=g[0], bias=layer.use_bias,
                                              bias_out=g[1] if layer.use_bias else None)
                    if i > 0:
                        # d(pre-activation of layer i-1) = (dz W^T) * (relu output > 0)
                        da = ws.dout[i - 1][:n]
                        relu_out = a_prev if self.layers[i - 1].activation == "relu" else None
                        ops.dense_backward_input(dz, layer.kernel, relu_output=relu_out, out=da)
                        dz = da
        with _nvtx.annotate("optimizer"):
            self.optimizer.step(self.params(), [g for gs in ws.grads for g in gs])
        return loss, logits

    def _correct(self, logits, y):
        """Number of rows whose arg-max matches the label (a device scalar)."""
        truth = y if y.ndim == 1 else y.argmax(axis=1)
        return (logits.argmax(axis=1) == truth).sum()

    # -- fit ----------------------------------------------------------------------------
    def fit(self, x, y, epochs: int = 1, batch_size: int = 32, validation_data=None,
            validation_split: float = 0.0, shuffle: bool = True, verbose: int = 1,
            callbacks=None, device: str = "auto", initial_epoch: int = 0) -> History:
        """Train for ``epochs`` epochs; returns a History (``history.history`` holds the
        per-epoch ``loss``, the metrics and their ``val_*`` twins).

        ``validation_split`` holds out the last fraction of (x, y), before shuffling, as
        Keras does. ``device``: "cpu", "cuda" or "auto" (the GPU when usable). ``verbose``:
        0 silent, 1 a progress bar per epoch, 2 one line per epoch.
        """
        self._require_compiled("fit")
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"fit: 'batch_size' must be a positive integer, got {batch_size!r}")
        if not 0.0 <= validation_split < 1.0:
            raise ValueError(f"fit: 'validation_split' must be in [0, 1), got {validation_split}")
        if validation_split and validation_data is not None:
            raise ValueError("fit: pass validation_data or validation_split, not both")
        if verbose not in (0, 1, 2):
            raise ValueError(f"fit: 'verbose' must be 0, 1 or 2, got {verbose!r}")
        batch_size = int(batch_size)
        self.to(_resolve_device(device, x))
        x = self._prepare_x(x, "x")
        if validation_split:
            n_val = int(len(x) * validation_split)
            if n_val == 0 or n_val == len(x):
                raise ValueError(f"fit: validation_split={validation_split} of {len(x)} samples "
                                 f"leaves {n_val} for validation")
            y = _as_input(y, "y")
            if len(y) != len(x):
                raise ValueError(f"'x' has {len(x)} samples but 'y' has {len(y)}")
            validation_data = (x[len(x) - n_val:], y[len(x) - n_val:])
            x, y = x[:len(x) - n_val], y[:len(x) - n_val]
        x, y = self._prepare_xy(x, y, "x", "y")
        if len(x) == 0:
            raise ValueError("fit: 'x' has no samples")
        val = None
        if validation_data is not None:
            if len(validation_data) != 2:
                raise ValueError("fit: validation_data must be a tuple (x_val, y_val)")
            val = self._prepare_xy(*validation_data, "x_val", "y_val")

        history = History()
        history.params = {"epochs": epochs, "steps": math.ceil(len(x) / batch_size),
                          "batch_size": batch_size, "samples": len(x), "device": self.device}
        cbs: list[Callback] = [history] + list(callbacks or [])
        for cb in cbs:
            if not isinstance(cb, Callback):
                raise TypeError(f"fit: callbacks must be fm.callbacks.Callback instances, got "
                                f"{type(cb).__name__}")
            cb.set_model(self)
        self.stop_training = False
        self._workspace(max(batch_size, min(_EVAL_BATCH, len(val[0]))) if val else batch_size)
        for cb in cbs:
            cb.on_train_begin()
        for epoch in range(initial_epoch, epochs):
            for cb in cbs:
                cb.on_epoch_begin(epoch)
            t0 = time.perf_counter()
            with _nvtx.annotate(f"epoch{epoch + 1}"):
                logs = self._train_epoch(x, y, batch_size, shuffle, verbose,
                                         f"Epoch {epoch + 1}/{epochs}", val)
            logs["time"] = time.perf_counter() - t0
            if verbose == 2:
                print(f"Epoch {epoch + 1}/{epochs} - " + _format_logs(logs), flush=True)
            for cb in cbs:
                cb.on_epoch_end(epoch, logs)
            if self.stop_training:
                break
        for cb in cbs:
            cb.on_train_end()
        return history

    # -- the lean CPU loop ----------------------------------------------------------------
    _LEAN_CHUNK = 64  # steps per C++ call: the progress bar moves a few times per second

    def _lean_ok(self, x, y) -> bool:
        """Whether fit can run its steps in C++ (``_C.cpu.train_steps``): on the CPU, with
        SGD / Adam / AdamW exactly (a subclass may override the update), and the data as
        prepared by fit (C-contiguous float32 x, int32 / float32 labels)."""
        if os.environ.get("FASTMLP_LEAN_FIT", "1") == "0" or self.device != "cpu":
            return False
        if type(self.optimizer) not in (_optim.SGD, _optim.Adam, _optim.AdamW):
            return False
        return (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)
                and x.dtype == np.float32 and x.flags.c_contiguous and y.flags.c_contiguous
                and y.dtype in (np.int32, np.int64, np.float32))

    def _train_epoch_lean(self, x, y, batch_size, shuffle, verbose, desc, val) -> dict:
        from . import _C

        n_total = len(x)
        steps = math.ceil(n_total / batch_size)
        order = self._rng.permutation(n_total) if shuffle else None  # as _Batcher.order
        if order is not None:
            order = np.ascontiguousarray(order, dtype=np.int64)
        cap = min(batch_size, n_total)
        ws = self._workspace(cap)
        opt, params = self.optimizer, self.params()
        if len(opt.state) != len(params):
            opt.build(params)
        ptr = _address
        layer_ptrs, dims, k = [], [], 0
        for i, layer in enumerate(self.layers):
            g = ws.grads[i]
            st = [opt.state[k]] + ([opt.state[k + 1]] if layer.use_bias else [{}])
            k += 2 if layer.use_bias else 1
            if isinstance(opt, _optim.Adam):
                bufs = [st[0]["exp_avg"], st[0]["exp_avg_sq"],
                        st[1].get("exp_avg"), st[1].get("exp_avg_sq")]
            else:
                bufs = [st[0].get("momentum_buffer"), st[1].get("momentum_buffer"), None, None]
            layer_ptrs.append([ptr(layer.kernel), ptr(layer.bias) if layer.use_bias else 0,
                               ptr(g[0]), ptr(g[1]) if layer.use_bias else 0,
                               *[0 if b is None else ptr(b) for b in bufs],
                               ptr(ws.out[i]), ptr(ws.dout[i]) if i < len(ws.dout) else 0])
            dims.append([layer.input_dim, layer.units, int(layer.activation == "relu")])
        classes = self.layers[-1].units
        probs = np.empty((cap, classes), np.float32)
        row_loss = np.empty((cap,), np.float32)
        scalars = np.empty((1,), np.float32)
        bad_row = np.empty((1,), np.int64)
        xbuf = np.empty((cap, x.shape[1]), np.float32)
        ybuf = np.empty((cap,) + y.shape[1:], y.dtype)
        kind = {np.dtype(np.int32): 0, np.dtype(np.int64): 1, np.dtype(np.float32): 2}[y.dtype]
        losses = np.empty((self._LEAN_CHUNK,), np.float32)
        hits = np.empty((self._LEAN_CHUNK,), np.int64)
        want_acc = bool(self.metrics)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = _progress(steps, desc) if verbose == 1 else None
        last_shown = time.perf_counter()
        try:
            for first in range(0, steps, self._LEAN_CHUNK):
                chunk = min(self._LEAN_CHUNK, steps - first)
                if isinstance(opt, _optim.Adam):
                    hyper = (1, opt.lr, 0.0, opt.weight_decay, opt.betas[0], opt.betas[1],
                             opt.eps, False, opt._decoupled)
                else:
                    hyper = (0, opt.lr, opt.momentum, opt.weight_decay, 0.0, 0.0, 0.0,
                             opt.nesterov, False)
                with _nvtx.annotate("train_steps"):
                    done = _C.cpu.train_steps(
                        layer_ptrs, dims, *hyper, opt.iterations + 1, ptr(x), n_total,
                        x.shape[1], ptr(y), kind, 0 if order is None else ptr(order),
                        first * batch_size, batch_size, chunk, ptr(xbuf), ptr(ybuf),
                        ptr(probs), ptr(row_loss), ptr(scalars), ptr(bad_row), ptr(losses),
                        ptr(hits))
                opt.iterations += done
                for s in range(done):
                    step = first + s
                    n = min(n_total, (step + 1) * batch_size) - step * batch_size
                    value = float(losses[s])
                    if not math.isfinite(value):
                        self._raise_nonfinite(value, desc, step)
                    loss_sum += value * n
                    seen += n
                    if want_acc:
                        correct += int(hits[s])
                if bar is not None:
                    bar.update(done)
                    now = time.perf_counter()
                    if now - last_shown > 0.25 or first + done == steps:
                        last_shown = now
                        bar.set_postfix(self._running(loss_sum, correct, seen, desc, first),
                                        refresh=False)
            return self._epoch_logs(loss_sum, correct, seen, desc, steps, val, bar)
        finally:
            if bar is not None:
                bar.close()

    def _train_epoch(self, x, y, batch_size, shuffle, verbose, desc, val) -> dict:
        if self._lean_ok(x, y):
            return self._train_epoch_lean(x, y, batch_size, shuffle, verbose, desc, val)
        n_total = len(x)
        steps = math.ceil(n_total / batch_size)
        xp = _xp_of(self.device)
        batches = _Batcher(x, y, batch_size, self.device)
        order = batches.order(self._rng) if shuffle else None
        want_acc = bool(self.metrics)
        on_gpu = self.device == "cuda"
        loss_sum = xp.zeros((), np.float64) if on_gpu else 0.0
        correct = xp.zeros((), np.int64) if on_gpu else 0
        bar = _progress(steps, desc) if verbose == 1 else None
        last_shown = time.perf_counter()
        seen = 0
        try:
            for step in range(steps):
                lo, hi = step * batch_size, min(n_total, (step + 1) * batch_size)
                n = hi - lo
                with _nvtx.annotate("gather"):
                    xb, yb = batches.batch(lo, hi, order)
                loss, logits = self._train_step(xb, yb, n)
                seen += n
                if on_gpu:
                    loss_sum += loss * n
                    if want_acc:
                        correct += self._correct(logits, yb)
                else:
                    value = float(loss)
                    if not math.isfinite(value):
                        self._raise_nonfinite(value, desc, step)
                    loss_sum += value * n
                    if want_acc:
                        correct += int(self._correct(logits, yb))
                if bar is not None:
                    bar.update(1)
                    now = time.perf_counter()
                    if now - last_shown > 0.25 or step == steps - 1:
                        last_shown = now
                        bar.set_postfix(self._running(loss_sum, correct, seen, desc, step),
                                        refresh=False)
            return self._epoch_logs(loss_sum, correct, seen, desc, steps, val, bar)
        finally:
            if bar is not None:
                bar.close()

    def _epoch_logs(self, loss_sum, correct, seen, desc, steps, val, bar) -> dict:
        """The epoch's logs: running figures, plus validation when there is data for it."""
        logs = self._running(loss_sum, correct, seen, desc, steps - 1)
        if val is not None:
            with _nvtx.annotate("validation"):
                v = self._evaluate_prepared(*val, min(_EVAL_BATCH, max(1, len(val[0]))))
            logs.update({"val_" + k: value for k, value in v.items()})
        if bar is not None:
            bar.set_postfix(logs, refresh=True)
        return logs

    def _running(self, loss_sum, correct, seen, desc, step) -> dict:
        loss = float(loss_sum) / seen
        if not math.isfinite(loss):
            self._raise_nonfinite(loss, desc, step)
        logs = {"loss": loss}
        for m in self.metrics:
            logs[m] = int(correct) / seen
        return logs

    def _raise_nonfinite(self, value, desc, step):
        self.stop_training = True
        raise FloatingPointError(
            f"fit: the loss became {value} in {desc.lower()} at step {step + 1} (or before "
            "it, on the GPU); training stopped. Lower the learning rate, or check the "
            "inputs for NaN/Inf and their scale (e.g. images divided by 255).")

    # -- evaluate / predict -------------------------------------------------------------
    def evaluate(self, x, y, batch_size: int | None = None, verbose: int = 0) -> dict:
        """``{"loss": mean loss, "accuracy": ...}`` over (x, y), on the model's device."""
        self._require_compiled("evaluate")
        x, y = self._prepare_xy(x, y, "x", "y")
        logs = self._evaluate_prepared(x, y, batch_size or _EVAL_BATCH)
        if verbose:
            print(_format_logs(logs))
        return logs

    def _evaluate_prepared(self, x, y, batch_size: int) -> dict:
        n_total = len(x)
        if n_total == 0:
            raise ValueError("evaluate: no samples")
        on_gpu = self.device == "cuda"
        xp = _xp_of(self.device)
        loss_sum = xp.zeros((), np.float64) if on_gpu else 0.0
        correct = xp.zeros((), np.int64) if on_gpu else 0
        batches = _Batcher(x, y, batch_size, self.device)
        for lo in range(0, n_total, batch_size):
            hi = min(n_total, lo + batch_size)
            xb, yb = batches.batch(lo, hi)
            logits = self._forward(xb, hi - lo)
            loss, _, _ = ops.softmax_cross_entropy_forward(logits, yb, check_labels=False)
            if on_gpu:
                loss_sum += loss * (hi - lo)
                correct += self._correct(logits, yb)
            else:
                loss_sum += float(loss) * (hi - lo)
                correct += int(self._correct(logits, yb))
        logs = {"loss": float(loss_sum) / n_total}
        for m in self.metrics or ["accuracy"]:
            logs[m] = int(correct) / n_total
        return logs

    def predict(self, x, batch_size: int | None = None):
        """The last layer's output for each row of ``x`` (softmax probabilities when the
        last activation is softmax). NumPy in -> NumPy out; CuPy in -> CuPy out."""
        self._require_built("predict")
        want_cupy = is_cupy(_as_input(x, "x"))
        x = self._place(self._prepare_x(x, "x"), np.float32)
        batch_size = batch_size or _EVAL_BATCH
        xp = _xp_of(self.device)
        out = xp.empty((len(x), self.layers[-1].units), np.float32)
        for lo in range(0, len(x), batch_size):
            hi = min(len(x), lo + batch_size)
            y = self._forward(x[lo:hi], hi - lo)
            if self.layers[-1].activation == "softmax":
                _, y, _ = ops.softmax_cross_entropy_forward(
                    y, self._workspace(hi - lo).zeros[:hi - lo], check_labels=False)
            out[lo:hi] = y
        if want_cupy:
            return out if is_cupy(out) else cupy_module().asarray(out)
        return _host(out)

    # -- weights ------------------------------------------------------------------------
    def get_weights(self) -> list:
        """[W0 (in, out), b0, W1, b1, ...] as NumPy copies (Keras order and shapes)."""
        self._require_built("get_weights")
        return [_host(p).copy() for p in self.params()]

    def set_weights(self, weights) -> None:
        """Copy ``weights`` (Keras order and shapes) into the model's parameters."""
        weights = list(weights)
        if not self.built and weights:
            self.build(np.shape(weights[0])[0])
        params = self.params()
        if len(weights) != len(params):
            raise ValueError(f"set_weights: the model has {len(params)} weight arrays "
                             f"({self._weight_shapes()}), got {len(weights)}")
        for i, (p, w) in enumerate(zip(params, weights)):
            if tuple(np.shape(w)) != tuple(p.shape):
                raise ValueError(f"set_weights: weight {i} must have shape {tuple(p.shape)}, "
                                 f"got {tuple(np.shape(w))}")
        for p, w in zip(params, weights):
            p[...] = _to_device(np.asarray(_host(w), dtype=np.float32), self.device)

    def _weight_shapes(self) -> str:
        return ", ".join(str(tuple(p.shape)) for p in self.params())

    def summary(self, print_fn=print) -> None:
        """Print the layers, their output shapes and parameter counts."""
        rows = [("Layer", "Output shape", "Activation", "Params")]
        for i, layer in enumerate(self.layers):
            rows.append((layer.name or f"dense_{i} (Dense)", f"(None, {layer.units})",
                         layer.activation or "linear", f"{layer.count_params():,}"))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        line = "  ".join("-" * w for w in widths)
        text = [f'Model: "{self.name or "sequential"}"', line]
        for j, r in enumerate(rows):
            text.append("  ".join(cell.ljust(w) if c < 3 else cell.rjust(w)
                                  for c, (cell, w) in enumerate(zip(r, widths))))
            if j == 0:
                text.append(line)
        text += [line, f"Total params: {self.count_params():,}"
                 + ("" if self.built else " (not built: no input_dim yet)")]
        if self.optimizer is not None:
            text.append(f"Optimizer: {self.optimizer!r}; loss: {self.loss.name}; "
                        f"device: {self.device}")
        print_fn("\n".join(text))

    # -- save / load --------------------------------------------------------------------
    def get_config(self) -> dict:
        return {"name": self.name, "layers": [l.get_config() for l in self.layers]}

    def save(self, path, include_optimizer: bool = True) -> None:
        """Write the model to ``path`` in safetensors format: the weights as tensors
        ``layers.<i>.kernel`` / ``layers.<i>.bias``, the configuration (layers, optimizer,
        loss, metrics) in the metadata, and, with ``include_optimizer``, the optimizer
        state and the shuffling generator's state so that ``fit`` continues exactly."""
        from safetensors.numpy import save_file

        self._require_built("save")
        tensors = {}
        for i, layer in enumerate(self.layers):
            tensors[f"layers.{i}.kernel"] = _host(layer.kernel)
            if layer.use_bias:
                tensors[f"layers.{i}.bias"] = _host(layer.bias)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "model": self.get_config()}
        if self.loss is not None:
            meta["compile"] = {"optimizer": type(self.optimizer).__name__,
                               "optimizer_config": self.optimizer.get_config(),
                               "loss": self.loss.name, "metrics": self.metrics}
        if include_optimizer and self.optimizer is not None:
            for key, arr in self.optimizer.state_arrays().items():
                tensors[f"optimizer.{key}"] = _host(arr)
            meta["optimizer_iterations"] = self.optimizer.iterations
            meta["rng_state"] = self._rng.bit_generator.state
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
                  metadata={"fastmlp": json.dumps(meta)})

    def __repr__(self):
        return f"Sequential({self.layers!r})"


def _format_logs(logs: dict) -> str:
    parts = []
    for k, v in logs.items():
        parts.append(f"{k}: {v:.2f}s" if k == "time" else f"{k}: {v:.4f}")
    return " - ".join(parts)


def _progress(steps: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc=desc, unit="step", dynamic_ncols=True, leave=True)


def load_model(path, compile: bool = True) -> Sequential:
    """Read a model written by :meth:`Sequential.save`.

    With ``compile`` (default) the optimizer, loss and metrics are restored, and the
    optimizer state when it was saved. A file that is not a fastmlp model, or whose
    tensors do not match its configuration, raises ValueError naming the file.
    """
    from safetensors import SafetensorError, safe_open

    path = str(path)
    try:
        with safe_open(path, framework="numpy") as f:
            raw = (f.metadata() or {}).get("fastmlp")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if raw is None:
        raise ValueError(f"{path}: a safetensors file without fastmlp metadata (not saved by "
                         "fastmlp's model.save)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt fastmlp metadata ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: format version {meta['format_version']} is newer than this "
                         f"fastmlp reads ({FORMAT_VERSION}); upgrade fastmlp")
    try:
        layers = [Dense.from_config(c) for c in meta["model"]["layers"]]
        model = Sequential(layers, name=meta["model"].get("name"))
        model.build(layers[0].input_dim)
        weights = []
        for i, layer in enumerate(layers):
            weights.append(tensors.pop(f"layers.{i}.kernel"))
            if layer.use_bias:
                weights.append(tensors.pop(f"layers.{i}.bias"))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: the model configuration does not match the tensors "
                         f"({type(e).__name__}: {e})") from None
    try:
        model.set_weights(weights)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if compile and "compile" in meta:
        c = meta["compile"]
        try:
            model.compile(_optim.from_config(c["optimizer"], c["optimizer_config"]),
                          c["loss"], c["metrics"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: bad compile settings ({e})") from None
        opt_state = {k[len("optimizer."):]: v for k, v in tensors.items()
                     if k.startswith("optimizer.")}
        if "optimizer_iterations" in meta:
            try:
                model.optimizer.load_state_arrays(opt_state, model.params(),
                                                  meta["optimizer_iterations"],
                                                  lambda a: _to_device(a, model.device))
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
        if "rng_state" in meta:
            model._rng.bit_generator.state = meta["rng_state"]
    return model
