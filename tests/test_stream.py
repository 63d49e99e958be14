"""Data larger than memory: read_idx(mmap=True), fit / evaluate / predict of memmaps,
and fit on a dataset of batches (the prefetch thread). The streamed paths run one
engine pass per batch and add the sums on the host, so they must give the in-memory
results bit for bit when they see the same batches."""
from __future__ import annotations

import gzip
import shutil
import struct
import threading

import numpy as np
import pytest

import fastmlp as fm
from fastmlp.datasets import read_idx

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FEATURES, CLASSES = 12, 4


def idx_bytes(arr: np.ndarray, code: int) -> bytes:
    """An IDX file's bytes, written independently of read_idx (struct, big-endian)."""
    big = {0x08: ">u1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(big).tobytes()


def device_of(backend) -> str:
    return "cuda" if backend.is_gpu else "cpu"


def mlp(dropout=False, metrics=("accuracy",), input_dim=FEATURES, optimizer=None):
    fm.set_seed(7)
    layers = [fm.Dense(16, activation="relu", input_dim=input_dim)]
    if dropout:
        layers.append(fm.Dropout(0.25))
    layers.append(fm.Dense(CLASSES))
    model = fm.Sequential(layers)
    model.compile(optimizer=optimizer or fm.optim.Adam(lr=3e-3),
                  loss="sparse_categorical_crossentropy", metrics=list(metrics))
    return model


def auc_model():
    """A model with the 'auc' metric (one-hot targets)."""
    fm.set_seed(7)
    model = fm.Sequential([fm.Dense(CLASSES, input_dim=FEATURES)])
    model.compile("adam", "categorical_crossentropy", metrics=["auc"])
    return model


def one_hot(y):
    return np.eye(CLASSES, dtype=np.float32)[y]


def data(rng, n=150, dtype=np.uint8):
    x = rng.integers(0, 256, (n, FEATURES)).astype(dtype)
    y = rng.integers(0, CLASSES, n).astype(np.int64)
    return x, y


def as_memmap(tmp_path, arr, name="x.npy"):
    np.save(tmp_path / name, arr)
    mm = np.load(tmp_path / name, mmap_mode="r")
    assert isinstance(mm, np.memmap)
    return mm


def scaled(x):
    return x.astype(np.float32) / np.float32(255.0)


def batches(x, y, b):
    return [(x[i:i + b], y[i:i + b]) for i in range(0, len(x), b)]


def same_weights(a, b):
    wa, wb = a.get_weights(), b.get_weights()
    assert len(wa) == len(wb)
    for p, q in zip(wa, wb):
        np.testing.assert_array_equal(p, q)


def same_history(ha, hb):
    keys = [k for k in ha.history if k != "time"]
    assert keys == [k for k in hb.history if k != "time"]
    for k in keys:
        assert ha.history[k] == hb.history[k], k  # exact: the same sums in the same order


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "fastmlp-prefetch" and t.is_alive()]


# ----------------------------------------------------------------------------- read_idx


@pytest.fixture(scope="module")
def raw_fashion(tmp_path_factory):
    """The Fashion-MNIST test images and labels, decompressed (as `gunzip -k` would)."""
    out = tmp_path_factory.mktemp("fashion")
    paths = []
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(f"{FASHION_DIR}/{stem}.gz", "rb") as src, open(out / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
        paths.append(out / stem)
    return paths


def test_read_idx_mmap_equals_the_reader_on_fashion_mnist(raw_fashion):
    for path in raw_fashion:
        mm = read_idx(path, mmap=True)
        assert isinstance(mm, np.memmap) and mm.mode == "r" and not mm.flags.writeable
        ref = read_idx(path)
        assert mm.dtype == ref.dtype and mm.shape == ref.shape
        np.testing.assert_array_equal(mm, ref)
        # the default still reads the .gz (bit-identical to the decompressed file's array)
        np.testing.assert_array_equal(read_idx(f"{FASHION_DIR}/{path.name}.gz"), ref)


@pytest.mark.parametrize("code,dtype", [(0x08, np.uint8), (0x0B, np.int16), (0x0C, np.int32),
                                        (0x0D, np.float32), (0x0E, np.float64)])
def test_read_idx_mmap_keeps_the_files_byte_order(tmp_path, code, dtype):
    arr = (np.random.default_rng(code).standard_normal((3, 5, 2)) * 50).astype(dtype)
    path = tmp_path / "a.idx"
    path.write_bytes(idx_bytes(arr, code))
    mm = read_idx(path, mmap=True)
    assert mm.dtype == np.dtype(dtype).newbyteorder(">") or mm.dtype.itemsize == 1
    np.testing.assert_array_equal(mm, arr)
    np.testing.assert_array_equal(mm, read_idx(path))


GOOD = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), 0x08)


