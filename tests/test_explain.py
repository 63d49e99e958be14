"""fm.explain: saliency, gradient x input and integrated gradients (issue 18).

Every attribution is held to an independent float64 computation of the same model
(fm.reference.model_input_gradient: the layers' inference forward and the chain rule
by hand), to Captum on the same weights where it is installed, and to its own
properties (completeness of integrated gradients); the C++ engines are held to the
Python executor bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastmlp as fm
from fastmlp import reference as ref

# float32 forward and backward through a few layers vs float64: gradients of O(1)
# outputs agree to a few 1e-6 relative to the largest attribution.
TOL = 2e-5


def _model(kind, d=12, c=5, seed=0):
    fm.set_seed(seed)
    if kind == "relu_softmax":
        layers = [fm.Dense(16, activation="relu", input_dim=d), fm.Dense(c, activation="softmax")]
        loss = "sparse_categorical_crossentropy"
    elif kind == "tanh_logits":
        layers = [fm.Dense(16, activation="tanh", input_dim=d), fm.Dense(c)]
        loss = "sparse_categorical_crossentropy"
    elif kind == "gelu_dropout_ln":
        layers = [fm.Dense(16, activation="gelu", input_dim=d), fm.Dropout(0.3),
                  fm.LayerNormalization(), fm.Dense(9, activation="silu"),
                  fm.Dense(c, activation="softmax")]
        loss = "sparse_categorical_crossentropy"
    elif kind == "bn_sigmoid":
        layers = [fm.Dense(16, input_dim=d), fm.BatchNormalization(), fm.Activation("elu"),
                  fm.Dense(1, activation="sigmoid")]
        loss = "binary_crossentropy"
        c = 1
    elif kind == "dropout_first_mse":
        layers = [fm.Dropout(0.2, input_dim=d), fm.Dense(8, activation="softplus"),
                  fm.Dense(c, activation="tanh")]
        loss = "mse"
    else:
        raise ValueError(kind)
    model = fm.Sequential(layers)
    model.compile(optimizer=fm.optim.Adam(1e-2), loss=loss)
    rng = np.random.default_rng(seed)
    x = rng.random((64, d), dtype=np.float32)
    if kind == "bn_sigmoid":  # moving statistics that are not the initial 0 / 1
        model.fit(x, (x[:, 0] > 0.5).astype(np.float32)[:, None], epochs=2, batch_size=16,
                  verbose=0, device="cpu")
    return model, c


KINDS = ["relu_softmax", "tanh_logits", "gelu_dropout_ln", "bn_sigmoid", "dropout_first_mse"]


def _x(rng, n, d=12):
    return rng.random((n, d), dtype=np.float32)


def _close(got, want, what):
    got = np.asarray(got, np.float64)
    scale = max(float(np.abs(want).max()), 1e-30)
    assert float(np.abs(want).max()) > 0, f"{what}: the reference is all zeros"
    err = float(np.abs(got - want).max()) / scale
    assert err < TOL, f"{what}: max error {err:.3g} of the largest value {scale:.3g}"


@pytest.mark.parametrize("kind", KINDS)
def test_saliency_and_gradient_x_input_match_float64(backend, rng, kind):
    model, c = _model(kind)
    model.to("cuda" if backend.is_gpu else "cpu")
    x = _x(rng, 37)
    t = rng.integers(0, c, size=37)
    layers = model.layers
    _close(backend.host(fm.explain.saliency(model, backend.to(x), t)),
           ref.saliency(layers, x, t), f"{kind} saliency")
    _close(backend.host(fm.explain.saliency(model, backend.to(x), t, abs=False)),
           ref.saliency(layers, x, t, abs=False), f"{kind} signed saliency")
    _close(backend.host(fm.explain.gradient_x_input(model, backend.to(x), t)),
           ref.gradient_x_input(layers, x, t), f"{kind} gradient x input")


@pytest.mark.parametrize("method", fm.explain.METHODS)
@pytest.mark.parametrize("kind", ["relu_softmax", "gelu_dropout_ln", "bn_sigmoid"])
def test_integrated_gradients_match_float64(backend, rng, kind, method):
    model, c = _model(kind)
    model.to("cuda" if backend.is_gpu else "cpu")
    x = _x(rng, 9)
    base = rng.random(12, dtype=np.float32) * 0.1
    t = rng.integers(0, c, size=9)
    alphas, weights = fm.explain.quadrature(method, 7)
    for baseline in (None, base):
        got = fm.explain.integrated_gradients(model, backend.to(x), t, baseline=baseline,
                                              steps=7, method=method, batch_size=4)
        want = ref.integrated_gradients(model.layers, x, t, alphas, weights,
                                        baseline=baseline)
        _close(backend.host(got), want, f"{kind} IG {method} baseline={baseline is not None}")


def test_quadrature_rules_are_captums():
    a, w = fm.explain.quadrature("riemann_trapezoid", 5)
    np.testing.assert_allclose(a, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(w, [0.1, 0.2, 0.2, 0.2, 0.1])
    a, w = fm.explain.quadrature("riemann_middle", 4)
    np.testing.assert_allclose(a, [0.125, 0.375, 0.625, 0.875])
    a, _ = fm.explain.quadrature("riemann_left", 4)
    np.testing.assert_allclose(a, [0, 0.25, 0.5, 0.75])
    a, _ = fm.explain.quadrature("riemann_right", 4)
    np.testing.assert_allclose(a, [0.25, 0.5, 0.75, 1])
    a, w = fm.explain.quadrature("gausslegendre", 3)
    np.testing.assert_allclose(w.sum(), 1.0)
    # exact for polynomials of degree 2n - 1: int_0^1 a^5 da = 1/6
    np.testing.assert_allclose((w * a ** 5).sum(), 1 / 6)
    try:
        from captum.attr._utils.approximation_methods import approximation_parameters
    except ImportError:
        return
    for method in fm.explain.METHODS:
        sizes, alphas = approximation_parameters(method)
        a, w = fm.explain.quadrature(method, 11)
        np.testing.assert_allclose(a, alphas(11), atol=1e-7, err_msg=method)
        np.testing.assert_allclose(w, sizes(11), atol=1e-12, err_msg=method)


@pytest.mark.parametrize("kind", ["relu_softmax", "tanh_logits"])
def test_integrated_gradients_completeness(rng, kind):
    """The attributions of a row sum to f(x) - f(baseline), up to the quadrature's
    error (Gauss-Legendre with 50 points on a smooth model: tiny)."""
    model, c = _model(kind)
    x = _x(rng, 20)
    t = rng.integers(0, c, size=20)
    attr = fm.explain.integrated_gradients(model, x, t, steps=50)
    f = ref.model_predict(model.layers, x)[np.arange(20), t]
    f0 = ref.model_predict(model.layers, np.zeros_like(x))[np.arange(20), t]
    gap = np.abs(attr.astype(np.float64).sum(axis=1) - (f - f0))
    assert float(np.abs(f - f0).max()) > 1e-3
    assert float(gap.max()) < 1e-3 * max(1.0, float(np.abs(f - f0).max())), gap.max()


def test_engines_agree_bit_for_bit(monkeypatch, rng):
    model, c = _model("gelu_dropout_ln")
    x = _x(rng, 13)
    t = rng.integers(0, c, size=13)
    native = [fm.explain.integrated_gradients(model, x, t, steps=6, method=m, batch_size=5)
              for m in ("gausslegendre", "riemann_trapezoid")]
    native.append(fm.explain.saliency(model, x, t))
    monkeypatch.setenv("FASTMLP_ENGINE", "python")
    python = [fm.explain.integrated_gradients(model, x, t, steps=6, method=m, batch_size=5)
              for m in ("gausslegendre", "riemann_trapezoid")]
    python.append(fm.explain.saliency(model, x, t))
    for a, b in zip(native, python):
        assert np.abs(a).max() > 0
        np.testing.assert_array_equal(a, b)


def test_batching_does_not_change_the_result(rng):
    model, c = _model("relu_softmax")
    x = _x(rng, 23)
    t = rng.integers(0, c, size=23)
    one = fm.explain.integrated_gradients(model, x, t, steps=8, batch_size=23)
    for bs in (1, 4, 7):
        np.testing.assert_allclose(
            fm.explain.integrated_gradients(model, x, t, steps=8, batch_size=bs), one,
            rtol=1e-5, atol=1e-6 * float(np.abs(one).max()))


def test_default_target_is_the_predicted_class(rng):
    model, _ = _model("relu_softmax")
    x = _x(rng, 10)
    pred = np.argmax(model.predict(x), axis=1)
    np.testing.assert_array_equal(fm.explain.saliency(model, x),
                                  fm.explain.saliency(model, x, pred))
    np.testing.assert_array_equal(fm.explain.saliency(model, x, 2),
                                  fm.explain.saliency(model, x, np.full(10, 2)))


def test_uncompiled_model_and_training_after_explaining(rng):
    fm.set_seed(3)
    model = fm.Sequential([fm.Dense(8, activation="relu", input_dim=12),
                           fm.Dense(3, activation="softmax")])
    x = _x(rng, 6)
    got = fm.explain.saliency(model, x, 1, abs=False)
    _close(got, ref.saliency(model.layers, x, np.full(6, 1), abs=False), "uncompiled")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    y = rng.integers(0, 3, size=64)
    before = model.evaluate(_x(rng, 64), y)["loss"]
    model.fit(_x(rng, 64), y, epochs=1, verbose=0)  # the train list is still the plain one
    assert np.isfinite(model.evaluate(_x(rng, 64), y)["loss"]) and np.isfinite(before)


def test_matches_captum(rng):
    torch = pytest.importorskip("torch")
    captum_attr = pytest.importorskip("captum.attr")
    model, c = _model("relu_softmax")
    w0, b0, w1, b1 = model.get_weights()
    net = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, c),
                              torch.nn.Softmax(dim=1))
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(w0.T.copy()))
        net[0].bias.copy_(torch.from_numpy(b0))
        net[2].weight.copy_(torch.from_numpy(w1.T.copy()))
        net[2].bias.copy_(torch.from_numpy(b1))
    x = _x(rng, 16)
    t = rng.integers(0, c, size=16)
    xt = torch.from_numpy(x)
    tt = torch.from_numpy(t)

    def near(got, want, what):
        want = want.detach().double().numpy()
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 1e-4, f"{what}: {err:.3g}"

    near(fm.explain.saliency(model, x, t), captum_attr.Saliency(net).attribute(xt, target=tt),
         "saliency")
    near(fm.explain.gradient_x_input(model, x, t),
         captum_attr.InputXGradient(net).attribute(xt, target=tt), "gradient x input")
    for method in fm.explain.METHODS:
        want = captum_attr.IntegratedGradients(net).attribute(
            xt, target=tt, n_steps=20, method=method)
        near(fm.explain.integrated_gradients(model, x, t, steps=20, method=method), want,
             f"IG {method}")


def test_errors(rng):
    model, c = _model("relu_softmax")
    x = _x(rng, 4)
    with pytest.raises(ValueError, match="target 5 .*row 1"):
        fm.explain.saliency(model, x, [0, 5, 1, 1])
    with pytest.raises(ValueError, match="one per row"):
        fm.explain.saliency(model, x, [0, 1])
    with pytest.raises(ValueError, match="unknown method"):
        fm.explain.integrated_gradients(model, x, 0, method="simpson")
    with pytest.raises(ValueError, match="steps"):
        fm.explain.integrated_gradients(model, x, 0, steps=1, method="riemann_left")
    with pytest.raises(ValueError, match="baseline"):
        fm.explain.integrated_gradients(model, x, 0, baseline=np.zeros((2, 12), np.float32))
    with pytest.raises(ValueError, match="features"):
        fm.explain.saliency(model, x[:, :5], 0)
    bad = x.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="row 2, column 3"):
        fm.explain.saliency(model, bad, 0)
    with pytest.raises(TypeError, match="Sequential"):
        fm.explain.saliency("model", x, 0)


def test_plot_writes_a_png(tmp_path, rng):
    pytest.importorskip("matplotlib")
    model, c = _model("relu_softmax", d=16)
    x = rng.random((3, 16), dtype=np.float32)
    attr = fm.explain.integrated_gradients(model, x, 1, steps=8)
    path = tmp_path / "attr.png"
    fig = fm.explain.plot(attr, x, shape=(4, 4), path=path, titles=["a", "b", "c"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) >= 6  # an image and a heat map (+ colour bar) per example
    with pytest.raises(ValueError, match="shape"):
        fm.explain.plot(attr, shape=(3, 3))
    import matplotlib.pyplot as plt

    plt.close(fig)


@pytest.mark.gpu
def test_cpu_and_gpu_agree(gpu, rng):
    model, c = _model("gelu_dropout_ln")
    x = _x(rng, 11)
    t = rng.integers(0, c, size=11)
    cpu = fm.explain.integrated_gradients(model, x, t, steps=9)
    model.to("cuda")
    got = gpu.host(fm.explain.integrated_gradients(model, gpu.to(x), t, steps=9))
    np.testing.assert_allclose(got, cpu, rtol=1e-4, atol=1e-5 * float(np.abs(cpu).max()))
