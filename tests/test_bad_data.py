"""No silent corruption (issue 20): NaN/Inf in the inputs, parameters that become
non-finite, fit's argument checks, and memory that stays put over many calls.

The kernels' own NaN/Inf rules are in test_nonfinite.py; model files, checkpoints and
resuming in test_checkpoint.py; the file readers' fuzzing in test_fuzz.py.
"""
from __future__ import annotations

import gc
import os

import numpy as np
import pytest

import fastmlp as fm
from helpers import blobs as _blobs


def blobs(n=256, **kw):
    return _blobs(n=n, **kw)


def small(loss="sparse_categorical_crossentropy", opt="adam", features=20):
    model = fm.Sequential([fm.Dense(16, activation="relu", input_dim=features), fm.Dense(4)])
    model.compile(optimizer=opt, loss=loss, metrics=["accuracy"])
    return model


# ----------------------------------------------------------------------------- the case


def test_one_nan_pixel_no_longer_corrupts_the_model_silently():
    """The report: x[3, 1] = nan trained to a finite loss while the first kernel became
    NaN. Now fit refuses the data, naming the cell; with the check off, the NaN reaches
    the loss through the ReLU and fit stops with FloatingPointError."""
    x, y = blobs()
    x[3, 1] = np.nan
    model = small()
    before = model.get_weights()
    with pytest.raises(ValueError, match=r"fit: 'x' holds nan at row 3, column 1"):
        model.fit(x, y, epochs=1, verbose=0, device="cpu")
    for w0, w1 in zip(before, model.get_weights()):  # nothing ran
        np.testing.assert_array_equal(w0, w1)
    with pytest.raises(FloatingPointError, match="the loss became nan"):
        model.fit(x, y, epochs=1, verbose=0, device="cpu", check_finite=False)


def test_all_nan_x_is_refused():
    x, y = blobs(n=64)
    x[:] = np.nan
    with pytest.raises(ValueError, match=r"'x' holds nan at row 0, column 0"):
        small().fit(x, y, verbose=0, device="cpu")


# ----------------------------------------------------------------------------- finite-data check


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_fit_evaluate_predict_name_the_first_bad_cell(value):
    x, y = blobs()
    x[70, 5] = value
    x[200, 0] = np.nan  # a later one: the first is named
    model = small()
    text = f"holds {float(value)} at row 70, column 5"
    with pytest.raises(ValueError, match=f"fit: 'x' {text}"):
        model.fit(x, y, verbose=0, device="cpu")
    with pytest.raises(ValueError, match=f"evaluate: 'x' {text}"):
        model.evaluate(x, y)
    with pytest.raises(ValueError, match=f"predict: 'x' {text}"):
        model.predict(x)
    assert model.predict(x, check_finite=False).shape == (len(x), 4)


def test_validation_rows_are_checked_and_named():
    x, y = blobs(n=200)
    x[190, 2] = np.inf  # in the held-out last 10%: still row 190 of x
    with pytest.raises(ValueError, match=r"fit: 'x' holds inf at row 190, column 2"):
        small().fit(x, y, validation_split=0.1, verbose=0, device="cpu")
    xv, yv = blobs(n=30, seed=1)
    xv[7, 9] = np.nan
    with pytest.raises(ValueError, match=r"fit: 'x_val' holds nan at row 7, column 9"):
        small().fit(x[:100], y[:100], validation_data=(xv, yv), verbose=0, device="cpu")


def test_onehot_labels_are_checked():
    x, y = blobs(n=64)
    onehot = np.eye(4, dtype=np.float32)[y]
    onehot[11, 2] = np.nan
    model = small(loss="categorical_crossentropy")
    with pytest.raises(ValueError, match=r"fit: 'y' holds nan at row 11, column 2"):
        model.fit(x, onehot, verbose=0, device="cpu")


def test_float64_beyond_float32_range_is_caught_after_the_cast():
    """1e39 is finite in float64 but Inf once placed as float32: the check sees what the
    kernels would see."""
    x, y = blobs(n=64)
    x64 = x.astype(np.float64)
    x64[5, 4] = 1e39
    with pytest.raises(ValueError, match=r"'x' holds inf at row 5, column 4"), \
            np.errstate(over="ignore"):  # NumPy's own cast warning
        small().fit(x64, y, verbose=0, device="cpu")


def test_integer_inputs_train_without_a_check():
    x, y = blobs(n=64)
    small().fit(np.clip(x * 10, 0, 255).astype(np.uint8), y, verbose=0, device="cpu")


def test_first_nonfinite_op_matches_numpy(backend, rng):
    for shape in [(0,), (1,), (7,), (5000,), (300, 37), (3, 4, 5)]:
        x = rng.normal(size=shape).astype(np.float32)
        assert fm.ops.first_nonfinite(backend.to(x)) is None
        if x.size == 0:
            continue
        for count in (1, 3, x.size):
            x2 = x.copy()
            flat = x2.reshape(-1)
            count = min(count, x.size)
            idx = rng.choice(x.size, size=count, replace=False)
            flat[idx] = rng.choice([np.nan, np.inf, -np.inf], size=count)
            want = tuple(int(v) for v in np.argwhere(~np.isfinite(x2))[0])
            assert fm.ops.first_nonfinite(backend.to(x2)) == want, (shape, count)


