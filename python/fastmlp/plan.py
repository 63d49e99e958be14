"""The step plan: a model compiled into data.

``build_plan`` turns the layers, the loss and the optimizer into a :class:`StepPlan`:
a table of buffers (:class:`Buf`) and five op lists (:class:`Op`) over them --

* ``TRAIN``: one optimizer step: gather the batch (and its sample weights), forward
  per layer, the fused loss (loss + dlogits: the softmax-cross-entropy op with its
  arg-max hits, or the loss op of any other loss), the metrics op when metrics need
  it, backward per layer, in distributed training the gradients' all-reduce over the
  processes (``allreduce``), the optimizer (one update over all parameters; with
  regularizers or clipping the clip op, then one update per parameter tensor),
  ``step_end`` (the pass's sums, next step);
* ``EVALUATE``: gather, forward, loss, metrics, ``step_end``;
* ``PREDICT``: gather, forward (+ softmax), store the rows of the output;
* ``ATTRIBUTE`` (:mod:`fastmlp.explain`): the path points of a batch of images
  (``ig_interp``), the forward in inference mode, the gradient of each row's target
  output (``target_seed``), backward down to the input, the attributions
  (``ig_sum``);
* ``ATTACK`` (:mod:`fastmlp.adversarial`): gather, the attack, store the adversarial
  rows.

An attack (:class:`AttackSpec`: FGSM or PGD) is a prefix of ops: the start point
(``adv_init``), then per attack step the forward in inference mode (dropout off,
BatchNormalization's moving statistics), the loss and its gradient, backward to the
input and the sign step (``adv_step``). Adversarial training puts it before the
training step's forward (which then reads the adversarial rows), adversarial
evaluation before the evaluation's. :meth:`StepPlan.use` swaps such a variant of a
list in, over the same buffers (every plan has the few the variants need).

Each layer class has one place below (``_stages``, then its branch in ``forward``
and ``backward``): Dense is one GEMM with bias, activation and a following Dropout
in its epilogue, and its backward GEMM applies the previous Dense layer's activation
derivative (and dropout mask) in its epilogue; Activation and Dropout are one
elementwise kernel each way; BatchNormalization and LayerNormalization one kernel
each way. The training forward (dropout on, batch statistics) and the inference
forward (dropout off, moving statistics) are emitted separately. Nothing here
allocates or runs anything: :mod:`fastmlp.engine` binds the plan to memory
(:class:`fastmlp.engine.Arena`) and runs it -- op by op in Python (the reference)
or in C++ (``csrc/engine.h``: the CPU loop, CUDA Graph replay), through the one op
switch in ``csrc/engine_exec.h``. A new layer, loss or optimizer rule is new ops
here plus their kernels; the engines and the training loop do not change.

Buffer shapes may hold ``ROWS``, the batch dimension, sized to the arena's
capacity; ops that read a batch use its first ``n`` rows (``n`` = the step's
rows, the batch or fewer in the last step).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import _C
from ._act_codes import ACTIVATIONS, NEEDS_INPUT

__all__ = ["AttackSpec", "Buf", "DPSpec", "Op", "StepPlan", "build_plan", "validate", "ROWS",
           "TRAIN", "EVALUATE", "PREDICT", "ATTRIBUTE", "ATTACK", "OPCODES"]

# The opcodes of csrc/engine.h, by name (their order is the C++ enum's).
OPCODES = tuple(_C.engine_opcodes)
TRAIN, EVALUATE, PREDICT, ATTRIBUTE, ATTACK = 0, 1, 2, 3, 4
LIST_NAMES = {TRAIN: "train", EVALUATE: "evaluate", PREDICT: "predict",
              ATTRIBUTE: "attribute", ATTACK: "attack"}
ROWS = "rows"
SIZES = dict(_C.engine_sizes)  # bytes of EngineState, StepScalars, StepHyper

_LABEL_KINDS = {np.dtype(np.int32): 0, np.dtype(np.int64): 1, np.dtype(np.float32): 2}


@dataclass(frozen=True)
class Buf:
    """A buffer of the plan. ``role``: param | stat (weights the optimizer does not
    train) | grad | state (optimizer) | act | scratch | input (bound per pass) | hyper |
    metric | const (zeros) | table (constant contents, ``data``). A buffer with ``base`` is a
    view ``offset`` elements into another (a layer's kernel in the flat parameters)."""
    id: int
    name: str
    role: str
    shape: tuple
    dtype: np.dtype
    base: str | None = None
    offset: int = 0
    data: tuple | None = field(default=None, compare=False)  # a "table" buffer's contents

    def concrete_shape(self, rows: int) -> tuple:
        return tuple(rows if d == ROWS else d for d in self.shape)


@dataclass(frozen=True)
class Op:
    """One kernel call: ``code`` (an OPCODES name), a readable ``name`` such as
    ``"layer1.backward.dW"``, buffer ids (``None``: absent) and integer dims, in the
    order csrc/engine.h documents for the opcode."""
    code: str
    name: str
    bufs: tuple
    dims: tuple = ()
    # what the Python executor needs beyond the dims (a Dropout's rate, seed and
    # position: the public ops take those, the kernels their constants)
    extra: dict | None = field(default=None, compare=False)

    def native(self) -> tuple:
        return (OPCODES.index(self.code), [-1 if b is None else b for b in self.bufs],
                list(self.dims))


@dataclass
class StepPlan:
    bufs: list = field(default_factory=list)
    lists: dict = field(default_factory=dict)
    # what the plan was built from (for the engines and the Python executor)
    layers: tuple = ()
    features: int = 0
    classes: int = 0
    label_dtype: np.dtype = np.dtype(np.int32)
    label_cols: int = 0          # 0: integer labels (rows,); else (rows, classes) float rows
    opt_kind: int = 1            # 0 SGD, 1 Adam / AdamW (csrc/engine.h OptKind)
    opt_buffers: tuple = ()      # the optimizer's per-parameter buffer names, s0 then s1
    param_sizes: tuple = ()      # elements of each parameter, in Keras order
    precision: int = 0
    output_transform: str | None = None  # the output activation the loss fuses (predict applies it)
    loss_kind: str = "xent"      # "xent" (the softmax-cross-entropy op) or an ops.LOSS_KINDS key
    metrics: tuple = ()          # fastmlp.metrics.Metric, in the logs' order
    sample_weight: bool = False  # the training list reads "train.sw"
    reg_segments: int = 0        # parameter segments with a penalty slot (0: no regularizer)
    param_names: tuple = ()      # the trainable weights' buffers, in Keras order ("layer0.kernel")
    stat_names: tuple = ()       # the other weights' buffers (views of "stats")
    dp: DPSpec | None = None     # DP-SGD's settings (None: ordinary training)
    # the variant each list holds (use()): an AttackSpec or None for TRAIN / EVALUATE /
    # ATTACK, (steps, multiply, absolute, baseline) for ATTRIBUTE; and a counter per
    # list bumped when it changes (the engines reload a changed list)
    variants: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    make_list: object = field(default=None, repr=False, compare=False)

    def use(self, lst: int, variant=None) -> bool:
        """Put the ``variant`` of op list ``lst`` in place (see :func:`build_plan`'s
        ``make_list``): an :class:`AttackSpec` (or None: none) for TRAIN, EVALUATE and
        ATTACK, ``(steps, multiply, absolute, baseline)`` for ATTRIBUTE. Returns whether
        the list changed."""
        if lst in self.lists and self.variants.get(lst, None) == variant:
            return False
        ops = self.make_list(lst, variant)
        validate_list(self, lst, ops)
        self.lists[lst] = ops
        self.variants[lst] = variant
        self.versions[lst] = self.versions.get(lst, 0) + 1
        return True

    def buf(self, name: str) -> Buf:
        for b in self.bufs:
            if b.name == name:
                return b
        raise KeyError(name)

    def has(self, name: str) -> bool:
        return any(b.name == name for b in self.bufs)

    def describe(self) -> str:
        """The op lists, one op a line (for debugging and the docs)."""
        lines = []
        for lst, ops in self.lists.items():
            lines.append(f"{LIST_NAMES[lst]}:")
            for op in ops:
                names = ", ".join("-" if b is None else self.bufs[b].name for b in op.bufs)
                lines.append(f"  {op.name:28s} {op.code}({names}) dims={list(op.dims)}")
        return "\n".join(lines)


class _Builder:
    def __init__(self):
        self.bufs: list[Buf] = []

    def add(self, name, role, shape, dtype=np.float32, base=None, offset=0, data=None) -> int:
        self.bufs.append(Buf(len(self.bufs), name, role, tuple(shape), np.dtype(dtype), base,
                             offset, None if data is None else tuple(data)))
        return len(self.bufs) - 1


def _f32_bits(value: float) -> int:
    """A float as the int64 dim the C++ side reads back (engine_exec.h dim_float)."""
    return int(np.array(value, np.float32).view(np.uint32))


@dataclass(frozen=True)
class DPSpec:
    """DP-SGD in the training step: each example's gradient (over all parameters)
    clipped to L2 norm ``clip``, Gaussian noise of standard deviation
    ``noise_multiplier * clip`` added to their sum, divided by ``divisor`` (0: the step's
    rows; Poisson sampling: the expected batch size). ``seed``: the noise stream's."""
    clip: float
    noise_multiplier: float
    divisor: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class AttackSpec:
    """An attack in a step (FGSM, PGD: :mod:`fastmlp.adversarial`): start at the clean
    rows (``random_start``: plus uniform noise in [-eps, eps]), then ``steps`` times
    ``adv = clamp(x + clamp(adv + alpha * sign(grad) - x, -eps, eps), lo, hi)`` with
    grad the gradient of the compiled loss with respect to the input (``project``
    False: no projection onto the eps-ball, FGSM). ``lo`` / ``hi``: the clip range
    (+-inf: none); ``seed``: the random start's stream."""
    eps: float
    alpha: float
    steps: int
    lo: float = 0.0
    hi: float = 1.0
    random_start: bool = False
    project: bool = True
    seed: int = 0


@dataclass(frozen=True)
class _Stage:
    """One kernel-level step of the forward pass: a layer, or a layer with the Dropout
    that follows it fused in (``dropout``: that Dropout's position, or None). ``act``:
    the activation the stage applies (the layer's, except an output activation the loss
    fuses)."""
    kind: str          # dense | act | dropout | bn | ln
    index: int         # the layer's position
    layer: object
    dropout: int | None = None
    act: str | None = None


def output_activation(layers):
    """The last layer's activation when it is a Dense or Activation layer, else None."""
    from .layers import Activation, Dense

    last = layers[-1]
    if isinstance(last, (Dense, Activation)) and last.activation not in (None, "linear"):
        return last.activation
    return None


def _stages(layers, fused=None):
    """The layers as stages: a Dropout right after a Dense or an Activation runs in that
    layer's kernels (its epilogue); the output activation the loss fuses (``fused``:
    softmax, or sigmoid with binary cross-entropy) is not applied (the loss and
    predict's last op apply it)."""
    from .layers import (Activation, BatchNormalization, Dense, Dropout,
                         LayerNormalization)

    out, i = [], 0
    last = len(layers) - 1
    while i < len(layers):
        layer = layers[i]
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        fuse = isinstance(nxt, Dropout) and nxt.rate > 0.0
        act = getattr(layer, "activation", None)
        if i == last and fused is not None and act == fused:
            act = None
        if isinstance(layer, Dense):
            out.append(_Stage("dense", i, layer, i + 1 if fuse else None, act))
        elif isinstance(layer, Activation):
            if act is not None:
                out.append(_Stage("act", i, layer, i + 1 if fuse else None, act))
            else:
                fuse = False
        elif isinstance(layer, Dropout):
            fuse = False
            if layer.rate > 0.0:
                out.append(_Stage("dropout", i, layer, i))
        elif isinstance(layer, BatchNormalization):
            fuse = False
            out.append(_Stage("bn", i, layer))
        elif isinstance(layer, LayerNormalization):
            fuse = False
            out.append(_Stage("ln", i, layer))
        else:
            raise ValueError(f"plan: no kernels for layer {layer!r}")
        i += 2 if fuse else 1
    return out


def _check_dp_layers(layers, clipnorm, global_clipnorm, clipvalue):
    """ValueError for what DP-SGD's per-example norms do not cover: they are exact for
    Dense layers (the ghost-norm identity) and for the layers without weights between
    them (activations, dropout, a LayerNormalization without weights); a normalization
    layer's weights have no per-example gradient norm computed here, and
    BatchNormalization mixes the examples of a batch, so an example's gradient is not
    even defined."""
    from .layers import BatchNormalization, LayerNormalization

    for i, layer in enumerate(layers):
        if isinstance(layer, BatchNormalization):
            raise ValueError(f"plan: DP-SGD cannot train layer {i} (BatchNormalization): its "
                             "batch statistics mix the examples of a batch, so no per-example "
                             "gradient exists to clip; remove it (LayerNormalization is not "
                             "covered either)")
        if isinstance(layer, LayerNormalization) and layer.trainable_names():
            raise ValueError(f"plan: DP-SGD cannot train layer {i} (LayerNormalization with "
                             "gamma / beta): the per-example gradient norms are computed for "
                             "Dense layers only; remove it, or use center=False, scale=False")
    if clipnorm is not None or global_clipnorm is not None or clipvalue is not None:
        raise ValueError("plan: DP-SGD clips each example's gradient (l2_norm_clip); "
                         "clipnorm / global_clipnorm / clipvalue do not apply")


def _act_code(name) -> int:
    return ACTIVATIONS["linear" if name is None else name]


# Codes whose derivative reads the pre-activation once a dropout has scaled the output
# (sigmoid, tanh and elu read their own output otherwise; relu and leaky_relu only its
# sign, which the scaling keeps).
_OUTPUT_RULE_NEEDS_UNSCALED = ("sigmoid", "tanh", "elu")


def _regularizer_coefficients(layer, name):
    """(l1, l2) of the regularizer on weight ``name`` of ``layer`` ((0, 0): none)."""
    reg = getattr(layer, f"{name}_regularizer", None) if name in ("kernel", "bias") else None
    if reg is None:
        return 0.0, 0.0
    return float(reg.l1), float(reg.l2)


def build_plan(layers, optimizer_kind: int, optimizer_buffers, label_dtype, precision: int,
               seed: int = 0, *, loss=None, metrics=(), sample_weight: bool = False,
               clipnorm=None, global_clipnorm=None, clipvalue=None,
               work_doubles=(0, 0), dp=None, dist: bool = False, rank: int = 0) -> StepPlan:
    """The plan of a layer stack with ``loss`` on its output.

    ``optimizer_kind``: 0 SGD, 1 Adam/AdamW, 2 RMSprop; ``optimizer_buffers``: the
    names of its per-parameter state buffers (e.g. ("exp_avg", "exp_avg_sq"));
    ``label_dtype``: int32 (class indices) or float32 (rows shaped like the output);
    ``precision``: the GEMM precision (0 fp32, 1 tf32); ``seed``: the model's seed
    (Dropout layers without their own draw their masks from it); ``loss``: an
    :class:`fastmlp.losses.Loss` (None: sparse or categorical cross-entropy by the label
    dtype); ``metrics``: :class:`fastmlp.metrics.Metric` s; ``sample_weight``: the
    training step weights each sample's loss by "train.sw"; ``clipnorm`` /
    ``global_clipnorm`` / ``clipvalue``: the optimizer's gradient clipping;
    ``work_doubles``: (clip, optimizer) scratch sizes in doubles for the clip op and a
    regularized optimizer op (the device's needs: the kernels' work functions);
    ``dp``: a :class:`DPSpec` (DP-SGD: per-example clipping and Gaussian noise) or None;
    ``dist``: data-parallel training (:mod:`fastmlp.distributed`): the training step
    all-reduces the gradients (the ``allreduce`` op, before any clipping and the
    update), and ``rank``, the process's, keys its dropout masks and adversarial random
    starts (rank 0's are one process's).
    """
    from . import losses as _losses
    from .metrics import FLAGS, SLOTS, TOP_K
    from .ops import LOSS_KINDS, dropout_constants

    label_dtype = np.dtype(label_dtype)
    if label_dtype not in _LABEL_KINDS:
        raise ValueError(f"plan: labels must be int32, int64 or float32, got {label_dtype}")
    if loss is None:
        loss = (_losses.SparseCategoricalCrossentropy() if label_dtype != np.float32
                else _losses.CategoricalCrossentropy())
    b = _Builder()
    features = layers[0].input_dim
    classes = layers[-1].output_dim
    out_act = output_activation(layers)
    loss_kind, fused = loss.kernel(out_act)
    if out_act == "softmax" and fused != "softmax":
        raise ValueError(f"plan: a softmax output layer needs a categorical cross-entropy loss "
                         f"(it is computed fused with it), got {loss.name!r}; remove the "
                         "softmax or change the loss")
    softmax = fused == "softmax"
    if dp is not None:
        _check_dp_layers(layers, clipnorm, global_clipnorm, clipvalue)
        if dist:
            raise ValueError("plan: DP-SGD is not supported in distributed training (each "
                             "process would add its own noise); train it in one process")
    use_xent = (loss_kind == "cce_logits" and loss.label_smoothing == 0.0 and not sample_weight)
    metrics = tuple(metrics)
    transform = {"softmax": 2, "sigmoid": 1}.get(fused, 0)

    # Flat parameters, gradients and optimizer state, at the same offsets; the weights
    # the optimizer does not train (BatchNormalization's moving statistics) in "stats".
    trainable, fixed = [], []
    for i, layer in enumerate(layers):
        shapes = layer.weight_shapes()
        for name in layer.weight_names():
            (trainable if name in layer.trainable_names() else fixed).append(
                (i, name, tuple(shapes[name])))
    sizes = [int(np.prod(shape)) for _, _, shape in trainable]
    total = sum(sizes)
    params = b.add("params", "param", (total,))
    # distributed: one more float, the all-reduce's row count (engine.h allreduce)
    grads = b.add("grads", "grad", (total + int(bool(dist)),))
    opt_bufs = tuple(optimizer_buffers)
    opt_ids = [b.add(f"opt.{name}", "state", (total,)) for name in opt_bufs]
    weight, grad = {}, {}
    off = 0
    for (i, name, shape), size in zip(trainable, sizes):
        weight[i, name] = b.add(f"layer{i}.{name}", "param", shape, base="params", offset=off)
        grad[i, name] = b.add(f"layer{i}.grad.{name}", "grad", shape, base="grads", offset=off)
        off += size
    n_fixed = sum(int(np.prod(shape)) for _, _, shape in fixed)
    if fixed:
        b.add("stats", "stat", (n_fixed,))
    off = 0
    for i, name, shape in fixed:
        weight[i, name] = b.add(f"layer{i}.{name}", "stat", shape, base="stats", offset=off)
        off += int(np.prod(shape))

    # Engine memory: the pass state, the step's loss scalars, the optimizer table.
    state = b.add("state", "metric", (SIZES["state"],), np.uint8)
    scalars = b.add("scalars", "metric", (SIZES["scalars"],), np.uint8)
    hyper = b.add("hyper", "hyper", ("steps", SIZES["step_hyper"]), np.uint8)

    # Inputs, bound per pass: training data (+ order), evaluation data, prediction data.
    label_cols = classes if label_dtype == np.float32 else 0
    lshape = (ROWS, label_cols) if label_cols else (ROWS,)
    label_bytes = label_dtype.itemsize * max(label_cols, 1)
    x_train = b.add("train.x", "input", ("data", features))
    y_train = b.add("train.y", "input", ("data",) + lshape[1:], label_dtype)
    order = b.add("train.order", "input", ("data",), np.int64)
    x_eval = b.add("eval.x", "input", ("data", features))
    y_eval = b.add("eval.y", "input", ("data",) + lshape[1:], label_dtype)
    x_pred = b.add("predict.x", "input", ("data", features))
    out_pred = b.add("predict.out", "input", ("data", classes))
    sw_train = b.add("train.sw", "input", ("data",)) if sample_weight else None

    # Per-batch buffers.
    xb = b.add("batch.x", "act", (ROWS, features))
    yb = b.add("batch.y", "act", lshape, label_dtype)
    swb = b.add("batch.sw", "act", (ROWS,)) if sample_weight else None
    stages = _stages(layers, fused)
    # the forward buffers of each stage: input, output, what its backward reads
    a = xb
    fwd_in, fwd_out, preact, stats, dinput, zero_mean = {}, {}, {}, {}, {}, {}
    for k, st in enumerate(stages):
        i, layer = st.index, st.layer
        fwd_in[i] = a
        fwd_out[i] = b.add(f"layer{i}.out", "act", (ROWS, layer.output_dim))
        if st.kind == "dense":
            if st.act is not None and (_act_code(st.act) in NEEDS_INPUT or (
                    st.dropout is not None and st.act in _OUTPUT_RULE_NEEDS_UNSCALED)):
                preact[i] = b.add(f"layer{i}.preact", "act", (ROWS, layer.units))
        elif st.kind in ("bn", "ln"):
            shape = (layer.input_dim,) if st.kind == "bn" else (ROWS,)
            stats[i] = (b.add(f"layer{i}.mean", "scratch", shape),
                        b.add(f"layer{i}.invstd", "scratch", shape))
            if st.kind == "bn":  # the inference-mode backward (see backward())
                zero_mean[i] = b.add(f"layer{i}.zero_mean", "const", (layer.input_dim,))
        # (a normalization layer's backward writes a dx even first, where it is unused)
        if (k > 0 and st.kind == "dense") or st.kind in ("bn", "ln"):
            dinput[i] = b.add(f"layer{i}.dinput", "act", (ROWS, layer.input_dim))
        a = fwd_out[i]
    logits = a
    dlogits = b.add("loss.dlogits", "act", (ROWS, classes))  # probs in evaluate / predict
    row_loss = b.add("loss.row_loss", "scratch", (ROWS,))
    row_hits = b.add("loss.row_hits", "scratch", (ROWS,), np.int32)
    zeros = b.add("predict.labels", "const", (ROWS,), np.int32)  # zeros: softmax needs labels
    # Input gradients (issue 18): the gradient with respect to the batch's rows, the
    # adversarial rows, each row's target output, and the inputs of the attributions
    # and the attacks (bound per call).
    input_grad = b.add("input.grad", "act", (ROWS, features))
    adv_x = b.add("adv.x", "act", (ROWS, features))
    row_targets = b.add("explain.row_targets", "act", (ROWS,), np.int32)
    ex_x = b.add("explain.x", "input", ("data", features))
    ex_base = b.add("explain.baseline", "input", ("data", features))
    ex_targets = b.add("explain.targets", "input", ("data",), np.int32)
    ex_alphas = b.add("explain.alphas", "input", ("steps",))
    ex_weights = b.add("explain.weights", "input", ("steps",))
    ex_out = b.add("explain.out", "input", ("data", features))
    attack_out = b.add("attack.out", "input", ("data", features))
    want_metrics = [m for m in metrics if not (use_xent and m.kind == "argmax")]
    flags = 0
    for m in want_metrics:
        flags |= FLAGS.get(m.kind, 0)
    auc = any(m.kind == "auc" for m in metrics)
    metric_scratch = (b.add("metric.scratch", "scratch", (ROWS, len(SLOTS)))
                      if want_metrics else None)
    metric_probs = b.add("metric.probs", "scratch", (ROWS, classes)) if auc else None
    auc_bufs = {lst: (b.add(f"{lst}.auc_scores", "input", ("data", classes)),
                      b.add(f"{lst}.auc_labels", "input", ("data", classes)))
                for lst in ("train", "eval")} if auc else {}

    kind = _LABEL_KINDS[label_dtype]
    dp_scale = b.add("dp.scale", "scratch", (ROWS,)) if dp is not None else None
    dp_std = b.add("dp.noise_std", "scratch", (1,)) if dp is not None else None
    noise_key = 0
    if dp is not None:
        k0, k1 = _C.noise_key(int(dp.seed) & (2 ** 64 - 1))
        noise_key = int(np.array(k0 | (k1 << 32), np.uint64).view(np.int64))

    def dropout_dims(j):
        """dims 4..6 of the Dropout at position j (zeros: none) and its Python view."""
        if j is None:
            return (0, 0, 0), None
        layer = layers[j]
        threshold, scale = dropout_constants(layer.rate)
        dseed = rank_seed(seed if layer.seed is None else layer.seed, rank)
        k0, k1 = _C.dropout_key(dseed, j)
        key = int(np.array(k0 | (k1 << 32), np.uint64).view(np.int64))
        return (threshold, _f32_bits(scale), key), {"rate": layer.rate, "seed": dseed,
                                                     "layer": j}

    def gather(name, x, y, order_id, batch_x, batch_y, lb):
        return Op("gather", name, (x, y, order_id, batch_x, batch_y, state),
                  (features, lb, 0, 0))  # the batch and the source rows: set per pass

    def forward(mode, x0=xb):
        """(ops, output buffer, aliases) of the forward pass over the rows in ``x0``.
        ``mode``: "train" (dropout on, batch statistics, the pre-activations kept),
        "infer" (dropout off, moving statistics) or "grad" (inference, keeping what a
        backward pass reads). In inference a Dropout stage is no op: the next stage
        reads its input (``alias``)."""
        training, keep = mode == "train", mode != "infer"
        ops, alias = [], {xb: x0}
        for st in stages:
            i, layer = st.index, st.layer
            x, y = alias.get(fwd_in[i], fwd_in[i]), fwd_out[i]
            if st.kind == "dropout" and not training:
                alias[y] = x
                continue
            drop, extra = dropout_dims(st.dropout if training else None)
            st_buf = state if extra else None
            if st.kind == "dense":
                code = _act_code(st.act)
                ops.append(Op("dense_fwd", f"layer{i}.forward",
                              (x, weight[i, "kernel"], weight.get((i, "bias")), y,
                               preact.get(i) if keep else None, st_buf),
                              (layer.input_dim, layer.units, code, precision) + drop,
                              extra))
            elif st.kind in ("act", "dropout"):
                code = _act_code(st.act) if st.kind == "act" else 0
                ops.append(Op("act_fwd", f"layer{i}.forward", (x, y, st_buf),
                              (layer.input_dim, code, 0, 0) + drop, extra))
            elif st.kind == "bn":
                mean, invstd = stats[i] if training else (None, None)
                ops.append(Op("bn_fwd", f"layer{i}.forward",
                              (x, weight.get((i, "gamma")), weight.get((i, "beta")), y, mean,
                               invstd, weight[i, "moving_mean"], weight[i, "moving_variance"]),
                              (layer.input_dim, int(training), _f32_bits(layer.epsilon),
                               _f32_bits(layer.momentum))))
            else:  # ln
                ops.append(Op("ln_fwd", f"layer{i}.forward",
                              (x, weight.get((i, "gamma")), weight.get((i, "beta")), y,
                               *stats[i]), (layer.input_dim, _f32_bits(layer.epsilon))))
        return ops, alias.get(logits, logits), alias

    def backward(mode="train", alias=None, dx0=None):
        """The gradient from dlogits back through the stages. ``mode`` "train": the
        weights' gradients, and the inputs' gradients as far back as a trained weight
        lies; "grad": no weight gradient, every input's gradient down to the rows
        (into ``dx0``), after a "grad" forward (``alias``: its aliases) -- dropout off,
        BatchNormalization's backward its inference-mode scale. ``done``: whether g is
        already the gradient of the stage's pre-activation (the next Dense's backward
        GEMM applied this stage's activation and dropout in its epilogue)."""
        grad_only = mode == "grad"
        alias = alias or {}
        ops, g, done = [], dlogits, False
        # a Dropout is the identity in inference: its stage has no backward
        sts = [st for st in stages if not (grad_only and st.kind == "dropout")]
        has_params = [any(layer.trainable_names()) for layer in (st.layer for st in sts)]
        # DP-SGD: the per-example norms of every Dense layer (their dz and input) are
        # summed before any weight gradient, whose GEMM then scales dz's rows by the
        # clip factors: the dW / db ops move after the chain of dX ops.
        weight_ops, norm_ops = [], []
        for k in range(len(sts) - 1, -1, -1):
            st = sts[k]
            i, layer = st.index, st.layer
            need_dx = grad_only or any(has_params[:k])  # a trained weight lies before
            drop, extra = dropout_dims(None if grad_only else st.dropout)
            st_buf = state if extra else None
            x = alias.get(fwd_in[i], fwd_in[i])
            # the gradient with respect to this stage's input
            dx = dx0 if k == 0 and grad_only else dinput.get(i)
            if st.kind == "dense":
                code = _act_code(st.act)
                if not done and (code or extra):
                    saved = preact.get(i, fwd_out[i] if code else None)
                    ops.append(Op("act_bwd", f"layer{i}.backward.act",
                                  (g, saved, g, st_buf),
                                  (layer.units, code, int(i in preact), 0) + drop, extra))
                if grad_only:
                    pass
                elif dp is None:
                    ops.append(Op("dense_bwd_w", f"layer{i}.backward.dW",
                                  (x, g, grad[i, "kernel"], grad.get((i, "bias"))),
                                  (layer.input_dim, layer.units, 0, precision)))
                else:
                    norm = Op("dp_norms", f"layer{i}.backward.dp_norms",
                              (x, g, dp_scale, None),
                              (layer.input_dim, layer.units, int((i, "bias") in grad),
                               int(bool(norm_ops))), {"layer": i})
                    ops.append(norm)
                    norm_ops.append(len(ops) - 1)
                    weight_ops.append(Op("dense_bwd_w", f"layer{i}.backward.dW",
                                         (x, g, grad[i, "kernel"], grad.get((i, "bias")),
                                          dp_scale),
                                         (layer.input_dim, layer.units, 0, precision)))
                if not need_dx:
                    break
                prev = sts[k - 1] if k > 0 else None
                if prev is not None and prev.kind == "dense":
                    # its activation and dropout in this GEMM's epilogue
                    p = prev.index
                    pcode = _act_code(prev.act)
                    pdrop, pextra = dropout_dims(None if grad_only else prev.dropout)
                    saved = preact.get(p, fwd_out[p] if pcode else None)
                    ops.append(Op("dense_bwd_x", f"layer{i}.backward.dX",
                                  (g, weight[i, "kernel"], saved, dx,
                                   state if pextra else None),
                                  (layer.input_dim, layer.units, pcode, precision) + pdrop
                                  + (int(p in preact),), pextra))
                    done = True
                else:
                    ops.append(Op("dense_bwd_x", f"layer{i}.backward.dX",
                                  (g, weight[i, "kernel"], None, dx, None),
                                  (layer.input_dim, layer.units, 0, precision, 0, 0, 0, 0)))
                    done = False
                g = dx
            elif st.kind in ("act", "dropout"):
                if not need_dx:
                    break
                code = _act_code(st.act) if st.kind == "act" else 0
                out = dx if dx is not None else g  # in place, except into dx0
                ops.append(Op("act_bwd", f"layer{i}.backward",
                              (g, x if code else None, out, st_buf),
                              (layer.input_dim, code, 1, 0) + drop, extra))
                g, done = out, False
            elif st.kind == "bn" and grad_only:
                # In inference BatchNormalization is y = (x - mean) * gamma / sqrt(var +
                # eps) + beta with the moving statistics: dx = dy * gamma / sqrt(var +
                # eps), which is its inference forward of dy with mean 0 and no beta.
                ops.append(Op("bn_fwd", f"layer{i}.backward",
                              (g, weight.get((i, "gamma")), None, dx, None, None, zero_mean[i],
                               weight[i, "moving_variance"]),
                              (layer.input_dim, 0, _f32_bits(layer.epsilon),
                               _f32_bits(layer.momentum))))
                g, done = dx, False
            else:  # bn, ln: the weights' gradients, and dx when something before trains
                if not (layer.trainable_names() or need_dx):
                    break
                ops.append(Op(f"{st.kind}_bwd", f"layer{i}.backward",
                              (g, x, weight.get((i, "gamma")), *stats[i], dx,
                               None if grad_only else grad.get((i, "gamma")),
                               None if grad_only else grad.get((i, "beta"))),
                              (layer.input_dim,)))
                if not need_dx:
                    break
                g, done = dx, False
        if grad_only and g != dx0:
            # no stage wrote the rows' gradient (only dropout stages): it is dlogits
            ops.append(Op("act_bwd", "input.backward", (g, None, dx0, None),
                          (features, 0, 1, 0, 0, 0, 0)))
        if dp is not None and norm_ops:
            # the last norms op turns the sums into the clip factors and the noise's scale
            k = norm_ops[-1]
            last = ops[k]
            ops[k] = Op(last.code, last.name, last.bufs[:3] + (dp_std,),
                        last.dims[:3] + (last.dims[3] | 2, _f32_bits(dp.clip),
                                         _f32_bits(dp.noise_multiplier),
                                         _f32_bits(dp.divisor)),
                        {**last.extra, "finish": True})
            ops += weight_ops
        return ops

    def loss_ops(out, y, training, lst, metrics_too=True):
        """The loss (and dlogits when training), then the metrics of the step."""
        ops = []
        if use_xent:
            ops.append(Op("xent", "loss", (out, y, dlogits, row_loss, row_hits, scalars),
                          (classes, kind, int(training))))
        else:
            ops.append(Op("loss", "loss",
                          (out, y, swb if training and metrics_too else None,
                           dlogits if training else None, row_loss, scalars),
                          (classes, kind, LOSS_KINDS[loss_kind], _f32_bits(loss.delta),
                           _f32_bits(loss.label_smoothing), int(training)),
                          {"kind": loss_kind, "delta": loss.delta,
                           "label_smoothing": loss.label_smoothing}))
        if not metrics_too:
            return ops
        if want_metrics:
            ops.append(Op("metrics", "metrics", (out, y, metric_probs, metric_scratch, scalars),
                          (classes, kind, flags, transform, TOP_K, _f32_bits(0.5)),
                          {"metrics": tuple(m for m in SLOTS if FLAGS[m] & flags),
                           "transform": ("none", "sigmoid", "softmax")[transform]}))
        if auc:
            scores, targets = auc_bufs[lst]
            ops.append(Op("store", "auc.scores", (metric_probs, scores, state), (classes, 0)))
            ops.append(Op("store", "auc.labels", (y, targets, state), (classes, 0)))
        return ops

    def attack_ops(spec, counter):
        """An attack on the batch (batch.x, batch.y) into adv.x: the start point, then
        per step the forward in inference mode, the loss's gradient (mean over the
        rows: its sign is what counts), backward to the rows and the sign step.
        ``counter``: 0 draws the random start from the optimizer step number (training),
        1 from the pass's step."""
        key = 0
        # training: each process's own random starts; evaluation: the rows' own
        aseed = rank_seed(spec.seed, rank) if counter == 0 else int(spec.seed)
        if spec.random_start:
            k0, k1 = _C.adversarial_key(aseed & (2 ** 64 - 1))
            key = int(np.array(k0 | (k1 << 32), np.uint64).view(np.int64))
        eps, lo, hi = _f32_bits(spec.eps), _f32_bits(spec.lo), _f32_bits(spec.hi)
        ops = [Op("adv_init", "attack.init", (xb, adv_x, state),
                  (features, eps, lo, hi, int(spec.random_start), key, counter),
                  {"seed": aseed, "random": bool(spec.random_start),
                   "counter": counter})]
        # one step's gradient ops, the same in every step (named per step)
        fwd, out, alias = forward("grad", adv_x)
        grad_ops = (fwd + loss_ops(out, yb, True, None, metrics_too=False)
                    + backward("grad", alias, input_grad))
        for s in range(spec.steps):
            ops += [Op(o.code, f"attack{s}.{o.name}", o.bufs, o.dims, o.extra) for o in grad_ops]
            ops.append(Op("adv_step", f"attack{s}.step", (xb, adv_x, input_grad),
                          (features, eps, _f32_bits(spec.alpha), lo, hi, int(spec.project))))
        return ops

    # The optimizer: one update over the flat parameters, or, with a gradient transform
    # (regularizers, clipping), one per parameter tensor (segment) with its own l1 / l2,
    # after the clip op that computes each segment's scale.
    coeffs = [_regularizer_coefficients(layers[i], name) for i, name, _ in trainable]
    any_reg = any(l1 or l2 for l1, l2 in coeffs)
    if clipnorm is not None and global_clipnorm is not None:
        raise ValueError("plan: clipnorm and global_clipnorm are exclusive")
    max_norm = clipnorm if clipnorm is not None else global_clipnorm
    transformed = any_reg or max_norm is not None or clipvalue is not None
    nseg = len(sizes)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64) if sizes else [0]
    opt_ops = []
    s = opt_ids + [None] * (3 - len(opt_ids))
    noise_extra = ({"noise_seed": int(dp.seed), "offsets": tuple(int(v) for v in offsets)}
                   if dp is not None else None)
    # noise_multiplier 0 (clipping only): the optimizer draws no noise at all
    opt_std = dp_std if dp is not None and dp.noise_multiplier > 0.0 else None
    if total and not transformed:
        opt_ops.append(Op("optimizer", "optimizer",
                          (params, grads, s[0], s[1], hyper, state, s[2], None, None, None,
                           opt_std),
                          (total, optimizer_kind, 0, 0, 0, 0, 0, noise_key), noise_extra))
    penalty = None
    if total and transformed:
        scale = None
        l1l2 = None
        if any_reg:
            l1l2 = b.add("reg.l1l2", "table", (2 * nseg,), np.float32,
                         data=[c for pair in coeffs for c in pair])
        if max_norm is not None:
            table = b.add("clip.offsets", "table", (nseg + 1,), np.int64, data=offsets)
            scale = b.add("clip.scale", "scratch", (nseg,))
            work = b.add("clip.work", "scratch", (max(1, work_doubles[0]),), np.float64)
            opt_ops.append(Op("clip", "optimizer.clip",
                              (params, grads, table, l1l2, scale, work),
                              (nseg, 0 if clipnorm is not None else 1, _f32_bits(max_norm)),
                              {"offsets": tuple(int(v) for v in offsets),
                               "l1l2": tuple(coeffs)}))
        penalty = b.add("reg.penalty", "scratch", (nseg,), np.float64) if any_reg else None
        opt_work = (b.add("opt.work", "scratch", (max(1, work_doubles[1]),), np.float64)
                    if any_reg else None)
        for k, ((i, name, _), size) in enumerate(zip(trainable, sizes)):
            l1, l2 = coeffs[k]
            # a penalty slot only where a regularizer is (the others stay 0)
            reg_k = bool(l1 or l2)
            opt_ops.append(Op("optimizer", f"optimizer.layer{i}.{name}",
                              (params, grads, s[0], s[1], hyper, state, s[2], scale,
                               penalty if reg_k else None, opt_work if reg_k else None, opt_std),
                              (size, optimizer_kind, int(offsets[k]), _f32_bits(l1),
                               _f32_bits(l2), _f32_bits(clipvalue or 0.0), k, noise_key),
                              {"segment": k, "l1": l1, "l2": l2,
                               "clipvalue": float(clipvalue or 0.0), "noise": noise_extra}))
    penalty_id = penalty if total and transformed and any_reg else None

    def train_list(adv):
        x_in = xb if adv is None else adv_x
        ops = [gather("gather", x_train, y_train, order, xb, yb, label_bytes)]
        if sample_weight:
            # the sample weights: a gather of one-float "rows" in the same order
            ops.append(Op("gather", "gather.sw", (sw_train, None, order, swb, None, state),
                          (1, 0, 0, 0)))
        if adv is not None:
            ops += attack_ops(adv, 0)
        fwd, _, alias = forward("train", x_in)
        ops += fwd
        ops += loss_ops(logits, yb, True, "train")
        ops += backward("train", alias)
        if dist and total:
            ops.append(Op("allreduce", "allreduce", (grads,), (total,)))
        ops += opt_ops
        ops.append(Op("step_end", "step_end", (state, scalars, penalty_id),
                      (nseg if penalty_id is not None else 0, int(bool(want_metrics)))))
        return ops

    def evaluate_list(adv):
        ops = [gather("gather", x_eval, y_eval, None, xb, yb, label_bytes)]
        if adv is not None:
            ops += attack_ops(adv, 1)
        inference, out, _ = forward("infer", xb if adv is None else adv_x)
        ops += inference
        ops += loss_ops(out, yb, False, "eval")
        ops.append(Op("step_end", "step_end", (state, scalars, None),
                      (0, int(bool(want_metrics)))))
        return ops

    def predict_list():
        inference, out, _ = forward("infer")
        ops = [gather("gather", x_pred, None, None, xb, None, 0)] + inference
        result = out
        if softmax:
            ops.append(Op("xent", "softmax", (out, zeros, dlogits, row_loss, row_hits,
                                             scalars), (classes, 0, 0)))
            result = dlogits
        elif fused == "sigmoid":
            ops.append(Op("act_fwd", "sigmoid", (out, dlogits, None),
                          (classes, ACTIVATIONS["sigmoid"], 0, 0, 0, 0, 0)))
            result = dlogits
        ops.append(Op("store", "store", (result, out_pred, state), (classes, 0)))
        ops.append(Op("step_end", "step_end", (state, None, None), (0, 0)))
        return ops

    def attack_list(adv):
        """The adversarial rows of eval.x / eval.y into attack.out."""
        ops = [gather("gather", x_eval, y_eval, None, xb, yb, label_bytes)]
        ops += attack_ops(adv, 1)
        ops.append(Op("store", "store", (adv_x, attack_out, state), (features, 0)))
        ops.append(Op("step_end", "step_end", (state, None, None), (0, 0)))
        return ops

    def attribute_list(variant):
        """Attributions of explain.x: ``steps`` path points per image (a batch holds
        whole images), the gradient of each row's target output (the output after the
        transform the loss fuses: predict's columns), their weighted sum per image
        (times x - baseline when ``multiply``, absolute when ``absolute``)."""
        steps, multiply, absolute, baseline = variant
        base = ex_base if baseline else None
        fwd, out, alias = forward("grad")
        ops = [Op("ig_interp", "explain.interpolate",
                  (ex_x, base, ex_alphas, ex_targets, xb, row_targets, state),
                  (features, steps, 0, 0))]
        ops += fwd
        ops.append(Op("target_seed", "explain.seed", (out, row_targets, dlogits),
                      (classes, transform)))
        ops += backward("grad", alias, input_grad)
        ops.append(Op("ig_sum", "explain.sum",
                      (input_grad, ex_x, base if multiply else None, ex_weights, ex_out, state),
                      (features, steps, 0, 0, int(multiply), int(absolute))))
        ops.append(Op("step_end", "step_end", (state, None, None), (0, 0)))
        return ops

    def make_list(lst, variant):
        if lst == TRAIN:
            if variant is not None and dp is not None:
                raise ValueError("plan: adversarial training with a DP optimizer is not "
                                 "supported (the attack's rows are not covered by the "
                                 "per-example clipping as planned); use one or the other")
            return train_list(variant)
        if lst == EVALUATE:
            return evaluate_list(variant)
        if lst == PREDICT:
            return predict_list()
        if lst == ATTACK:
            if variant is None:
                raise ValueError("plan: the attack list needs an AttackSpec")
            return attack_list(variant)
        if lst == ATTRIBUTE:
            return attribute_list(variant or (1, False, False, False))
        raise ValueError(f"plan: unknown op list {lst}")

    plan = StepPlan(bufs=b.bufs, lists={}, layers=tuple(layers), features=features,
                    classes=classes, label_dtype=label_dtype, label_cols=label_cols,
                    opt_kind=optimizer_kind, opt_buffers=opt_bufs, param_sizes=tuple(sizes),
                    precision=precision, output_transform=fused,
                    loss_kind="xent" if use_xent else loss_kind, metrics=metrics,
                    sample_weight=bool(sample_weight),
                    reg_segments=nseg if any_reg else 0,
                    param_names=tuple(f"layer{i}.{n}" for i, n, _ in trainable),
                    stat_names=tuple(f"layer{i}.{n}" for i, n, _ in fixed), dp=dp,
                    make_list=make_list)
    for lst in (TRAIN, EVALUATE, PREDICT, ATTRIBUTE):
        plan.use(lst, None)  # validates each list
    return plan


