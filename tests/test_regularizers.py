"""Weight regularizers (fm.regularizers) and Dense's kernel_regularizer /
bias_regularizer: penalties against sums written out here, Keras' identifiers and
defaults, configs, and models that keep them through save / load."""
import json
import math

import numpy as np
import pytest

import fastmlp as fm
from fastmlp import regularizers as R


def _penalty64(w, l1, l2):
    """The penalty summed element by element in float64 (Python floats)."""
    flat = [float(v) for v in np.asarray(w).ravel()]
    return l1 * math.fsum(abs(v) for v in flat) + l2 * math.fsum(v * v for v in flat)


def test_penalties(backend, rng):
    w = rng.normal(size=(7, 5)).astype(np.float32)
    dev = backend.to(w)
    for reg, (l1, l2) in ((R.L1(0.3), (0.3, 0.0)), (R.L2(0.2), (0.0, 0.2)),
                          (R.L1L2(0.01, 0.5), (0.01, 0.5))):
        assert (reg.l1, reg.l2) == (l1, l2)
        got = reg(dev)
        assert isinstance(got, float)
        assert got == pytest.approx(_penalty64(w, l1, l2), rel=1e-12)
    assert R.Regularizer()(dev) == 0.0


def test_keras_doc_examples():
    # keras.regularizers docs: L2(2.) of a 5x5 of ones is 50; L1(0.01) of a 5x5 of 1s is 0.25
    assert R.L2(2.0)(np.ones((5, 5), np.float32)) == 50.0
    assert R.L1(0.01)(np.ones((5, 5), np.float32)) == pytest.approx(0.25, rel=1e-15)


def test_zero_coefficient_term_is_skipped():
    w = np.array([np.inf, 1.0], np.float32)  # as Keras: a 0 coefficient adds nothing
    assert R.L1L2(l1=0.5, l2=0.0)(w) == math.inf
    assert R.L1L2(l1=0.0, l2=0.0)(w) == 0.0


def test_defaults_and_aliases():
    assert (R.L1().l1, R.L1().l2) == (0.01, 0.0)
    assert (R.L2().l1, R.L2().l2) == (0.0, 0.01)
    assert (R.L1L2().l1, R.L1L2().l2) == (0.0, 0.0)
    assert R.l1 is R.L1 and R.l2 is R.L2
    both = R.l1_l2()
    assert isinstance(both, R.L1L2) and (both.l1, both.l2) == (0.01, 0.01)
    assert (R.l1_l2(l2=0.3).l1, R.l1_l2(l2=0.3).l2) == (0.01, 0.3)
    assert R.L1(None).l1 == 0.01 and R.L1L2(None, None).l2 == 0.0  # None: the default


def test_get():
    assert R.get(None) is None
    reg = R.L2(0.5)
    assert R.get(reg) is reg
    for name, want in (("l1", (0.01, 0.0)), ("l2", (0.0, 0.01)), ("l1_l2", (0.01, 0.01)),
                       ("L1", (0.01, 0.0)), ("L1L2", (0.0, 0.0))):
        got = R.get(name)
        assert isinstance(got, R.Regularizer) and (got.l1, got.l2) == want, name
    got = R.get({"class_name": "L1L2", "config": {"l1": 0.25, "l2": 0.125},
                 "module": "keras.regularizers"})  # Keras' extra keys are ignored
    assert type(got) is R.L1L2 and (got.l1, got.l2) == (0.25, 0.125)
    with pytest.raises(ValueError, match="could not interpret regularizer identifier 'l3'"):
        R.get("l3")
    with pytest.raises(ValueError, match="could not interpret"):
        R.get(lambda w: 0.0)
    with pytest.raises(ValueError, match="unknown regularizer class 'Orthogonal'"):
        R.get({"class_name": "Orthogonal", "config": {}})

    class Custom(R.Regularizer):
        pass

    with pytest.raises(ValueError, match="unsupported regularizer Custom"):
        R.get(Custom())


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, "0.1", True])
def test_bad_coefficients(bad):
    with pytest.raises(ValueError, match="'l1' must be a finite number >= 0"):
        R.L1(bad)
    with pytest.raises(ValueError, match="'l2' must be a finite number >= 0"):
        R.L1L2(0.0, bad)


