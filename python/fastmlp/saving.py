"""Saving and loading models: the file format, in one place.

A model file is safetensors: the weights as tensors ``layers.<i>.<weight name>``
(``kernel``, ``bias``; ``gamma``, ``beta``, ``moving_mean``, ``moving_variance``); the
configuration (layers, optimizer, loss, metrics) as JSON in
the metadata key ``fastmlp``; and, when the optimizer is included, its state as
``optimizer.<param index>.<buffer>`` tensors plus the step count and the shuffling
position (seed, epochs shuffled) in the metadata, so a resumed ``fit`` continues
exactly. Engines never touch files; objects give their configuration
(``get_config``) and state (``state_arrays``).

Files are written atomically (:func:`write_atomic`): the bytes go to a temporary file
``.fastmlp-<random>.tmp`` in the target's folder, are flushed to the disk (fsync), and
the temporary is renamed over the target, then the folder is synced. A crash, a kill
or a full disk at any moment leaves the previous file or the new one, never half a
model; a process killed mid-write may leave its temporary behind (harmless, and safe
to delete).

Format versions: 1 (fastmlp 0.1 before the step plan: NumPy shuffling state) still
loads, but its shuffling position does not carry over; 2 is written for models of
Dense layers only (older fastmlp reads them), 3 for models with the layers of issue 15
(Activation, Dropout, BatchNormalization, LayerNormalization), which an older fastmlp
refuses as "newer" instead of misreading.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import stat

import numpy as np

from . import losses as _losses
from . import optim as _optim
from . import layers as _layers
from .layers import Dense
from .model import Sequential, _host, _to_device

__all__ = ["save_model", "load_model", "write_atomic", "save_backup", "restore_backup", "FORMAT",
           "FORMAT_VERSION"]

FORMAT = "fastmlp.sequential"
FORMAT_VERSION = 3
TEMP_PREFIX, TEMP_SUFFIX = ".fastmlp-", ".tmp"  # the temporaries write_atomic leaves on a kill


def save_model(model, path, include_optimizer: bool = True) -> None:
    """Write ``model`` to ``path`` (atomically: see :func:`write_atomic`)."""
    write_atomic(path, _model_bytes(model, include_optimizer))


def _model_bytes(model, include_optimizer: bool, backup: dict | None = None) -> bytes:
    """The model file's bytes; ``backup`` (BackupAndRestore's epoch count) goes into the
    metadata under "backup"."""
    from safetensors.numpy import save

    tensors = {}
    for i, layer in enumerate(model.layers):
        for name, arr in zip(layer.weight_names(), layer.weights()):
            tensors[f"layers.{i}.{name}"] = _host(arr)
    only_dense = all(type(layer) is Dense for layer in model.layers)
    meta = {"format": FORMAT, "format_version": 2 if only_dense else FORMAT_VERSION,
            "model": model.get_config()}
    if model.loss is not None:
        meta["compile"] = {"optimizer": type(model.optimizer).__name__,
                           "optimizer_config": model.optimizer.get_config(),
                           "loss": model.loss.name, "loss_config": model.loss.get_config(),
                           "metrics": model.metrics}
    if include_optimizer and model.optimizer is not None:
        # before the first step the state is not built yet: its zeros are saved
        for key, arr in model.optimizer.state_arrays(model.params()).items():
            tensors[f"optimizer.{key}"] = _host(arr)
        meta["optimizer_iterations"] = model.optimizer.iterations
        meta["shuffle"] = {"seed": model._shuffle_seed, "count": model._shuffle_count}
    if backup is not None:
        meta["backup"] = backup
    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                metadata={"fastmlp": json.dumps(meta)})


def write_atomic(path, data: bytes) -> None:
    """Replace ``path`` by a file holding ``data``, so that a crash, a kill or a full disk
    at any moment leaves either the previous file or the new one: write a temporary in
    the same folder, fsync it, rename it over ``path`` (``os.replace``), fsync the
    folder. On an error the temporary is removed and the error propagates; a killed
    process leaves it behind. The file gets the mode of the file it replaces, else the
    usual one (0o666 less the umask, as ``open(path, "wb")``)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, f"cannot write {path}: no such folder", folder)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None
    # 64 random bits: two writers never pick the same name; O_EXCL would say if they did.
    # os.open applies the umask to 0o666 (tempfile.mkstemp would make it 0o600).
    tmp = os.path.join(folder, f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        try:
            if mode is not None:
                os.chmod(tmp, mode)
            view = memoryview(data)
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view):]
            os.fsync(fd)  # the data on the disk before the name points at it
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    """Make the rename durable: on POSIX a file name is data of its folder."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # some file systems cannot sync a folder: nothing more to do there
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


# -- reading ------------------------------------------------------------------------------
# A model file may hold anything: every check below ends in ValueError naming the file,
# and the configuration is checked against the tensors' shapes BEFORE a layer is built
# (building allocates input_dim x units floats: a file claiming 10^12 units must be
# refused, not allocated).


def _brief(value) -> str:
    """``value`` for a message: the repr of a scalar (cut short), the type of anything
    else (a JSON container may nest deeper than repr recurses)."""
    if isinstance(value, (str, int, float, bool, type(None))):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return f"a JSON {'list' if isinstance(value, list) else 'object'}"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_safetensors(path: str):
    """(the fastmlp metadata string or None, {name: array}) of a safetensors file. The
    cost follows the file's size: safetensors caps the header and checks that the
    tensor table covers the file exactly, so the arrays hold at most its bytes."""
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(path, framework="numpy")
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    tensors = {}
    with f:
        raw = (f.metadata() or {}).get("fastmlp")
        for key in f.keys():
            try:
                tensors[key] = f.get_tensor(key)
            except (SafetensorError, OSError, ValueError) as e:
                raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
            except (TypeError, AttributeError) as e:
                # safetensors' NumPy loader fails so on the types NumPy lacks (BF16, F8...)
                raise ValueError(f"{path}: tensor {key!r} has a type NumPy cannot hold ({e}); "
                                 "fastmlp writes float32") from None
            if tensors[key].dtype.isbuiltin != 1:  # 2: a type registered by a package
                # the same types, loaded when a package such as ml_dtypes (which onnx
                # brings) registered them with NumPy: refused alike, before any shape check
                raise ValueError(f"{path}: tensor {key!r} has a type NumPy cannot hold "
                                 f"without extensions ({tensors[key].dtype}); fastmlp writes "
                                 "float32")
    return raw, tensors


def _check_tensor(path, tensors: dict, key: str, shape: tuple, index: int) -> None:
    """Tensor ``key`` must be there, float32 of ``shape`` (weight ``index`` of the model)."""
    if key not in tensors:
        raise ValueError(f"{path}: the model configuration does not match the tensors (no "
                         f"tensor {key!r})")
    arr = tensors[key]
    if tuple(arr.shape) != shape:
        # set_weights' wording: this check stands in for it, before anything is built.
        raise ValueError(f"{path}: set_weights: weight {index} must have shape {shape}, got "
                         f"{tuple(arr.shape)}")
    if arr.dtype != np.float32:
        raise ValueError(f"{path}: tensor {key!r} is {arr.dtype}; fastmlp writes float32")


def _check_layers(path, config, tensors: dict) -> None:
    """The layer configurations checked for types, against each other, and against the
    tensors' shapes and types: what is left for Dense and Sequential to refuse is values
    of the right type (an unknown activation, softmax before the last layer)."""
    if not isinstance(config, dict) or not isinstance(config.get("layers"), list) \
            or not config["layers"]:
        raise ValueError(f"{path}: the model configuration has no list of layers")
    if not isinstance(config.get("name"), (str, type(None))):
        raise ValueError(f"{path}: the model's name is {_brief(config['name'])}, not a string")
    dim, index = None, 0
    for i, layer in enumerate(config["layers"]):
        where = f"{path}: layer {i}"
        if not isinstance(layer, dict):
            raise ValueError(f"{where}: the configuration is {_brief(layer)}, not an object")
        cls = layer.get("class", "Dense")
        if not isinstance(cls, str) or cls not in _layers.CLASSES:
            raise ValueError(f"{where}: unknown layer class {_brief(cls)}; fastmlp has "
                             f"{sorted(_layers.CLASSES)}")
        input_dim = layer.get("input_dim")
        if input_dim is not None and (not _is_int(input_dim) or input_dim < 1):
            raise ValueError(f"{where}: 'input_dim' must be a positive integer, got "
                             f"{_brief(input_dim)}")
        if i == 0:
            if input_dim is None:
                raise ValueError(f"{where}: no 'input_dim' (a saved model is built)")
            dim = input_dim
        elif input_dim is not None and input_dim != dim:
            raise ValueError(f"{where}: 'input_dim' is {input_dim} but the previous layer has "
                             f"{dim} outputs")
        if cls == "Dense":
            units = layer.get("units")
            if not _is_int(units) or units < 1:
                raise ValueError(f"{where}: 'units' must be a positive integer, got "
                                 f"{_brief(units)}")
            if not isinstance(layer.get("use_bias", True), bool):
                raise ValueError(f"{where}: 'use_bias' must be true or false, got "
                                 f"{_brief(layer['use_bias'])}")
        for key in ("activation", "name", "kernel_initializer", "bias_initializer"):
            if not isinstance(layer.get(key), (str, type(None))):
                raise ValueError(f"{where}: {key!r} must be a string, got "
                                 f"{_brief(layer[key])}")
        # The other values are checked by the layer's constructor, which allocates
        # nothing: the shapes below come from the configuration, before any build.
        try:
            obj = _layers.from_config(layer)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: bad configuration ({e})") from None
        obj.input_dim = dim
        for name, shape in obj.weight_shapes().items():
            _check_tensor(path, tensors, f"layers.{i}.{name}", tuple(shape), index)
            index += 1
        dim = obj.output_dim


def _check_compile(path, meta: dict) -> None:
    """The types of the compile settings and of the saved counters (their values are
    checked by the optimizer, loss and metric constructors)."""
    c = meta["compile"]
    if not isinstance(c, dict) or not isinstance(c.get("optimizer"), str) \
            or not isinstance(c.get("optimizer_config"), dict):
        raise ValueError(f"{path}: bad compile settings (expected an optimizer name and an "
                         "optimizer_config object)")
    if not isinstance(c.get("loss"), str) or not isinstance(c.get("metrics", []), list) \
            or not isinstance(c.get("loss_config") or {}, dict):
        raise ValueError(f"{path}: bad compile settings (expected a loss name and a list of "
                         "metrics)")
    # The kernels take the step (iterations + 1) as int64: 2^62 leaves room to train on.
    iterations = meta.get("optimizer_iterations", 0)
    if not _is_int(iterations) or not 0 <= iterations < 2**62:
        raise ValueError(f"{path}: bad optimizer step count {_brief(iterations)} (a "
                         "non-negative integer)")
    shuffle = meta.get("shuffle")
    if shuffle is not None and not (
            isinstance(shuffle, dict) and _is_int(shuffle.get("seed"))
            and _is_int(shuffle.get("count")) and 0 <= shuffle["seed"] < 2**64
            and 0 <= shuffle["count"] < 2**62):
        raise ValueError(f"{path}: bad shuffling state (expected seed and count, "
                         "non-negative 64-bit integers)")


def _optimizer_state(path, tensors: dict) -> dict:
    """The file's ``optimizer.*`` tensors by state key, float32 only (load_state_arrays
    would cast another type silently)."""
    state = {k[len("optimizer."):]: v for k, v in tensors.items() if k.startswith("optimizer.")}
    for key, arr in state.items():
        if arr.dtype != np.float32:
            raise ValueError(f"{path}: tensor 'optimizer.{key}' is {arr.dtype}; fastmlp "
                             "writes float32")
    return state


def load_model(path, compile: bool = True):
    """Read a model written by :func:`save_model`.

    With ``compile`` (default) the optimizer, loss and metrics are restored, and the
    optimizer state when it was saved. A file that is not a fastmlp model, or whose
    tensors do not match its configuration, raises ValueError naming the file.
    """
    return _load(path, compile)[0]


def _load(path, compile: bool):
    """:func:`load_model`, also returning the file's metadata and its tensors other than
    the layers' (the optimizer state): ``(model, meta, tensors)``, one read."""
    path = str(path)
    raw, tensors = _read_safetensors(path)
    if raw is None:
        raise ValueError(f"{path}: a safetensors file without fastmlp metadata (not saved by "
                         "fastmlp's model.save)")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:  # also numbers of over 4300 digits, deep nests
        raise ValueError(f"{path}: corrupt fastmlp metadata ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: corrupt fastmlp metadata ({_brief(meta)}, not an object)")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {_brief(meta.get('format'))}, expected {FORMAT!r}")
    version = meta.get("format_version", 0)
    if not _is_int(version):
        raise ValueError(f"{path}: format version {_brief(version)} is not an integer")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: format version {version} is newer than this fastmlp reads "
                         f"({FORMAT_VERSION}); upgrade fastmlp")
    _check_layers(path, meta.get("model"), tensors)
    try:
        layers = [_layers.from_config(c) for c in meta["model"]["layers"]]
        model = Sequential(layers, name=meta["model"].get("name"))
        model.build(layers[0].input_dim)
        weights = []
        for i, layer in enumerate(layers):
            for name in layer.weight_names():
                weights.append(tensors.pop(f"layers.{i}.{name}"))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: the model configuration does not match the tensors "
                         f"({type(e).__name__}: {e})") from None
    try:
        model.set_weights(weights)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if compile and "compile" in meta:
        _check_compile(path, meta)
        c = meta["compile"]
        try:
            model.compile(_optim.from_config(c["optimizer"], c["optimizer_config"]),
                          _losses.from_config(c["loss"], c.get("loss_config")),
                          c.get("metrics"))
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"{path}: bad compile settings ({e})") from None
        opt_state = _optimizer_state(path, tensors)
        if "optimizer_iterations" in meta:
            try:
                model.optimizer.load_state_arrays(opt_state, model.params(),
                                                  meta["optimizer_iterations"],
                                                  lambda a: _to_device(a, model.device))
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
        shuffle = meta.get("shuffle")
        if shuffle is not None:
            model._shuffle_seed = shuffle["seed"]
            model._shuffle_count = shuffle["count"]
    return model, meta, tensors


