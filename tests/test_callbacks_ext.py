"""LearningRateScheduler, ReduceLROnPlateau and CSVLogger: Keras' semantics, with a
real small model and, for ReduceLROnPlateau's state machine, logs fed by hand (the
expected learning rates worked out step by step from Keras' algorithm in comments)."""
import csv
import types

import numpy as np
import pytest

import fastmlp as fm
from fastmlp import schedules
from fastmlp.callbacks import CSVLogger, LearningRateScheduler, ReduceLROnPlateau


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=n).astype(np.int32)
    return x, y


def _model(seed=0):
    fm.set_seed(seed)
    model = fm.Sequential([fm.Dense(8, activation="relu", input_dim=4), fm.Dense(3)])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    return model


def _fake(lr):
    """A stand-in model: only what the callbacks touch (optimizer.lr)."""
    return types.SimpleNamespace(optimizer=types.SimpleNamespace(lr=lr))


class _Record(fm.callbacks.Callback):
    """Keeps a copy of every epoch's logs and the lr the epoch trained with."""

    def __init__(self):
        self.logs, self.lrs = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.lrs.append(self.model.optimizer.lr)

    def on_epoch_end(self, epoch, logs=None):
        self.logs.append(dict(logs))


# ----------------------------------------------------------------- LearningRateScheduler


def test_scheduler_sets_lr_each_epoch_and_logs_it():
    x, y = _data()
    model, rec = _model(), _Record()
    seen = []

    def schedule(epoch, lr):
        seen.append((epoch, lr))
        return 0.1 / (epoch + 1)

    model.fit(x, y, epochs=3, batch_size=16, verbose=0,
              callbacks=[LearningRateScheduler(schedule), rec])
    # each call gets the epoch and the rate then current (the previous epoch's)
    assert seen == [(0, 1e-3), (1, 0.1), (2, 0.05)]
    assert rec.lrs == [0.1, 0.05, 0.1 / 3]
    assert [lg["learning_rate"] for lg in rec.logs] == [0.1, 0.05, 0.1 / 3]
    assert model.optimizer.lr == 0.1 / 3


def _device(backend):
    return "cuda" if backend.is_gpu else "cpu"


def test_scheduler_trains_with_the_scheduled_rates(backend):
    """The same run as setting opt.lr by hand between one-epoch fits (on each engine:
    the CUDA one replays a graph)."""
    x, y = _data()
    kw = dict(batch_size=16, verbose=0, device=_device(backend))
    a = _model()
    a.fit(x, y, epochs=2, callbacks=[LearningRateScheduler(lambda epoch: [0.5, 0.05][epoch])],
          **kw)
    b = _model()
    b.optimizer.lr = 0.5
    b.fit(x, y, epochs=1, **kw)
    b.optimizer.lr = 0.05
    b.fit(x, y, epochs=1, **kw)
    c = _model()  # and not the same as a constant rate
    c.optimizer.lr = 0.5
    c.fit(x, y, epochs=2, **kw)
    for wa, wb, wc in zip(a.get_weights(), b.get_weights(), c.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    assert any(not np.array_equal(wa, wc) for wa, wc in zip(a.get_weights(), c.get_weights()))


def test_scheduler_one_argument_and_schedule_objects():
    m = _fake(0.2)
    cb = LearningRateScheduler(lambda epoch: 0.01 * (epoch + 1))
    cb.set_model(m)
    cb.on_epoch_begin(4)
    assert m.optimizer.lr == pytest.approx(0.05, rel=1e-15)
    # a step schedule, called with the epoch (it takes one argument)
    cb = LearningRateScheduler(schedules.ExponentialDecay(1.0, 1, 0.5))
    cb.set_model(m)
    cb.on_epoch_begin(3)
    assert m.optimizer.lr == 0.125
    cb = LearningRateScheduler(lambda epoch, lr: np.float32(0.5) * lr)  # NumPy scalars
    cb.set_model(m)
    cb.on_epoch_begin(0)
    assert m.optimizer.lr == 0.0625 and type(m.optimizer.lr) is float


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1, "0.1", None])
def test_scheduler_rejects_bad_rates(bad):
    m = _fake(0.2)
    cb = LearningRateScheduler(lambda epoch, lr: bad)
    cb.set_model(m)
    with pytest.raises(ValueError, match="learning rate must be a finite number >= 0"):
        cb.on_epoch_begin(0)
    assert m.optimizer.lr == 0.2