def rank_seed(seed, rank: int) -> int:
    """Process ``rank``'s seed for draws that must differ between the processes of a
    distributed fit (dropout masks, adversarial random starts): ``seed`` itself on rank
    0, so one process draws as when not distributed."""
    seed = int(seed) & (2 ** 64 - 1)
    return seed if rank == 0 else (seed + rank * 0x9E3779B97F4A7C15) & (2 ** 64 - 1)


def with_batch(ops, batch: int, rows: int):
    """The ops with the batch size filled in where an op indexes rows by step
    (gather, ig_interp, ig_sum: dims[2]; store: dims[1]) and the pass's source rows
    (gather: dims[3]; ig_interp, ig_sum: the images, dims[3], ``rows`` / steps)."""
    out = []
    for op in ops:
        dims = list(op.dims)
        if op.code == "gather":
            dims[2], dims[3] = batch, rows
        elif op.code in ("ig_interp", "ig_sum"):
            dims[2], dims[3] = batch, rows // max(1, dims[1])
        elif op.code == "store":
            dims[1] = batch
        out.append(Op(op.code, op.name, op.bufs, tuple(dims), op.extra))
    return out


# What each opcode reads and writes, by buffer position (csrc/engine.h).
_READS = {"gather": (0, 1, 2, 5), "dense_fwd": (0, 1, 2, 5), "xent": (0, 1),
          "loss": (0, 1, 2), "metrics": (0, 1), "clip": (0, 1, 2, 3),
          "act_fwd": (0, 2), "act_bwd": (0, 1, 3), "dense_bwd_w": (0, 1, 4), "dp_norms": (0, 1),
          "dense_bwd_x": (0, 1, 2, 4), "bn_fwd": (0, 1, 2, 6, 7), "bn_bwd": (0, 1, 2, 3, 4),
          "ln_fwd": (0, 1, 2), "ln_bwd": (0, 1, 2, 3, 4),
          "optimizer": (0, 1, 2, 3, 4, 5, 6, 7, 10), "store": (0, 2), "step_end": (0, 1, 2),
          "target_seed": (0, 1), "ig_interp": (0, 1, 2, 3, 6), "ig_sum": (0, 1, 2, 3, 5),
          "adv_init": (0, 2), "adv_step": (0, 1, 2), "allreduce": (0,)}