def test_first_nonfinite_checks_its_argument():
    with pytest.raises(TypeError, match="float32"):
        fm.ops.first_nonfinite(np.zeros(3))
    with pytest.raises(ValueError, match="C-contiguous"):
        fm.ops.first_nonfinite(np.zeros((4, 4), np.float32)[:, ::2])


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("engine,device", [
    ("native", "cpu"), ("python", "cpu"),
    pytest.param("native", "cuda", marks=pytest.mark.gpu),
    pytest.param("python", "cuda", marks=pytest.mark.gpu)])
def test_a_parameter_that_overflows_stops_fit(monkeypatch, engine, device):
    """The loss of a step is computed before its update: a learning rate that overflows
    the update leaves Inf/NaN weights while the loss was finite. fit stops after that
    step (found in the optimizer's own pass over the parameters); the CUDA engine runs on
    to the end of its chunk of steps but names the same step."""
    if device == "cuda":
        from conftest import gpu_backend

        gpu_backend()  # skips with the reason when CUDA is not usable
    monkeypatch.setenv("FASTMLP_ENGINE", engine)
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(64, 8)) * 1e3).astype(np.float32)
    y = rng.integers(0, 3, 64)
    model = fm.Sequential([fm.Dense(16, activation="relu", input_dim=8), fm.Dense(3)])
    model.compile(fm.optim.SGD(lr=3e38), "sparse_categorical_crossentropy")
    with pytest.raises(FloatingPointError,
                       match="optimizer update of step 1 in epoch 1/3 left a parameter NaN or Inf"):
        model.fit(x, y, epochs=3, batch_size=32, shuffle=False, verbose=0, device=device)
    ran = model.optimizer.iterations
    assert ran == 1 if device == "cpu" or engine == "python" else ran == 2  # CUDA: its chunk
    assert not all(np.isfinite(w).all() for w in model.get_weights())


def test_engine_state_reports_the_parameter_step():
    """The C++ engine's state carries the step (-1 while all parameters are finite)."""
    x, y = blobs(n=64)
    model = small()
    model.fit(x, y, epochs=1, verbose=0, device="cpu")
    (eng,) = model._bound.engines.values()  # the CPU engine that ran
    assert eng.name == "cpu"
    assert eng.state()["nonfinite_param_step"] == -1


# ----------------------------------------------------------------------------- fit's arguments

BAD_FIT_ARGS = [
    ({"epochs": -1}, "'epochs' must be an integer >= 0, got -1"),
    ({"epochs": 2.5}, "'epochs' must be an integer >= 0, got 2.5"),
    ({"epochs": "3"}, "'epochs' must be an integer >= 0, got '3'"),
    ({"epochs": None}, "'epochs' must be an integer >= 0, got None"),
    ({"epochs": True}, "'epochs' must be an integer >= 0, got True"),
    ({"epochs": float("nan")}, "'epochs' must be an integer"),
    ({"epochs": float("inf")}, "'epochs' must be an integer"),
    ({"initial_epoch": -2}, "'initial_epoch' must be an integer >= 0, got -2"),
    ({"epochs": 2, "initial_epoch": 3}, r"'initial_epoch' \(3\) is past 'epochs' \(2\)"),
    ({"batch_size": 0}, "'batch_size' must be an integer >= 1, got 0"),
    ({"batch_size": None}, "'batch_size' must be an integer >= 1, got None"),
    ({"batch_size": 3.5}, "'batch_size' must be an integer >= 1"),
    ({"verbose": 3}, "'verbose' must be 0, 1, 2 or 'auto', got 3"),
    ({"verbose": "loud"}, "'verbose' must be 0, 1, 2 or 'auto'"),
    ({"shuffle": "yes"}, "'shuffle' must be True or False, got 'yes'"),
    ({"shuffle": None}, "'shuffle' must be True or False"),
    ({"check_finite": 1}, "'check_finite' must be True or False, got 1"),
    ({"validation_split": "0.1"}, "'validation_split' must be a number in \\[0, 1\\)"),
    ({"validation_split": -0.1}, "'validation_split' must be a number in \\[0, 1\\)"),
    ({"validation_split": True}, "'validation_split' must be a number in \\[0, 1\\)"),
    ({"validation_data": [1, 2, 3]}, "validation_data must be a tuple"),
    ({"validation_data": 5}, "validation_data must be a tuple"),
]


