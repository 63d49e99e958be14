"""Export a trained :class:`fastmlp.Sequential` to ONNX, for inference elsewhere
(onnxruntime, TensorRT, ...): ``model.export(path, format="onnx", opset=None)``.

The graph computes what ``model.predict`` does: input ``"input"`` float32
``[batch, features]`` (a symbolic batch dimension), output ``"output"`` float32
``[batch, outputs]`` (softmax probabilities when the last activation is softmax). One
place per layer class (``_emit_*``):

* Dense: ``MatMul`` with the kernel (in, out), ``Add`` of the bias, its activation;
* Activation: its activation;
* Dropout: nothing (the identity in inference);
* BatchNormalization: ``BatchNormalization`` with the moving statistics (inference);
  ``scale=False`` / ``center=False`` give ones / zeros for gamma / beta;
* LayerNormalization: ``LayerNormalization`` over the last axis (opset >= 17), the same
  ones / zeros without gamma / beta.

Activations follow csrc/kernel_math.h (``act_forward``): relu ``Relu``, sigmoid
``Sigmoid``, tanh ``Tanh``, gelu the exact form ``0.5 x (1 + Erf(x * 0.70710678))``,
silu ``x * Sigmoid(x)``, elu ``Elu`` (alpha 1), softplus ``Softplus``, leaky_relu
``LeakyRelu`` (alpha 0.2), softmax ``Softmax`` (axis -1).

The ``onnx`` package is imported only here, when exporting (``pip install
fastmlp[onnx]``). The model is checked with ``onnx.checker.check_model`` before the
file is written (atomically, as ``save`` writes; an unwritable path raises its
``OSError``).
"""
from __future__ import annotations

import numpy as np

from ._interop import cupy_module, is_cupy
from .layers import Activation, BatchNormalization, Dense, Dropout, LayerNormalization

__all__ = ["export", "to_onnx", "FORMATS", "DEFAULT_OPSET", "MIN_OPSET"]

FORMATS = ("onnx",)
DEFAULT_OPSET = 17
MIN_OPSET = 17  # LayerNormalization is an ONNX op from opset 17 on

# csrc/kernel_math.h: kLeakySlope and the gelu constant 1/sqrt(2)
_LEAKY_SLOPE = 0.2
_INV_SQRT2 = 0.70710678118654752


def _onnx():
    """The onnx package, or ImportError saying how to get it."""
    try:
        import onnx
    except ImportError as e:
        raise ImportError("exporting to ONNX needs the 'onnx' package: "
                          "pip install fastmlp[onnx]") from e
    return onnx


def _host(a) -> np.ndarray:
    """A weight (NumPy or CuPy) as a float32 NumPy array."""
    a = cupy_module().asnumpy(a) if is_cupy(a) else np.asarray(a)
    return np.ascontiguousarray(a, dtype=np.float32)


class _Graph:
    """The nodes and initializers (weights, constants) of the graph being built."""

    def __init__(self, onnx):
        self.onnx = onnx
        self.nodes = []
        self.initializers = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, hint: str, value) -> str:
        """An initializer holding ``value`` (float32); its name."""
        name = self.name(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(
            np.ascontiguousarray(value, dtype=np.float32), name))
        return name

    def op(self, op_type: str, inputs, hint: str, **attrs) -> str:
        """A node of ``op_type`` on ``inputs``; the name of its (single) output."""
        out = self.name(hint)
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), [out],
                                                     name=out, **attrs))
        return out


def _emit_activation(g: _Graph, x: str, act, hint: str) -> str:
    """``act(x)`` (fastmlp's canonical names: None for linear, "silu" for swish)."""
    if act is None:
        return x
    simple = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "softplus": "Softplus"}
    if act in simple:
        return g.op(simple[act], [x], f"{hint}.{act}")
    if act == "elu":
        return g.op("Elu", [x], f"{hint}.elu", alpha=1.0)
    if act == "leaky_relu":
        return g.op("LeakyRelu", [x], f"{hint}.leaky_relu", alpha=_LEAKY_SLOPE)
    if act == "softmax":
        return g.op("Softmax", [x], f"{hint}.softmax", axis=-1)
    if act == "silu":
        s = g.op("Sigmoid", [x], f"{hint}.silu.sigmoid")
        return g.op("Mul", [x, s], f"{hint}.silu")
    if act == "gelu":  # 0.5 * x * (1 + erf(x * (1/sqrt 2))), as kernel_math.h
        t = g.op("Mul", [x, g.const(f"{hint}.gelu.inv_sqrt2", _INV_SQRT2)], f"{hint}.gelu.t")
        e = g.op("Erf", [t], f"{hint}.gelu.erf")
        e1 = g.op("Add", [e, g.const(f"{hint}.gelu.one", 1.0)], f"{hint}.gelu.1p")
        xe = g.op("Mul", [x, e1], f"{hint}.gelu.x")
        return g.op("Mul", [xe, g.const(f"{hint}.gelu.half", 0.5)], f"{hint}.gelu")
    raise ValueError(f"export: activation {act!r} has no ONNX form")  # layers.py checks names


