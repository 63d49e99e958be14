"""The C++ engines (csrc/engine.h): the CPU loop and the CUDA Graph engine.

Both receive the plan's ops as (opcode, buffer ids, dims) and the arena's buffer
addresses, and run whole passes with no Python per op. On CUDA the engine works on
its own non-blocking stream, ordered against CuPy's current stream with events; it
captures one CUDA Graph per (op list, rows) -- the full batch, the last partial batch,
the evaluation batch -- after one eager warm-up step, and replays it. The step index,
the optimizer's per-step constants and the metric sums live in engine memory, so a
replay needs no launch arguments and the host reads the sums only when asked.
"""
from __future__ import annotations

from .. import _C
from .._interop import cupy_module
from ..plan import with_batch
from .base import Engine


def optimizer_kind(optimizer) -> int:
    """csrc/engine.h OptKind of an optimizer: 0 SGD, 1 Adam / AdamW, 2 RMSprop."""
    from .. import optim

    if isinstance(optimizer, optim.Adam):
        return 1
    if isinstance(optimizer, optim.RMSprop):
        return 2
    return 0


class NativeEngine(Engine):
    def __init__(self, plan, arena):
        super().__init__(plan, arena)
        self.name = arena.device
        ordinal = 0
        if arena.device == "cuda":
            ordinal = cupy_module().cuda.Device().id
        self._e = _C.new_engine(arena.device, ordinal)
        self._batch = {}
        self._addresses = None
        self._sync_buffers()
        self._state_id = plan.buf("state").id
        self._hyper_id = plan.buf("hyper").id

    def _sync_buffers(self):
        addresses = self.arena.addresses()
        if addresses != self._addresses:
            self._e.set_buffers(addresses)  # drops captured graphs when an address moved
            self._addresses = addresses

    def bind(self, **inputs):
        super().bind(**inputs)
        self._sync_buffers()

    def set_schedule(self, lrs, step0, optimizer):
        from .. import optim

        if len(lrs) > self.arena.max_steps:
            raise ValueError(f"engine: a schedule of {len(lrs)} steps does not fit the "
                             f"arena's optimizer table ({self.arena.max_steps} steps)")
        if self.plan.opt_kind != optimizer_kind(optimizer):
            raise ValueError(f"engine: the plan was built for another optimizer than "
                             f"{type(optimizer).__name__}; compile again")
        if isinstance(optimizer, optim.SGD) and optimizer.momentum != 0.0 \
                and not self.plan.opt_buffers:
            raise ValueError("engine: SGD momentum was set after the optimizer was created "
                             "(it has no momentum buffer); create fm.optim.SGD(momentum=...) "
                             "instead")
        kw = dict(momentum=0.0, beta1=0.0, beta2=0.0, eps=0.0, nesterov=False, decoupled=False,
                  alpha=0.0, centered=False)
        if isinstance(optimizer, optim.Adam):
            kw.update(beta1=optimizer.betas[0], beta2=optimizer.betas[1], eps=optimizer.eps,
                      decoupled=optimizer._decoupled)
        elif isinstance(optimizer, optim.RMSprop):
            kw.update(momentum=optimizer.momentum, eps=optimizer.eps, alpha=optimizer.alpha,
                      centered=optimizer.centered)
        else:
            kw.update(momentum=optimizer.momentum, nesterov=optimizer.nesterov)
        self._e.set_schedule(self._hyper_id, self.plan.opt_kind, [float(v) for v in lrs],
                             int(step0), kw["momentum"], kw["beta1"], kw["beta2"], kw["eps"],
                             optimizer.weight_decay, kw["nesterov"], kw["decoupled"],
                             kw["alpha"], kw["centered"])

    def begin_pass(self):
        self._e.begin_pass(self._state_id)

    def prepare(self, lst, batch, rows):
        """Give the engine op list ``lst`` for passes over ``rows`` rows in batches of
        ``batch``. (A changed list drops that list's captured graphs.)"""
        key = (batch, rows, self.plan.versions.get(lst, 0))  # a new variant: reload
        if self._batch.get(lst) != key:
            self._e.set_ops(lst, [op.native() for op in
                                  with_batch(self.plan.lists[lst], batch, rows)])
            self._batch[lst] = key

    def run(self, lst, rows, batch, first, count, source_rows=None):
        self.prepare(lst, batch, rows if source_rows is None else source_rows)
        stream = 0
        if self.arena.device == "cuda":
            stream = cupy_module().cuda.get_current_stream().ptr
        return self._e.run(lst, rows, batch, first, count, stream)

    def state(self):
        return self._e.state(self._state_id)

    def set_allreduce(self, fn):
        self._e.set_allreduce(fn)

    def synchronize(self):
        self._e.synchronize()

    def graphs_captured(self):
        return self._e.graphs_captured()
