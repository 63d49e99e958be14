"""The Keras-like model: ``Sequential`` with compile / fit / evaluate / predict / save.

``Sequential`` is the API only: it checks and places the user's arguments and owns
the layers, the loss and the optimizer. ``compile``'s settings become a step plan
(:mod:`fastmlp.plan`: the ordered kernel calls and buffers of a training step, an
evaluation step and a prediction step), bound to memory on the model's device and
run by an engine (:mod:`fastmlp.engine`: C++ on the CPU, CUDA Graph replay on the
GPU, or the Python executor that serves as their reference); :mod:`fastmlp.trainer`
drives the epochs; :mod:`fastmlp.saving` reads and writes the files.

The parameters, the optimizer state, the per-batch buffers and (when it fits) the
whole dataset live on the model's device; batches are gathered there. On the GPU the
only device-to-host reads of an epoch are the metric sums at progress updates (a few
per second with a progress bar) and at its end.
"""
from __future__ import annotations

import numpy as np

from . import losses as _losses
from . import ops as _ops
from . import optim as _optim
from . import stream as _stream
from . import trainer as _trainer
from ._interop import cuda_status, cupy_module, is_cupy, require_cuda
from ._random import generator
from .callbacks import Callback, History
from .layers import Activation, Dense, Layer

__all__ = ["Sequential", "load_model"]

_EVAL_BATCH = _trainer.EVAL_BATCH


class _Default:
    """A fit default that depends on the data (arrays or a dataset of batches), so that
    an explicit None stays an error for arrays."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self):
        return self.text


_BATCH_DEFAULT = _Default("32 (arrays) / the first batch's rows (a dataset)")
_SHUFFLE_DEFAULT = _Default("True (arrays)")


# ------------------------------------------------------------------------- devices


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


def _int_arg(value, name: str, where: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (Python or NumPy integers, or integral floats
    such as 32.0); anything else -> ValueError naming the argument."""
    ok = not isinstance(value, (bool, np.bool_))
    if ok:
        try:
            ok = int(value) == value and value >= minimum
        except (TypeError, ValueError, OverflowError):
            ok = False
    if not ok:
        raise ValueError(f"{where}: '{name}' must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _bool_arg(value, name: str, where: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{where}: '{name}' must be True or False, got {value!r}")
    return bool(value)


def _verbose_arg(verbose, where: str) -> int:
    """0, 1 or 2 ("auto" = 1, as Keras)."""
    if isinstance(verbose, str) and verbose == "auto":
        return 1
    if isinstance(verbose, (bool, np.bool_)) or verbose not in (0, 1, 2):
        raise ValueError(f"{where}: 'verbose' must be 0, 1, 2 or 'auto', got {verbose!r}")
    return int(verbose)


def _check_finite(arr, name: str, where: str, row0: int = 0) -> None:
    """ValueError naming the first NaN / +-Inf of a placed float32 array (one pass on
    its device: ``ops.first_nonfinite``); ``row0`` is the array's first row in the
    user's data (validation_split holds out the last rows)."""
    at = _ops.first_nonfinite(arr)
    if at is None:
        return
    value = float(arr[at])
    where_at = f"row {at[0] + row0}" + (f", column {at[1]}" if len(at) > 1 else "")
    raise ValueError(
        f"{where}: '{name}' holds {value} at {where_at} (the first non-finite value); NaN "
        "and Inf in the data would poison the weights. Clean it (drop or impute the "
        "rows, e.g. np.nan_to_num) or pass check_finite=False to skip this check.")


def _fits_on_device(nbytes: int) -> bool:
    """Whether a dataset of ``nbytes`` may live on the GPU: at most half its free memory
    (counting what CuPy's pool holds), leaving room for workspaces and other work."""
    cp = cupy_module()
    free, _ = cp.cuda.runtime.memGetInfo()
    pool = cp.get_default_memory_pool()
    return nbytes <= 0.5 * (free + pool.free_bytes())


