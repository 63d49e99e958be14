"""Model files: nothing half-written, nothing silently different.

- ``save`` writes a temporary next to the target, fsyncs it and renames it over the
  target: a write that fails half-way (a full disk) or a process killed at any moment
  leaves the previous file, which loads; the file gets the usual mode, not 0600.
- A compiled, untrained model round-trips and trains as the original would.
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
from fastmlp.callbacks import Callback, ModelCheckpoint

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