@pytest.mark.parametrize("kwargs,message", BAD_FIT_ARGS, ids=[str(k) for k, _ in BAD_FIT_ARGS])
def test_fit_rejects_bad_arguments_by_name(kwargs, message):
    x, y = blobs(n=64)
    model = small()
    before = model.get_weights()
    with pytest.raises(ValueError, match=message):
        model.fit(x, y, **{"verbose": 0, "device": "cpu", **kwargs})
    for w0, w1 in zip(before, model.get_weights()):
        np.testing.assert_array_equal(w0, w1)


def test_fit_accepts_numpy_integers_and_empty_ranges():
    x, y = blobs(n=64)
    model = small()
    h = model.fit(x, y, epochs=np.int64(2), batch_size=np.int32(16), verbose=0, device="cpu")
    assert h.epoch == [0, 1]
    h = model.fit(x, y, epochs=2, initial_epoch=2, verbose=0, device="cpu")  # nothing left to run
    assert h.epoch == [] and h.history == {}
    h = model.fit(x, y, epochs=0, verbose=0, device="cpu")
    assert h.epoch == []
    h = model.fit(x, y, epochs=3, initial_epoch=1, verbose="auto", device="cpu")
    assert h.epoch == [1, 2]


@pytest.mark.parametrize("call,message", [
    (lambda m, x, y: m.evaluate(x, y, batch_size=0), "evaluate: 'batch_size' must be an integer >= 1"),
    (lambda m, x, y: m.evaluate(x, y, verbose=7), "evaluate: 'verbose' must be"),
    (lambda m, x, y: m.evaluate(x, y, check_finite="no"), "evaluate: 'check_finite' must be"),
    (lambda m, x, y: m.predict(x, batch_size=-3), "predict: 'batch_size' must be an integer >= 1"),
    (lambda m, x, y: m.predict(x, check_finite=None), "predict: 'check_finite' must be"),
])
def test_evaluate_and_predict_reject_bad_arguments(call, message):
    x, y = blobs(n=64)
    with pytest.raises(ValueError, match=message):
        call(small(), x, y)


# ----------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    """The resident set size now (Linux /proc), else the peak (ru_maxrss): growth of
    either over the loop bounds a leak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


RSS_BOUND = 8 * 2**20  # bytes of growth allowed over 200 calls after warm-up


def test_memory_is_stable_over_200_fit_and_predict_calls():
    """200 consecutive fit / evaluate / predict calls on one model, and 200 fresh models
    fitted in a loop (an experiment sweep), grow the process's RSS by less than
    RSS_BOUND once warm (measured here: under 0.1 MB)."""
    x, y = blobs(n=512)
    model = small()
    for _ in range(20):  # warm-up: arenas, engines, allocator pools
        model.fit(x, y, epochs=1, batch_size=32, validation_split=0.1, verbose=0, device="cpu")
        model.predict(x)
    gc.collect()
    start = _rss_bytes()
    for _ in range(200):
        model.fit(x, y, epochs=1, batch_size=32, validation_split=0.1, verbose=0, device="cpu")
        model.predict(x)
        model.evaluate(x, y)
    gc.collect()
    grown = _rss_bytes() - start
    assert grown < RSS_BOUND, f"RSS grew by {grown / 2**20:.1f} MiB over 200 fit/predict calls"

    for _ in range(20):
        small().fit(x, y, epochs=1, verbose=0, device="cpu")
    gc.collect()
    start = _rss_bytes()
    for _ in range(200):
        m = small()
        m.fit(x, y, epochs=1, verbose=0, device="cpu")
        m.predict(x)
    del m
    gc.collect()
    grown = _rss_bytes() - start
    assert grown < RSS_BOUND, f"RSS grew by {grown / 2**20:.1f} MiB over 200 fresh models"


@pytest.mark.gpu
def test_gpu_memory_is_stable_over_200_fit_and_predict_calls(gpu):
    """The same on the GPU (run by benchmarks/gpu_check.sh): host RSS and the device
    memory CuPy's pool hands out stay put over 200 fit / evaluate / predict calls."""
    cp = gpu.xp
    pool = cp.get_default_memory_pool()
    x, y = blobs(n=512)
    xd, yd = cp.asarray(x), cp.asarray(y)
    model = small()
    for _ in range(20):
        model.fit(xd, yd, epochs=1, batch_size=32, validation_split=0.1, verbose=0,
                  device="cuda")
        model.predict(xd)
    cp.cuda.get_current_stream().synchronize()
    gc.collect()
    rss0, used0 = _rss_bytes(), pool.used_bytes()
    for _ in range(200):
        model.fit(xd, yd, epochs=1, batch_size=32, validation_split=0.1, verbose=0,
                  device="cuda")
        model.predict(xd)
        model.evaluate(xd, yd)
    cp.cuda.get_current_stream().synchronize()
    gc.collect()
    rss_grown, used_grown = _rss_bytes() - rss0, pool.used_bytes() - used0
    assert rss_grown < RSS_BOUND, f"host RSS grew by {rss_grown / 2**20:.1f} MiB"
    assert used_grown < 2**20, f"device memory in use grew by {used_grown / 2**20:.2f} MiB"