def test_scheduler_errors():
    with pytest.raises(TypeError, match="'schedule' must be callable"):
        LearningRateScheduler(0.1)
    cb = LearningRateScheduler(lambda epoch, lr: lr)
    cb.set_model(_fake(schedules.CosineDecay(0.1, 10)))
    with pytest.raises(TypeError, match="a schedule"):
        cb.on_epoch_begin(0)


# ----------------------------------------------------------------- ReduceLROnPlateau


def _drive(cb, model, values, monitor="val_loss"):
    """Feed one epoch's logs per value; the logged learning rate of each epoch."""
    cb.set_model(model)
    cb.on_train_begin()
    logged = []
    for epoch, v in enumerate(values):
        logs = {monitor: v}
        cb.on_epoch_end(epoch, logs)
        logged.append(logs["learning_rate"])
    return logged


def test_plateau_patience():
    m = _fake(1.0)
    cb = ReduceLROnPlateau(factor=0.5, patience=2, min_delta=0.0)
    logged = _drive(cb, m, [1.0, 1.0, 1.0, 0.5, 0.6, 0.7, 0.8, 0.9])
    # e0 best=1.0 | e1 wait 1 | e2 wait 2 -> lr 0.5 | e3 best=0.5 | e4 wait 1
    # e5 wait 2 -> 0.25 | e6 wait 1 | e7 wait 2 -> 0.125 (logs: the rate before)
    assert logged == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]
    assert m.optimizer.lr == 0.125 and cb.wait == 0


def test_plateau_cooldown_min_lr_and_min_delta():
    m = _fake(0.1)
    cb = ReduceLROnPlateau(factor=0.1, patience=1, min_delta=0.05, cooldown=2, min_lr=0.005)
    logged = _drive(cb, m, [1.0, 0.97, 0.9, 0.9, 0.9, 0.9, 0.9])
    r1 = 0.1 * 0.1
    # e0 best=1.0
    # e1 0.97 is not < 1.0 - 0.05: wait 1 -> lr 0.1*0.1, cooldown 2
    # e2 cooldown -> 1; 0.9 < 0.95: best 0.9
    # e3 cooldown -> 0; 0.9 not < 0.85, out of cooldown: wait 1 -> max(r1*0.1, 0.005)
    # e4 cooldown -> 1, no count | e5 cooldown -> 0: wait 1, lr = min_lr: no change
    # e6 wait 2, still at min_lr
    assert logged == [0.1, 0.1, r1, r1, 0.005, 0.005, 0.005]
    assert m.optimizer.lr == 0.005
    assert (cb.wait, cb.cooldown_counter, cb.best) == (2, 0, 0.9)


def test_plateau_max_mode_for_accuracy():
    m = _fake(0.4)
    cb = ReduceLROnPlateau(monitor="val_accuracy", factor=0.5, patience=2, min_delta=0.0)
    assert cb.mode == "max"
    logged = _drive(cb, m, [0.5, 0.6, 0.6, 0.55, 0.7], monitor="val_accuracy")
    # e0 best .5 | e1 best .6 | e2 wait 1 | e3 wait 2 -> 0.2 | e4 best .7
    assert logged == [0.4, 0.4, 0.4, 0.4, 0.2]
    assert m.optimizer.lr == 0.2


def test_plateau_train_begin_resets():
    m = _fake(1.0)
    cb = ReduceLROnPlateau(monitor="loss", factor=0.5, patience=3)
    _drive(cb, m, [1.0, 2.0], monitor="loss")
    assert cb.wait == 1
    cb.on_train_begin()
    assert (cb.wait, cb.cooldown_counter, cb.best) == (0, 0, float("inf"))


def test_plateau_errors():
    with pytest.raises(ValueError, match="'factor' must be in"):
        ReduceLROnPlateau(factor=1.0)
    with pytest.raises(ValueError, match="'factor' must be in"):
        ReduceLROnPlateau(factor=2)
    with pytest.raises(ValueError, match="'patience'"):
        ReduceLROnPlateau(patience=-1)
    with pytest.raises(ValueError, match="'min_lr'"):
        ReduceLROnPlateau(min_lr=-1e-3)
    with pytest.raises(ValueError, match="mode must be"):
        ReduceLROnPlateau(mode="up")
    cb = ReduceLROnPlateau()
    cb.set_model(_fake(schedules.ExponentialDecay(0.1, 10, 0.9)))
    with pytest.raises(TypeError, match="schedule"):
        cb.on_train_begin()
    with pytest.raises(TypeError, match="schedule"):
        cb.on_epoch_end(0, {"val_loss": 1.0})
    cb = ReduceLROnPlateau()
    cb.set_model(_fake(0.1))
    with pytest.raises(ValueError, match="'val_loss' is not in the logs"):
        cb.on_epoch_end(0, {"loss": 1.0})


