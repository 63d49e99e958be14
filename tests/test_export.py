"""ONNX export: ``model.export(path, format="onnx")`` runs in onnxruntime with the
outputs of ``model.predict`` (rtol = atol = 1e-5), for every activation and layer type,
on models trained a few steps (non-trivial weights and BatchNormalization moving
statistics); the file loads and passes the checker; the errors. Skipped only where
the onnx or onnxruntime packages are not installed."""
from __future__ import annotations

import sys

import numpy as np
import pytest

import fastmlp as fm
from helpers import blobs

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

FEATURES, CLASSES = 12, 5
TOL = 1e-5
ELEMENTWISE = ("linear", "relu", "sigmoid", "tanh", "gelu", "silu", "swish", "elu",
               "softplus", "leaky_relu")


def data(n=64, seed=0):
    x, y = blobs(n, FEATURES, CLASSES, seed=seed)
    return x, y


def trained(layers, steps=4, device="cpu", seed=0):
    """A model of ``layers`` trained ``steps`` Adam steps (batch 16): weights that are not
    the initial ones, and moving statistics away from (0, 1)."""
    fm.set_seed(seed)
    model = fm.Sequential(layers)
    model.compile(optimizer=fm.optim.Adam(lr=1e-2), loss="sparse_categorical_crossentropy")
    before = [w.copy() for w in model.get_weights()] if model.built else None
    x, y = data(16 * steps, seed=seed + 1)
    model.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0, device=device)
    if before is not None:
        for i, (a, b) in enumerate(zip(before, model.get_weights())):
            assert not np.array_equal(a, b), f"weight {i} did not change in training"
    return model


def run_onnx(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["output"], {"input": np.ascontiguousarray(x, dtype=np.float32)})[0]


def check_export(model, tmp_path, opset=None, scale=1.0):
    """Export, load and check the file, and compare onnxruntime with predict on
    batches of 1 and 37 rows (the same file)."""
    path = tmp_path / "model.onnx"
    model.export(path, opset=opset)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    rng = np.random.default_rng(7)
    for rows in (1, 37):
        x = (blobs(rows, FEATURES, CLASSES, seed=rows)[0] * scale
             + rng.normal(0, 0.1, (rows, FEATURES))).astype(np.float32)
        want = model.predict(x)
        got = run_onnx(path, x)
        assert got.shape == want.shape == (rows, model.output_dim)
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL,
                                   err_msg=f"onnxruntime vs predict, {rows} rows")
    return proto


# ------------------------------------------------------------------- activations


@pytest.mark.parametrize("act", ELEMENTWISE + ("softmax",))
def test_dense_activation(act, tmp_path):
    model = trained([fm.Dense(16, activation="tanh", input_dim=FEATURES),
                     fm.Dense(CLASSES, activation=act)])
    out = check_export(model, tmp_path)
    if act == "softmax":
        assert [n.op_type for n in out.graph.node][-1] == "Softmax"


@pytest.mark.parametrize("act", ELEMENTWISE + ("softmax",))
def test_activation_layer(act, tmp_path):
    """In the middle and at the output (softmax: at the output only, as Sequential allows)."""
    hidden = [] if act == "softmax" else [fm.Activation(act)]
    model = trained([fm.Dense(16, input_dim=FEATURES), *hidden, fm.Dense(CLASSES),
                     fm.Activation(act)])
    check_export(model, tmp_path)


@pytest.mark.parametrize("act", ELEMENTWISE)
def test_activation_hidden_wide_range(act, tmp_path):
    """Pre-activations in the tens (softplus, elu, gelu, sigmoid saturate or overflow
    there if computed naively)."""
    model = trained([fm.Dense(16, activation=act, input_dim=FEATURES), fm.Dense(CLASSES)])
    check_export(model, tmp_path, scale=8.0)