def _snake(name: str) -> str:
    """BatchNormalization -> batch_normalization (Keras' default layer names)."""
    return "".join("_" + c.lower() if c.isupper() and i else c.lower()
                   for i, c in enumerate(name))


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
        self._bound = None  # the plan bound to memory (fastmlp.trainer.bind)
        self._initial_epoch = 0  # fit's first epoch; BackupAndRestore may move it (as Keras)
        # Shuffling: epoch e visits the rows in ops.random_permutation(rows, seed, e). The
        # seed is drawn from fastmlp's generator (set_seed makes runs repeat); seed and
        # count are saved with the model, so a resumed run shuffles on.
        self._shuffle_seed = int(generator().integers(2**63))
        self._shuffle_count = 0
        self._train_penalty = 0.0  # the last training pass's mean penalty (trainer._logs)
        for layer in layers or []:
            self.add(layer)

    # -- structure ----------------------------------------------------------------------
    def add(self, layer) -> None:
        if not isinstance(layer, Layer):
            raise TypeError(f"Sequential.add: expected an fm layer (Dense, Activation, Dropout, "
                            f"BatchNormalization, LayerNormalization), got "
                            f"{type(layer).__name__}")
        if any(l is layer for l in self.layers):
            raise ValueError(f"Sequential.add: {layer!r} is already in the model (a layer "
                             "holds its own weights: add a new instance)")
        if self.layers and isinstance(self.layers[-1], (Dense, Activation)) \
                and self.layers[-1].activation == "softmax":
            raise ValueError("Sequential: activation='softmax' is only supported on the last "
                             "layer (it is fused with the cross-entropy loss)")
        if self.layers and layer.input_dim is not None \
                and self.layers[-1].output_dim is not None \
                and layer.input_dim != self.layers[-1].output_dim:
            raise ValueError(f"Sequential: {layer!r} has input_dim={layer.input_dim} but the "
                             f"previous layer has {self.layers[-1].output_dim} outputs")
        self.layers.append(layer)
        self._bound = None
        if self.layers[0].input_dim is not None:
            self.build(self.layers[0].input_dim)

    @property
    def built(self) -> bool:
        return bool(self.layers) and all(l.built for l in self.layers)

    @property
    def input_dim(self):
        return self.layers[0].input_dim if self.layers else None

    @property
    def output_dim(self):
        """Features per sample of the model's output (None until built)."""
        return self.layers[-1].output_dim if self.layers else None

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
                layer.set_weight_arrays([_to_device(w, self.device) for w in layer.weights()])
            elif layer.input_dim != dim:
                raise ValueError(f"Sequential: {layer!r} is built for {layer.input_dim} inputs "
                                 f"but the previous layer gives {dim}")
            dim = layer.output_dim

    def _require_built(self, what: str):
        if not self.built:
            raise ValueError(f"{what}: the model is not built yet; give the first Dense an "
                             "input_dim, call model.build(input_dim), or fit it first")

    def params(self) -> list:
        """The trainable weights (what the optimizer updates), in Keras order."""
        return [p for layer in self.layers for p in layer.params()]

    def weights(self) -> list:
        """Every weight, trainable or not (BatchNormalization's moving statistics), in
        Keras order: what get_weights returns."""
        return [w for layer in self.layers for w in layer.weights()]

    def count_params(self) -> int:
        return sum(layer.count_params() for layer in self.layers)

    # -- compile ------------------------------------------------------------------------
    def compile(self, optimizer="adam", loss=None, metrics=None) -> None:
        """Set the optimizer (an fm.optim instance or "sgd" / "adam" / "adamw" /
        "rmsprop"), the loss (a name such as "sparse_categorical_crossentropy",
        "categorical_crossentropy", "binary_crossentropy", "mse", "mae", "huber", or an
        fm.losses instance) and the metrics (names: see :mod:`fastmlp.metrics`)."""
        from .metrics import check_names, resolve

        if not self.layers:
            raise ValueError("compile: the model has no layers")
        if loss is None:
            raise ValueError("compile: 'loss' is required: e.g. "
                             "'sparse_categorical_crossentropy' (integer labels), "
                             "'categorical_crossentropy' (one-hot rows), "
                             "'binary_crossentropy' or 'mse'")
        optimizer = _optim.get(optimizer)
        loss = _losses.get(loss)
        metrics = check_names(metrics)
        if self.output_dim is not None:
            resolve(metrics, loss, self.output_dim)  # a metric the targets cannot give
            from .plan import output_activation

            loss.kernel(output_activation(self.layers))  # from_logits against the output
            if output_activation(self.layers) == "softmax" and loss.family != "categorical":
                raise ValueError(f"compile: a softmax output layer needs a categorical "
                                 f"cross-entropy loss (it is computed fused with it), got "
                                 f"{loss.name!r}")
        from .privacy import is_private

        if is_private(optimizer):
            from .plan import _check_dp_layers

            _check_dp_layers(self.layers, None, None, None)
        self.optimizer, self.loss, self.metrics = optimizer, loss, metrics
        self._bound = None  # a new plan on the next fit

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
                    layer.set_weight_arrays([_to_device(w, device) for w in layer.weights()])
            if self.optimizer is not None:
                self.optimizer.to(lambda a: _to_device(a, device))
            self.device = device
            self._bound = None
        return self

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

    def _prepare_xy(self, x, y, wx: str, wy: str, where: str, check_finite: bool, row0: int = 0):
        x = self._prepare_x(x, wx)
        mapped = isinstance(x, np.memmap)  # never scanned whole: see fit's docstring
        y = _as_input(y, wy)
        if len(y) != len(x):
            raise ValueError(f"'{wx}' has {len(x)} samples but '{wy}' has {len(y)}")
        # Checked once, on the whole set, before any step (no per-step label check).
        y = self.loss.labels(y, len(x), self.output_dim, where=wy)
        x_float = x.dtype.kind == "f"
        if self.device == "cuda" and not is_cupy(x) \
                and not _fits_on_device(len(x) * (x.shape[1] * 4 + y.nbytes // max(1, len(y)))):
            # too large for the GPU: stays on the host, batches are copied over one by one
            x, y = np.ascontiguousarray(x, dtype=np.float32), _host(y)
        else:
            x, y = self._place(x, np.float32), self._place(y, y.dtype)
        if check_finite:  # after the cast: float64 beyond float32's range is Inf here
            if x_float and not mapped:
                _check_finite(x, wx, where, row0)
            if y.dtype.kind == "f":
                _check_finite(y, wy, where, row0)
        return x, y

    # -- fit ----------------------------------------------------------------------------
    def fit(self, x, y=None, epochs: int = 1, batch_size: int = _BATCH_DEFAULT,
            validation_data=None, validation_split: float = 0.0,
            shuffle: bool = _SHUFFLE_DEFAULT,
            verbose: int = 1, callbacks=None, device: str = "auto", initial_epoch: int = 0,
            check_finite: bool = True, sample_weight=None, class_weight=None,
            poisson_sampling: bool = False, adversarial=None,
            steps_per_epoch: int | None = None) -> History:
        """Train for ``epochs`` epochs; returns a History (``history.history`` holds the
        per-epoch ``loss``, the metrics and their ``val_*`` twins).

        ``validation_split`` holds out the last fraction of (x, y), before shuffling, as
        Keras does. ``device``: "cpu", "cuda" or "auto" (the GPU when usable). ``verbose``:
        0 silent, 1 a progress bar per epoch, 2 one line per epoch. ``initial_epoch``: the
        epoch to start from (to resume a run; ``epochs`` counts from 0, as Keras).
        ``check_finite``: the inputs are checked once for NaN / Inf (ValueError naming the
        first bad row and column); False skips that pass. ``sample_weight``: one weight
        per sample of (x, y) multiplying its loss; ``class_weight``: ``{class index:
        weight}`` (classes not named weigh 1), the weight of each sample's class (the
        arg-max of a one-hot row, the rounded target of one binary output); with both,
        their product. Keras semantics: the weighted losses are summed and divided by the
        batch's samples. The validation loss and the metrics are unweighted.
        With a DP optimizer (:mod:`fastmlp.privacy`) the History holds ``epsilon`` per
        epoch; ``poisson_sampling=True`` then draws each step's batch by Poisson sampling
        (every row joins with probability batch_size / rows: batches of varying size, as
        the accountant assumes; ``shuffle`` is ignored) instead of shuffled fixed batches.
        ``adversarial``: ``fm.adversarial.FGSM(...)`` or ``fm.adversarial.PGD(...)``
        trains on the adversarial rows of each batch instead of the batch (adversarial
        training, Madry et al. 2018), made in the training step with the current
        weights; the validation metrics stay on the clean rows (``evaluate(...,
        adversarial=)`` gives the robust ones). ``batch_size`` defaults to 32 and
        ``shuffle`` to True for arrays.

        Distributed (:func:`fastmlp.distributed.init` under ``mpiexec``): every process
        calls fit with the same data and arguments; ``batch_size`` is per process, each
        process trains on its share of every global batch, the gradients are averaged
        over the processes each step, and only rank 0 prints and writes files (see
        :mod:`fastmlp.distributed`).

        Data larger than memory (:mod:`fastmlp.stream`):

        * ``x`` an ``np.memmap`` (e.g. ``fm.datasets.read_idx(path, mmap=True)``
          reshaped to 2-D): only each batch's rows are read. A float32 C-contiguous
          memmap on the CPU is read in place by the engine; any other (uint8 images,
          float64, or a CUDA model) has its batches gathered on the host -- the same
          rows in the same order as for an in-memory array -- and converted one by one
          (sample_weight, class_weight, poisson_sampling and DP optimizers are not
          available then). ``check_finite`` does not scan a memmap up front (that
          would read the whole file): gathered batches are checked one by one, and a
          NaN read in place shows as a non-finite loss (FloatingPointError), as any
          diverging run.
        * ``x`` an iterable of ``(x, y)`` batches (a generator, a list, an object with
          ``__iter__``) and ``y`` None: a streamed fit. ``steps_per_epoch`` None:
          each epoch iterates ``x`` afresh until it ends (a generator is used up after
          one epoch: pass a re-iterable); an int: one iterator for the whole fit, that
          many batches per epoch. ``batch_size``: the largest batch to expect (default:
          the first batch's rows); smaller batches are fine. Each batch is checked
          (labels, and NaN / Inf unless ``check_finite=False``); a background thread
          reads and converts the next batch while the current step runs, and an
          exception raised while reading is raised here. ``validation_data`` is
          arrays; validation_split, shuffle, sample_weight, class_weight,
          poisson_sampling, DP optimizers and the ``auc`` metric are not available.
        """
        self._require_compiled("fit")
        if y is None and not _stream.is_dataset(x):
            raise ValueError("fit: 'y' is missing: pass fit(x, y) with arrays, or an iterable "
                             "of (x, y) batches as x (with y None)")
        epochs = _int_arg(epochs, "epochs", "fit", 0)
        initial_epoch = _int_arg(initial_epoch, "initial_epoch", "fit", 0)
        if initial_epoch > epochs:
            raise ValueError(f"fit: 'initial_epoch' ({initial_epoch}) is past 'epochs' ({epochs}): "
                             "epochs is the number of the last epoch to run, counted from 0 "
                             "as in Keras")
        dataset = y is None
        if batch_size is _BATCH_DEFAULT:
            batch_size = None if dataset else 32
        if batch_size is not None or not dataset:
            batch_size = _int_arg(batch_size, "batch_size", "fit", 1)
        if steps_per_epoch is not None:
            if not dataset:
                raise ValueError("fit: 'steps_per_epoch' applies to a dataset of batches "
                                 "(fit(dataset)), not to arrays")
            steps_per_epoch = _int_arg(steps_per_epoch, "steps_per_epoch", "fit", 1)
        if dataset:
            return self._fit_dataset(x, epochs=epochs, batch_size=batch_size,
                                     steps_per_epoch=steps_per_epoch,
                                     validation_data=validation_data,
                                     validation_split=validation_split,
                                     shuffle=None if shuffle is _SHUFFLE_DEFAULT else shuffle,
                                     verbose=verbose, callbacks=callbacks, device=device,
                                     initial_epoch=initial_epoch, check_finite=check_finite,
                                     sample_weight=sample_weight, class_weight=class_weight,
                                     poisson_sampling=poisson_sampling,
                                     adversarial=adversarial)
        shuffle = True if shuffle is _SHUFFLE_DEFAULT else shuffle
        if isinstance(validation_split, (bool, np.bool_)) \
                or not isinstance(validation_split, (int, float, np.integer, np.floating)) \
                or not 0.0 <= validation_split < 1.0:
            raise ValueError(f"fit: 'validation_split' must be a number in [0, 1), got "
                             f"{validation_split!r}")
        if validation_split and validation_data is not None:
            raise ValueError("fit: pass validation_data or validation_split, not both")
        verbose = _verbose_arg(verbose, "fit")
        shuffle = _bool_arg(shuffle, "shuffle", "fit")
        check_finite = _bool_arg(check_finite, "check_finite", "fit")
        poisson_sampling = _bool_arg(poisson_sampling, "poisson_sampling", "fit")
        from .adversarial import as_spec

        adversarial = as_spec(adversarial, "fit")
        if adversarial is not None:
            from .privacy import is_private

            if is_private(self.optimizer):
                raise ValueError("fit: adversarial training with a DP optimizer (fm.privacy) "
                                 "is not supported; use one or the other")
        if poisson_sampling:
            from .privacy import is_private

            if not is_private(self.optimizer):
                raise ValueError("fit: poisson_sampling=True is DP-SGD's sampling; compile "
                                 "with a fm.privacy optimizer (DPSGD, DPAdam)")
        self.to(_resolve_device(device, x))
        x = self._prepare_x(x, "x")
        if sample_weight is not None:
            sample_weight = _as_input(sample_weight, "sample_weight")
            if sample_weight.ndim != 1 or len(sample_weight) != len(x):
                raise ValueError(f"fit: 'sample_weight' must hold one weight per sample "
                                 f"({len(x)},), got shape {tuple(sample_weight.shape)}")
        val_names, val_row0 = ("x_val", "y_val"), 0
        if validation_split:
            n_val = int(len(x) * validation_split)
            if n_val == 0 or n_val == len(x):
                raise ValueError(f"fit: validation_split={validation_split} of {len(x)} samples "
                                 f"leaves {n_val} for validation")
            y = _as_input(y, "y")
            if len(y) != len(x):
                raise ValueError(f"'x' has {len(x)} samples but 'y' has {len(y)}")
            validation_data = (x[len(x) - n_val:], y[len(x) - n_val:])
            # the held-out rows are rows of x and y: errors name them so
            val_names, val_row0 = ("x", "y"), len(x) - n_val
            x, y = x[:len(x) - n_val], y[:len(x) - n_val]
            if sample_weight is not None:
                sample_weight = sample_weight[:len(x)]
        if _stream.needs_host_gather(self, x):  # a memmap: batches gathered on the host
            return self._fit_memmap(x, y, epochs=epochs, batch_size=batch_size,
                                    validation_data=validation_data, val_names=val_names,
                                    val_row0=val_row0, shuffle=shuffle, verbose=verbose,
                                    callbacks=callbacks, initial_epoch=initial_epoch,
                                    check_finite=check_finite, sample_weight=sample_weight,
                                    class_weight=class_weight,
                                    poisson_sampling=poisson_sampling, adversarial=adversarial)
        x, y = self._prepare_xy(x, y, "x", "y", "fit", check_finite)
        sample_weight = self._sample_weights(sample_weight, class_weight, y, check_finite)
        if len(x) == 0:
            raise ValueError("fit: 'x' has no samples")
        val = None
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ValueError("fit: validation_data must be a tuple (x_val, y_val)")
            val = self._prepare_xy(*validation_data, *val_names, "fit", check_finite, val_row0)

        history, cbs = self._callbacks(callbacks)
        return _trainer.fit(self, x, y, epochs=epochs, batch_size=batch_size, val=val,
                            shuffle=shuffle, verbose=verbose, callbacks=cbs,
                            initial_epoch=initial_epoch, history=history,
                            sample_weight=sample_weight, poisson_sampling=poisson_sampling,
                            adversarial=adversarial)

    def _callbacks(self, callbacks):
        """(History, the callbacks fit calls): History last, as Keras: it records what
        the other callbacks add to the logs (LearningRateScheduler's learning_rate)."""
        history = History()
        cbs: list[Callback] = list(callbacks or []) + [history]
        for cb in cbs:
            if not isinstance(cb, Callback):
                raise TypeError(f"fit: callbacks must be fm.callbacks.Callback instances, got "
                                f"{type(cb).__name__}")
            cb.set_model(self)
        return history, cbs

    def _stream_val(self, validation_data, names, row0, check_finite):
        """fit's validation data for a streamed fit: a memmap to gather on the host
        (evaluated in chunks) or arrays prepared as in-memory fit prepares them."""
        if validation_data is None:
            return None
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise ValueError("fit: validation_data must be a tuple (x_val, y_val)")
        xv = self._prepare_x(validation_data[0], names[0])
        if _stream.needs_host_gather(self, xv):
            yv = _stream.host_labels(self, validation_data[1], len(xv), names[1], "fit",
                                     check_finite, row0)
            return _stream.HostEval(xv, yv, check_finite, row0, names)
        return _stream.ArrayEval(*self._prepare_xy(xv, validation_data[1], *names, "fit",
                                                   check_finite, row0))

    def _fit_dataset(self, dataset, *, epochs, batch_size, steps_per_epoch, validation_data,
                     validation_split, shuffle, verbose, callbacks, device, initial_epoch,
                     check_finite, sample_weight, class_weight, poisson_sampling, adversarial):
        """fit(dataset): checks, then :func:`fastmlp.stream.fit_stream`."""
        from .adversarial import as_spec

        _stream.check_stream_options(self, "a dataset of batches (fit(dataset))",
                                     sample_weight=sample_weight, class_weight=class_weight,
                                     poisson_sampling=poisson_sampling,
                                     validation_split=validation_split, shuffle=shuffle)
        verbose = _verbose_arg(verbose, "fit")
        check_finite = _bool_arg(check_finite, "check_finite", "fit")
        adversarial = as_spec(adversarial, "fit")
        self.to(_resolve_device(device, None))
        history, cbs = self._callbacks(callbacks)

        def val():  # called once the model is built (maybe by the first batch)
            return self._stream_val(validation_data, ("x_val", "y_val"), 0, check_finite)

        return _stream.fit_stream(self, dataset, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                  batch_size=batch_size, val=val, verbose=verbose,
                                  callbacks=cbs, initial_epoch=initial_epoch, history=history,
                                  check_finite=check_finite, adversarial=adversarial)

    def _fit_memmap(self, x, y, *, epochs, batch_size, validation_data, val_names, val_row0,
                    shuffle, verbose, callbacks, initial_epoch, check_finite, sample_weight,
                    class_weight, poisson_sampling, adversarial):
        """fit on a memmap whose batches are gathered on the host: checks, then
        :func:`fastmlp.stream.fit_memmap`."""
        _stream.check_stream_options(self, "a memory-mapped x gathered on the host "
                                     "(not float32 C-contiguous, or a CUDA model)",
                                     sample_weight=sample_weight, class_weight=class_weight,
                                     poisson_sampling=poisson_sampling)
        val = self._stream_val(validation_data, val_names, val_row0, check_finite)
        history, cbs = self._callbacks(callbacks)
        return _stream.fit_memmap(self, x, y, epochs=epochs, batch_size=batch_size,
                                  shuffle=shuffle, val=val, verbose=verbose, callbacks=cbs,
                                  initial_epoch=initial_epoch, history=history,
                                  check_finite=check_finite, adversarial=adversarial)

    def _sample_weights(self, sample_weight, class_weight, y, check_finite):
        """fit's per-sample loss weights on y's device (None: unweighted): sample_weight
        times the class weight of each sample's class."""
        if sample_weight is None and class_weight is None:
            return None
        xp = cupy_module() if is_cupy(y) else np
        w = None
        if sample_weight is not None:
            w = xp.asarray(_host(sample_weight) if xp is np else sample_weight,
                           dtype=np.float32)
            if check_finite:
                _check_finite(w, "sample_weight", "fit")
            if bool((w < 0).any()):
                raise ValueError("fit: 'sample_weight' holds a negative weight")
        if class_weight is not None:
            if not isinstance(class_weight, dict) or not class_weight:
                raise ValueError("fit: 'class_weight' must be a non-empty dict {class index: "
                                 "weight}")
            classes = max(self.output_dim, 2)
            table = np.ones(classes, np.float32)
            for c, cw in class_weight.items():
                if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)) \
                        or not 0 <= c < classes:
                    raise ValueError(f"fit: class_weight key {c!r} is not a class index in "
                                     f"[0, {classes})")
                if not np.isfinite(cw) or cw < 0:
                    raise ValueError(f"fit: class_weight[{c}] = {cw!r} must be a finite "
                                     "number >= 0")
                table[int(c)] = cw
            if y.ndim == 1:
                cls = y.astype(np.int64)
            elif y.shape[1] == 1:
                cls = xp.rint(y[:, 0]).astype(np.int64).clip(0, classes - 1)
            else:
                cls = xp.argmax(y, axis=1)
            cw_rows = xp.asarray(table)[cls]
            w = cw_rows if w is None else w * cw_rows
        return xp.ascontiguousarray(w, dtype=np.float32)

    # -- evaluate / predict -------------------------------------------------------------
    def evaluate(self, x, y=None, batch_size: int | None = None, verbose: int = 0,
                 check_finite: bool = True, adversarial=None) -> dict:
        """``{"loss": mean loss, "accuracy": ...}`` over (x, y), on the model's device.
        ``check_finite`` as in :meth:`fit`. ``adversarial``: ``fm.adversarial.FGSM(...)``
        or ``fm.adversarial.PGD(...)``: the loss and metrics of the adversarial rows of
        (x, y) (robust accuracy), each batch attacked on the device. ``x`` may be an
        ``np.memmap`` (see :meth:`fit`): only a float32 C-contiguous one on the CPU is
        read in place (not scanned for NaN / Inf up front); any other is read in
        chunks of whole batches, each checked and converted (same result, bit for bit;
        no ``adversarial``, no ``auc`` metric). ``x`` may also be an iterable of
        ``(x, y)`` batches with ``y`` None (``batch_size``: the largest batch, default
        the first batch's rows; no ``adversarial``, no ``auc``)."""
        from .adversarial import as_spec

        self._require_compiled("evaluate")
        verbose = _verbose_arg(verbose, "evaluate")
        check_finite = _bool_arg(check_finite, "check_finite", "evaluate")
        adversarial = as_spec(adversarial, "evaluate")
        if y is None:
            if not _stream.is_dataset(x):
                raise ValueError("evaluate: 'y' is missing: pass evaluate(x, y) with arrays, or "
                                 "an iterable of (x, y) batches as x (with y None)")
            if adversarial is not None:
                raise ValueError("evaluate: adversarial does not apply to a dataset of batches")
            logs = _stream.evaluate_dataset(
                self, x, None if batch_size is None else self._batch_arg(batch_size, "evaluate"),
                check_finite)
            if verbose:
                print(_trainer.format_logs(logs))
            return logs
        if isinstance(x, np.memmap) and _stream.needs_host_gather(self, self._prepare_x(x, "x")):
            if adversarial is not None:
                raise ValueError("evaluate: adversarial does not apply to a memory-mapped x "
                                 "gathered on the host; evaluate chunks of it as arrays")
            x = self._prepare_x(x, "x")
            y = _stream.host_labels(self, y, len(x), "y", "evaluate", check_finite)
            logs = _stream.evaluate_host(self, x, y, self._batch_arg(batch_size, "evaluate"),
                                         check_finite=check_finite)
            if verbose:
                print(_trainer.format_logs(logs))
            return logs
        x, y = self._prepare_xy(x, y, "x", "y", "evaluate", check_finite)
        logs = _trainer.evaluate(self, x, y, self._batch_arg(batch_size, "evaluate"),
                                 adversarial=adversarial)
        if verbose:
            print(_trainer.format_logs(logs))
        return logs

    def predict(self, x, batch_size: int | None = None, check_finite: bool = True):
        """The last layer's output for each row of ``x`` (softmax probabilities when the
        last activation is softmax). NumPy in -> NumPy out; CuPy in -> CuPy out.
        ``check_finite`` as in :meth:`fit`. ``x`` may be an ``np.memmap`` (see
        :meth:`evaluate`); the output is then a NumPy array in memory. ``x`` may also
        be an iterable of x batches (or of (x, y) batches): their outputs concatenated."""
        self._require_built("predict")
        check_finite = _bool_arg(check_finite, "check_finite", "predict")
        if _stream.is_dataset(x):
            return _stream.predict_dataset(self, x, batch_size, check_finite)
        want_cupy = is_cupy(_as_input(x, "x"))
        x = self._prepare_x(x, "x")
        if _stream.needs_host_gather(self, x):
            return _stream.predict_host(self, x, self._batch_arg(batch_size, "predict"),
                                        check_finite)
        x_float = x.dtype.kind == "f" and not isinstance(x, np.memmap)  # no scan of a memmap
        x = self._place(x, np.float32)
        if check_finite and x_float:
            _check_finite(x, "x", "predict")
        out = _trainer.predict(self, x, self._batch_arg(batch_size, "predict"))
        if want_cupy:
            return out if is_cupy(out) else cupy_module().asarray(out)
        return _host(out)

    @staticmethod
    def _batch_arg(batch_size, what):
        if batch_size is None:
            return _EVAL_BATCH
        return _int_arg(batch_size, "batch_size", what, 1)

    # -- weights ------------------------------------------------------------------------
    def get_weights(self) -> list:
        """Every layer's weights as NumPy copies, in Keras order and shapes: Dense
        [kernel (in, out), bias], BatchNormalization [gamma, beta, moving_mean,
        moving_variance], LayerNormalization [gamma, beta]."""
        self._require_built("get_weights")
        return [_host(w).copy() for w in self.weights()]

    def set_weights(self, weights) -> None:
        """Copy ``weights`` (get_weights' order and shapes) into the model's weights."""
        weights = list(weights)
        if not self.built and weights:
            self.build(np.shape(weights[0])[0])
        mine = self.weights()
        if len(weights) != len(mine):
            raise ValueError(f"set_weights: the model has {len(mine)} weight arrays "
                             f"({self._weight_shapes()}), got {len(weights)}")
        for i, (p, w) in enumerate(zip(mine, weights)):
            if tuple(np.shape(w)) != tuple(p.shape):
                raise ValueError(f"set_weights: weight {i} must have shape {tuple(p.shape)}, "
                                 f"got {tuple(np.shape(w))}")
        for p, w in zip(mine, weights):
            p[...] = _to_device(np.asarray(_host(w), dtype=np.float32), self.device)

    def _weight_shapes(self) -> str:
        return ", ".join(str(tuple(p.shape)) for p in self.weights())

    def summary(self, print_fn=print) -> None:
        """Print the layers, their output shapes and parameter counts."""
        rows = [("Layer", "Output shape", "Activation", "Params")]
        for i, layer in enumerate(self.layers):
            cls = type(layer).__name__
            act = getattr(layer, "activation", "-") or "linear"
            rows.append((layer.name or f"{_snake(cls)}_{i} ({cls})",
                         f"(None, {layer.output_dim})", act, f"{layer.count_params():,}"))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        line = "  ".join("-" * w for w in widths)
        text = [f'Model: "{self.name or "sequential"}"', line]
        for j, r in enumerate(rows):
            text.append("  ".join(cell.ljust(w) if c < 3 else cell.rjust(w)
                                  for c, (cell, w) in enumerate(zip(r, widths))))
            if j == 0:
                text.append(line)
        fixed = sum(int(np.prod(layer.weight_shapes()[n])) for layer in self.layers
                    if layer.input_dim is not None
                    for n in layer.weight_names() if n not in layer.trainable_names())
        text += [line, f"Total params: {self.count_params():,}"
                 + ("" if self.built else " (not built: no input_dim yet)")]
        if fixed:
            text.append(f"Trainable params: {self.count_params() - fixed:,}; non-trainable "
                        f"params: {fixed:,}")
        if self.optimizer is not None:
            text.append(f"Optimizer: {self.optimizer!r}; loss: {self.loss.name}; "
                        f"device: {self.device}")
        print_fn("\n".join(text))

    # -- save / load --------------------------------------------------------------------
    def get_config(self) -> dict:
        return {"name": self.name, "layers": [l.get_config() for l in self.layers]}

    def save(self, path, include_optimizer: bool = True) -> None:
        """Write the model to ``path`` (safetensors; see :mod:`fastmlp.saving`): the
        weights, the configuration and, with ``include_optimizer``, the optimizer state
        and the shuffling position, so that ``fit`` continues exactly. Distributed
        (:mod:`fastmlp.distributed`): only rank 0 writes (the others hold the same
        weights); on the other ranks this does nothing."""
        from .distributed import is_root
        from .saving import save_model

        self._require_built("save")
        if is_root():
            save_model(self, path, include_optimizer=include_optimizer)

    def export(self, path, format="onnx", opset=None) -> None:
        """Write the model for inference elsewhere: ``format="onnx"`` (the only one) writes
        an ONNX graph (default opset 17; ``opset`` >= 17) with input ``"input"`` float32
        (batch, features) and output ``"output"``, computing what :meth:`predict` does
        (see :mod:`fastmlp.export`). Needs the ``onnx`` package (``pip install
        fastmlp[onnx]``). Distributed: only rank 0 writes, as :meth:`save`."""
        from .distributed import is_root
        from .export import export

        if is_root():
            export(self, path, format=format, opset=opset)

    def __repr__(self):
        return f"Sequential({self.layers!r})"


def load_model(path, compile: bool = True) -> Sequential:
    """Read a model written by :meth:`Sequential.save` (see :func:`fastmlp.saving.load_model`)."""
    from .saving import load_model as _load

    return _load(path, compile=compile)