def test_plateau_in_fit_with_csv_log(tmp_path, backend):
    """min_delta larger than any change: only epoch 0 improves, then with patience 1
    every epoch halves the rate. The CSVLogger after it logs the rate of each epoch."""
    x, y = _data()
    model, rec = _model(), _Record()
    path = tmp_path / "log.csv"
    cb = ReduceLROnPlateau(monitor="loss", factor=0.5, patience=1, min_delta=100.0)
    model.fit(x, y, epochs=4, batch_size=16, verbose=0, device=_device(backend),
              callbacks=[cb, CSVLogger(path), rec])
    lr0 = 1e-3
    assert rec.lrs == [lr0, lr0, lr0 / 2, lr0 / 4]
    assert model.optimizer.lr == lr0 / 8
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["learning_rate"]) for r in rows] == [lr0, lr0, lr0 / 2, lr0 / 4]


# ----------------------------------------------------------------- CSVLogger


def _read(path, sep=","):
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter=sep))


def test_csv_logger_contents(tmp_path):
    x, y = _data()
    xv, yv = _data(32, seed=1)
    model = _model()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    path = tmp_path / "log.csv"
    logger = CSVLogger(path)
    hist = model.fit(x, y, epochs=3, batch_size=16, verbose=0, validation_data=(xv, yv),
                     callbacks=[logger])
    rows = _read(path)
    keys = sorted(hist.history)
    assert "val_loss" in keys and "accuracy" in keys
    assert rows[0] == ["epoch"] + keys
    assert len(rows) == 4
    for i, row in enumerate(rows[1:]):
        assert int(row[0]) == i
        # written with repr's precision: every float reads back exactly
        assert [float(c) for c in row[1:]] == [hist.history[k][i] for k in keys]
    assert logger.csv_file.closed
    with open(path, "rb") as f:
        assert f.read().count(b"\r\n") == 4  # the csv module's (excel) line ends, as Keras


def test_csv_logger_append_and_overwrite(tmp_path):
    x, y = _data()
    model = _model()
    path = tmp_path / "log.csv"
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[CSVLogger(path)])
    model.fit(x, y, epochs=3, batch_size=16, verbose=0,
              callbacks=[CSVLogger(path, append=True)])
    rows = _read(path)
    assert rows[0][0] == "epoch" and sum(r[0] == "epoch" for r in rows) == 1
    assert [r[0] for r in rows[1:]] == ["0", "1", "0", "1", "2"]
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[CSVLogger(path)])
    rows = _read(path)  # append=False: a new file
    assert len(rows) == 2 and rows[0][0] == "epoch" and rows[1][0] == "0"
    # appending to an empty file writes the header
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0,
              callbacks=[CSVLogger(empty, append=True)])
    rows = _read(empty)
    assert rows[0][0] == "epoch" and len(rows) == 2


def test_csv_logger_separator_and_flush(tmp_path):
    x, y = _data()
    path = tmp_path / "log.tsv"
    counts = []

    class LinesSoFar(fm.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            counts.append(len(_read(path, "\t")))  # flushed: readable mid-training

    _model().fit(x, y, epochs=3, batch_size=16, verbose=0,
                 callbacks=[CSVLogger(path, separator="\t"), LinesSoFar()])
    assert counts == [2, 3, 4]
    rows = _read(path, "\t")
    assert rows[0][:2] == ["epoch", "loss"] and all(len(r) == len(rows[0]) for r in rows)


def test_csv_logger_missing_keys_and_values(tmp_path):
    path = tmp_path / "log.csv"
    logger = CSVLogger(path, separator=";")
    logger.on_train_begin()
    logger.on_epoch_end(0, {"b": 0.1, "a": "x;y", "v": np.array([1.5, 2.0])})
    logger.on_epoch_end(1, {"a": 2, "c": 3.0})  # b missing: NA; c not a column
    logger.on_train_end()
    assert _read(path, ";") == [["epoch", "a", "b", "v"], ["0", "x;y", "0.1", "[1.5, 2.0]"],
                                ["1", "2", "NA", "NA"]]


def test_csv_logger_errors(tmp_path):
    with pytest.raises(ValueError, match="'separator' must be one character"):
        CSVLogger(tmp_path / "a.csv", separator=", ")
    with pytest.raises(ValueError, match="'filename'"):
        CSVLogger(3)