def _emit_dense(g, x, layer: Dense, hint):
    y = g.op("MatMul", [x, g.const(f"{hint}.kernel", _host(layer.kernel))], f"{hint}.matmul")
    if layer.use_bias:
        y = g.op("Add", [y, g.const(f"{hint}.bias", _host(layer.bias))], f"{hint}.bias_add")
    return _emit_activation(g, y, layer.activation, hint)


def _affine(layer) -> tuple:
    """(gamma, beta) of a normalization layer; ones / zeros for those it lacks."""
    d = layer.input_dim
    gamma = _host(layer.gamma) if layer.scale else np.ones((d,), np.float32)
    beta = _host(layer.beta) if layer.center else np.zeros((d,), np.float32)
    return gamma, beta


def _emit_batch_norm(g, x, layer: BatchNormalization, hint):
    gamma, beta = _affine(layer)
    inputs = [x, g.const(f"{hint}.gamma", gamma), g.const(f"{hint}.beta", beta),
              g.const(f"{hint}.moving_mean", _host(layer.moving_mean)),
              g.const(f"{hint}.moving_variance", _host(layer.moving_variance))]
    return g.op("BatchNormalization", inputs, f"{hint}.batch_norm", epsilon=layer.epsilon)


def _emit_layer_norm(g, x, layer: LayerNormalization, hint):
    gamma, beta = _affine(layer)
    inputs = [x, g.const(f"{hint}.gamma", gamma), g.const(f"{hint}.beta", beta)]
    return g.op("LayerNormalization", inputs, f"{hint}.layer_norm", axis=-1,
                epsilon=layer.epsilon)


def _emit_layer(g, x, layer, hint):
    if isinstance(layer, Dense):
        return _emit_dense(g, x, layer, hint)
    if isinstance(layer, Activation):
        return _emit_activation(g, x, layer.activation, hint)
    if isinstance(layer, Dropout):
        return x
    if isinstance(layer, BatchNormalization):
        return _emit_batch_norm(g, x, layer, hint)
    if isinstance(layer, LayerNormalization):
        return _emit_layer_norm(g, x, layer, hint)
    raise ValueError(f"export: no ONNX form for the layer {layer!r}")


def _opset_arg(onnx, opset) -> int:
    if opset is None:
        return DEFAULT_OPSET
    newest = onnx.defs.onnx_opset_version()
    ok = isinstance(opset, (int, np.integer)) and not isinstance(opset, (bool, np.bool_))
    if not ok or not MIN_OPSET <= opset <= newest:
        raise ValueError(f"export: 'opset' must be an integer in [{MIN_OPSET}, {newest}] "
                         f"(the installed onnx package's newest), or None for "
                         f"{DEFAULT_OPSET}; got {opset!r}")
    return int(opset)


def to_onnx(model, opset=None):
    """The ONNX ``ModelProto`` of a built ``model`` (checked by onnx.checker)."""
    model._require_built("export")
    onnx = _onnx()
    opset = _opset_arg(onnx, opset)
    helper = onnx.helper
    g = _Graph(onnx)
    x = "input"
    for i, layer in enumerate(model.layers):
        x = _emit_layer(g, x, layer, f"layer{i}")
    if not g.nodes:  # only Dropout layers: the identity
        g.nodes.append(helper.make_node("Identity", [x], ["output"], name="output"))
    else:  # the last node writes the graph's output (no other node reads it)
        g.nodes[-1].output[0] = "output"
    f32 = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        g.nodes, model.name or "sequential",
        [helper.make_tensor_value_info("input", f32, ["batch", int(model.input_dim)])],
        [helper.make_tensor_value_info("output", f32, ["batch", int(model.output_dim)])],
        initializer=g.initializers)
    from . import __version__

    opset_ids = [helper.make_opsetid("", opset)]
    proto = helper.make_model(graph, producer_name="fastmlp", producer_version=__version__,
                              opset_imports=opset_ids)
    # the oldest IR version that carries this opset: the widest range of runtimes read it
    proto.ir_version = helper.find_min_ir_version_for(opset_ids)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export(model, path, format="onnx", opset=None) -> None:
    """Write ``model`` to ``path`` in ``format`` (only "onnx"); see the module's doc."""
    if format not in FORMATS:
        raise ValueError(f"export: unknown format {format!r}; supported: {list(FORMATS)}")
    data = to_onnx(model, opset).SerializeToString()
    from .saving import write_atomic

    write_atomic(path, data)