@pytest.mark.parametrize("content,message", [
    (GOOD[:-1], "truncated: shape (2, 3, 4) of uint8 needs 40 bytes, the file has 39"),
    (GOOD + b"\x00", "has trailing bytes: shape (2, 3, 4) of uint8 needs 40 bytes, the file "
                     "has 41"),
    (GOOD[:10], "truncated IDX header"),
    (b"\x00\x01\x08\x03" + GOOD[4:], "magic number 00010803"),
    (gzip.compress(GOOD), "cannot be memory-mapped; decompress it first (e.g. gunzip -k"),
])
def test_read_idx_mmap_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        read_idx(path, mmap=True)
    assert str(path) in str(info.value) and message in str(info.value)


def test_read_idx_mmap_of_no_data_is_an_empty_read_only_array(tmp_path):
    path = tmp_path / "e.idx"
    path.write_bytes(idx_bytes(np.zeros((0, 28, 28), np.uint8), 0x08))
    got = read_idx(path, mmap=True)
    assert got.shape == (0, 28, 28) and got.dtype == np.uint8 and not got.flags.writeable


# ----------------------------------------------------------------------------- memmaps


def test_uint8_memmap_fit_equals_in_memory(backend, tmp_path, rng):
    """Batches gathered on the host from a uint8 memmap (shuffled, the last batch
    smaller, validation_split held out of the memmap) = the in-memory fit of the array."""
    x, y = data(rng)
    mm = as_memmap(tmp_path, x)
    kw = dict(epochs=3, batch_size=32, shuffle=True, validation_split=0.2, verbose=0,
              device=device_of(backend))
    a, b = mlp(), mlp()
    ha = a.fit(x, y, **kw)
    hb = b.fit(mm, y, **kw)
    same_history(ha, hb)
    same_weights(a, b)
    assert a._shuffle_count == b._shuffle_count == 3
    assert hb.params["steps"] == ha.params["steps"] == 4


def test_float32_memmap_is_read_in_place_and_equals_in_memory(tmp_path, rng):
    x, y = data(rng)
    x = scaled(x)
    mm = as_memmap(tmp_path, x)
    kw = dict(epochs=2, batch_size=32, verbose=0, device="cpu", validation_data=(x, y))
    a, b = mlp(), mlp()
    same_history(a.fit(x, y, **kw), b.fit(mm, y, **kw))
    same_weights(a, b)


def test_memmap_is_not_scanned_for_nan_up_front(tmp_path, rng):
    """check_finite scans arrays before training, never a memmap (that reads the whole
    file): a NaN in a memmap read in place shows as a non-finite loss."""
    x, y = data(rng)
    x = scaled(x)
    x[100, 3] = np.nan
    with pytest.raises(ValueError, match="holds nan at row 100, column 3"):
        mlp().fit(x, y, epochs=1, verbose=0, device="cpu")
    with pytest.raises(FloatingPointError, match="the loss became nan"):
        mlp().fit(as_memmap(tmp_path, x), y, epochs=1, shuffle=False, verbose=0, device="cpu")
    # gathered batches (a float64 memmap) are checked one by one
    with pytest.raises(ValueError, match="'x of batch 4' holds nan"):
        mlp().fit(as_memmap(tmp_path, x.astype(np.float64), "x64.npy"), y, epochs=1,
                  shuffle=False, verbose=0, device="cpu")


def test_evaluate_and_predict_of_a_uint8_memmap_equal_in_memory(backend, tmp_path, rng):
    x, y = data(rng, n=300)
    mm = as_memmap(tmp_path, x)
    model = mlp(metrics=("accuracy", "sparse_top_k_categorical_accuracy"))
    model.fit(x, y, epochs=1, verbose=0, device=device_of(backend))
    for batch in (4, 64, 1000):  # 4: two chunks of 64 batches; 1000: one short batch
        assert model.evaluate(mm, y, batch_size=batch) == model.evaluate(x, y, batch_size=batch)
        got = model.predict(mm, batch_size=batch)
        assert isinstance(got, np.ndarray) and not isinstance(got, np.memmap)
        np.testing.assert_array_equal(got, backend.host(model.predict(x, batch_size=batch)))


