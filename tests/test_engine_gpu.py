"""The CUDA engine (CUDA Graph replay) on the GPU (marked `gpu`; the GPU check runs them).

Bit for bit where the kernels and their order are the same: the graph engine against
the CUDA Python executor (the same plan op by op through fm.ops on CuPy arrays), for
every case of tests/plan_cases.py; few or many steps per engine call; save -> load ->
resume against an uninterrupted run. With stated tolerances where kernels differ: the
CPU against the GPU. And the batch order, which is the same on both devices.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastmlp as fm
import fastmlp.trainer as trainer
from plan_cases import BY_ID, CASES
from test_engine import assert_same_run

pytestmark = pytest.mark.gpu


def run_case(case, monkeypatch, gpu, engine, chunk=None, model=None, **overrides):
    monkeypatch.setenv("FASTMLP_ENGINE", "python" if engine == "python" else "native")
    if chunk is not None:
        monkeypatch.setitem(trainer._CHUNK, "cuda" if engine != "python" else "python", chunk)
    x, y = case.data()
    x, y = gpu.xp.asarray(x), gpu.xp.asarray(y)  # data on the device, as the engine wants it
    model = model or case.model()
    kw = dict(case.fit_kwargs(), **overrides)
    hist = model.fit(x, y, verbose=0, device="cuda", **kw)
    assert hist.params["engine"] == ("python" if engine == "python" else "cuda")
    return model, hist


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_graph_engine_equals_cuda_python_executor(gpu, monkeypatch, case):
    m1, h1 = run_case(case, monkeypatch, gpu, "native")
    m0, h0 = run_case(case, monkeypatch, gpu, "python")
    assert_same_run(m1, h1, m0, h0)
    assert m1._bound.engines["cuda"].graphs_captured() >= 1  # replayed, not only eager


def test_graphs_on_equal_graphs_off(gpu, monkeypatch):
    """The same engine with every step run op by op (FASTMLP_CUDA_GRAPHS=0, read when
    the engine is created): capture and replay change nothing. If the executor test
    above fails and this one passes, the kernels differ; if this one fails, the
    graphs do."""
    case = BY_ID["adam-shuffle"]
    on = run_case(case, monkeypatch, gpu, "native")
    monkeypatch.setenv("FASTMLP_CUDA_GRAPHS", "0")
    off = run_case(case, monkeypatch, gpu, "native")
    assert off[0]._bound.engines["cuda"].graphs_captured() == 0
    assert on[0]._bound.engines["cuda"].graphs_captured() >= 1
    assert_same_run(*on, *off)


@pytest.mark.parametrize("chunk", [1, 5])
def test_steps_per_call_do_not_change_the_gpu_result(gpu, monkeypatch, chunk):
    case = BY_ID["adamw-shuffle"]
    assert_same_run(*run_case(case, monkeypatch, gpu, "native", chunk=chunk),
                    *run_case(case, monkeypatch, gpu, "native"))


def test_full_and_partial_batch_get_one_graph_each(gpu, monkeypatch):
    """203 rows at batch 32: 6 full steps and a last one of 11 rows. Each shape runs
    eagerly once (warm-up), is captured the next time it comes, then replayed."""
    case = BY_ID["sgd-inorder"]
    one, _ = run_case(case, monkeypatch, gpu, "native", epochs=1, validation_split=0.0)
    # the full batch; the partial one has run once, eagerly
    assert one._bound.engines["cuda"].graphs_captured() == 1
    three, h = run_case(case, monkeypatch, gpu, "native", epochs=3, validation_split=0.0)
    assert three._bound.engines["cuda"].graphs_captured() == 2  # + the 11-row step
    assert three.optimizer.iterations == 3 * 7


@pytest.mark.parametrize("n", [1, 2, 3, 97, 1000, 60000])
def test_cpu_and_gpu_draw_the_same_permutation(gpu, n):
    for counter in (0, 1, 2**40 + 3):
        got = fm.ops.random_permutation(n, 2**63 + 5, counter, device="cuda")
        want = fm.ops.random_permutation(n, 2**63 + 5, counter)
        np.testing.assert_array_equal(gpu.xp.asnumpy(got), want)


def test_cpu_and_gpu_train_on_the_same_batches(gpu, monkeypatch):
    """Shuffled, 3 epochs: the CPU and the GPU differ only by kernel rounding (nvcc's
    FMA contraction, another GEMM summation order): measured ~1e-7 relative on the
    losses. A different batch order would move them by ~1e-2."""
    case = BY_ID["adam-shuffle"]
    monkeypatch.setenv("FASTMLP_ENGINE", "native")
    x, y = case.data()
    cpu_model = case.model()
    hc = cpu_model.fit(x, y, verbose=0, device="cpu", **case.fit)
    gm, hg = run_case(case, monkeypatch, gpu, "native")
    np.testing.assert_allclose(hg.history["loss"], hc.history["loss"], rtol=1e-5)
    for a, b in zip(gm.get_weights(), cpu_model.get_weights()):
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


@pytest.mark.parametrize("case_id", ["mse-regression", "bce-sigmoid-1out", "regularizers",
                                     "opt-rmsprop-all", "sparse-cce-smoothing-topk",
                                     "regularizers-global-clip-mse",
                                     "cce-softmax-smoothing-weighted"])
def test_gpu_training_options_match_the_cpu(gpu, monkeypatch, case_id):
    """Issue 16's losses, metrics, weights, clipping, regularizers and RMSprop: the GPU
    run follows the CPU run up to kernel rounding."""
    case = BY_ID[case_id]
    monkeypatch.setenv("FASTMLP_ENGINE", "native")
    x, y = case.data()
    cpu_model = case.model()
    hc = cpu_model.fit(x, y, verbose=0, device="cpu", **case.fit_kwargs())
    gm, hg = run_case(case, monkeypatch, gpu, "native")
    assert hg.history.keys() == hc.history.keys()
    for k in hc.history:
        if k != "time":  # a metric may flip one borderline sample
            atol = 1e-5 if k.endswith("loss") else 2.0 / case.n
            np.testing.assert_allclose(hg.history[k], hc.history[k], rtol=2e-4, atol=atol,
                                       err_msg=k)
    for a, b in zip(gm.get_weights(), cpu_model.get_weights()):
        assert np.abs(a - b).max() <= 1e-3 * max(np.abs(b).max(), 1e-3)


def test_gpu_resume_equals_uninterrupted_run(gpu, monkeypatch, tmp_path):
    case = BY_ID["sgd-nesterov-shuffle"]
    straight, hs = run_case(case, monkeypatch, gpu, "native", epochs=3)
    first, _ = run_case(case, monkeypatch, gpu, "native", epochs=1)
    assert first.optimizer.iterations > 0
    first.save(tmp_path / "m.safetensors")
    resumed = fm.load_model(tmp_path / "m.safetensors")
    x, y = case.data()
    kw = dict(case.fit, epochs=3, initial_epoch=1)
    hr = resumed.fit(gpu.xp.asarray(x), gpu.xp.asarray(y), verbose=0, device="cuda", **kw)
    assert hr.history["loss"] == hs.history["loss"][1:]
    for a, b in zip(resumed.get_weights(), straight.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_gpu_nan_loss_stops_fit(gpu, monkeypatch):
    """The engine records the first non-finite step on the device; fit reads it at the
    next progress update (here: the end of the epoch) and stops with that step."""
    case = BY_ID["deep-onehot-nobias-relu-last"]
    x, y = case.data()
    y[100] = np.nan  # row 100: step 3 at batch 50, unshuffled
    monkeypatch.setenv("FASTMLP_ENGINE", "native")
    model = case.model()
    with pytest.raises(FloatingPointError, match="at step 3"):
        model.fit(gpu.xp.asarray(x), gpu.xp.asarray(y), epochs=2, batch_size=50,
                  shuffle=False, verbose=0, device="cuda")
    assert model.stop_training


def test_gpu_evaluate_and_predict_equal_the_python_executor(gpu, monkeypatch):
    case = BY_ID["softmax-output-onehot"]
    model, _ = run_case(case, monkeypatch, gpu, "native")
    x, y = case.data()
    xd, yd = gpu.xp.asarray(x), gpu.xp.asarray(y)
    got = model.evaluate(xd, yd, batch_size=23), model.predict(xd, batch_size=23)
    monkeypatch.setenv("FASTMLP_ENGINE", "python")
    want = model.evaluate(xd, yd, batch_size=23), model.predict(xd, batch_size=23)
    assert got[0] == want[0]
    np.testing.assert_array_equal(gpu.xp.asnumpy(got[1]), gpu.xp.asnumpy(want[1]))


def test_sanitize_engine_small_run(gpu, monkeypatch):
    """A small shuffled run with validation and partial batches -- eager warm-up steps,
    captures, replays, evaluate and predict -- against the CUDA executor. The GPU check
    runs this one under compute-sanitizer (memcheck, racecheck, synccheck, initcheck)."""
    case = BY_ID["prime-sizes"]
    m1, h1 = run_case(case, monkeypatch, gpu, "native", epochs=3, validation_split=0.2)
    m0, h0 = run_case(case, monkeypatch, gpu, "python", epochs=3, validation_split=0.2)
    assert_same_run(m1, h1, m0, h0)
    x, _ = case.data()
    monkeypatch.setenv("FASTMLP_ENGINE", "native")
    got = m1.predict(gpu.xp.asarray(x), batch_size=10)
    np.testing.assert_array_equal(gpu.xp.asnumpy(got), gpu.xp.asnumpy(
        m0.predict(gpu.xp.asarray(x), batch_size=10)))