@pytest.mark.parametrize("reg", [R.L1(0.3), R.L2(1e-4), R.L1L2(0.1, 0.2), R.Regularizer()],
                         ids=lambda r: type(r).__name__)
def test_config_round_trip(reg):
    d = json.loads(json.dumps(R.serialize(reg)))
    back = R.get(d)
    assert type(back) is type(reg) and (back.l1, back.l2) == (reg.l1, reg.l2)
    assert type(reg).from_config(reg.get_config()).get_config() == reg.get_config()
    assert repr(reg).startswith(type(reg).__name__ + "(")
    assert R.serialize(None) is None


# ----------------------------------------------------------------- Dense


def test_dense_arguments_config_and_signature():
    d = fm.Dense(4, input_dim=3, kernel_regularizer="l2", bias_regularizer=R.L1(0.5))
    assert type(d.kernel_regularizer) is R.L2 and d.kernel_regularizer.l2 == 0.01
    assert d.bias_regularizer.l1 == 0.5
    cfg = d.get_config()
    assert cfg["kernel_regularizer"] == {"class_name": "L2", "config": {"l2": 0.01}}
    assert cfg["bias_regularizer"] == {"class_name": "L1", "config": {"l1": 0.5}}
    again = fm.layers.from_config(json.loads(json.dumps(cfg)))
    assert (again.kernel_regularizer.l1, again.kernel_regularizer.l2) == (0.0, 0.01)
    assert again.signature() == d.signature()
    hash(d.signature())  # the plan cache keys on it
    sig = dict(d.signature())
    assert sig["kernel_regularizer"] == (0.0, 0.01) and sig["bias_regularizer"] == (0.5, 0.0)
    # the coefficients change the signature (hence the plan); None stays None
    other = fm.Dense(4, input_dim=3, kernel_regularizer=R.L2(0.02), bias_regularizer=R.L1(0.5))
    assert other.signature() != d.signature()
    plain = fm.Dense(4, input_dim=3)
    assert plain.kernel_regularizer is None and plain.get_config()["bias_regularizer"] is None
    assert dict(plain.signature())["kernel_regularizer"] is None


def test_dense_config_without_the_keys_means_none():
    cfg = fm.Dense(5, input_dim=2).get_config()
    del cfg["kernel_regularizer"], cfg["bias_regularizer"]  # a file from before them
    d = fm.layers.from_config(cfg)
    assert d.kernel_regularizer is None and d.bias_regularizer is None


def test_dense_bad_regularizer():
    with pytest.raises(ValueError, match="Dense: 'kernel_regularizer': could not interpret"):
        fm.Dense(3, kernel_regularizer="l3")
    with pytest.raises(ValueError, match="Dense: 'bias_regularizer'.*'l2' must be"):
        fm.Dense(3, bias_regularizer={"class_name": "L2", "config": {"l2": -1.0}})


def test_model_save_load_keeps_regularizers(tmp_path):
    fm.set_seed(0)
    model = fm.Sequential([fm.Dense(8, activation="relu", input_dim=4,
                                    kernel_regularizer=R.L1L2(1e-3, 1e-2)),
                           fm.Dense(3, bias_regularizer="l2")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    path = tmp_path / "m.safetensors"
    model.save(path)
    loaded = fm.load_model(path)
    k = loaded.layers[0].kernel_regularizer
    assert type(k) is R.L1L2 and (k.l1, k.l2) == (1e-3, 1e-2)
    assert loaded.layers[0].bias_regularizer is None
    assert loaded.layers[1].bias_regularizer.l2 == 0.01
    assert [l.signature() for l in loaded.layers] == [l.signature() for l in model.layers]
