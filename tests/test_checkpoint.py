"""Model files and resumable training: nothing half-written, nothing silently different.

- ``save`` writes a temporary next to the target, fsyncs it and renames it over the
  target: a write that fails half-way (a full disk) or a process killed at any moment
  leaves the previous file, which loads; the file gets the usual mode, not 0600.
- A compiled, untrained model round-trips and trains as the original would.
- ``BackupAndRestore``: a training process killed mid-run (SIGKILL) and started again
  ends bit for bit as an uninterrupted run (subprocesses); bad arguments, another
  model's backup, keeping the backup, failing backup writes.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest

import fastmlp as fm
from fastmlp.callbacks import BackupAndRestore, Callback, EarlyStopping, ModelCheckpoint

posix_only = pytest.mark.skipif(os.name != "posix", reason="SIGKILL and file modes: POSIX")


def blobs(n=400, features=20, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (classes, features))
    y = rng.integers(0, classes, n)
    return (centers[y] + rng.normal(0, 1, (n, features))).astype(np.float32), y


def make_model(opt=None, units=16, seed=0):
    fm.set_seed(seed)
    model = fm.Sequential([fm.Dense(units, activation="relu", input_dim=20),
                           fm.Dense(4, activation="softmax")])
    model.compile(opt if opt is not None else fm.optim.Adam(lr=1e-2),
                  "sparse_categorical_crossentropy", ["accuracy"])
    return model


def fit(model, x, y, epochs, callbacks=(), device="cpu"):
    return model.fit(x, y, epochs=epochs, batch_size=32, validation_split=0.25, shuffle=True,
                     verbose=0, callbacks=list(callbacks), device=device)


def assert_same_training_state(a, b):
    """Weights, optimizer state and step count, lr, shuffling position: bit for bit."""
    wa, wb = a.get_weights(), b.get_weights()
    assert len(wa) == len(wb)
    for i in range(len(wa)):
        np.testing.assert_array_equal(wa[i], wb[i], err_msg=f"weight {i}")
    sa, sb = a.optimizer.state_arrays(a.params()), b.optimizer.state_arrays(b.params())
    assert sorted(sa) == sorted(sb)
    for key in sa:
        np.testing.assert_array_equal(host(sa[key]), host(sb[key]),
                                      err_msg=f"optimizer state {key}")
    assert (a.optimizer.iterations, a.optimizer.lr) == (b.optimizer.iterations, b.optimizer.lr)
    assert (a._shuffle_seed, a._shuffle_count) == (b._shuffle_seed, b._shuffle_count)


def host(a):
    return a.get() if hasattr(a, "get") else a  # CuPy -> NumPy


def temporaries(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".fastmlp-"))


def child_env():
    """The environment for a child Python: this fastmlp first on its path."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(fm.__file__)))
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=here + (os.pathsep + path if path else ""))


# ------------------------------------------------------------------- untrained models


@pytest.mark.parametrize("opt", [lambda: fm.optim.Adam(lr=1e-2),
                                 lambda: fm.optim.SGD(lr=0.1, momentum=0.9)],
                         ids=["adam", "sgd-momentum"])
def test_compiled_untrained_model_round_trips_and_trains_the_same(tmp_path, opt):
    """The optimizer state is built on the first step; saved before it, the file holds
    its zeros, loads, and the loaded model trains exactly as the original."""
    x, y = blobs()
    model = make_model(opt())
    path = tmp_path / "m.safetensors"
    model.save(path)
    loaded = fm.load_model(path)
    assert loaded.optimizer.iterations == 0
    assert (loaded._shuffle_seed, loaded._shuffle_count) == (model._shuffle_seed, 0)
    start = model.get_weights()
    fit(model, x, y, 3)
    fit(loaded, x, y, 3)
    assert not np.array_equal(model.get_weights()[0], start[0])  # it did train
    assert_same_training_state(loaded, model)