_WRITES = {"gather": (3, 4), "dense_fwd": (3, 4), "xent": (2, 3, 4, 5), "act_fwd": (1,),
           "loss": (3, 4, 5), "metrics": (2, 3, 4), "clip": (4, 5),
           "act_bwd": (2,), "dense_bwd_w": (2, 3), "dense_bwd_x": (3,), "dp_norms": (2, 3),
           "bn_fwd": (3, 4, 5, 6, 7), "bn_bwd": (5, 6, 7), "ln_fwd": (3, 4, 5),
           "ln_bwd": (5, 6, 7), "optimizer": (0, 2, 3, 6, 8, 9), "store": (1,), "step_end": (0,),
           "target_seed": (2,), "ig_interp": (4, 5), "ig_sum": (4,), "adv_init": (1,),
           "adv_step": (1,), "allreduce": (0,)}
# Ops that update a buffer in place by design (the others' outputs never overlap
# their inputs: the kernels' __restrict__ contract).
_IN_PLACE = ("act_bwd", "bn_fwd", "optimizer", "step_end", "dp_norms", "adv_step",
             "allreduce")
# Written before any list runs: parameters, statistics, optimizer state, inputs,
# engine memory.
_PRESET = ("param", "stat", "state", "input", "hyper", "metric", "const", "table")


