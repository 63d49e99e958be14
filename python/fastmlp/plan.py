"""The step plan: a model compiled into data.

``build_plan`` turns the layers, the loss and the optimizer into a :class:`StepPlan`:
a table of buffers (:class:`Buf`) and three op lists (:class:`Op`) over them --

* ``TRAIN``: one optimizer step: gather the batch, forward per layer, the fused
  softmax-cross-entropy (loss partials + dlogits + hits), backward per layer, one
  optimizer update over all parameters, ``step_end`` (metrics, next step);
* ``EVALUATE``: gather, forward, loss + hits, ``step_end``;
* ``PREDICT``: gather, forward (+ softmax), store the rows of the output.

The forward ops are emitted once and shared by the three lists. Nothing here
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

__all__ = ["Buf", "Op", "StepPlan", "build_plan", "validate", "ROWS", "TRAIN", "EVALUATE",
           "PREDICT", "OPCODES"]

# The opcodes of csrc/engine.h, by name (their order is the C++ enum's).
OPCODES = tuple(_C.engine_opcodes)
TRAIN, EVALUATE, PREDICT = 0, 1, 2
LIST_NAMES = {TRAIN: "train", EVALUATE: "evaluate", PREDICT: "predict"}
ROWS = "rows"
SIZES = dict(_C.engine_sizes)  # bytes of EngineState, StepScalars, StepHyper

_LABEL_KINDS = {np.dtype(np.int32): 0, np.dtype(np.int64): 1, np.dtype(np.float32): 2}


@dataclass(frozen=True)
class Buf:
    """A buffer of the plan. ``role``: param | grad | state (optimizer) | act |
    scratch | input (bound per pass) | hyper | metric | const (zeros). A buffer with ``base`` is a
    view ``offset`` elements into another (a layer's kernel in the flat parameters)."""
    id: int
    name: str
    role: str
    shape: tuple
    dtype: np.dtype
    base: str | None = None
    offset: int = 0

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
    softmax_output: bool = False

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

    def add(self, name, role, shape, dtype=np.float32, base=None, offset=0) -> int:
        self.bufs.append(Buf(len(self.bufs), name, role, tuple(shape), np.dtype(dtype), base,
                             offset))
        return len(self.bufs) - 1


def build_plan(layers, optimizer_kind: int, optimizer_buffers, label_dtype, precision: int
               ) -> StepPlan:
    """The plan of a Dense stack with softmax-cross-entropy on its logits.

    ``optimizer_kind``: 0 SGD, 1 Adam/AdamW; ``optimizer_buffers``: the names of its
    per-parameter state buffers (e.g. ("exp_avg", "exp_avg_sq")); ``label_dtype``:
    int32 (class indices) or float32 (one-hot / distribution rows);
    ``precision``: the GEMM precision (0 fp32, 1 tf32).
    """
    label_dtype = np.dtype(label_dtype)
    if label_dtype not in _LABEL_KINDS:
        raise ValueError(f"plan: labels must be int32, int64 or float32, got {label_dtype}")
    b = _Builder()
    features = layers[0].input_dim
    classes = layers[-1].units
    sizes = []
    for layer in layers:
        sizes.append(layer.input_dim * layer.units)
        if layer.use_bias:
            sizes.append(layer.units)
    total = sum(sizes)

    # Flat parameters, gradients and optimizer state, at the same offsets.
    params = b.add("params", "param", (total,))
    grads = b.add("grads", "grad", (total,))
    opt_bufs = tuple(optimizer_buffers)
    opt_ids = [b.add(f"opt.{name}", "state", (total,)) for name in opt_bufs]
    w, bias, gw, gb = [], [], [], []
    off = 0
    for i, layer in enumerate(layers):
        shape = (layer.input_dim, layer.units)
        w.append(b.add(f"layer{i}.kernel", "param", shape, base="params", offset=off))
        gw.append(b.add(f"layer{i}.grad.kernel", "grad", shape, base="grads", offset=off))
        off += shape[0] * shape[1]
        if layer.use_bias:
            bias.append(b.add(f"layer{i}.bias", "param", (layer.units,), base="params",
                              offset=off))
            gb.append(b.add(f"layer{i}.grad.bias", "grad", (layer.units,), base="grads",
                            offset=off))
            off += layer.units
        else:
            bias.append(None)
            gb.append(None)

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

    # Per-batch buffers.
    xb = b.add("batch.x", "act", (ROWS, features))
    yb = b.add("batch.y", "act", lshape, label_dtype)
    acts = [b.add(f"layer{i}.out", "act", (ROWS, l.units)) for i, l in enumerate(layers)]
    dacts = [b.add(f"layer{i}.dout", "act", (ROWS, l.units)) for i, l in enumerate(layers[:-1])]
    dlogits = b.add("loss.dlogits", "act", (ROWS, classes))  # probs in evaluate / predict
    row_loss = b.add("loss.row_loss", "scratch", (ROWS,))
    row_hits = b.add("loss.row_hits", "scratch", (ROWS,), np.int32)
    zeros = b.add("predict.labels", "const", (ROWS,), np.int32)  # zeros: softmax needs labels

    kind = _LABEL_KINDS[label_dtype]

    def gather(name, x, y, order_id, batch_x, batch_y, lb):
        return Op("gather", name, (x, y, order_id, batch_x, batch_y, state),
                  (features, lb, 0, 0))  # the batch and the source rows: set per pass

    def forward():
        ops, a = [], xb
        for i, layer in enumerate(layers):
            ops.append(Op("dense_fwd", f"layer{i}.forward", (a, w[i], bias[i], acts[i]),
                          (layer.input_dim, layer.units, int(layer.activation == "relu"),
                           precision)))
            a = acts[i]
        return ops

    fwd = forward()
    train = [gather("gather", x_train, y_train, order, xb, yb, label_bytes)] + fwd
    train.append(Op("xent", "loss", (acts[-1], yb, dlogits, row_loss, row_hits, scalars),
                    (classes, kind, 1)))
    if layers[-1].activation == "relu":
        train.append(Op("relu_bwd", f"layer{len(layers) - 1}.backward.relu",
                        (dlogits, acts[-1]), (classes,)))
    dz = dlogits
    for i in range(len(layers) - 1, -1, -1):
        layer = layers[i]
        a_prev = xb if i == 0 else acts[i - 1]
        train.append(Op("dense_bwd_w", f"layer{i}.backward.dW", (a_prev, dz, gw[i], gb[i]),
                        (layer.input_dim, layer.units, 0, precision)))
        if i > 0:
            mask = acts[i - 1] if layers[i - 1].activation == "relu" else None
            train.append(Op("dense_bwd_x", f"layer{i}.backward.dX",
                            (dz, w[i], mask, dacts[i - 1]),
                            (layer.input_dim, layer.units, 0, precision)))
            dz = dacts[i - 1]
    s = opt_ids + [None] * (2 - len(opt_ids))
    train.append(Op("optimizer", "optimizer", (params, grads, s[0], s[1], hyper, state),
                    (total, optimizer_kind)))
    train.append(Op("step_end", "step_end", (state, scalars)))

    evaluate = [gather("gather", x_eval, y_eval, None, xb, yb, label_bytes)] + fwd
    evaluate.append(Op("xent", "loss", (acts[-1], yb, dlogits, row_loss, row_hits, scalars),
                       (classes, kind, 0)))
    evaluate.append(Op("step_end", "step_end", (state, scalars)))

    softmax = layers[-1].activation == "softmax"
    predict = [gather("gather", x_pred, None, None, xb, None, 0)] + fwd
    if softmax:
        predict.append(Op("xent", "softmax", (acts[-1], zeros, dlogits, row_loss, row_hits,
                                             scalars), (classes, 0, 0)))
    predict.append(Op("store", "store", (dlogits if softmax else acts[-1], out_pred, state),
                      (classes, 0)))
    predict.append(Op("step_end", "step_end", (state, None)))

    plan = StepPlan(bufs=b.bufs, lists={TRAIN: train, EVALUATE: evaluate, PREDICT: predict},
                    layers=tuple(layers), features=features, classes=classes,
                    label_dtype=label_dtype, label_cols=label_cols, opt_kind=optimizer_kind,
                    opt_buffers=opt_bufs, param_sizes=tuple(sizes), precision=precision,
                    softmax_output=softmax)
    validate(plan)
    return plan


def with_batch(ops, batch: int, rows: int):
    """The ops with the batch size filled in where an op indexes rows by step
    (gather: dims[2]; store: dims[1]) and the pass's source rows (gather: dims[3])."""
    out = []
    for op in ops:
        dims = list(op.dims)
        if op.code == "gather":
            dims[2], dims[3] = batch, rows
        elif op.code == "store":
            dims[1] = batch
        out.append(Op(op.code, op.name, op.bufs, tuple(dims)))
    return out


# What each opcode reads and writes, by buffer position (csrc/engine.h).
_READS = {"gather": (0, 1, 2, 5), "dense_fwd": (0, 1, 2), "xent": (0, 1),
          "relu_bwd": (0, 1), "dense_bwd_w": (0, 1), "dense_bwd_x": (0, 1, 2),
          "optimizer": (0, 1, 2, 3, 4, 5), "store": (0, 2), "step_end": (0, 1)}
_WRITES = {"gather": (3, 4), "dense_fwd": (3,), "xent": (2, 3, 4, 5), "relu_bwd": (0,),
           "dense_bwd_w": (2, 3), "dense_bwd_x": (3,), "optimizer": (0, 2, 3),
           "store": (1,), "step_end": (0,)}
# Written before any list runs: parameters, optimizer state, inputs, engine memory.
_PRESET = ("param", "state", "input", "hyper", "metric", "const")


def validate(plan: StepPlan) -> None:
    """Check the plan at build time: known opcodes, buffer ids in range, every buffer
    written before it is read within a list, and an op's output never overlapping
    its own inputs (the kernels' __restrict__ contract) except where an op works in
    place by design (relu_bwd, optimizer, step_end)."""
    n = len(plan.bufs)
    for lst, ops in plan.lists.items():
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
            if op.code not in ("relu_bwd", "optimizer", "step_end"):
                ins = {op.bufs[p] for p in _READS[op.code] if p < len(op.bufs)} - {None}
                if outs & ins:
                    raise ValueError(f"{where}: writes its own input "
                                     f"{[plan.bufs[i].name for i in outs & ins]}")
            for bid in outs:
                written.add(bid)
                base = plan.bufs[bid].base
                if base is not None:
                    written.add(plan.buf(base).id)
