"""Callbacks for ``Model.fit``: History, EarlyStopping, ModelCheckpoint, BackupAndRestore,
LearningRateScheduler, ReduceLROnPlateau, CSVLogger.

A callback sees the model (``self.model``) and the epoch logs -- a dict such as
``{"loss": 0.41, "accuracy": 0.85, "val_loss": 0.45, "val_accuracy": 0.84}``.
Setting ``model.stop_training = True`` ends ``fit`` after the current epoch.
There are no per-batch hooks: they would force a device-to-host copy every step.
The learning-rate callbacks set ``model.optimizer.lr`` between epochs (the next
epoch's steps use it) and add ``"learning_rate"`` to the logs.
"""
from __future__ import annotations

import csv
import inspect
import math
import numbers
import os

__all__ = ["Callback", "History", "EarlyStopping", "ModelCheckpoint", "BackupAndRestore",
           "LearningRateScheduler", "ReduceLROnPlateau", "CSVLogger"]


def _is_root() -> bool:
    """Whether this process writes files and prints (rank 0 of a distributed fit)."""
    from .distributed import is_root

    return is_root()


def _print(*args, **kw):
    if _is_root():
        print(*args, **kw)


class Callback:
    model = None

    def set_model(self, model) -> None:
        self.model = model

    def on_train_begin(self, logs=None) -> None:
        pass

    def on_train_end(self, logs=None) -> None:
        pass

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        pass

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        pass


class History(Callback):
    """What ``fit`` returns: ``history.history`` maps each metric to its per-epoch values;
    ``history.epoch`` lists the epoch indices."""

    def __init__(self):
        self.history: dict[str, list[float]] = {}
        self.epoch: list[int] = []
        self.params: dict = {}

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(value)

    def __repr__(self):
        return f"History(epochs={len(self.epoch)}, keys={list(self.history)})"


def _mode(monitor: str, mode: str) -> str:
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    if mode != "auto":
        return mode
    return "max" if monitor.endswith("accuracy") or monitor.endswith("acc") else "min"


class _Monitor(Callback):
    """Tracks the best value of one logged quantity."""

    def __init__(self, monitor: str, mode: str, min_delta: float = 0.0):
        self.monitor = monitor
        self.mode = _mode(monitor, mode)
        self.min_delta = abs(float(min_delta))
        self.best = math.inf if self.mode == "min" else -math.inf

    def _value(self, logs):
        if logs is None or self.monitor not in logs:
            have = sorted(logs or {})
            hint = (" (val_* metrics need validation_data or validation_split)"
                    if self.monitor.startswith("val_") else "")
            raise ValueError(f"{type(self).__name__}: monitored quantity '{self.monitor}' is "
                             f"not in the logs {have}{hint}")
        return float(logs[self.monitor])

    def _improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta


class EarlyStopping(_Monitor):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience``
    epochs in a row (at the first epoch without improvement when ``patience`` is 0). With ``restore_best_weights`` the model ends with the weights of its best
    epoch (also when training runs to the last epoch, unlike Keras)."""

    def __init__(self, monitor: str = "val_loss", min_delta: float = 0.0, patience: int = 0,
                 mode: str = "auto", restore_best_weights: bool = False, verbose: int = 0):
        super().__init__(monitor, mode, min_delta)
        if patience < 0:
            raise ValueError(f"EarlyStopping: 'patience' must be >= 0, got {patience}")
        self.patience = int(patience)
        self.restore_best_weights = bool(restore_best_weights)
        self.verbose = verbose
        self.wait = 0
        self.stopped_epoch = None
        self.best_epoch = None
        self.best_weights = None

    def on_train_begin(self, logs=None):
        self.best = math.inf if self.mode == "min" else -math.inf
        self.wait, self.stopped_epoch, self.best_epoch, self.best_weights = 0, None, None, None

    def on_epoch_end(self, epoch, logs=None):
        value = self._value(logs)
        if self._improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                self.best_weights = self.model.get_weights()
            return
        self.wait += 1
        if self.wait >= self.patience:  # as Keras: patience epochs without improvement
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.restore_best_weights and self.best_weights is not None:
            self.model.set_weights(self.best_weights)
        if self.verbose and self.stopped_epoch is not None:
            _print(f"EarlyStopping: stopped after epoch {self.stopped_epoch + 1}; best "
                  f"{self.monitor} = {self.best:.4f} at epoch {self.best_epoch + 1}")


class ModelCheckpoint(_Monitor):
    """Save the model after each epoch (``model.save``), or with ``save_best_only`` only
    when ``monitor`` improved. ``filepath`` may hold ``{epoch}`` and log keys, e.g.
    ``"ckpt-{epoch:02d}-{val_loss:.3f}.safetensors"`` (epochs counted from 1)."""

    def __init__(self, filepath, monitor: str = "val_loss", save_best_only: bool = False,
                 mode: str = "auto", include_optimizer: bool = True, verbose: int = 0):
        super().__init__(monitor, mode)
        self.filepath = str(filepath)
        self.save_best_only = bool(save_best_only)
        self.include_optimizer = bool(include_optimizer)
        self.verbose = verbose
        self.saved: list[str] = []

    def on_train_begin(self, logs=None):
        self.best = math.inf if self.mode == "min" else -math.inf

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.save_best_only:
            value = self._value(logs)
            if not self._improved(value):
                return
            self.best = value
        if not _is_root():  # distributed: rank 0 writes (every process keeps `best`)
            return
        path = self.filepath.format(epoch=epoch + 1, **logs)
        self.model.save(path, include_optimizer=self.include_optimizer)
        self.saved.append(path)
        if self.verbose:
            print(f"ModelCheckpoint: saved {path}")


class BackupAndRestore(Callback):
    """Resume a ``fit`` that was interrupted (killed, crashed) where it stopped, as Keras 3's
    BackupAndRestore: at each epoch's end the training state -- weights, optimizer state
    and step count, ``lr``, the shuffling position, the number of epochs completed -- is
    written atomically to ``<backup_dir>/backup.safetensors``; a ``fit`` that finds it
    restores it into the model (of the same layers, loss and optimizer: else ValueError)
    and continues with the next epoch, so the run ends bit for bit as an uninterrupted
    one. Its History starts at that epoch. A ``fit`` that ends (also stopped by
    EarlyStopping) deletes the backup (and ``backup_dir`` when then empty) unless
    ``delete_checkpoint=False``; one that raises keeps it. Other callbacks' state (e.g.
    EarlyStopping's patience count) is not backed up. One backup_dir per training run. A
    kill in the middle of a backup's write may leave a ``.fastmlp-*.tmp`` in backup_dir
    (never read; the folder then stays)."""

    FILENAME = "backup.safetensors"

    def __init__(self, backup_dir, delete_checkpoint: bool = True):
        if not isinstance(backup_dir, (str, os.PathLike)) \
                or not isinstance(os.fspath(backup_dir), str):
            raise TypeError(f"BackupAndRestore: 'backup_dir' must be a folder path (str or "
                            f"os.PathLike), got {type(backup_dir).__name__}")
        if not os.fspath(backup_dir):
            raise ValueError("BackupAndRestore: 'backup_dir' is empty")
        self.backup_dir = os.fspath(backup_dir)
        self.delete_checkpoint = bool(delete_checkpoint)
        self.path = os.path.join(self.backup_dir, self.FILENAME)

    def on_train_begin(self, logs=None):
        from .saving import restore_backup  # here: saving imports model, which imports us

        if os.path.exists(self.path):
            self.model._initial_epoch = restore_backup(self.model, self.path)

    def on_epoch_end(self, epoch, logs=None):
        from .saving import save_backup

        if not _is_root():  # distributed: rank 0 writes, every process restores
            return
        os.makedirs(self.backup_dir, exist_ok=True)
        save_backup(self.model, self.path, epoch + 1)

    def on_train_end(self, logs=None):
        if not self.delete_checkpoint or not _is_root():
            return
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        try:
            os.rmdir(self.backup_dir)  # only when empty: the folder may hold other files
        except OSError:
            pass


# ----------------------------------------------------------------- learning-rate callbacks


def _current_lr(model, who: str) -> float:
    """The optimizer's learning rate as a float; TypeError when it is a schedule (a
    callable of the step, which a callback cannot set -- as in Keras)."""
    opt = getattr(model, "optimizer", None)
    if opt is None:
        raise ValueError(f"{who}: the model has no optimizer (compile it first)")
    lr = opt.lr
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"{who}: the optimizer's learning rate is a "
                        f"{type(lr).__name__} (a schedule), not a number: a callback "
                        "cannot set it. Use a float learning rate with this callback, or "
                        "the schedule alone")
    return float(lr)


def _check_lr(value, who: str, epoch: int) -> float:
    """A learning rate from user code: a finite number >= 0, or ValueError."""
    if hasattr(value, "ndim") and getattr(value, "ndim") == 0 and hasattr(value, "item"):
        value = value.item()  # a 0-d array
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = math.isfinite(value) and value >= 0.0
    if not ok:
        raise ValueError(f"{who}: the schedule returned {value!r} for epoch {epoch}; a "
                         "learning rate must be a finite number >= 0")
    return value


class LearningRateScheduler(Callback):
    """At each epoch's start sets ``model.optimizer.lr = schedule(epoch, lr)`` (epoch
    from 0, ``lr`` the current rate); a ``schedule(epoch)`` of one argument is called
    with the epoch alone (as Keras). The schedule must return a finite number >= 0 (else
    ValueError). At each epoch's end the rate goes into ``logs["learning_rate"]``.
    Needs a float learning rate (TypeError when the optimizer's is a schedule)."""

    def __init__(self, schedule, verbose: int = 0):
        if not callable(schedule):
            raise TypeError(f"LearningRateScheduler: 'schedule' must be callable "
                            f"(epoch, lr) -> float, got {type(schedule).__name__}")
        self.schedule = schedule
        self.verbose = verbose

    def _call_schedule(self, epoch: int, lr: float):
        try:
            inspect.signature(self.schedule).bind(epoch, lr)
        except TypeError:  # takes no second argument
            return self.schedule(epoch)
        except ValueError:  # no signature to inspect (some builtins): Keras' way
            try:
                return self.schedule(epoch, lr)
            except TypeError:
                return self.schedule(epoch)
        return self.schedule(epoch, lr)

    def on_epoch_begin(self, epoch, logs=None):
        who = "LearningRateScheduler"
        lr = _check_lr(self._call_schedule(epoch, _current_lr(self.model, who)), who, epoch)
        self.model.optimizer.lr = lr
        if self.verbose:
            _print(f"\nEpoch {epoch + 1}: LearningRateScheduler setting learning rate to {lr}.")

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = _current_lr(self.model, "LearningRateScheduler")


class ReduceLROnPlateau(_Monitor):
    """Keras' ReduceLROnPlateau: when ``monitor`` has not improved (by more than
    ``min_delta``) for ``patience`` epochs, ``lr = max(lr * factor, min_lr)`` -- only
    while ``lr > min_lr`` -- followed by ``cooldown`` epochs in which no epoch counts
    as one without improvement. Each epoch's end also puts the rate (before any
    reduction) into ``logs["learning_rate"]``. ``mode`` as EarlyStopping's ("auto":
    "max" for an accuracy, else "min"). Needs a float learning rate (TypeError when the
    optimizer's is a schedule)."""

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10,
                 verbose: int = 0, mode: str = "auto", min_delta: float = 1e-4,
                 cooldown: int = 0, min_lr: float = 0.0):
        who = "ReduceLROnPlateau"
        if not isinstance(factor, numbers.Real) or not 0.0 <= factor < 1.0:
            raise ValueError(f"{who}: 'factor' must be in [0, 1) (the new rate is lr * "
                             f"factor), got {factor!r}")
        for name, value in (("patience", patience), ("cooldown", cooldown)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{who}: {name!r} must be an integer >= 0, got {value!r}")
        for name, value in (("min_delta", min_delta), ("min_lr", min_lr)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(value) or value < 0:
                raise ValueError(f"{who}: {name!r} must be a finite number >= 0, got "
                                 f"{value!r}")
        super().__init__(monitor, mode, min_delta)
        self.factor, self.min_lr = float(factor), float(min_lr)
        self.patience, self.cooldown = int(patience), int(cooldown)
        self.verbose = verbose
        self._reset()

    def _reset(self):
        self.best = math.inf if self.mode == "min" else -math.inf
        self.wait = 0
        self.cooldown_counter = 0

    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def on_train_begin(self, logs=None):
        _current_lr(self.model, "ReduceLROnPlateau")  # a schedule: fail before training
        self._reset()

    def on_epoch_end(self, epoch, logs=None):
        lr = _current_lr(self.model, "ReduceLROnPlateau")
        if logs is None:
            logs = {}
        logs["learning_rate"] = lr
        current = self._value(logs)
        if self.in_cooldown():
            self.cooldown_counter -= 1
            self.wait = 0
        if self._improved(current):
            self.best, self.wait = current, 0
        elif not self.in_cooldown():
            self.wait += 1
            if self.wait >= self.patience and lr > self.min_lr:
                new_lr = max(lr * self.factor, self.min_lr)
                self.model.optimizer.lr = new_lr
                if self.verbose:
                    _print(f"\nEpoch {epoch + 1}: ReduceLROnPlateau reducing learning rate "
                          f"to {new_lr}.")
                self.cooldown_counter = self.cooldown
                self.wait = 0


# ----------------------------------------------------------------- CSVLogger


class CSVLogger(Callback):
    """Keras' CSVLogger: one row per epoch to ``filename`` -- the columns ``epoch``
    (from 0) and the log keys, sorted, of the first epoch logged (a key missing later
    is written ``NA``); numbers as Python writes them (``repr``: they read back
    exactly). ``append=True`` appends to an existing file, without a new header when
    the file is not empty. The file is flushed after each epoch and closed at the
    end of training."""

    def __init__(self, filename, separator: str = ",", append: bool = False):
        if not isinstance(filename, (str, os.PathLike)) \
                or not isinstance(os.fspath(filename), str) or not os.fspath(filename):
            raise ValueError(f"CSVLogger: 'filename' must be a file path (str or "
                             f"os.PathLike), got {filename!r}")
        if not isinstance(separator, str) or len(separator) != 1:
            raise ValueError(f"CSVLogger: 'separator' must be one character, got "
                             f"{separator!r}")
        self.filename = os.fspath(filename)
        self.sep = separator
        self.append = bool(append)
        self.keys = None
        self.writer = None
        self.csv_file = None
        self.append_header = True

    def on_train_begin(self, logs=None):
        self.append_header = True
        if not _is_root():  # distributed: rank 0 writes the file
            return
        if self.append and os.path.exists(self.filename):
            with open(self.filename, newline="") as f:
                self.append_header = not f.readline()
        if self.csv_file is not None and not self.csv_file.closed:
            self.csv_file.close()
        self.csv_file = open(self.filename, "a" if self.append else "w", newline="")
        self.keys = None
        self.writer = None

    @staticmethod
    def _cell(value):
        if isinstance(value, str):
            return value
        if hasattr(value, "__iter__") and getattr(value, "ndim", 1) != 0:
            return "[" + ", ".join(map(str, value)) + "]"  # a 1-D array or list
        return value

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if not _is_root():
            return
        if self.csv_file is None or self.csv_file.closed:
            raise ValueError("CSVLogger: the file is not open (on_train_begin opens it)")
        if self.keys is None:
            self.keys = sorted(logs)
        if self.writer is None:
            self.writer = csv.DictWriter(self.csv_file, fieldnames=["epoch"] + self.keys,
                                         delimiter=self.sep)
            if self.append_header:
                self.writer.writeheader()
        row = {"epoch": epoch}
        row.update((k, self._cell(logs.get(k, "NA"))) for k in self.keys)
        self.writer.writerow(row)
        self.csv_file.flush()

    def on_train_end(self, logs=None):
        if self.csv_file is not None and not self.csv_file.closed:
            self.csv_file.close()
        self.writer = None