def test_memmap_fit_refuses_what_needs_the_whole_set(tmp_path, rng):
    x, y = data(rng)
    mm = as_memmap(tmp_path, x)
    with pytest.raises(ValueError, match="sample_weight does not apply to a memory-mapped x"):
        mlp().fit(mm, y, sample_weight=np.ones(len(x)), verbose=0, device="cpu")
    with pytest.raises(ValueError, match="class_weight does not apply"):
        mlp().fit(mm, y, class_weight={0: 2.0}, verbose=0, device="cpu")
    with pytest.raises(ValueError, match="'auc' metric is not available"):
        auc_model().fit(mm, one_hot(y), verbose=0, device="cpu")


# ----------------------------------------------------------------------------- datasets


def test_generator_fit_equals_in_memory_unshuffled(backend, rng):
    """A generator of the in-memory fit's consecutive batches (the last one smaller),
    with validation data and dropout: the same History and weights, bit for bit."""
    x, y = data(rng)
    xv, yv = data(rng, n=40)
    kw = dict(verbose=0, device=device_of(backend), validation_data=(scaled(xv), yv))
    a, b = mlp(dropout=True), mlp(dropout=True)
    ha = a.fit(x, y, epochs=1, batch_size=32, shuffle=False, **kw)
    hb = b.fit((xy for xy in batches(x, y, 32)), epochs=1, **kw)  # uint8 batches: converted
    same_history(ha, hb)
    same_weights(a, b)
    assert hb.params["steps"] == 5 and hb.params["samples"] == len(x)
    assert b.optimizer.iterations == a.optimizer.iterations == 5


def test_list_dataset_iterates_afresh_each_epoch(rng):
    x, y = data(rng)
    xf = scaled(x)
    a, b = mlp(), mlp()
    ha = a.fit(xf, y, epochs=3, batch_size=25, shuffle=False, verbose=0, device="cpu")
    hb = b.fit(batches(xf, y, 25), epochs=3, verbose=0, device="cpu")
    same_history(ha, hb)
    same_weights(a, b)


def test_steps_per_epoch_takes_consecutive_batches_of_one_iterator(rng):
    """2 epochs of 3 steps over one generator = an in-memory fit over its first 3
    batches, then one over the next 3 (the optimizer carries on)."""
    x, y = data(rng, n=6 * 20)
    xf = scaled(x)
    a, b = mlp(), mlp()
    h1 = a.fit(xf[:60], y[:60], epochs=1, batch_size=20, shuffle=False, verbose=0, device="cpu")
    h2 = a.fit(xf[60:], y[60:], epochs=1, batch_size=20, shuffle=False, verbose=0, device="cpu")
    hb = b.fit(iter(batches(xf, y, 20)), epochs=2, steps_per_epoch=3, verbose=0, device="cpu")
    assert hb.history["loss"] == h1.history["loss"] + h2.history["loss"]
    assert hb.history["accuracy"] == h1.history["accuracy"] + h2.history["accuracy"]
    same_weights(a, b)


def test_steps_per_epoch_stops_the_thread_on_an_endless_generator(rng):
    x, y = data(rng, n=32)
    xf = scaled(x)
    pulled = []

    def endless():
        while True:
            pulled.append(1)
            yield xf, y

    h = mlp().fit(endless(), epochs=2, steps_per_epoch=4, verbose=0, device="cpu")
    assert len(h.history["loss"]) == 2
    assert len(pulled) == 8  # exactly the batches the epochs took
    assert not prefetch_threads()


def test_an_exception_while_reading_is_raised_by_fit(rng):
    x, y = data(rng)
    xf = scaled(x)
    boom = ValueError("boom")

    def gen():
        for i, xy in enumerate(batches(xf, y, 16)):
            if i == 3:
                raise boom
            yield xy

    model = mlp()
    with pytest.raises(ValueError, match="boom") as info:
        model.fit(gen(), epochs=1, verbose=0, device="cpu")
    assert info.value is boom
    assert model.optimizer.iterations == 3  # the batches before it were trained on
    assert not prefetch_threads()


def test_a_model_without_input_dim_is_built_by_the_first_batch(rng):
    x, y = data(rng)
    xf = scaled(x)
    model = fm.Sequential([fm.Dense(8, activation="relu"), fm.Dense(CLASSES)])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    h = model.fit(batches(xf, y, 30), epochs=2, validation_data=(xf[:20], y[:20]), verbose=0,
                  device="cpu")
    assert model.input_dim == FEATURES
    assert len(h.history["val_loss"]) == 2 and h.params["batch_size"] == 30


