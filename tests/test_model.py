"""The model API: layers, weights, predict, validation, callbacks, save/load, bad input.

Small synthetic data (fast); the real-data training runs are in test_train.py.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import fastmlp as fm
from fastmlp.callbacks import Callback, EarlyStopping, ModelCheckpoint
from helpers import assert_close, blobs


def small(classes=4, features=20, act_out=None, opt="adam", loss="sparse_categorical_crossentropy"):
    model = fm.Sequential([fm.Dense(16, activation="relu", input_dim=features),
                           fm.Dense(classes, activation=act_out)])
    model.compile(optimizer=opt, loss=loss, metrics=["accuracy"])
    return model


# ------------------------------------------------------------------- structure, weights


def test_weights_in_keras_order_and_shapes():
    fm.set_seed(0)
    model = fm.Sequential([fm.Dense(128, activation="relu", input_dim=784), fm.Dense(10)])
    ws = model.get_weights()
    assert [w.shape for w in ws] == [(784, 128), (128,), (128, 10), (10,)]
    assert all(w.dtype == np.float32 for w in ws)
    assert model.count_params() == 101_770
    # Glorot-uniform kernels (limit sqrt(6 / (in + out))) and zero biases, as Keras.
    limit = np.sqrt(6 / (784 + 128))
    assert np.abs(ws[0]).max() <= limit and np.abs(ws[0]).max() > 0.9 * limit
    assert abs(ws[0].std() - limit / np.sqrt(3)) < 0.02 * limit
    assert not ws[1].any() and not ws[3].any()
    # get_weights returns copies
    ws[0][...] = 0
    assert model.get_weights()[0].any()


@pytest.mark.parametrize("init,std", [("he_normal", np.sqrt(2 / 300)),
                                      ("glorot_normal", np.sqrt(2 / 400)),
                                      ("lecun_uniform", np.sqrt(1 / 300))])
def test_initializers_have_their_variance(init, std):
    fm.set_seed(0)
    layer = fm.Dense(100, kernel_initializer=init)
    layer.build(300)
    assert abs(layer.kernel.std() - std) < 0.03 * std
    if init.endswith("normal"):  # truncated at two standard deviations of the draw
        assert np.abs(layer.kernel).max() <= 2 * std / 0.8796 + 1e-6


def test_set_weights_round_trip_and_errors():
    model = small()
    ws = [np.full(w.shape, i + 1, np.float32) for i, w in enumerate(model.get_weights())]
    model.set_weights(ws)
    for a, b in zip(model.get_weights(), ws):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="has 4 weight arrays"):
        model.set_weights(ws[:3])
    with pytest.raises(ValueError, match=r"weight 2 must have shape \(16, 4\), got \(4, 16\)"):
        model.set_weights([ws[0], ws[1], ws[2].T, ws[3]])


def test_lazy_build_from_the_data():
    x, y = blobs()
    model = fm.Sequential([fm.Dense(8, activation="relu"), fm.Dense(4)])
    assert not model.built
    with pytest.raises(ValueError, match="not built yet"):
        model.get_weights()
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, verbose=0, device="cpu")
    assert [w.shape for w in model.get_weights()] == [(20, 8), (8,), (8, 4), (4,)]


def test_predict_matches_a_float64_forward_pass():
    x, _ = blobs(n=37)
    model = small()
    w = [wi.astype(np.float64) for wi in model.get_weights()]
    want = np.maximum(x @ w[0] + w[1], 0) @ w[2] + w[3]
    got = model.predict(x)
    assert got.shape == (37, 4) and got.dtype == np.float32
    # two float32 GEMMs of depth <= 20: relative error well under 1e-5 of the row scale
    assert_close(got, want, 1e-5 * (1 + np.abs(want)), "predict")
    # batching does not change the answer
    np.testing.assert_array_equal(model.predict(x, batch_size=5), got)
    assert model.predict(x[:0]).shape == (0, 4)


def test_summary_lists_layers_and_params(capsys):
    fm.set_seed(0)
    model = fm.Sequential([fm.Dense(128, activation="relu", input_dim=784), fm.Dense(10)])
    model.summary()
    out = capsys.readouterr().out
    assert "100,480" in out and "1,290" in out and "Total params: 101,770" in out
    assert "relu" in out


def test_use_bias_false():
    x, y = blobs()
    model = fm.Sequential([fm.Dense(16, activation="relu", input_dim=20, use_bias=False),
                           fm.Dense(4, use_bias=False)])
    model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    assert [w.shape for w in model.get_weights()] == [(20, 16), (16, 4)]
    h = model.fit(x, y, epochs=5, verbose=0, device="cpu")
    assert h.history["loss"][-1] < 0.5 * h.history["loss"][0]


# ------------------------------------------------------------------- fit behaviour


def test_fit_history_validation_split_uses_the_last_rows():
    x, y = blobs(n=500)
    fm.set_seed(0)
    model = small()
    h = model.fit(x, y, epochs=3, batch_size=16, validation_split=0.2, verbose=0, device="cpu")
    assert h.epoch == [0, 1, 2]
    assert set(h.history) == {"loss", "accuracy", "val_loss", "val_accuracy", "time"}
    assert h.params["samples"] == 400
    assert h.history["loss"][-1] < h.history["loss"][0]
    assert h.history["val_accuracy"][-1] > 0.9
    # the held-out rows are the last 20%, as in Keras: evaluating them now gives the
    # last epoch's val_* exactly (same weights, same batches, same kernels)
    ev = model.evaluate(x[400:], y[400:])
    assert ev["loss"] == h.history["val_loss"][-1]
    assert ev["accuracy"] == h.history["val_accuracy"][-1]


def test_validation_data_equals_split():
    x, y = blobs(n=500)
    fm.set_seed(0)
    a = small()
    ha = a.fit(x, y, epochs=2, validation_split=0.2, verbose=0, device="cpu")
    fm.set_seed(0)
    b = small()
    hb = b.fit(x[:400], y[:400], epochs=2, validation_data=(x[400:], y[400:]), verbose=0,
               device="cpu")
    assert ha.history["val_loss"] == hb.history["val_loss"]


def test_shuffle_false_and_partial_last_batch():
    x, y = blobs(n=103)
    fm.set_seed(0)
    model = small()
    h = model.fit(x, y, epochs=2, batch_size=10, shuffle=False, verbose=0, device="cpu")
    assert h.params["steps"] == 11
    assert model.optimizer.iterations == 22


def test_evaluate_is_weighted_by_batch_size():
    x, y = blobs(n=101)
    model = small()
    whole = model.evaluate(x, y, batch_size=1000)
    parts = model.evaluate(x, y, batch_size=7)
    assert abs(whole["loss"] - parts["loss"]) < 1e-6 * max(1.0, whole["loss"])
    assert whole["accuracy"] == parts["accuracy"]
    logits = model.predict(x)
    assert whole["accuracy"] == np.mean(logits.argmax(1) == y)


def test_verbose_modes(capsys):
    x, y = blobs(n=64)
    model = small()
    model.fit(x, y, epochs=1, verbose=2, device="cpu")
    out = capsys.readouterr().out
    assert out.startswith("Epoch 1/1 - loss: ") and "accuracy: " in out and "time: " in out
    model.fit(x, y, epochs=1, verbose=1, device="cpu")
    err = capsys.readouterr().err
    assert "Epoch 1/1" in err and "2/2" in err and "loss=" in err  # tqdm bar and postfix
    model.fit(x, y, epochs=1, verbose=0, device="cpu")
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == ""


def test_sgd_string_and_optimizer_defaults_follow_torch():
    assert fm.optim.SGD().get_config() == {"lr": 1e-3, "momentum": 0.0, "nesterov": False,
                                           "weight_decay": 0.0}
    assert fm.optim.Adam().get_config() == {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                            "weight_decay": 0.0}
    assert fm.optim.AdamW().weight_decay == 1e-2
    assert isinstance(fm.optim.get("sgd"), fm.optim.SGD)


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    x, y = blobs(n=64)
    fm.set_seed(0)
    a = small()
    a.fit(torch.from_numpy(x), torch.from_numpy(y), epochs=1, verbose=0, device="cpu")
    fm.set_seed(0)
    b = small()
    b.fit(x, y, epochs=1, verbose=0, device="cpu")
    np.testing.assert_array_equal(a.get_weights()[0], b.get_weights()[0])
    np.testing.assert_array_equal(a.predict(torch.from_numpy(x)), b.predict(x))


# ------------------------------------------------------------------- bad input


def test_bad_labels_are_refused_before_training():
    x, y = blobs(n=50)
    model = small()
    w0 = model.get_weights()
    y = y.copy()
    y[17] = 4
    with pytest.raises(ValueError, match=r"label 4 in row 17 of 'y' is outside \[0, 4\)"):
        model.fit(x, y, epochs=1, verbose=0, device="cpu")
    y[17] = -1
    with pytest.raises(ValueError, match="label -1 in row 17"):
        model.fit(x, y, epochs=1, verbose=0, device="cpu")
    y[17] = 0
    with pytest.raises(ValueError, match="label 9 in row 3 of 'y_val'"):
        model.fit(x, y, validation_data=(x[:5], np.array([0, 1, 2, 9, 0])), verbose=0,
                  device="cpu")
    np.testing.assert_array_equal(model.get_weights()[0], w0[0])  # nothing trained
    with pytest.raises(ValueError, match="label 7 in row 0"):
        model.evaluate(x[:2], np.array([7, 0]))


@pytest.mark.parametrize("call,exc,message", [
    (lambda m, x, y: m.fit(x.reshape(-1, 4, 5), y, verbose=0), ValueError,
     r"must be 2-D.*flatten it first"),
    (lambda m, x, y: m.fit(x[:, :19], y, verbose=0), ValueError,
     "has 19 features per sample, the model takes 20"),
    (lambda m, x, y: m.fit(x, y[:-1], verbose=0), ValueError, "has 50 samples but 'y' has 49"),
    (lambda m, x, y: m.fit(x, np.eye(4, dtype=np.float32)[y], verbose=0), ValueError,
     "categorical_crossentropy"),
    (lambda m, x, y: m.fit(x, y.astype(np.float32) + 0.5, verbose=0), TypeError,
     "integer class indices"),
    (lambda m, x, y: m.fit(x, y, batch_size=0, verbose=0), ValueError, "'batch_size'"),
    (lambda m, x, y: m.fit(x, y, validation_split=1.0, verbose=0), ValueError,
     "'validation_split'"),
    (lambda m, x, y: m.fit(x, y, validation_split=0.01, verbose=0), ValueError,
     "leaves 0 for validation"),
    (lambda m, x, y: m.fit(x, y, validation_split=0.2, validation_data=(x, y), verbose=0),
     ValueError, "not both"),
    (lambda m, x, y: m.fit(x, y, verbose=3), ValueError, "'verbose'"),
    (lambda m, x, y: m.fit(x, y, device="tpu", verbose=0), ValueError, "'cpu', 'cuda' or 'auto'"),
    (lambda m, x, y: m.fit(x[:0], y[:0], verbose=0), ValueError, "no samples"),
    (lambda m, x, y: m.fit(x, y, callbacks=[print], verbose=0), TypeError, "Callback"),
])
def test_fit_bad_input(call, exc, message):
    x, y = blobs(n=50)
    model = small()
    with pytest.raises(exc, match=message):
        call(model, x, y)


def test_onehot_labels_need_the_right_shape():
    x, y = blobs(n=50)
    model = small(loss="categorical_crossentropy")
    with pytest.raises(ValueError, match=r"one-hot rows of shape \(50, 4\).*sparse"):
        model.fit(x, y, verbose=0, device="cpu")


def test_nan_loss_stops_training_with_a_clear_error():
    """With the input check off, a NaN in x reaches the loss through the ReLU (NaN
    propagates) and fit stops at that step."""
    x, y = blobs(n=128)
    x[40, 3] = np.nan
    model = small()
    with pytest.raises(FloatingPointError, match="the loss became nan in epoch 1/1 at step 2"):
        model.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0, device="cpu",
                  check_finite=False)
    assert model.stop_training


def test_model_and_layer_construction_errors():
    with pytest.raises(ValueError, match="'units' must be a positive integer"):
        fm.Dense(0)
    with pytest.raises(ValueError, match="unknown activation 'tanhh'"):
        fm.Dense(3, activation="tanhh")
    with pytest.raises(ValueError, match="unknown kernel_initializer 'xavier'"):
        fm.Dense(3, kernel_initializer="xavier")
    with pytest.raises(TypeError, match="expected an fm layer"):
        fm.Sequential([object()])
    with pytest.raises(ValueError, match="only supported on the last layer"):
        fm.Sequential([fm.Dense(3, activation="softmax", input_dim=2), fm.Dense(2)])
    with pytest.raises(ValueError, match="has input_dim=5 but the previous layer has 3 outputs"):
        fm.Sequential([fm.Dense(3, input_dim=2), fm.Dense(2, input_dim=5)])
    model = fm.Sequential([fm.Dense(3, input_dim=2)])
    x, y = np.zeros((4, 2), np.float32), np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="call model.compile"):
        model.fit(x, y)
    with pytest.raises(ValueError, match="'loss' is required"):
        model.compile("adam")
    with pytest.raises(ValueError, match="unknown optimizer 'adagrad'"):
        model.compile("adagrad", "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="unknown loss 'poisson'"):
        model.compile("adam", "poisson")
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        model.compile("adam", "sparse_categorical_crossentropy", ["f1"])
    with pytest.raises(ValueError, match="nesterov=True needs momentum"):
        fm.optim.SGD(nesterov=True)
    with pytest.raises(ValueError, match="'betas'"):
        fm.optim.Adam(betas=(0.9, 1.0))


def test_cuda_device_without_a_gpu_says_why():
    if fm.backends()["cuda"]:
        pytest.skip("a GPU is usable here; this checks the message on machines without one")
    x, y = blobs(n=8)
    model = small()
    with pytest.raises(RuntimeError, match="CUDA kernels cannot run here: .+") as info:
        model.fit(x, y, device="cuda", verbose=0)
    assert fm.backends()["cuda_reason"] in str(info.value)


# ------------------------------------------------------------------- callbacks


class FakeModel:
    def __init__(self):
        self.stop_training = False
        self.weights = 0
        self.restored = None

    def get_weights(self):
        return self.weights

    def set_weights(self, w):
        self.restored = w


def drive(cb, values, key="val_loss"):
    model = FakeModel()
    cb.set_model(model)
    cb.on_train_begin()
    stopped_at = None
    for epoch, v in enumerate(values):
        model.weights = epoch
        cb.on_epoch_end(epoch, {key: v})
        if model.stop_training:
            stopped_at = epoch
            break
    cb.on_train_end()
    return model, stopped_at


def test_early_stopping_patience_min_delta_and_restore():
    _, stopped = drive(EarlyStopping(patience=2), [1.0, 0.9, 0.95, 0.91, 0.8])
    assert stopped == 3  # two epochs without improving on 0.9
    _, stopped = drive(EarlyStopping(patience=2, min_delta=0.05), [1.0, 0.97, 0.96, 0.5])
    assert stopped == 2  # 0.97 and 0.96 are within min_delta of 1.0
    model, stopped = drive(EarlyStopping(patience=2, restore_best_weights=True),
                           [1.0, 0.7, 0.8, 0.9, 0.1])
    assert stopped == 3 and model.restored == 1  # the weights of epoch 1 (best, 0.7)
    _, stopped = drive(EarlyStopping(monitor="val_accuracy", patience=0),
                       [0.5, 0.6, 0.55], key="val_accuracy")
    assert stopped == 2  # 'auto' mode maximises accuracies
    with pytest.raises(ValueError, match="'val_loss' is not in the logs.*validation_data"):
        drive(EarlyStopping(), [1.0], key="loss")


def test_early_stopping_in_fit():
    """SGD with lr=0 never changes the weights, so val_loss never improves after epoch 1:
    with patience 2 fit stops after epoch 3 of 20."""
    x, y = blobs(n=200)
    model = small(opt=fm.optim.SGD(lr=0.0))
    es = EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    h = model.fit(x, y, epochs=20, validation_split=0.25, callbacks=[es], verbose=0,
                  device="cpu")
    assert h.epoch == [0, 1, 2] and es.stopped_epoch == 2 and es.best_epoch == 0


def test_model_checkpoint_save_best_only(tmp_path):
    x, y = blobs(n=200)
    fm.set_seed(0)
    model = small()
    ck = ModelCheckpoint(tmp_path / "m-{epoch:02d}.safetensors", monitor="val_loss",
                         save_best_only=True)
    h = model.fit(x, y, epochs=6, validation_split=0.25, callbacks=[ck], verbose=0,
                  device="cpu")
    vl = h.history["val_loss"]
    improved = [e for e in range(len(vl)) if vl[e] < min(vl[:e], default=np.inf)]
    assert ck.saved == [str(tmp_path / f"m-{e + 1:02d}.safetensors") for e in improved]
    best = fm.load_model(ck.saved[-1])
    assert best.evaluate(x[150:], y[150:])["loss"] == pytest.approx(min(vl), rel=1e-6)
    every = ModelCheckpoint(tmp_path / "last.safetensors")
    model.fit(x, y, epochs=2, callbacks=[every], verbose=0, device="cpu")
    assert every.saved == [str(tmp_path / "last.safetensors")] * 2


def test_callback_hooks_and_stop_training():
    calls = []

    class Recorder(Callback):
        def on_train_begin(self, logs=None):
            calls.append("begin")

        def on_epoch_begin(self, epoch, logs=None):
            calls.append(f"e{epoch}")

        def on_epoch_end(self, epoch, logs=None):
            calls.append(f"end{epoch}:{sorted(logs)}")
            if epoch == 1:
                self.model.stop_training = True

        def on_train_end(self, logs=None):
            calls.append("done")

    x, y = blobs(n=40)
    small().fit(x, y, epochs=5, callbacks=[Recorder()], verbose=0, device="cpu")
    assert calls == ["begin", "e0", "end0:['accuracy', 'loss', 'time']", "e1",
                     "end1:['accuracy', 'loss', 'time']", "done"]


# ------------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path):
    x, y = blobs()
    fm.set_seed(0)
    model = fm.Sequential([fm.Dense(16, activation="relu", input_dim=20),
                           fm.Dense(4, activation="softmax")], name="clf")
    model.compile(fm.optim.SGD(lr=0.1, momentum=0.9, nesterov=True), "sparse_categorical_crossentropy",
                  ["accuracy"])
    model.fit(x, y, epochs=1, verbose=0, device="cpu")
    path = tmp_path / "m.safetensors"
    model.save(path)
    loaded = fm.load_model(path)
    assert loaded.name == "clf" and loaded.layers[1].activation == "softmax"
    assert isinstance(loaded.optimizer, fm.optim.SGD) and loaded.optimizer.nesterov
    assert loaded.optimizer.iterations == model.optimizer.iterations
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    # without the optimizer state: weights and config only, a fresh optimizer
    model.save(path, include_optimizer=False)
    fresh = fm.load_model(path)
    assert fresh.optimizer.iterations == 0
    np.testing.assert_array_equal(fresh.get_weights()[0], model.get_weights()[0])
    fresh.fit(x, y, epochs=1, verbose=0, device="cpu")


def test_save_is_atomic_and_keeps_the_shuffling_position(tmp_path, monkeypatch):
    """The file is written next to the target and renamed over it: a failing write
    leaves the old file intact and no temporary behind. The shuffling seed and the
    epochs shuffled travel with the optimizer state; a format-1 file (the NumPy
    generator state of earlier releases) still loads, shuffling from epoch 0."""
    import json

    import safetensors.numpy as stn
    from safetensors import safe_open

    x, y = blobs()
    fm.set_seed(0)
    model = fm.Sequential([fm.Dense(8, activation="relu", input_dim=20), fm.Dense(4)])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=2, verbose=0)
    path = tmp_path / "m.safetensors"
    model.save(path)
    loaded = fm.load_model(path)
    assert (loaded._shuffle_seed, loaded._shuffle_count) == (model._shuffle_seed, 2)
    before = path.read_bytes()

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(stn, "save", broken)  # (a failing write: tests/test_checkpoint.py)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    monkeypatch.undo()

    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads(f.metadata()["fastmlp"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["format_version"] = 1
    del meta["shuffle"]
    meta["rng_state"] = {"bit_generator": "PCG64"}
    old = tmp_path / "old.safetensors"
    stn.save_file(tensors, str(old), metadata={"fastmlp": json.dumps(meta)})
    v1 = fm.load_model(old)
    assert v1._shuffle_count == 0 and v1.optimizer.iterations == model.optimizer.iterations
    np.testing.assert_array_equal(v1.predict(x), model.predict(x))


def test_load_model_rejects_bad_files(tmp_path):
    from safetensors.numpy import save_file

    x, y = blobs(n=20)
    model = small()
    good = tmp_path / "good.safetensors"
    model.save(good)
    data = good.read_bytes()

    with pytest.raises(FileNotFoundError):
        fm.load_model(tmp_path / "missing.safetensors")
    cases = {
        "garbage": (b"\x13\x00\x00\x00\x00\x00\x00\x00not a header", "not a readable safetensors"),
        "truncated": (data[: len(data) // 2], "not a readable safetensors"),
        "empty": (b"", "not a readable safetensors"),
    }
    for name, (content, message) in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(content)
        with pytest.raises(ValueError, match=message) as info:
            fm.load_model(p)
        assert str(p) in str(info.value)

    plain = tmp_path / "plain.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(plain))
    with pytest.raises(ValueError, match="without fastmlp metadata"):
        fm.load_model(plain)

    # a config that does not match the tensors
    from safetensors import safe_open

    with safe_open(str(good), framework="numpy") as f:
        meta = json.loads(f.metadata()["fastmlp"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["model"]["layers"][0]["units"] = 17
    meta["model"]["layers"][1]["input_dim"] = 17
    bad = tmp_path / "mismatch.safetensors"
    save_file(tensors, str(bad), metadata={"fastmlp": json.dumps(meta)})
    with pytest.raises(ValueError, match=r"mismatch.safetensors: set_weights: weight 0 must have "
                                         r"shape \(20, 17\), got \(20, 16\)"):
        fm.load_model(bad)
    del tensors["layers.1.bias"]
    meta = json.loads(json.dumps(meta).replace("17", "16"))
    save_file(tensors, str(bad), metadata={"fastmlp": json.dumps(meta)})
    with pytest.raises(ValueError, match="does not match the tensors.*layers.1.bias"):
        fm.load_model(bad)
    meta["format_version"] = 99
    save_file(tensors, str(bad), metadata={"fastmlp": json.dumps(meta)})
    with pytest.raises(ValueError, match="format version 99 is newer"):
        fm.load_model(bad)
