"""Callbacks for ``Model.fit``: History, EarlyStopping, ModelCheckpoint, BackupAndRestore.

A callback sees the model (``self.model``) and the epoch logs -- a dict such as
``{"loss": 0.41, "accuracy": 0.85, "val_loss": 0.45, "val_accuracy": 0.84}``.
Setting ``model.stop_training = True`` ends ``fit`` after the current epoch.
There are no per-batch hooks: they would force a device-to-host copy every step.
"""
from __future__ import annotations

import math
import os

__all__ = ["Callback", "History", "EarlyStopping", "ModelCheckpoint", "BackupAndRestore"]


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
            print(f"EarlyStopping: stopped after epoch {self.stopped_epoch + 1}; best "
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

        os.makedirs(self.backup_dir, exist_ok=True)
        save_backup(self.model, self.path, epoch + 1)

    def on_train_end(self, logs=None):
        if not self.delete_checkpoint:
            return
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        try:
            os.rmdir(self.backup_dir)  # only when empty: the folder may hold other files
        except OSError:
            pass