@pytest.mark.parametrize("make,kw,exc,match", [
    (lambda xf, y: [(xf[:16], y[:16]), (xf[:32], y[:32])], {}, ValueError,
     r"batch 2 of the dataset has 32 rows, more than batch_size=16"),
    (lambda xf, y: [(xf[:16], y[:16]), (xf[:40], y[:40])], {"batch_size": 32}, ValueError,
     r"batch 2 of the dataset has 40 rows, more than batch_size=32"),
    (lambda xf, y: [(xf[:8], y[:8]), xf[:8]], {}, ValueError,
     r"batch 2 of the dataset must be a tuple \(x, y\), got ndarray"),
    (lambda xf, y: [(xf[:8], y[:8]), (xf[:8], y[:8], y[:8])], {}, ValueError,
     r"batch 2 of the dataset must be a tuple \(x, y\), got tuple of 3 items"),
    (lambda xf, y: [(xf[:8], y[:8]), (xf[:8, :5], y[:8])], {}, ValueError,
     r"'x of batch 2' has 5 features per sample, the model takes 12"),
    (lambda xf, y: [(xf[:8], y[:8]), (xf[:8], y[:7])], {}, ValueError,
     r"batch 2 of the dataset has 8 rows in x but 7 in y"),
    (lambda xf, y: [(xf[:8], y[:8]), (xf[:8], np.full(8, CLASSES))], {}, ValueError,
     r"label \d+ in row 0 of 'y of batch 2' is outside \[0, 4\)"),
    (lambda xf, y: [(xf[:8], y[:8]), (np.full((8, FEATURES), np.inf, np.float32), y[:8])],
     {}, ValueError, r"'x of batch 2' holds inf at row 0, column 0"),
    (lambda xf, y: [(xf[:8], y[:8]), (np.full((8, FEATURES), np.nan, np.float32), y[:8])],
     {"check_finite": False}, FloatingPointError, r"the loss became nan .* at step 2"),
    (lambda xf, y: (b for b in [(xf[:8], y[:8])]), {"epochs": 2}, ValueError,
     r"the dataset gave no batch in epoch 2; .* pass a dataset that can be iterated again"),
    (lambda xf, y: iter(batches(xf[:40], y[:40], 8)), {"epochs": 2, "steps_per_epoch": 3},
     ValueError, r"the dataset ran out in epoch 2: it gave 2 of the 3 batches"),
    (lambda xf, y: [], {}, ValueError, r"the dataset gave no batch"),
])
def test_bad_datasets_are_named(rng, make, kw, exc, match):
    x, y = data(rng)
    kw = {"verbose": 0, "device": "cpu", **kw}
    with pytest.raises(exc, match=match):
        mlp().fit(make(scaled(x), y), **kw)
    assert not prefetch_threads()


@pytest.mark.parametrize("kw,match", [
    ({"validation_split": 0.1}, "validation_split .*does not apply to a dataset"),
    ({"shuffle": True}, "shuffle .*does not apply to a dataset"),
    ({"sample_weight": np.ones(8)}, "sample_weight does not apply to a dataset"),
    ({"class_weight": {0: 1.0}}, "class_weight does not apply to a dataset"),
    ({"steps_per_epoch": 0}, "'steps_per_epoch' must be an integer >= 1"),
])
def test_options_a_dataset_does_not_take(rng, kw, match):
    x, y = data(rng, n=8)
    with pytest.raises(ValueError, match=match):
        mlp().fit([(scaled(x), y)], verbose=0, device="cpu", **kw)


def test_dp_poisson_auc_and_missing_y_are_refused(rng):
    x, y = data(rng, n=8)
    ds = [(scaled(x), y)]
    dp = mlp(optimizer=fm.privacy.DPSGD(lr=0.1))
    with pytest.raises(ValueError, match="poisson_sampling does not apply to a dataset"):
        dp.fit(ds, poisson_sampling=True, verbose=0, device="cpu")
    with pytest.raises(ValueError, match="a DP optimizer .*does not apply to a dataset"):
        dp.fit(ds, verbose=0, device="cpu")
    with pytest.raises(ValueError, match="'auc' metric is not available when fit streams"):
        auc_model().fit([(scaled(x), one_hot(y))], verbose=0, device="cpu")
    with pytest.raises(ValueError, match="'y' is missing"):
        mlp().fit(scaled(x), verbose=0, device="cpu")
    with pytest.raises(ValueError, match="'steps_per_epoch' applies to a dataset"):
        mlp().fit(scaled(x), y, steps_per_epoch=2, verbose=0, device="cpu")