@pytest.mark.parametrize("act", ELEMENTWISE + ("softmax",))
def test_activation_extreme_inputs(act, tmp_path):
    """The activation alone on values from -100 to 100 (overflow and saturation)."""
    model = fm.Sequential([fm.Activation(act, input_dim=9)])
    x = np.array([[-100, -30, -5, -1e-3, 0, 1e-3, 5, 30, 100]], np.float32)
    model.export(tmp_path / "m.onnx")
    got = run_onnx(tmp_path / "m.onnx", np.concatenate([x, -x[:, ::-1] / 7]))
    want = model.predict(np.concatenate([x, -x[:, ::-1] / 7]))
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


# ------------------------------------------------------------------- layers


def test_dense_without_bias_and_dropout(tmp_path):
    model = trained([fm.Dense(16, activation="relu", use_bias=False, input_dim=FEATURES),
                     fm.Dropout(0.5), fm.Dense(16, activation="gelu"), fm.Dropout(0.2),
                     fm.Dense(CLASSES, use_bias=False)])
    proto = check_export(model, tmp_path)
    assert "Dropout" not in {n.op_type for n in proto.graph.node}


@pytest.mark.parametrize("center,scale", [(True, True), (False, True), (True, False),
                                          (False, False)])
def test_batch_normalization(center, scale, tmp_path):
    model = trained([fm.Dense(16, activation="relu", input_dim=FEATURES),
                     fm.BatchNormalization(momentum=0.5, epsilon=0.25, center=center,
                                           scale=scale),
                     fm.Dense(CLASSES)])
    bn = model.layers[1]
    assert not np.allclose(bn.moving_mean, 0.0)  # the moving statistics were trained
    assert not np.allclose(bn.moving_variance, 1.0)
    proto = check_export(model, tmp_path)
    node = [n for n in proto.graph.node if n.op_type == "BatchNormalization"][0]
    assert onnx.helper.get_attribute_value(node.attribute[0]) == pytest.approx(0.25)


@pytest.mark.parametrize("center,scale", [(True, True), (False, True), (True, False),
                                          (False, False)])
def test_layer_normalization(center, scale, tmp_path):
    model = trained([fm.Dense(16, activation="relu", input_dim=FEATURES),
                     fm.LayerNormalization(epsilon=0.25, center=center, scale=scale),
                     fm.Dense(CLASSES)])
    check_export(model, tmp_path)


def test_every_layer_deep_model(tmp_path):
    model = trained([fm.Dense(32, activation="silu", input_dim=FEATURES),
                     fm.BatchNormalization(momentum=0.5), fm.Dropout(0.1),
                     fm.Dense(24), fm.Activation("elu"), fm.LayerNormalization(),
                     fm.Dense(16, activation="leaky_relu"), fm.BatchNormalization(center=False),
                     fm.Dense(CLASSES, activation="softmax")], steps=6)
    check_export(model, tmp_path)


def test_normalization_first_layer(tmp_path):
    """A normalization layer reading the graph's input directly."""
    model = trained([fm.BatchNormalization(momentum=0.5, input_dim=FEATURES),
                     fm.LayerNormalization(), fm.Dense(CLASSES)])
    check_export(model, tmp_path)


def test_model_built_from_data_and_untrained(tmp_path):
    fm.set_seed(3)
    model = fm.Sequential([fm.Dense(8, activation="sigmoid"), fm.Dense(CLASSES)])
    model.build(FEATURES)
    check_export(model, tmp_path)


def test_dropout_only_model_is_the_identity(tmp_path):
    model = fm.Sequential([fm.Dropout(0.3, input_dim=FEATURES)])
    proto = check_export(model, tmp_path)
    assert [n.op_type for n in proto.graph.node] == ["Identity"]


def test_loaded_model_exports_the_same(tmp_path):
    model = trained([fm.Dense(16, activation="gelu", input_dim=FEATURES),
                     fm.BatchNormalization(), fm.Dense(CLASSES, activation="softmax")])
    model.save(tmp_path / "m.safetensors")
    loaded = fm.load_model(tmp_path / "m.safetensors")
    model.export(tmp_path / "a.onnx")
    loaded.export(tmp_path / "b.onnx")
    x = data(20, seed=9)[0]
    np.testing.assert_array_equal(run_onnx(tmp_path / "a.onnx", x),
                                  run_onnx(tmp_path / "b.onnx", x))


# ------------------------------------------------------------------- the file