def test_untrained_file_without_optimizer_state_loads(tmp_path):
    """Files saved right after compile by earlier releases have no state tensors: at
    step 0 the state is zeros, so they load; at a later step missing state is an error."""
    import safetensors.numpy as stn
    from safetensors import safe_open

    x, y = blobs()
    model = make_model()
    path = tmp_path / "m.safetensors"
    model.save(path)
    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads(f.metadata()["fastmlp"])
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("optimizer.")}
    stn.save_file(tensors, str(path), metadata={"fastmlp": json.dumps(meta)})
    loaded = fm.load_model(path)
    fit(model, x, y, 2)
    fit(loaded, x, y, 2)
    assert_same_training_state(loaded, model)

    meta["optimizer_iterations"] = 5
    stn.save_file(tensors, str(path), metadata={"fastmlp": json.dumps(meta)})
    with pytest.raises(ValueError, match=r"m.safetensors: optimizer state '0.exp_avg' is missing"):
        fm.load_model(path)


# ------------------------------------------------------------------- atomic writes


def half_a_write_then_disk_full(monkeypatch):
    """Make os.write write half of what it is given, then fail as on a full disk."""
    real = os.write

    def write(fd, data):
        real(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    x, y = blobs()
    model = make_model()
    fit(model, x, y, 1)
    path = tmp_path / "m.safetensors"
    model.save(path)
    before = path.read_bytes()
    fit(model, x, y, 1)

    with monkeypatch.context() as m:
        half_a_write_then_disk_full(m)
        with pytest.raises(OSError) as info:
            model.save(path)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert fm.load_model(path).optimizer.iterations == 10  # the first epoch's 10 steps
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]

    # no previous file: none appears
    with monkeypatch.context() as m:
        half_a_write_then_disk_full(m)
        with pytest.raises(OSError):
            model.save(tmp_path / "new.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]

    # ModelCheckpoint saves through model.save: the same guarantee
    class DiskFullAtEpoch1(Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                half_a_write_then_disk_full(monkeypatch)

    ck = tmp_path / "ck.safetensors"
    with pytest.raises(OSError):
        fit(model, x, y, 3, [DiskFullAtEpoch1(), ModelCheckpoint(ck)])
    monkeypatch.undo()
    assert fm.load_model(ck).optimizer.iterations == 30  # 20 steps before + epoch 0's 10
    assert temporaries(tmp_path) == []


def test_save_syncs_the_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    make_model().save(tmp_path / "m.safetensors")
    expected = ["fsync file", "rename"] + (["fsync folder"] if os.name == "posix" else [])
    assert events == expected


@posix_only
def test_saved_file_has_the_usual_mode(tmp_path):
    """Not mkstemp's 0600: a new file gets 0666 less the umask, as open() would give it;
    a replaced file keeps its mode."""
    model = make_model()
    path = tmp_path / "m.safetensors"
    old = os.umask(0o027)
    try:
        model.save(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    path.chmod(0o604)
    model.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o604


def test_save_into_a_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder.*nope"):
        make_model().save(tmp_path / "nope" / "m.safetensors")


SAVE_LOOP = """
import os, sys
import fastmlp as fm

path = sys.argv[1]
models = []
for seed in (0, 1):  # two different models of 3 MB files (weights and Adam state)
    fm.set_seed(seed)
    m = fm.Sequential([fm.Dense(512, activation="relu", input_dim=512), fm.Dense(10)])
    m.compile("adam", "sparse_categorical_crossentropy")
    m.save(f"{path}.{seed}")  # the references
    models.append(m)

real_write = os.write
saves, started = 0, False


def write(fd, data):
    # short writes of 64 KB (POSIX allows them; save loops), saying when a save's began
    global started
    n = real_write(fd, data[:1 << 16])
    if not started:
        started = True
        print("writing", saves, flush=True)
    return n


os.write = write
while True:
    models[saves % 2].save(path)
    saves, started = saves + 1, False
    print("saved", saves, flush=True)
"""


@posix_only
@pytest.mark.parametrize("moment", ["saved 3", "writing 4"])
def test_killed_while_saving_leaves_one_whole_model(tmp_path, moment):
    """A child saves two models alternately to one path; SIGKILLed when it reports
    ``moment`` -- a save returned (the kill lands as the next one starts), or a save
    wrote its first 64 KB (the kill lands in the middle of the file) -- it leaves a file
    that is exactly one of the two models. Its temporary may remain (documented)."""
    script = tmp_path / "save_loop.py"
    script.write_text(SAVE_LOOP)
    path = tmp_path / "m.safetensors"
    child = subprocess.Popen([sys.executable, str(script), str(path)], env=child_env(),
                             stdout=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:
            if line.strip() == moment:
                child.send_signal(signal.SIGKILL)
                break
    finally:
        child.kill()
        child.wait(timeout=60)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    refs = [(tmp_path / f"m.safetensors.{seed}").read_bytes() for seed in (0, 1)]
    assert refs[0] != refs[1]
    assert path.read_bytes() in refs
    fm.load_model(path)
    left = set(p.name for p in tmp_path.iterdir()) - {script.name, path.name,
                                                       "m.safetensors.0", "m.safetensors.1"}
    assert all(n.startswith(".fastmlp-") and n.endswith(".tmp") for n in left), left


# ------------------------------------------------------------------- BackupAndRestore


TRAIN = """
import json, os, signal, sys, threading, time
import numpy as np
import fastmlp as fm
from fastmlp.callbacks import BackupAndRestore, Callback

backup_dir, out = sys.argv[1], sys.argv[2]
kill_at, delay = int(sys.argv[3]), float(sys.argv[4])  # kill_at -1: no kill
EPOCHS = 6


class Killer(Callback):
    # SIGKILLs this process `delay` seconds after epoch kill_at begins, and holds the run
    # at the next epoch's begin until then: the kill always lands mid-run.
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == kill_at:
            def kill():
                time.sleep(delay)
                os.kill(os.getpid(), signal.SIGKILL)
            threading.Thread(target=kill, daemon=True).start()
        elif epoch > kill_at:
            threading.Event().wait()


class Decay(Callback):
    # changes lr cumulatively: the resumed run needs the backed-up lr
    def on_epoch_end(self, epoch, logs=None):
        self.model.optimizer.lr *= 0.7


rng = np.random.default_rng(0)
x = rng.normal(size=(2000, 20)).astype(np.float32)
y = rng.integers(0, 4, 2000)
fm.set_seed(0)
model = fm.Sequential([fm.Dense(32, activation="relu", input_dim=20),
                       fm.Dense(4, activation="softmax")])
model.compile(fm.optim.Adam(lr=1e-2), "sparse_categorical_crossentropy", ["accuracy"])
callbacks = ([Killer()] if kill_at >= 0 else []) + [Decay(), BackupAndRestore(backup_dir)]
history = model.fit(x, y, epochs=EPOCHS, batch_size=32, validation_split=0.2, shuffle=True,
                    verbose=0, callbacks=callbacks, device="cpu")
model.save(out)
with open(out + ".json", "w") as f:
    json.dump({"epoch": history.epoch, "val_loss": history.history["val_loss"]}, f)
"""


def read_file(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return json.loads(f.metadata()["fastmlp"]), {k: f.get_tensor(k) for k in f.keys()}


@posix_only
@pytest.mark.parametrize("delay", [0.001, 0.01])
def test_killed_training_resumes_bit_for_bit(tmp_path, delay):
    """A training process is SIGKILLed ``delay`` s after epoch 2 begins (here: 1 ms
    most often lands while epoch 2's backup is being written, 10 ms once it is written),
    then run again to the end: it ends bit for bit as an uninterrupted run."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    backup_dir = tmp_path / "backup"

    def run(backup, out, kill_at):
        return subprocess.run([sys.executable, str(script), str(backup), str(out),
                               str(kill_at), str(delay)], env=child_env(),
                              timeout=300).returncode

    assert run(backup_dir, tmp_path / "resumed.safetensors", kill_at=2) == -signal.SIGKILL
    meta, _ = read_file(backup_dir / BackupAndRestore.FILENAME)
    done = meta["backup"]["epochs_done"]
    assert 1 <= done < 6 and done in (2, 3)  # epoch 2 ran, or was under way
    assert meta["optimizer_iterations"] == done * 50  # 1600 training rows / 32

    assert run(backup_dir, tmp_path / "resumed.safetensors", kill_at=-1) == 0
    # deleted at the end, with its folder -- unless the kill left a temporary there
    assert not (backup_dir / BackupAndRestore.FILENAME).exists()
    assert not backup_dir.exists() or temporaries(backup_dir) == sorted(os.listdir(backup_dir))
    assert run(tmp_path / "backup2", tmp_path / "straight.safetensors", kill_at=-1) == 0

    resumed_meta, resumed = read_file(tmp_path / "resumed.safetensors")
    straight_meta, straight = read_file(tmp_path / "straight.safetensors")
    assert sorted(resumed) == sorted(straight)
    for key in straight:
        np.testing.assert_array_equal(resumed[key], straight[key], err_msg=key)
    assert resumed_meta == straight_meta  # step count, lr, shuffling position
    assert straight_meta["optimizer_iterations"] == 300
    logs = {n: json.loads((tmp_path / f"{n}.safetensors.json").read_text())
            for n in ("resumed", "straight")}
    assert logs["straight"]["epoch"] == [0, 1, 2, 3, 4, 5]
    assert logs["resumed"]["epoch"] == list(range(done, 6))  # History starts at the resume
    assert logs["resumed"]["val_loss"] == logs["straight"]["val_loss"][done:]


class Crash(Callback):
    """Raises at the begin of epoch ``at``: an interrupted run whose backup stays."""

    def __init__(self, at):
        self.at = at

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at:
            raise RuntimeError("crash")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_backup_restores_into_the_model_the_engine_runs_on(tmp_path, request, device):
    """Interrupted, then resumed by the same model object (its engine buffers bound):
    the backup overwrites whatever the model holds, and the run ends as an
    uninterrupted one."""
    if device == "cuda":
        request.getfixturevalue("gpu")  # skips without a usable GPU
    x, y = blobs()
    straight = make_model()
    fit(straight, x, y, 5, device=device)

    model = make_model()
    with pytest.raises(RuntimeError, match="crash"):
        fit(model, x, y, 5, [Crash(2), BackupAndRestore(tmp_path / "b")], device=device)
    # scramble everything the backup must restore, in place and by assignment
    model.set_weights([w + 1 for w in model.get_weights()])
    for s in model.optimizer.state:
        for arr in s.values():
            arr[...] = 7
    model.optimizer.iterations, model.optimizer.lr, model._shuffle_count = 999, 5.0, 42
    history = fit(model, x, y, 5, [BackupAndRestore(tmp_path / "b")], device=device)
    assert history.epoch == [2, 3, 4]
    assert_same_training_state(model, straight)
    assert not (tmp_path / "b").exists()


def test_backup_of_another_model_is_refused(tmp_path):
    x, y = blobs()
    folder = tmp_path / "b"
    with pytest.raises(RuntimeError):
        fit(make_model(), x, y, 3, [Crash(1), BackupAndRestore(folder)])
    backup = str(folder / BackupAndRestore.FILENAME)
    others = {"layers": make_model(units=8),
              "optimizer": make_model(fm.optim.SGD(lr=1e-2)),
              "optimizer settings": make_model(fm.optim.Adam(lr=1e-2, betas=(0.8, 0.999)))}
    for what, model in others.items():
        before = model.get_weights()
        with pytest.raises(ValueError, match="not a backup of this model") as info:
            fit(model, x, y, 3, [BackupAndRestore(folder)])
        assert backup in str(info.value), what
        for w, b in zip(model.get_weights(), before):  # untouched
            np.testing.assert_array_equal(w, b)
    # another lr is no mismatch: lr is training state (a callback may change it)
    model = make_model(fm.optim.Adam(lr=0.5))
    assert fit(model, x, y, 3, [BackupAndRestore(folder)]).epoch == [1, 2]
    assert model.optimizer.lr == 1e-2

    # a model file where a backup is expected
    folder.mkdir()
    make_model().save(backup)
    with pytest.raises(ValueError, match="a model file, not a backup"):
        fit(make_model(), x, y, 3, [BackupAndRestore(folder)])


def test_backup_and_restore_arguments():
    for bad in (123, None, b"dir", ["dir"]):
        with pytest.raises(TypeError, match="'backup_dir' must be a folder path"):
            BackupAndRestore(bad)
    with pytest.raises(ValueError, match="'backup_dir' is empty"):
        BackupAndRestore("")


def test_keeping_and_deleting_the_backup(tmp_path):
    x, y = blobs()
    folder = tmp_path / "b"
    model = make_model()
    fit(model, x, y, 2, [BackupAndRestore(folder, delete_checkpoint=False)])
    meta, _ = read_file(folder / BackupAndRestore.FILENAME)
    assert meta["backup"]["epochs_done"] == 2
    # the backup says the 2 epochs are done: nothing left to run
    weights = model.get_weights()
    history = fit(model, x, y, 2, [BackupAndRestore(folder)])
    assert history.epoch == []
    np.testing.assert_array_equal(model.get_weights()[0], weights[0])
    assert not folder.exists()

    # the folder keeps other files; a run stopped by EarlyStopping also ends cleanly
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    stop = EarlyStopping(monitor="loss", patience=0, min_delta=1e9)
    history = fit(make_model(), x, y, 5, [stop, BackupAndRestore(folder)])
    assert history.epoch == [0, 1]  # epoch 0 improves on inf; epoch 1 cannot
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_backup_is_written_atomically(tmp_path, monkeypatch):
    """The disk fills while epoch 1's backup is written: fit raises, and the backup of
    epoch 0 is intact, with no temporary beside it."""
    x, y = blobs()

    class DiskFullAtEpoch1(Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                half_a_write_then_disk_full(monkeypatch)

    with pytest.raises(OSError) as info:
        fit(make_model(), x, y, 4, [DiskFullAtEpoch1(), BackupAndRestore(tmp_path)])
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    meta, _ = read_file(tmp_path / BackupAndRestore.FILENAME)
    assert meta["backup"]["epochs_done"] == 1
    assert temporaries(tmp_path) == []


def test_backup_resumes_a_scheduled_clipped_regularized_run(tmp_path):
    """Issue 16's options in a backup: an RMSprop with a learning-rate schedule and
    clipping, a regularized layer; the resumed run ends as the uninterrupted one."""
    def model_():
        fm.set_seed(0)
        model = fm.Sequential([
            fm.Dense(16, activation="relu", input_dim=20,
                     kernel_regularizer=fm.regularizers.l2(1e-3)),
            fm.Dense(4, activation="softmax")])
        model.compile(fm.optim.RMSprop(lr=fm.optim.schedules.ExponentialDecay(1e-2, 10, 0.7),
                                       momentum=0.5, clipnorm=1.0),
                      fm.losses.SparseCategoricalCrossentropy(label_smoothing=0.1),
                      ["accuracy", "sparse_top_k_categorical_accuracy"])
        return model

    x, y = blobs()
    straight = model_()
    hs = fit(straight, x, y, 4)
    model = model_()
    with pytest.raises(RuntimeError, match="crash"):
        fit(model, x, y, 4, [Crash(2), BackupAndRestore(tmp_path / "b")])
    model = model_()  # a new process: a fresh model that finds the backup
    hr = fit(model, x, y, 4, [BackupAndRestore(tmp_path / "b")])
    assert hr.epoch == [2, 3]
    assert hr.history["loss"] == hs.history["loss"][2:]
    assert_same_training_state(model, straight)
    assert model.optimizer.lr_at(7) == straight.optimizer.lr_at(7)
