"""The engines against the Python executor, bit for bit (CPU), and the step plan.

The CPU engine (C++, whole passes per call) and the Python executor (the same plan,
op by op through fm.ops) run the same kernels in the same order on the same batches,
so weights, optimizer state and History must be equal bit for bit, for every case of
tests/plan_cases.py. The GPU twin of these tests is test_engine_gpu.py.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastmlp as fm
import fastmlp.trainer as trainer
from fastmlp import plan as fm_plan
from plan_cases import BY_ID, CASES


def run_case(case, monkeypatch, engine, device="cpu", chunk=None, seed=0):
    monkeypatch.setenv("FASTMLP_ENGINE", "python" if engine == "python" else "native")
    if chunk is not None:
        monkeypatch.setitem(trainer._CHUNK, engine if engine == "python" else device, chunk)
    x, y = case.data(seed)
    model = case.model()
    hist = model.fit(x, y, verbose=0, device=device, **case.fit_kwargs(seed))
    assert hist.params["engine"] == (engine if engine == "python" else device)
    return model, hist


def assert_same_run(m1, h1, m0, h0):
    w1, w0 = m1.get_weights(), m0.get_weights()
    assert len(w1) == len(w0)
    for a, b in zip(w1, w0):
        np.testing.assert_array_equal(a, b)
    s1, s0 = m1.optimizer.state_arrays(), m0.optimizer.state_arrays()
    assert s1.keys() == s0.keys()
    for k in s1:
        np.testing.assert_array_equal(fm.model._host(s1[k]), fm.model._host(s0[k]), err_msg=k)
    assert m1.optimizer.iterations == m0.optimizer.iterations > 0
    assert h1.history.keys() == h0.history.keys()
    for k in h1.history:
        if k not in ("time",):
            np.testing.assert_array_equal(h1.history[k], h0.history[k], err_msg=k)
    assert m1._shuffle_count == m0._shuffle_count


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cpu_engine_equals_python_executor(monkeypatch, case):
    m1, h1 = run_case(case, monkeypatch, "native")
    m0, h0 = run_case(case, monkeypatch, "python")
    assert_same_run(m1, h1, m0, h0)
    # the run learned something: an all-zero update cannot pass
    assert not np.array_equal(m1.get_weights()[0], case.model().get_weights()[0])


@pytest.mark.parametrize("chunk", [1, 7])
def test_steps_per_call_do_not_change_the_result(monkeypatch, chunk):
    """1 step per engine call, 7, or 64 (the default): the same run bit for bit."""
    case = BY_ID["adam-shuffle"]
    assert_same_run(*run_case(case, monkeypatch, "native", chunk=chunk),
                    *run_case(case, monkeypatch, "native"))


def test_cpu_engine_stops_at_the_first_nonfinite_loss(monkeypatch):
    case = BY_ID["deep-onehot-nobias-relu-last"]
    x, y = case.data()
    y[100] = np.nan  # the batch holding row 100 (unshuffled: step 3 at batch 50)
    monkeypatch.setenv("FASTMLP_ENGINE", "native")
    model = case.model()
    with pytest.raises(FloatingPointError, match="became nan in epoch 1/1 at step 3"):
        model.fit(x, y, epochs=1, batch_size=50, shuffle=False, verbose=0, check_finite=False)
    assert model.optimizer.iterations == 3  # the failing step ran, nothing after it
    assert model.stop_training


def test_custom_optimizer_runs_on_the_python_executor(monkeypatch):
    """A subclass may override the update rule: fit must call it, and says so."""
    seen = []

    class Logged(fm.optim.SGD):
        def _update(self, param, grad, state):
            seen.append(1)
            super()._update(param, grad, state)

    monkeypatch.delenv("FASTMLP_ENGINE", raising=False)
    x, y = BY_ID["sgd-inorder"].data()
    model = fm.Sequential([fm.Dense(4, activation="relu", input_dim=37), fm.Dense(7)])
    model.compile(optimizer=Logged(lr=0.1), loss="sparse_categorical_crossentropy")
    h = model.fit(x[:64], y[:64], epochs=1, batch_size=32, verbose=0)
    assert h.params["engine"] == "python" and "Logged" in h.params["engine_reason"]
    assert len(seen) == 2 * 4  # 2 steps x 4 parameters


def test_bad_engine_setting_is_refused(monkeypatch):
    monkeypatch.setenv("FASTMLP_ENGINE", "turbo")
    x, y = BY_ID["sgd-inorder"].data()
    model = BY_ID["sgd-inorder"].model()
    with pytest.raises(ValueError, match="FASTMLP_ENGINE must be"):
        model.fit(x, y, verbose=0)


def test_evaluate_and_predict_engines_equal_the_python_executor(monkeypatch):
    case = BY_ID["softmax-output-onehot"]
    x, y = case.data()
    model, _ = run_case(case, monkeypatch, "native")
    got = model.evaluate(x, y, batch_size=23), model.predict(x, batch_size=23)
    monkeypatch.setenv("FASTMLP_ENGINE", "python")
    want = model.evaluate(x, y, batch_size=23), model.predict(x, batch_size=23)
    assert got[0] == want[0]
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[1].sum(axis=1), 1.0, rtol=1e-5)  # softmax rows


def test_layers_and_optimizer_hold_views_of_one_arena(monkeypatch):
    """One flat buffer of parameters (one optimizer launch for all), and the weights
    the model shows are the ones the engine updates."""
    case = BY_ID["adam-inorder"]
    model, _ = run_case(case, monkeypatch, "native")
    arena = model._bound.arena
    flat = arena.named("params")
    assert all(np.shares_memory(p, flat) for p in model.params())
    assert all(np.shares_memory(s, arena.named("opt.exp_avg"))
               for s in [st["exp_avg"] for st in model.optimizer.state])
    before = model.get_weights()
    model.set_weights([w * 0 for w in before])
    assert not flat.any()


def test_plan_lists_and_validation():
    layers = [fm.Dense(8, activation="relu", input_dim=5), fm.Dense(3)]
    for l, d in zip(layers, (5, 8)):
        l.build(d)
    plan = fm_plan.build_plan(layers, 1, ("exp_avg", "exp_avg_sq"), np.int32, 0)
    codes = [op.code for op in plan.lists[fm_plan.TRAIN]]
    assert codes == ["gather", "dense_fwd", "dense_fwd", "xent", "dense_bwd_w", "dense_bwd_x",
                     "dense_bwd_w", "optimizer", "step_end"]
    names = [op.name for op in plan.lists[fm_plan.TRAIN]]
    assert "layer1.backward.dX" in names
    assert [op.code for op in plan.lists[fm_plan.PREDICT]][-2:] == ["store", "step_end"]
    assert "layer0.forward" in plan.describe()
    assert fm_plan.OPCODES == tuple(fm._C.engine_opcodes)
    # an op that reads a buffer nothing wrote is refused at build time
    bad = list(plan.lists[fm_plan.TRAIN])
    bad.insert(1, fm_plan.Op("dense_fwd", "early", (plan.buf("layer0.out").id,
                                                   plan.buf("layer1.kernel").id, None,
                                                   plan.buf("layer1.out").id), (8, 3, 0, 0)))
    plan.lists[fm_plan.TRAIN] = bad
    with pytest.raises(ValueError, match="'early'.*reads 'layer0.out' before"):
        fm_plan.validate(plan)


def test_native_engine_checks_its_inputs():
    e = fm._C.new_engine("cpu", 0)
    e.set_buffers([0, 0])
    with pytest.raises(ValueError, match="unknown opcode"):
        e.set_ops(0, [(99, [0], [])])
    with pytest.raises(ValueError, match="names buffer 5"):
        e.set_ops(0, [(0, [5], [])])
    with pytest.raises(ValueError, match="at most"):
        e.set_ops(0, [(0, [0] * (fm._C.engine_max_bufs + 1), [])])
    dense = fm_plan.OPCODES.index("dense_fwd")
    e.set_ops(0, [(dense, [0, 1, -1, 0], [1, 1, 0, 0])])
    with pytest.raises(ValueError, match=r"op 0 \(dense_fwd\) needs buffer 0, which is not bound"):
        e.run(0, 1, 1, 0, 1, 0)
    with pytest.raises(ValueError, match="no engine for device"):
        fm._C.new_engine("tpu", 0)
