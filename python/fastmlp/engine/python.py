"""The Python executor: runs a plan op by op through :mod:`fastmlp.ops`.

It is the reference the C++ engines are tested against bit for bit: every op calls
the public, individually tested op with NumPy / CuPy views of the arena, so the
engines' argument plumbing (sizes, leading dimensions, offsets, the per-step table)
is checked against code that reads like the math. It also runs what the engines do
not: an optimizer subclass with its own ``_update`` (called per parameter, as
``Optimizer.step`` would), and data left on the host while the model trains on the
GPU (each batch gathered on the host and copied over).
"""
from __future__ import annotations

import numpy as np

from .. import ops
from ..metrics import SLOTS
from .._interop import cupy_module, is_cupy
from ..plan import TRAIN
from .base import Engine

_PRECISION = {0: "fp32", 1: "tf32"}
_SLOTS = tuple(SLOTS)  # the metrics kernel's sums, in their order
_ACTS = {code: name for name, code in reversed(list(ops.ACTIVATIONS.items()))}  # canonical names
_TRANSFORMS = ("none", "sigmoid", "softmax")  # OutputTransform codes


def _float(bits: int) -> float:
    """A float32 passed as its bits in an int64 dim (plan._f32_bits)."""
    return float(np.array(bits, np.uint32).view(np.float32))


