"""Training on the real Fashion-MNIST files: accuracy, the loss curve against an
independent reference loop (and against PyTorch), repeatability, and exact resume."""
from __future__ import annotations

import numpy as np
import pytest

import fastmlp as fm
from reference_training import train as reference_train

BATCH = 32
STEPS = 64  # >= 50 steps of the loss curve


def mlp(optimizer, **compile_kw):
    model = fm.Sequential([fm.Dense(128, activation="relu", input_dim=784), fm.Dense(10)])
    model.compile(optimizer=optimizer, loss=compile_kw.pop("loss",
                  "sparse_categorical_crossentropy"), metrics=["accuracy"], **compile_kw)
    return model


def per_step_losses(model, x, y, steps, device="cpu"):
    """The loss of each step, through the public API: one fit call per batch (the
    optimizer state and its step count carry over between calls)."""
    out = []
    for b in range(steps):
        sl = slice(b * BATCH, (b + 1) * BATCH)
        h = model.fit(x[sl], y[sl], epochs=1, batch_size=BATCH, shuffle=False, verbose=0,
                      device=device)
        out.append(h.history["loss"][0])
    return np.array(out)


def test_one_cpu_epoch_reaches_accuracy(fashion):
    """The issue's workload for one epoch: 784-128-10, Adam 1e-3, batch 32, all 60000
    training images, from three seeds. Measured 0.829-0.851 test accuracy over seeds
    0-4 (one seed alone lands anywhere in that range: the trajectory is chaotic);
    Keras' identical model reaches about 0.82-0.85 after its first epoch. Stated
    bounds: every seed >= 0.82, their mean >= 0.835."""
    (xt, yt), (xs, ys) = fashion
    accs = []
    for seed in (0, 1, 2):
        fm.set_seed(seed)
        model = mlp(fm.optim.Adam(lr=1e-3))
        h = model.fit(xt, yt, epochs=1, batch_size=32, verbose=0, device="cpu")
        result = model.evaluate(xs, ys)
        assert result["accuracy"] >= 0.82, (seed, result)
        assert 0.2 < result["loss"] < 0.6, (seed, result)
        # The training metrics of the epoch are sane too (mean over the epoch's batches).
        assert h.history["accuracy"][0] >= 0.78 and h.history["loss"][0] < 0.7, h.history
        accs.append(result["accuracy"])
    assert np.mean(accs) >= 0.835, accs


OPTIMIZERS = {
    "adam": (lambda: fm.optim.Adam(lr=1e-3), {"name": "adam", "lr": 1e-3}),
    "adamw": (lambda: fm.optim.AdamW(lr=2e-3), {"name": "adamw", "lr": 2e-3}),
    "sgd-nesterov-wd": (lambda: fm.optim.SGD(lr=0.05, momentum=0.9, nesterov=True,
                                             weight_decay=1e-3),
                        {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True,
                         "weight_decay": 1e-3}),
}


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_kernel_path_matches_reference_loss_curve(fashion, opt):
    """64 steps of fit (float32 kernels) against tests/reference_training.py (fm.reference
    in float64, the backward pass written out independently), from the same weights on
    the same batches. Measured: the losses agree to <= 1.2e-6 relative and the weights to
    <= 7e-6 of their largest magnitude; float32 rounding grows slowly over the steps.
    Bounds: 1e-5 and 1e-4. A wrong mask, product order or step count is off by >= 1e-2."""
    (xt, yt), _ = fashion
    x, y = xt[:STEPS * BATCH], yt[:STEPS * BATCH]
    make, ref_opt = OPTIMIZERS[opt]
    fm.set_seed(1)
    model = mlp(make())
    w0 = model.get_weights()
    got = per_step_losses(model, x, y, STEPS)
    batches = [(x[b * BATCH:(b + 1) * BATCH], y[b * BATCH:(b + 1) * BATCH])
               for b in range(STEPS)]
    want, w_ref = reference_train(w0, ["relu", None], batches, ref_opt)
    want = np.array(want)
    assert want[-1] < 0.6 * want[0], "the reference run did not learn: the test is void"
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)
    for i, (a, b) in enumerate(zip(model.get_weights(), w_ref)):
        err = np.abs(a - b).max() / np.abs(b).max()
        assert err <= 1e-4, f"weight {i}: max error {err:.2e} of its largest magnitude"