def test_graph_interface_and_metadata(tmp_path):
    model = trained([fm.Dense(16, activation="relu", input_dim=FEATURES), fm.Dense(CLASSES)])
    proto = check_export(model, tmp_path)
    assert proto.producer_name == "fastmlp"
    assert proto.producer_version == fm.__version__
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("input", "output")
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    in_dims = inp.type.tensor_type.shape.dim
    out_dims = out.type.tensor_type.shape.dim
    assert in_dims[0].dim_param and not in_dims[0].HasField("dim_value")  # symbolic batch
    assert in_dims[0].dim_param == out_dims[0].dim_param
    assert (in_dims[1].dim_value, out_dims[1].dim_value) == (FEATURES, CLASSES)
    # the weights are the model's, bit for bit
    arrays = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer]
    for w in model.get_weights():
        assert any(a.shape == w.shape and np.array_equal(a, w) for a in arrays)


def test_newer_opset(tmp_path):
    model = trained([fm.Dense(16, activation="gelu", input_dim=FEATURES),
                     fm.LayerNormalization(), fm.Dense(CLASSES, activation="softmax")])
    proto = check_export(model, tmp_path, opset=18)
    assert [o.version for o in proto.opset_import] == [18]


def test_overwrites_an_existing_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    model = trained([fm.Dense(CLASSES, input_dim=FEATURES)])
    model.export(str(path))
    x = data(5)[0]
    np.testing.assert_allclose(run_onnx(path, x), model.predict(x), rtol=TOL, atol=TOL)


# ------------------------------------------------------------------- errors


def test_unbuilt_model_refused(tmp_path):
    model = fm.Sequential([fm.Dense(4), fm.Dense(2)])
    with pytest.raises(ValueError, match="not built"):
        model.export(tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("fmt", ["tflite", "ONNX", None, 1])
def test_unknown_format_refused(fmt, tmp_path):
    model = fm.Sequential([fm.Dense(2, input_dim=3)])
    with pytest.raises(ValueError, match="'onnx'"):
        model.export(tmp_path / "m.onnx", format=fmt)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("opset", [16, 0, 10**6, 17.0, "17", True])
def test_bad_opset_refused(opset, tmp_path):
    model = fm.Sequential([fm.Dense(2, input_dim=3)])
    with pytest.raises(ValueError, match="opset"):
        model.export(tmp_path / "m.onnx", opset=opset)
    assert not list(tmp_path.iterdir())


def test_unwritable_path_raises_oserror(tmp_path):
    model = fm.Sequential([fm.Dense(2, input_dim=3)])
    with pytest.raises(FileNotFoundError):
        model.export(tmp_path / "no" / "such" / "folder" / "m.onnx")
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(OSError):
        model.export(tmp_path / "dir.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["dir.onnx"]  # no temporary left


def test_missing_onnx_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    model = fm.Sequential([fm.Dense(2, input_dim=3)])
    with pytest.raises(ImportError, match=r"pip install fastmlp\[onnx\]"):
        model.export(tmp_path / "m.onnx")


# ------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_model_exports_the_same(gpu, tmp_path):
    layers = lambda: [fm.Dense(32, activation="gelu", input_dim=FEATURES),  # noqa: E731
                      fm.BatchNormalization(momentum=0.5), fm.Dropout(0.1),
                      fm.Dense(16, activation="silu"), fm.LayerNormalization(scale=False),
                      fm.Dense(CLASSES, activation="softmax")]
    model = trained(layers(), device="cuda")
    assert model.device == "cuda" and isinstance(model.layers[0].kernel, gpu.xp.ndarray)
    proto = check_export(model, tmp_path)
    # the file holds the device's weights, copied to the host
    arrays = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer]
    for w in model.get_weights():
        assert any(a.shape == w.shape and np.array_equal(a, w) for a in arrays)
    # predict on CuPy input agrees too
    x = data(37, seed=5)[0]
    want = gpu.xp.asnumpy(model.predict(gpu.xp.asarray(x)))
    np.testing.assert_allclose(run_onnx(tmp_path / "model.onnx", x), want, rtol=TOL, atol=TOL)
