"""fit's lean CPU loop (C++ ``_C.cpu.train_steps``) against the step-by-step path.

Both run the same kernels in the same order, so the weights, the optimizer state and
the logged loss/accuracy must be equal bit for bit -- across optimizers, shuffling, a
partial last batch, one-hot labels, a layer without bias, a ReLU on the last layer
and a deeper stack. ``FASTMLP_LEAN_FIT=0`` selects the step-by-step path.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastmlp as fm


def _data(rng, n=203, d=37, classes=7):
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, classes, n).astype(np.int64)
    return x, y


def _fit(monkeypatch, lean, layers, opt, x, y, loss="sparse_categorical_crossentropy",
         **kw):
    monkeypatch.setenv("FASTMLP_LEAN_FIT", "1" if lean else "0")
    fm.set_seed(3)
    model = fm.Sequential(layers())
    model.compile(optimizer=opt(), loss=loss, metrics=["accuracy"])
    calls = []
    if lean:  # prove the lean loop ran: count its C++ calls
        real = fm._C.cpu.train_steps
        monkeypatch.setattr(fm._C.cpu, "train_steps",
                            lambda *a: calls.append(1) or real(*a))
    hist = model.fit(x, y, verbose=0, **kw)
    if lean:
        assert calls, "the lean loop did not run"
    return model, hist


def _same(m1, h1, m0, h0):
    for a, b in zip(m1.get_weights(), m0.get_weights()):
        assert np.array_equal(a, b)
    s1, s0 = m1.optimizer.state_arrays(), m0.optimizer.state_arrays()
    assert s1.keys() == s0.keys()
    for k in s1:
        assert np.array_equal(s1[k], s0[k]), k
    assert m1.optimizer.iterations == m0.optimizer.iterations > 0
    for k in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert h1.history.get(k) == h0.history.get(k), k


OPTS = {
    "adam": lambda: fm.optim.Adam(lr=3e-3),
    "adamw": lambda: fm.optim.AdamW(lr=3e-3, weight_decay=0.05),
    "adam-wd": lambda: fm.optim.Adam(lr=3e-3, weight_decay=0.01),
    "sgd": lambda: fm.optim.SGD(lr=0.05),
    "sgd-nesterov": lambda: fm.optim.SGD(lr=0.05, momentum=0.9, nesterov=True,
                                         weight_decay=1e-3),
}


@pytest.mark.parametrize("opt", OPTS.values(), ids=OPTS.keys())
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffle", "inorder"])
def test_lean_equals_step_by_step(monkeypatch, rng, opt, shuffle):
    x, y = _data(rng)
    layers = lambda: [fm.Dense(16, activation="relu", input_dim=37), fm.Dense(7)]  # noqa: E731
    kw = dict(epochs=3, batch_size=32, shuffle=shuffle, validation_split=0.2)
    _same(*_fit(monkeypatch, True, layers, opt, x, y, **kw),
          *_fit(monkeypatch, False, layers, opt, x, y, **kw))


def test_lean_deep_stack_onehot_nobias_relu_last(monkeypatch, rng):
    x, y = _data(rng, n=150)
    onehot = np.eye(7, dtype=np.float32)[y]
    layers = lambda: [fm.Dense(24, activation="relu", input_dim=37),  # noqa: E731
                      fm.Dense(11, activation="relu", use_bias=False),
                      fm.Dense(9),
                      fm.Dense(7, activation="relu")]
    kw = dict(epochs=2, batch_size=50, loss="categorical_crossentropy")
    _same(*_fit(monkeypatch, True, layers, OPTS["adam"], x, onehot, **kw),
          *_fit(monkeypatch, False, layers, OPTS["adam"], x, onehot, **kw))


def test_lean_batch_larger_than_data_and_many_chunks(monkeypatch, rng):
    x, y = _data(rng, n=150)
    layers = lambda: [fm.Dense(5, activation="relu", input_dim=37), fm.Dense(7)]  # noqa: E731
    for bs in (1000, 1):  # one partial batch; 150 steps = several C++ chunks
        kw = dict(epochs=1, batch_size=bs)
        _same(*_fit(monkeypatch, True, layers, OPTS["sgd"], x, y, **kw),
              *_fit(monkeypatch, False, layers, OPTS["sgd"], x, y, **kw))


def test_lean_loop_stops_at_the_first_nonfinite_loss(monkeypatch, rng):
    x, y = _data(rng, n=256)
    onehot = np.eye(7, dtype=np.float32)[y]
    onehot[100] = np.nan  # the batch holding row 100 (unshuffled: step 4 at batch 32)
    y = onehot
    monkeypatch.setenv("FASTMLP_LEAN_FIT", "1")
    model = fm.Sequential([fm.Dense(8, activation="relu", input_dim=37), fm.Dense(7)])
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    with pytest.raises(FloatingPointError, match="at step 4"):
        model.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0)
    assert model.optimizer.iterations == 4  # the failing step ran, nothing after it


def test_custom_optimizer_subclass_takes_the_python_path(monkeypatch, rng):
    """A subclass may override the update rule: fit must call it, not the C++ loop."""
    seen = []

    class Logged(fm.optim.SGD):
        def _update(self, param, grad, state):
            seen.append(1)
            super()._update(param, grad, state)

    x, y = _data(rng, n=64)
    monkeypatch.setenv("FASTMLP_LEAN_FIT", "1")
    model = fm.Sequential([fm.Dense(4, activation="relu", input_dim=37), fm.Dense(7)])
    model.compile(optimizer=Logged(lr=0.1), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    assert len(seen) == 2 * 4  # 2 steps x 4 parameters