def validate(plan: StepPlan) -> None:
    """Check the plan at build time: known opcodes, buffer ids in range, every buffer
    written before it is read within a list, and an op's output never overlapping
    its own inputs (the kernels' __restrict__ contract) except where an op works in
    place by design (_IN_PLACE)."""
    for lst, ops in plan.lists.items():
        validate_list(plan, lst, ops)


def validate_list(plan: StepPlan, lst: int, ops) -> None:
    """:func:`validate` of one op list."""
    n = len(plan.bufs)
    written = {b.id for b in plan.bufs if b.role in _PRESET}
    written |= {b.id for b in plan.bufs if b.base is not None
                and plan.buf(b.base).role in _PRESET}
    for op in ops:
        where = f"plan ({LIST_NAMES[lst]}): op {op.name!r} ({op.code})"
        if op.code not in OPCODES:
            raise ValueError(f"{where}: unknown opcode")
        for bid in op.bufs:
            if bid is not None and not 0 <= bid < n:
                raise ValueError(f"{where}: buffer id {bid} out of range")
        for pos in _READS[op.code]:
            bid = op.bufs[pos] if pos < len(op.bufs) else None
            if bid is not None and bid not in written:
                raise ValueError(f"{where} reads {plan.bufs[bid].name!r} before any op "
                                 "writes it")
        outs = {op.bufs[p] for p in _WRITES[op.code] if p < len(op.bufs)} - {None}
        if op.code not in _IN_PLACE:
            ins = {op.bufs[p] for p in _READS[op.code] if p < len(op.bufs)} - {None}
            if outs & ins:
                raise ValueError(f"{where}: writes its own input "
                                 f"{[plan.bufs[i].name for i in outs & ins]}")
        for bid in outs:
            written.add(bid)
            base = plan.bufs[bid].base
            if base is not None:
                written.add(plan.buf(base).id)