class PythonExecutor(Engine):
    name = "python"

    def __init__(self, plan, arena, optimizer=None):
        super().__init__(plan, arena)
        self.optimizer = optimizer
        self._state = self._fresh_state()
        self._scalars = None
        self._metric = [0.0] * len(_SLOTS)
        self._lrs, self._step0 = [], 1
        self._allreduce = None

    @staticmethod
    def _fresh_state():
        return {"step": 0, "correct": 0, "loss_sum": 0.0, "nonfinite_step": -1, "bad_row": -1,
                "nonfinite_param_step": -1, "rng_step": 1, "metric": [0.0] * len(_SLOTS),
                "penalty_sum": 0.0}

    def set_schedule(self, lrs, step0, optimizer):
        self._lrs, self._step0 = list(lrs), int(step0)

    def begin_pass(self):
        self._state = self._fresh_state()
        self._state["rng_step"] = self._step0  # as the C++ engines: the last schedule's

    def state(self):
        return dict(self._state)

    def set_allreduce(self, fn):
        self._allreduce = fn

    def synchronize(self):
        if self.arena.device == "cuda":
            cupy_module().cuda.get_current_stream().synchronize()

    def run(self, lst, rows, batch, first, count, source_rows=None):
        if self._state["step"] != first:
            raise ValueError(f"engine: the pass is at step {self._state['step']}, asked to run "
                             f"from step {first}")
        for s in range(first, first + count):
            n = min(batch, rows - s * batch)
            for op in self.plan.lists[lst]:
                self._exec(op, n, batch)
            st = self._state
            if lst == TRAIN and (st["nonfinite_step"] >= 0 or st["nonfinite_param_step"] >= 0):
                return s - first + 1
        return count

    # -- one op ---------------------------------------------------------------------------
    def _exec(self, op, n, batch):
        arr = self.arena.array
        b = [None if i is None else arr(i) for i in op.bufs]
        d = op.dims
        code = op.code
        if code == "gather":
            x, y, order, xb, yb = b[0], b[1], b[2], b[3], b[4]
            lo = self._state["step"] * batch
            idx = order[lo:lo + n] if order is not None else slice(lo, lo + n)
            if is_cupy(xb) and not is_cupy(x):  # host data, GPU model: copy the batch over
                hidx = cupy_module().asnumpy(idx) if is_cupy(idx) else idx
                xb[:n].set(np.ascontiguousarray(x[hidx]))
                if y is not None:
                    yb[:n].set(np.ascontiguousarray(y[hidx]))
            else:
                xb[:n] = x[idx]
                if y is not None:
                    yb[:n] = y[idx]
        elif code == "dense_fwd":
            ops.dense_forward(b[0][:n], b[1], b[2], activation=_ACTS[d[2]],
                              dropout=self._dropout(op), out=b[3][:n],
                              preact_out=None if b[4] is None else b[4][:n],
                              precision=_PRECISION[d[3]])
        elif code == "xent":
            loss, _, hits, bad = ops.softmax_cross_entropy_fused(
                b[0][:n], b[1][:n], backward=bool(d[2]), out=b[2][:n], check_labels=False)
            self._scalars = (float(loss), int(hits), int(bad[0]))
        elif code == "loss":
            e = op.extra
            loss, _ = ops.loss_forward_backward(
                e["kind"], b[0][:n], b[1][:n],
                sample_weight=None if b[2] is None else b[2][:n], delta=e["delta"],
                label_smoothing=e["label_smoothing"], backward=bool(d[5]),
                out=None if b[3] is None else b[3][:n], check_labels=False)
            self._scalars = (float(loss), 0, -1)
        elif code == "metrics":
            e = op.extra
            sums = ops.metric_sums(b[0][:n], b[1][:n], e["metrics"], transform=e["transform"],
                                   k=int(d[4]), threshold=_float(d[5]),
                                   probs_out=None if b[2] is None else b[2][:n])
            self._metric = [float(sums.get(m, 0.0)) for m in _SLOTS]
        elif code == "clip":
            e = op.extra
            xp = cupy_module() if is_cupy(b[0]) else np
            offsets = xp.asarray(np.array(e["offsets"], np.int64))
            l1l2 = None if b[3] is None else b[3]
            ops.grad_clip_scale(b[0], b[1], offsets, l1l2, mode=int(d[1]),
                                max_norm=_float(d[2]), out=b[4])
        elif code == "act_fwd":
            ops.activation(b[0][:n], _ACTS[d[1]], dropout=self._dropout(op), out=b[1][:n])
        elif code == "act_bwd":
            ops.activation_backward(b[0][:n], None if b[1] is None else b[1][:n], _ACTS[d[1]],
                                    saved_is_input=bool(d[2]), dropout=self._dropout(op),
                                    out=b[2][:n])
        elif code == "dense_bwd_w":
            scale = b[4] if len(b) > 4 else None
            ops.dense_backward_weight(b[0][:n], b[1][:n], out=b[2], bias_out=b[3],
                                      bias=b[3] is not None, precision=_PRECISION[d[3]],
                                      row_scale=None if scale is None else scale[:n])
        elif code == "dp_norms":
            ops.dp_row_sqnorms(b[0][:n], b[1][:n], bias=bool(d[2]), out=b[2][:n],
                               accumulate=bool(d[3] & 1))
            if d[3] & 2:  # as engine_exec.h: grad_scale n (1 for an empty step)
                rows = float(max(n, 1))
                ops.dp_clip_factors(b[2][:n], clip=_float(d[4]), noise_multiplier=_float(d[5]),
                                    grad_scale=rows, divisor=_float(d[6]) if d[6] else rows,
                                    std_out=b[3])
        elif code == "dense_bwd_x":
            ops.dense_backward_input(b[0][:n], b[1], activation=_ACTS[d[2]],
                                     saved=None if b[2] is None else b[2][:n],
                                     saved_is_input=bool(d[7]), dropout=self._dropout(op),
                                     out=b[3][:n], precision=_PRECISION[d[3]])
        elif code == "bn_fwd":
            training = bool(d[1])
            ops.batch_norm_forward(b[0][:n], b[1], b[2], b[6], b[7], training=training,
                                   momentum=_float(d[3]), epsilon=_float(d[2]), out=b[3][:n],
                                   save_mean=b[4] if training else None,
                                   save_invstd=b[5] if training else None)
        elif code == "bn_bwd":
            ops.batch_norm_backward(b[0][:n], b[1][:n], b[2], b[3], b[4], out=b[5][:n],
                                    dgamma_out=b[6], dbeta_out=b[7])
        elif code == "ln_fwd":
            ops.layer_norm_forward(b[0][:n], b[1], b[2], epsilon=_float(d[1]), out=b[3][:n],
                                   save_mean=b[4][:n], save_invstd=b[5][:n])
        elif code == "ln_bwd":
            ops.layer_norm_backward(b[0][:n], b[1][:n], b[2], b[3][:n], b[4][:n], out=b[5][:n],
                                    dgamma_out=b[6], dbeta_out=b[7])
        elif code == "optimizer":
            if op.extra is None or "segment" not in op.extra:
                self._optimizer_step(noise=self._noise(op, b, None))
            else:
                self._optimizer_step(op.extra, b, self._noise(op, b, op.extra["segment"]))
            # The C++ engines find a non-finite parameter inside their update loop; here
            # the flat parameters (buffer 0) are checked afterwards: one pass, one read.
            st = self._state
            if st["nonfinite_param_step"] < 0 and ops.first_nonfinite(b[0]) is not None:
                st["nonfinite_param_step"] = st["step"]
        elif code == "store":
            lo = self._state["step"] * batch
            b[1][lo:lo + n] = b[0][:n]
        elif code == "step_end":
            st = self._state
            if op.bufs[2] is not None:  # the regularization penalty of this step's weights
                st["penalty_sum"] += float(sum(float(v) for v in b[2][:d[0]])) * n
            if op.bufs[1] is not None and d[1]:
                st["metric"] = [a + v for a, v in zip(st["metric"], self._metric)]
            if op.bufs[1] is not None:
                loss, hits, bad = self._scalars
                st["loss_sum"] += loss * n  # a float32 value times n, in double
                st["correct"] += hits
                if not np.isfinite(loss) and st["nonfinite_step"] < 0:
                    st["nonfinite_step"] = st["step"]
                if bad >= 0 and st["bad_row"] < 0:
                    st["bad_row"] = bad
            st["step"] += 1
            st["rng_step"] += 1
        elif code == "target_seed":
            ops.target_seed(b[0][:n], b[1][:n], transform=_TRANSFORMS[d[1]], out=b[2][:n])
        elif code == "ig_interp":
            ops.ig_interpolate(b[0], b[2], baseline=b[1], targets=b[3],
                               step=self._state["step"], batch=batch, rows=n, out=b[4][:n],
                               targets_out=None if b[5] is None else b[5][:n])
        elif code == "ig_sum":
            ops.ig_accumulate(b[0][:n], b[1], b[3], baseline=b[2], multiply=bool(d[4]),
                              absolute=bool(d[5]), step=self._state["step"], batch=batch,
                              out=b[4])
        elif code == "adv_init":
            e = op.extra
            counter = self._state["step"] if e["counter"] else self._state["rng_step"]
            ops.adversarial_init(b[0][:n], eps=_float(d[1]), clip=(_float(d[2]), _float(d[3])),
                                 seed=e["seed"] if e["random"] else None, step=counter,
                                 out=b[1][:n])
        elif code == "adv_step":
            ops.adversarial_step(b[0][:n], b[1][:n], b[2][:n], eps=_float(d[1]),
                                 alpha=_float(d[2]), clip=(_float(d[3]), _float(d[4])),
                                 project=bool(d[5]))
        elif code == "allreduce":
            # engine.h allreduce: times the rows, summed with the row counts, divided
            g, count = b[0], d[0]
            if self._allreduce is None:
                raise ValueError("engine: op allreduce needs the processes' all-reduce, which "
                                 "is not set (fastmlp.distributed)")
            g[:count] *= np.float32(n)
            g[count] = n
            stream = 0
            if is_cupy(g):
                stream = cupy_module().cuda.get_current_stream().ptr
            from .._interop import address

            self._allreduce(address(g), count + 1, stream)
            total = g[count:count + 1]
            if float(total[0]) > 0.0:
                g[:count] /= total
        else:
            raise ValueError(f"python executor: no rule for opcode {code!r}")

    def _dropout(self, op):
        """The op's Dropout as the public ops take it, for this step (None: none)."""
        if not op.extra or op.dims[4] == 0:
            return None
        e = op.extra
        return ops.Dropout(e["rate"], e["seed"], self._state["rng_step"], e["layer"])

    def _noise(self, op, b, segment):
        """DP-SGD's noise keywords of the ops' optimizer steps for this step, as a
        function of the parameter index (None without noise): the std buffer, the seed,
        the step number (the dropout counter, rng_step) and the parameter's offset in the
        flat parameters (its place in the noise stream)."""
        e = op.extra or {}
        e = e.get("noise", e) if segment is not None else e
        if len(b) <= 10 or b[10] is None or not e or "noise_seed" not in e:
            return None
        std, seed, step, offsets = b[10], e["noise_seed"], self._state["rng_step"], e["offsets"]
        return lambda k: {"noise_std": std, "noise_seed": seed, "noise_step": step,
                          "noise_offset": offsets[k]}

    def _optimizer_step(self, segment=None, b=None, noise=None):
        """The optimizer's own per-parameter rule, with the step number and learning rate
        the engines' table holds for this step (Adam's bias correction counts from 1):
        every parameter, or one (``segment``: the op's extra) with its gradient
        transform (regularizer, clip scale, clipvalue) and penalty slot."""
        opt = self.optimizer
        counted, lr = opt.iterations, opt.lr  # the trainer counts the steps a run did
        opt.iterations = self._step0 + self._state["step"]
        if self._lrs:
            opt.lr = self._lrs[self._state["step"]]
        try:
            views = list(zip(self.arena.param_views(), self.arena.grad_views(), opt.state))
            if segment is None:
                for k, (p, g, st) in enumerate(views):
                    opt._update(p, g, st, **(noise(k) if noise else {}))
            else:
                k = segment["segment"]
                p, g, st = views[k]
                opt._update(p, g, st, l1=segment["l1"], l2=segment["l2"],
                            clip_scale=None if b[7] is None else b[7][k:k + 1],
                            clipvalue=segment["clipvalue"],
                            penalty_out=None if b[8] is None else b[8][k:k + 1],
                            **(noise(k) if noise else {}))
        finally:
            opt.iterations, opt.lr = counted, lr