def test_callbacks_see_a_streamed_fit(rng):
    x, y = data(rng)
    xf = scaled(x)
    seen = []

    class Stop(fm.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((epoch, sorted(logs)))
            if epoch == 1:
                self.model.stop_training = True

    h = mlp().fit(batches(xf, y, 50), epochs=5, validation_data=(xf, y), callbacks=[Stop()],
                  verbose=2, device="cpu")
    assert [e for e, _ in seen] == [0, 1] and len(h.history["loss"]) == 2
    assert seen[0][1] == ["accuracy", "loss", "time", "val_accuracy", "val_loss"]


def test_fashion_mnist_memmap_fit_equals_in_memory(raw_fashion):
    """The real files: read_idx(mmap=True) images (uint8, gathered on the host) train and
    evaluate exactly as the images read into memory."""
    images, labels = raw_fashion
    mm = read_idx(images, mmap=True)
    mm = mm.reshape(len(mm), -1)[:2048]  # still a memmap: nothing read yet
    assert isinstance(mm, np.memmap)
    x, y = read_idx(images).reshape(10000, -1)[:2048], read_idx(labels)[:2048]
    models = []
    for data_x in (x, mm):
        fm.set_seed(3)
        model = fm.Sequential([fm.Dense(32, activation="relu", input_dim=784), fm.Dense(10)])
        model.compile(fm.optim.Adam(lr=1e-4), "sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        h = model.fit(data_x, y, epochs=2, batch_size=64, verbose=0, device="cpu")
        models.append((model, h, model.evaluate(data_x, y)))
    (a, ha, ea), (b, hb, eb) = models
    same_history(ha, hb)
    same_weights(a, b)
    assert ea == eb


def test_the_python_executor_streams_alike(monkeypatch, rng):
    """FASTMLP_ENGINE=python (the engines' reference) runs the same one-step passes."""
    monkeypatch.setenv("FASTMLP_ENGINE", "python")
    x, y = data(rng, n=70)
    a, b = mlp(dropout=True), mlp(dropout=True)
    ha = a.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0, device="cpu")
    hb = b.fit(batches(x, y, 16), epochs=2, verbose=0, device="cpu")
    assert hb.params["engine"] == "python"
    same_history(ha, hb)
    same_weights(a, b)


def test_adversarial_training_streams_alike(rng):
    """fit(adversarial=...) on a dataset: each batch's adversarial rows are made in its
    step, as in the in-memory fit (the attack's counter is the optimizer step)."""
    x, y = data(rng, n=64)
    xf = scaled(x)
    a, b = mlp(), mlp()
    pgd = fm.adversarial.PGD(eps=0.1, alpha=0.05, steps=2)
    ha = a.fit(xf, y, epochs=2, batch_size=16, shuffle=False, adversarial=pgd, verbose=0,
               device="cpu")
    hb = b.fit(batches(xf, y, 16), epochs=2, adversarial=pgd, verbose=0, device="cpu")
    same_history(ha, hb)
    same_weights(a, b)


def test_a_dp_optimizer_is_refused_for_a_gathered_memmap(tmp_path, rng):
    x, y = data(rng, n=16)
    with pytest.raises(ValueError, match="a DP optimizer .*does not apply to a memory-mapped"):
        mlp(optimizer=fm.privacy.DPSGD(lr=0.1)).fit(as_memmap(tmp_path, x), y, verbose=0,
                                                    device="cpu")


def test_evaluate_and_predict_of_a_dataset_equal_in_memory(backend, rng):
    x, y = data(rng, n=90)
    model = mlp(metrics=("accuracy", "sparse_top_k_categorical_accuracy"))
    model.fit(x, y, epochs=1, verbose=0, device=device_of(backend))
    ds = batches(x, y, 32)
    assert model.evaluate(ds) == model.evaluate(x, y, batch_size=32)
    assert model.evaluate(iter(ds), batch_size=40) == model.evaluate(x, y, batch_size=32)
    np.testing.assert_array_equal(model.predict(b for b, _ in ds), backend.host(model.predict(x)))
    np.testing.assert_array_equal(model.predict(ds), backend.host(model.predict(x)))
    with pytest.raises(ValueError, match="evaluate: batch 1 of the dataset has 32 rows, more "
                                         "than batch_size=20"):
        model.evaluate(ds, batch_size=20)
    with pytest.raises(ValueError, match="evaluate: 'y' is missing"):
        model.evaluate(x)
