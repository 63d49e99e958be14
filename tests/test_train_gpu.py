"""Training on the GPU (marked `gpu`; skipped with the reason where CUDA is not usable).

The same workload as test_train.py with device="cuda": accuracy, agreement with the CPU
run, bit-for-bit repeatability, the host-staged path for data too large for the GPU,
CuPy inputs and outputs, and labels checked before any step.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastmlp as fm
import fastmlp.model as fm_model
from test_train import BATCH, STEPS, mlp, per_step_losses

pytestmark = pytest.mark.gpu


def test_gpu_one_epoch_reaches_accuracy(fashion, gpu):
    (xt, yt), (xs, ys) = fashion
    fm.set_seed(0)
    model = mlp(fm.optim.Adam(lr=1e-3))
    model.fit(xt, yt, epochs=1, batch_size=32, verbose=0, device="cuda")
    assert model.device == "cuda"
    assert isinstance(model.layers[0].kernel, gpu.xp.ndarray)
    result = model.evaluate(xs, ys)
    assert result["accuracy"] >= 0.83, result


def test_gpu_loss_curve_matches_cpu(fashion, gpu):
    """Same weights, same batches: the CUDA and C++ kernels sum in different orders and
    nvcc contracts to FMA, so the curves agree to rounding. Each is within 1.2e-6
    (relative) of the float64 reference on the CPU; bound 1e-5."""
    (xt, yt), _ = fashion
    x, y = xt[:STEPS * BATCH], yt[:STEPS * BATCH]
    fm.set_seed(1)
    cpu_model = mlp(fm.optim.Adam(lr=1e-3))
    fm.set_seed(1)
    gpu_model = mlp(fm.optim.Adam(lr=1e-3))
    want = per_step_losses(cpu_model, x, y, STEPS, device="cpu")
    got = per_step_losses(gpu_model, x, y, STEPS, device="cuda")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)
    for a, b in zip(gpu_model.get_weights(), cpu_model.get_weights()):
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


def gpu_run(x, y, seed=4, epochs=2, **kw):
    fm.set_seed(seed)
    model = mlp(fm.optim.Adam(lr=1e-3))
    h = model.fit(x, y, epochs=epochs, batch_size=32, verbose=0, device="cuda", **kw)
    return model, h


def test_gpu_training_repeats_bit_for_bit(fashion, gpu):
    (xt, yt), _ = fashion
    m1, h1 = gpu_run(xt[:4000], yt[:4000], validation_split=0.1)
    m2, h2 = gpu_run(xt[:4000], yt[:4000], validation_split=0.1)
    assert h1.history["loss"] == h2.history["loss"]
    for a, b in zip(m1.get_weights(), m2.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_gpu_host_staged_data_equals_resident(fashion, gpu, monkeypatch):
    """Data that does not fit stays on the host and is copied over batch by batch: the
    same batches, the same kernels, so the same result bit for bit."""
    (xt, yt), _ = fashion
    resident, hr = gpu_run(xt[:3000], yt[:3000])
    monkeypatch.setattr(fm_model, "_fits_on_device", lambda nbytes: False)
    staged, hs = gpu_run(xt[:3000], yt[:3000])
    assert hs.history["loss"] == hr.history["loss"]
    for a, b in zip(staged.get_weights(), resident.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_gpu_cupy_inputs_and_outputs(fashion, gpu, tmp_path):
    cp = gpu.xp
    (xt, yt), (xs, ys) = fashion
    x, y = cp.asarray(xt[:2000]), cp.asarray(yt[:2000])
    fm.set_seed(0)
    model = mlp("adam")
    model.fit(x, y, epochs=1, verbose=0)  # device="auto" follows the CuPy input
    assert model.device == "cuda"
    out = model.predict(cp.asarray(xs[:50]))
    assert isinstance(out, cp.ndarray) and out.shape == (50, 10)
    host = model.predict(xs[:50])
    assert isinstance(host, np.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(out), host)
    # a model trained on the GPU saves and loads on the CPU
    path = tmp_path / "gpu.safetensors"
    model.save(path)
    loaded = fm.load_model(path)
    assert loaded.device == "cpu"
    np.testing.assert_allclose(loaded.predict(xs[:50]), host, rtol=1e-5, atol=1e-5)


def test_gpu_bad_labels_refused_before_training(fashion, gpu):
    (xt, yt), _ = fashion
    y = gpu.xp.asarray(yt[:100]).astype(gpu.xp.int64)
    y[42] = 10
    model = mlp("adam")
    w0 = model.get_weights()[0]
    with pytest.raises(ValueError, match="label 10 in row 42"):
        model.fit(gpu.xp.asarray(xt[:100]), y, verbose=0, device="cuda")
    np.testing.assert_array_equal(model.get_weights()[0], w0)
