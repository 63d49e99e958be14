"""Issue 16 through the model API: losses, metrics, sample / class weights, clipping,
regularizers, RMSprop and learning-rate schedules, each held to the same training loop
written in PyTorch (step for step) or to scikit-learn's metrics; the short real-data
runs (binary classification and regression on scikit-learn's bundled data sets).
The kernels' own tests are test_losses_kernels.py, test_metrics_kernels.py and
test_optim_ext.py; the engine equivalence of every option is in plan_cases.py."""
from __future__ import annotations

import math

import numpy as np
import pytest

import fastmlp as fm

torch = pytest.importorskip("torch")
sklearn_metrics = pytest.importorskip("sklearn.metrics")


# ----------------------------------------------------------------------------- torch twin


def _data(n=96, d=11, outputs=3, target="regression", seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    if target == "regression":
        y = rng.standard_normal((n, outputs)).astype(np.float32)
    elif target == "binary":
        y = (rng.random((n, outputs)) < 0.4).astype(np.float32)
    else:
        y = rng.integers(0, outputs, n).astype(np.int64)
    return x, y


def _torch_run(model, x, y, *, loss_fn, opt_fn, batch, steps, out_act=None, clip=None,
               sample_weight=None, reg=(), lrs=None):
    """The same run in PyTorch: fastmlp's initial weights, batches in order, the loss
    per step, the gradient clipping, the regularizers (added to the loss)."""
    torch.manual_seed(0)
    w = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in model.get_weights()]
    opt = opt_fn(w)
    xt = torch.tensor(x, dtype=torch.float64)
    yt = torch.tensor(y)
    if yt.dtype == torch.float32:
        yt = yt.double()
    losses = []
    for s in range(steps):
        sl = slice(s * batch, (s + 1) * batch)
        h = torch.relu(xt[sl] @ w[0] + w[1])
        z = h @ w[2] + w[3]
        if out_act == "sigmoid_probs":
            z = torch.sigmoid(z)
        per = loss_fn(z, yt[sl])
        if sample_weight is not None:
            per = per * torch.tensor(sample_weight[sl], dtype=torch.float64)
        loss = per.sum() / len(per)
        for idx, (l1, l2) in reg:
            loss = loss + l1 * w[idx].abs().sum() + l2 * (w[idx] ** 2).sum()
        losses.append(float(loss.detach()) * len(per))
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            clip(w)
        if lrs is not None:
            for g in opt.param_groups:
                g["lr"] = lrs[s]
        opt.step()
    return [a.detach().numpy() for a in w], sum(losses) / len(x)


def _row_mean(fn):
    return lambda z, y: fn(z, y).mean(dim=1)