# ----------------------------------------------------------------------------- backups
# BackupAndRestore's file (fastmlp.callbacks): a model file with the optimizer state and,
# in the metadata under "backup", the number of epochs completed.


def save_backup(model, path, epochs_done: int) -> None:
    """Write ``model``'s training state after ``epochs_done`` epochs to ``path``, atomically."""
    write_atomic(path, _model_bytes(model, True, backup={"epochs_done": int(epochs_done)}))


def restore_backup(model, path) -> int:
    """Load the training state written by :func:`save_backup` into ``model`` -- the
    weights, the optimizer state and step count, its ``lr`` (a callback may have changed
    it), the shuffling position -- in place (an engine may hold views of them), and
    return the number of epochs completed. The backup must be of a model with the same
    layers, loss and optimizer (class and settings other than ``lr``): else ValueError
    naming the file, and the model is left untouched."""
    path = os.fspath(path)
    saved, meta, tensors = _load(path, compile=False)  # checks the file and the weights
    state = _optimizer_state(path, tensors)

    def layers(m):  # what the weights' meaning depends on (not names, not initialisers)
        return [(type(l).__name__,) + l.signature() for l in m.layers]

    def settings(name, config):
        return name, {k: v for k, v in config.items() if k != "lr"}

    if "backup" not in meta:
        raise ValueError(f"{path}: a model file, not a backup (no 'backup' metadata: not "
                         "written by BackupAndRestore)")
    opt = model.optimizer
    c = meta.get("compile") or {}
    try:
        if layers(saved) != layers(model):
            raise ValueError(f"it holds layers {layers(saved)}, the model has "
                             f"{layers(model)}")
        if c.get("loss") != model.loss.name:
            raise ValueError(f"it was trained with loss {c.get('loss')!r}, the model has "
                             f"{model.loss.name!r}")
        theirs = settings(c.get("optimizer"), c.get("optimizer_config") or {})
        mine = settings(type(opt).__name__, json.loads(json.dumps(opt.get_config())))
        if theirs != mine:
            raise ValueError(f"its optimizer is {theirs[0]} {theirs[1]}, the model's is "
                             f"{mine[0]} {mine[1]} (lr aside)")
        epochs_done = int(meta["backup"]["epochs_done"])
        iterations = int(meta["optimizer_iterations"])
        seed, count = int(meta["shuffle"]["seed"]), int(meta["shuffle"]["count"])
        lr = c["optimizer_config"]["lr"]
        # a float (a callback may have changed it), or a serialized schedule
        lr = _optim.schedules.deserialize(lr) if isinstance(lr, dict) else float(lr)
        if epochs_done < 0 or iterations < 0 or count < 0:
            raise ValueError(f"negative counts: epochs_done={epochs_done}, "
                             f"optimizer_iterations={iterations}, shuffle count={count}")
        # the last check, and the first change: load_state_arrays checks every key and
        # shape before it writes (in place) into the state
        opt.load_state_arrays(state, model.params(), iterations,
                              lambda a: _to_device(a, model.device))
    except (KeyError, TypeError, ValueError) as e:
        what = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
        raise ValueError(f"{path}: not a backup of this model ({what}); delete it, or give "
                         "BackupAndRestore another backup_dir") from None
    model.set_weights(saved.get_weights())  # shapes checked above: cannot fail
    opt.lr = lr
    model._shuffle_seed, model._shuffle_count = seed, count
    return epochs_done