def test_loss_curve_matches_pytorch(fashion):
    """The same 64 Adam steps in PyTorch (nn.Linear, CrossEntropyLoss, torch.optim.Adam),
    float32 on the CPU, from the same weights: a check of the whole step by an outside
    implementation. Measured agreement ~1e-6 relative; bound 1e-4."""
    torch = pytest.importorskip("torch")
    (xt, yt), _ = fashion
    x, y = xt[:STEPS * BATCH], yt[:STEPS * BATCH]
    fm.set_seed(2)
    model = mlp(fm.optim.Adam(lr=1e-3))
    w = model.get_weights()
    got = per_step_losses(model, x, y, STEPS)

    net = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(),
                              torch.nn.Linear(128, 10))
    with torch.no_grad():  # torch keeps (out, in): the transpose of the Keras kernel
        net[0].weight.copy_(torch.from_numpy(w[0].T.copy()))
        net[0].bias.copy_(torch.from_numpy(w[1]))
        net[2].weight.copy_(torch.from_numpy(w[2].T.copy()))
        net[2].bias.copy_(torch.from_numpy(w[3]))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    want = []
    for b in range(STEPS):
        xb = torch.from_numpy(x[b * BATCH:(b + 1) * BATCH])
        yb = torch.from_numpy(y[b * BATCH:(b + 1) * BATCH].astype(np.int64))
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(xb), yb)
        loss.backward()
        opt.step()
        want.append(loss.item())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=0)
    np.testing.assert_allclose(model.get_weights()[0], net[0].weight.detach().numpy().T,
                               rtol=0, atol=1e-4 * float(np.abs(w[0]).max()))


def test_onehot_labels_with_softmax_output_train(fashion):
    """Dense(10, activation="softmax") + categorical_crossentropy on one-hot rows: the
    softmax is fused with the loss (trained on the logits, no double softmax), so it
    follows the same trajectory as logits + sparse labels, and predict gives
    probabilities."""
    (xt, yt), (xs, ys) = fashion
    n = 12000
    onehot = np.eye(10, dtype=np.float32)[yt[:n]]
    fm.set_seed(3)
    soft = fm.Sequential([fm.Dense(128, activation="relu", input_dim=784),
                          fm.Dense(10, activation="softmax")])
    soft.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    fm.set_seed(3)
    plain = mlp("adam")
    np.testing.assert_array_equal(soft.get_weights()[0], plain.get_weights()[0])
    hs = soft.fit(xt[:n], onehot, epochs=1, batch_size=32, verbose=0, device="cpu")
    hp = plain.fit(xt[:n], yt[:n], epochs=1, batch_size=32, verbose=0, device="cpu")
    # The gradients are identical ((p - onehot) / n either way); the loss value is
    # summed differently (-sum(y * logp) vs -logp[label]), so compare it to rounding.
    np.testing.assert_allclose(hs.history["loss"], hp.history["loss"], rtol=1e-6)
    for a, b in zip(soft.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    acc = soft.evaluate(xs, np.eye(10, dtype=np.float32)[ys])["accuracy"]
    assert acc >= 0.80, acc
    probs = soft.predict(xs[:100])
    assert probs.shape == (100, 10) and (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    logits = plain.predict(xs[:100])
    assert (logits < 0).any(), "the plain model's predict gives logits, not probabilities"
    np.testing.assert_array_equal(probs.argmax(1), logits.argmax(1))


def fit_run(x, y, seed, epochs, **fit_kw):
    fm.set_seed(seed)
    model = mlp(fm.optim.Adam(lr=1e-3))
    h = model.fit(x, y, epochs=epochs, batch_size=32, verbose=0, device="cpu", **fit_kw)
    return model, h


def test_set_seed_makes_cpu_training_repeat_bit_for_bit(fashion):
    (xt, yt), _ = fashion
    x, y = xt[:4000], yt[:4000]
    m1, h1 = fit_run(x, y, seed=5, epochs=2)
    m2, h2 = fit_run(x, y, seed=5, epochs=2)
    for a, b in zip(m1.get_weights(), m2.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert h1.history["loss"] == h2.history["loss"]
    m3, _ = fit_run(x, y, seed=6, epochs=2)
    assert not np.array_equal(m1.get_weights()[0], m3.get_weights()[0])


@pytest.mark.parametrize("opt", ["adam", "sgd-momentum"])
def test_save_load_continue_equals_uninterrupted_run(fashion, tmp_path, opt):
    """fit 3 epochs == fit 1, save, load_model, fit 2 more: bit for bit on the CPU (the
    weights, the optimizer state and its step count, and the shuffling generator are all
    in the file)."""
    (xt, yt), _ = fashion
    x, y = xt[:3000], yt[:3000]

    def make():
        fm.set_seed(7)
        return mlp(fm.optim.Adam(lr=1e-3) if opt == "adam"
                   else fm.optim.SGD(lr=0.05, momentum=0.9))

    full = make()
    hf = full.fit(x, y, epochs=3, batch_size=32, verbose=0, device="cpu",
                  validation_split=0.1)
    first = make()
    first.fit(x, y, epochs=1, batch_size=32, verbose=0, device="cpu", validation_split=0.1)
    path = tmp_path / "ckpt.safetensors"
    first.save(path)
    fm.set_seed(12345)  # the resumed run must not depend on the global seed
    resumed = fm.load_model(path)
    hr = resumed.fit(x, y, epochs=3, initial_epoch=1, batch_size=32, verbose=0,
                     device="cpu", validation_split=0.1)
    assert hr.epoch == [1, 2]
    assert hr.history["loss"] == hf.history["loss"][1:]
    assert hr.history["val_loss"] == hf.history["val_loss"][1:]
    for a, b in zip(resumed.get_weights(), full.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert resumed.optimizer.iterations == full.optimizer.iterations