TORCH_CASES = {
    "mse-sgd-clipnorm": dict(
        loss="mse", target="regression",
        loss_fn=_row_mean(lambda z, y: (z - y) ** 2),
        fm_opt=lambda: fm.optim.SGD(lr=0.05, momentum=0.9, clipnorm=0.5),
        opt_fn=lambda w: torch.optim.SGD(w, lr=0.05, momentum=0.9),
        clip=lambda w: [torch.nn.utils.clip_grad_norm_([p], 0.5) for p in w]),
    "mae-sgd": dict(
        loss="mae", target="regression",
        loss_fn=_row_mean(lambda z, y: (z - y).abs()),
        fm_opt=lambda: fm.optim.SGD(lr=0.1), opt_fn=lambda w: torch.optim.SGD(w, lr=0.1)),
    "huber-adam-global-clipnorm": dict(
        loss=lambda: fm.losses.Huber(delta=0.5), target="regression",
        loss_fn=_row_mean(lambda z, y: torch.nn.functional.huber_loss(
            z, y, reduction="none", delta=0.5)),
        fm_opt=lambda: fm.optim.Adam(lr=1e-2, global_clipnorm=0.3),
        opt_fn=lambda w: torch.optim.Adam(w, lr=1e-2),
        clip=lambda w: torch.nn.utils.clip_grad_norm_(w, 0.3)),
    "bce-sigmoid-rmsprop": dict(
        loss="binary_crossentropy", target="binary", out_act="sigmoid",
        loss_fn=_row_mean(lambda z, y: torch.nn.functional.binary_cross_entropy_with_logits(
            z, y, reduction="none")),
        fm_opt=lambda: fm.optim.RMSprop(lr=1e-2, momentum=0.5, centered=True),
        opt_fn=lambda w: torch.optim.RMSprop(w, lr=1e-2, momentum=0.5, centered=True)),
    "bce-probs-clipvalue": dict(
        loss=lambda: fm.losses.BinaryCrossentropy(from_logits=False), target="binary",
        out_act="sigmoid_layer",
        loss_fn=_row_mean(lambda z, y: torch.nn.functional.binary_cross_entropy(
            torch.sigmoid(z), y, reduction="none")),
        fm_opt=lambda: fm.optim.AdamW(lr=1e-2, clipvalue=0.05),
        opt_fn=lambda w: torch.optim.AdamW(w, lr=1e-2),
        clip=lambda w: torch.nn.utils.clip_grad_value_(w, 0.05)),
    "sparse-cce-smoothing-weighted": dict(
        loss=lambda: fm.losses.SparseCategoricalCrossentropy(label_smoothing=0.1),
        target="class", weighted=True,
        loss_fn=lambda z, y: torch.nn.functional.cross_entropy(
            z, y, reduction="none", label_smoothing=0.1),
        fm_opt=lambda: fm.optim.Adam(lr=1e-2), opt_fn=lambda w: torch.optim.Adam(w, lr=1e-2)),
    "cce-softmax-regularized": dict(
        loss="sparse_categorical_crossentropy", target="class", out_act="softmax",
        reg=((0, (0.0, 1e-2)), (2, (1e-3, 0.0)), (3, (1e-3, 1e-2))),
        loss_fn=lambda z, y: torch.nn.functional.cross_entropy(z, y, reduction="none"),
        fm_opt=lambda: fm.optim.SGD(lr=0.1, momentum=0.9, nesterov=True),
        opt_fn=lambda w: torch.optim.SGD(w, lr=0.1, momentum=0.9, nesterov=True)),
    "mse-exponential-decay": dict(
        loss="mse", target="regression",
        loss_fn=_row_mean(lambda z, y: (z - y) ** 2),
        fm_opt=lambda: fm.optim.SGD(lr=fm.optim.schedules.ExponentialDecay(
            0.1, decay_steps=2, decay_rate=0.5, staircase=True)),
        opt_fn=lambda w: torch.optim.SGD(w, lr=0.1),
        lrs=[0.1 * 0.5 ** (s // 2) for s in range(6)]),
    # linear warmup 0.01 -> 0.1 over 2 steps, then cosine to alpha * 0.1 over 3 steps
    "bce-cosine-warmup": dict(
        loss="binary_crossentropy", target="binary",
        loss_fn=_row_mean(lambda z, y: torch.nn.functional.binary_cross_entropy_with_logits(
            z, y, reduction="none")),
        fm_opt=lambda: fm.optim.SGD(lr=fm.optim.schedules.CosineDecay(
            0.01, decay_steps=3, alpha=0.2, warmup_target=0.1, warmup_steps=2), momentum=0.5),
        opt_fn=lambda w: torch.optim.SGD(w, lr=0.0, momentum=0.5),
        lrs=[0.01, 0.055] + [0.1 * (0.8 * 0.5 * (1 + math.cos(math.pi * min(k, 3) / 3)) + 0.2)
                             for k in range(4)]),
    "mse-piecewise-rmsprop": dict(
        loss="mse", target="regression",
        loss_fn=_row_mean(lambda z, y: (z - y) ** 2),
        fm_opt=lambda: fm.optim.RMSprop(lr=fm.optim.schedules.PiecewiseConstantDecay(
            [1, 3], [1e-2, 5e-3, 1e-3])),
        opt_fn=lambda w: torch.optim.RMSprop(w, lr=0.0),
        lrs=[1e-2, 1e-2, 5e-3, 5e-3, 1e-3, 1e-3]),
}


@pytest.mark.parametrize("name", sorted(TORCH_CASES))
def test_fit_follows_the_torch_training_loop(name):
    _follows_torch(name, "cpu", np)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(TORCH_CASES))
def test_gpu_fit_follows_the_torch_training_loop(gpu, name):
    _follows_torch(name, "cuda", gpu.xp)


def _follows_torch(name, device, xp):
    c = TORCH_CASES[name]
    outputs = 3
    x, y = _data(outputs=outputs, target=c["target"])
    batch, steps = 16, 6
    fm.set_seed(1)
    reg = dict(c.get("reg", ()))

    def regularizer(i):
        if i not in reg:
            return None
        return fm.regularizers.L1L2(l1=reg[i][0], l2=reg[i][1])

    act = {"sigmoid": "sigmoid", "softmax": "softmax", "sigmoid_layer": "sigmoid"}.get(
        c.get("out_act"))
    model = fm.Sequential([
        fm.Dense(8, activation="relu", input_dim=x.shape[1], kernel_regularizer=regularizer(0),
                 bias_regularizer=regularizer(1)),
        fm.Dense(outputs, activation=act, kernel_regularizer=regularizer(2),
                 bias_regularizer=regularizer(3))])
    loss = c["loss"]() if callable(c["loss"]) else c["loss"]
    model.compile(optimizer=c["fm_opt"](), loss=loss)
    sw = np.random.default_rng(5).uniform(0.2, 2.0, len(x)).astype(np.float32) \
        if c.get("weighted") else None
    want_w, want_loss = _torch_run(
        model, x, y, loss_fn=c["loss_fn"], opt_fn=c["opt_fn"], batch=batch, steps=steps,
        clip=c.get("clip"), sample_weight=sw, reg=c.get("reg", ()), lrs=c.get("lrs"))
    hist = model.fit(xp.asarray(x), xp.asarray(y), epochs=1, batch_size=batch, shuffle=False,
                     verbose=0, sample_weight=sw, device=device)
    assert model.optimizer.iterations == steps
    np.testing.assert_allclose(hist.history["loss"][0], want_loss, rtol=2e-5)
    for got, want in zip(model.get_weights(), want_w):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_class_weight_equals_the_sample_weights_it_implies():
    x, y = _data(outputs=4, target="class")
    cw = {0: 2.0, 2: 0.25, 3: 1.5}
    runs = []
    for kw in (dict(class_weight=cw),
               dict(sample_weight=np.array([cw.get(int(c), 1.0) for c in y], np.float32))):
        fm.set_seed(2)
        model = fm.Sequential([fm.Dense(8, activation="relu", input_dim=11), fm.Dense(4)])
        model.compile("adam", "sparse_categorical_crossentropy")
        h = model.fit(x, y, epochs=2, batch_size=20, verbose=0, **kw)
        runs.append((h.history["loss"], model.get_weights()))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        np.testing.assert_array_equal(a, b)


def test_sample_weight_scales_the_loss_as_keras():
    """sum_r w_r L_r / rows (not / sum w): all weights 2 doubles the loss."""
    x, y = _data(outputs=2, target="regression")
    model = fm.Sequential([fm.Dense(2, input_dim=11)])
    model.compile(fm.optim.SGD(lr=0.0), "mse")
    h1 = model.fit(x, y, epochs=1, batch_size=32, verbose=0, shuffle=False)
    h2 = model.fit(x, y, epochs=1, batch_size=32, verbose=0, shuffle=False,
                   sample_weight=np.full(len(x), 2.0, np.float32))
    np.testing.assert_allclose(h2.history["loss"][0], 2 * h1.history["loss"][0], rtol=1e-6)
    pred = model.predict(x)
    np.testing.assert_allclose(h1.history["loss"][0], np.mean((pred - y) ** 2), rtol=1e-5)


# ----------------------------------------------------------------------------- metrics


def _metric_model(outputs, act, loss, metrics):
    fm.set_seed(4)
    model = fm.Sequential([fm.Dense(12, activation="tanh", input_dim=11),
                           fm.Dense(outputs, activation=act)])
    model.compile(fm.optim.Adam(lr=1e-2), loss, metrics=metrics)
    return model


def test_classification_metrics_equal_sklearn():
    x, y = _data(n=300, outputs=9, target="class")
    model = _metric_model(9, "softmax", "sparse_categorical_crossentropy",
                          ["accuracy", "sparse_top_k_categorical_accuracy"])
    model.fit(x, y, epochs=3, batch_size=32, verbose=0)
    logs = model.evaluate(x, y, batch_size=64)
    p = model.predict(x)
    assert logs["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y, p.argmax(1)))
    assert logs["sparse_top_k_categorical_accuracy"] == pytest.approx(
        sklearn_metrics.top_k_accuracy_score(y, p, k=5, labels=np.arange(9)))
    ce = -np.mean(np.log(p[np.arange(len(y)), y]))
    assert logs["loss"] == pytest.approx(ce, rel=1e-5)


def test_binary_and_regression_metrics_equal_sklearn():
    _binary_metrics("cpu", np)


@pytest.mark.gpu
def test_gpu_binary_and_regression_metrics_equal_sklearn(gpu):
    _binary_metrics("cuda", gpu.xp)


def _binary_metrics(device, xp):
    x, y = _data(n=257, outputs=3, target="binary")
    model = _metric_model(3, "sigmoid", "binary_crossentropy",
                          ["accuracy", "binary_accuracy", "auc", "mae", "mse"])
    xd, yd = xp.asarray(x), xp.asarray(y)
    hist = model.fit(xd, yd, epochs=2, batch_size=32, verbose=0, validation_data=(xd, yd),
                     device=device)
    logs = model.evaluate(xd, yd, batch_size=50)
    p = fm.model._host(model.predict(xd))
    acc = np.mean((p > 0.5) == (y > 0.5))
    assert logs["accuracy"] == pytest.approx(acc) and logs["binary_accuracy"] == \
        pytest.approx(acc)
    assert logs["auc"] == pytest.approx(sklearn_metrics.roc_auc_score(y.ravel(), p.ravel()),
                                        rel=1e-9)
    assert logs["mae"] == pytest.approx(sklearn_metrics.mean_absolute_error(y, p), rel=1e-5)
    assert logs["mse"] == pytest.approx(sklearn_metrics.mean_squared_error(y, p), rel=1e-5)
    # the validation twins of the last epoch are evaluate's numbers
    for k in ("loss", "accuracy", "auc", "mae", "mse"):
        assert "val_" + k in hist.history
        assert hist.history["val_" + k][-1] == pytest.approx(logs[k], rel=1e-6)


def test_accuracy_resolves_from_the_loss():
    x, y = _data(n=64, outputs=1, target="regression")
    yb = (y > 0).astype(np.float32)
    model = _metric_model(1, None, "mse", ["accuracy"])
    model.fit(x, yb, epochs=1, verbose=0)
    logs = model.evaluate(x, yb)
    assert logs["accuracy"] == pytest.approx(np.mean((model.predict(x) > 0.5) == (yb > 0.5)))
    xo, yo = _data(n=64, outputs=4, target="class")
    onehot = np.eye(4, dtype=np.float32)[yo]
    model = _metric_model(4, "softmax", fm.losses.CategoricalCrossentropy(label_smoothing=0.1),
                          ["acc"])
    model.fit(xo, onehot, epochs=1, verbose=0)
    logs = model.evaluate(xo, onehot)
    assert logs["acc"] == pytest.approx(np.mean(model.predict(xo).argmax(1) == yo))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("layers, loss, metrics, match", [
    ((3, "softmax"), "mse", None, "softmax output layer needs a categorical"),
    ((3, "softmax"), fm.losses.CategoricalCrossentropy(from_logits=True), None,
     "from_logits=True"),
    ((1, "sigmoid"), fm.losses.BinaryCrossentropy(from_logits=True), None, "from_logits=True"),
    ((3, None), "sparse_categorical_crossentropy", ["mae"], "needs float targets"),
    ((3, None), "mse", ["sparse_top_k_categorical_accuracy"], "needs integer class labels"),
    ((3, None), "mse", ["f1"], "unknown metric"),
    ((3, None), "cross", None, "unknown loss"),
])
def test_compile_refuses_what_cannot_train(layers, loss, metrics, match):
    model = fm.Sequential([fm.Dense(layers[0], activation=layers[1], input_dim=4)])
    with pytest.raises(ValueError, match=match):
        model.compile("sgd", loss, metrics=metrics)


def test_loss_and_optimizer_argument_errors():
    with pytest.raises(ValueError, match="delta"):
        fm.losses.Huber(delta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        fm.losses.CategoricalCrossentropy(label_smoothing=1.0)
    with pytest.raises(ValueError, match="from_logits"):
        fm.losses.BinaryCrossentropy(from_logits="yes")
    with pytest.raises(ValueError):
        fm.optim.SGD(clipnorm=1.0, global_clipnorm=1.0)


def test_fit_weight_argument_errors():
    x, y = _data(n=40, outputs=3, target="class")
    model = fm.Sequential([fm.Dense(3, input_dim=11)])
    model.compile("sgd", "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="one weight per sample"):
        model.fit(x, y, sample_weight=np.ones(39), verbose=0)
    with pytest.raises(ValueError, match="negative"):
        model.fit(x, y, sample_weight=-np.ones(40), verbose=0)
    with pytest.raises(ValueError, match="class_weight key"):
        model.fit(x, y, class_weight={7: 1.0}, verbose=0)
    with pytest.raises(ValueError, match="class_weight"):
        model.fit(x, y, class_weight=[1.0, 2.0], verbose=0)
    with pytest.raises(ValueError, match="sample_weight"):
        model.fit(x, y, sample_weight=np.full(40, np.nan), verbose=0)


def test_save_load_keeps_loss_metrics_optimizer_and_regularizers(tmp_path):
    x, y = _data(n=80, outputs=2, target="binary")
    fm.set_seed(6)
    model = fm.Sequential([
        fm.Dense(6, activation="relu", input_dim=11,
                 kernel_regularizer=fm.regularizers.l2(1e-3)),
        fm.Dense(2, activation="sigmoid")])
    model.compile(fm.optim.RMSprop(lr=fm.optim.schedules.CosineDecay(1e-2, 20),
                                   momentum=0.3, clipnorm=1.0),
                  fm.losses.BinaryCrossentropy(label_smoothing=0.05), metrics=["auc", "mae"])
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    model.save(tmp_path / "m.safetensors")
    loaded = fm.load_model(tmp_path / "m.safetensors")
    assert loaded.loss.label_smoothing == 0.05 and loaded.metrics == ["auc", "mae"]
    assert loaded.layers[0].kernel_regularizer.l2 == pytest.approx(1e-3)
    assert loaded.optimizer.clipnorm == 1.0 and loaded.optimizer.momentum == 0.3
    assert loaded.optimizer.lr_at(5) == pytest.approx(model.optimizer.lr_at(5))
    h1 = model.fit(x, y, epochs=2, initial_epoch=1, batch_size=16, verbose=0, shuffle=False)
    h2 = loaded.fit(x, y, epochs=2, initial_epoch=1, batch_size=16, verbose=0, shuffle=False)
    def no_time(h):
        return {k: v for k, v in h.history.items() if k != "time"}

    assert no_time(h1) == no_time(h2) and "auc" in no_time(h1)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_reported_loss_includes_the_regularization_penalty():
    x, y = _data(n=50, outputs=2, target="regression")
    fm.set_seed(7)
    reg = fm.regularizers.l1_l2(l1=1e-2, l2=1e-1)
    model = fm.Sequential([fm.Dense(2, input_dim=11, kernel_regularizer=reg)])
    model.compile(fm.optim.SGD(lr=0.0), "mse")  # lr 0: the weights stay
    h = model.fit(x, y, epochs=1, batch_size=50, verbose=0)
    w = model.get_weights()[0]
    data = np.mean((model.predict(x) - y) ** 2)
    want = data + 1e-2 * np.abs(w).sum() + 1e-1 * (w ** 2).sum()
    assert h.history["loss"][0] == pytest.approx(want, rel=1e-5)
    assert model.evaluate(x, y)["loss"] == pytest.approx(want, rel=1e-5)


# ----------------------------------------------------------------------------- real data


def test_binary_classification_on_breast_cancer():
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_breast_cancer(return_X_y=True)  # shipped with scikit-learn
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)[idx]
    y = y.astype(np.float32)[idx]
    n = 400
    fm.set_seed(0)
    model = fm.Sequential([fm.Dense(16, activation="relu", input_dim=30),
                           fm.Dropout(0.2), fm.Dense(1, activation="sigmoid")])
    model.compile(fm.optim.Adam(lr=3e-3), "binary_crossentropy", metrics=["accuracy", "auc"])
    hist = model.fit(x[:n], y[:n], epochs=25, batch_size=32, verbose=0,
                     validation_data=(x[n:], y[n:]))
    logs = model.evaluate(x[n:], y[n:])
    assert logs["accuracy"] > 0.93 and logs["auc"] > 0.97, logs
    assert hist.history["loss"][-1] < hist.history["loss"][0] / 2
    assert logs["auc"] == pytest.approx(
        sklearn_metrics.roc_auc_score(y[n:], model.predict(x[n:]).ravel()))


def test_regression_on_diabetes():
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_diabetes(return_X_y=True)  # shipped with scikit-learn
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)[idx]
    y = y.astype(np.float32)[idx]
    mu, sd = y.mean(), y.std()
    yn = ((y - mu) / sd)[:, None]
    n = 330
    fm.set_seed(0)
    model = fm.Sequential([fm.Dense(32, activation="relu", input_dim=10,
                                    kernel_regularizer=fm.regularizers.l2(1e-3)),
                           fm.Dense(1)])
    model.compile(fm.optim.Adam(lr=fm.optim.schedules.ExponentialDecay(1e-2, 100, 0.5)),
                  "huber", metrics=["mae", "mse"])
    model.fit(x[:n], yn[:n], epochs=40, batch_size=32, verbose=0)
    pred = model.predict(x[n:])[:, 0] * sd + mu
    r2 = sklearn_metrics.r2_score(y[n:], pred)
    assert r2 > 0.3, r2
    logs = model.evaluate(x[n:], yn[n:])
    assert logs["mae"] == pytest.approx(
        sklearn_metrics.mean_absolute_error(yn[n:], model.predict(x[n:])), rel=1e-5)
    assert math.isfinite(logs["loss"])
