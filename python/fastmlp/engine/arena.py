"""One owner for a bound plan's memory.

An :class:`Arena` allocates every buffer of a :class:`~fastmlp.plan.StepPlan` on one
device, once, sized for ``capacity`` batch rows and ``max_steps`` steps per pass: the
flat parameters, gradients and optimizer state (same offsets), the weights the
optimizer does not train (BatchNormalization's moving statistics), the activations, the
loss scratch and the engine memory (pass state, step scalars, the optimizer's per-step
table). Layers and the optimizer then hold *views* into it (``adopt``), so the
engines update the very arrays ``get_weights``/``save`` read, and one optimizer launch
covers every parameter. Inputs (the data of a pass) are not allocated: they are bound.
Device memory comes from CuPy's pool; nothing is allocated per step.
"""
from __future__ import annotations

import math

import numpy as np

from .._interop import address, cupy_module
from ..plan import ROWS, StepPlan


class Arena:
    def __init__(self, plan: StepPlan, device: str, capacity: int, max_steps: int):
        self.plan, self.device = plan, device
        self.capacity, self.max_steps = int(capacity), int(max_steps)
        self.xp = cupy_module() if device == "cuda" else np
        self.arrays: dict[int, object] = {}
        for buf in plan.bufs:
            if buf.role == "input" or buf.base is not None:
                continue
            shape = tuple(self.capacity if d == ROWS else self.max_steps if d == "steps" else d
                          for d in buf.shape)
            # zeros: predict's dummy labels must be 0; everything else is written first
            if buf.role == "table":
                self.arrays[buf.id] = self.xp.asarray(np.array(buf.data, buf.dtype)
                                                      .reshape(shape))
            else:
                self.arrays[buf.id] = self.xp.zeros(shape, buf.dtype)
        for buf in plan.bufs:
            if buf.base is not None:
                base = self.arrays[plan.buf(buf.base).id]
                size = math.prod(buf.shape)
                self.arrays[buf.id] = base[buf.offset:buf.offset + size].reshape(buf.shape)

    def fits(self, capacity: int, max_steps: int) -> bool:
        return capacity <= self.capacity and max_steps <= self.max_steps

    def array(self, buf_id: int):
        return self.arrays.get(buf_id)

    def named(self, name: str):
        return self.arrays.get(self.plan.buf(name).id)

    def bind(self, **inputs) -> None:
        """Bind input buffers by name (``train_x=...`` binds "train.x"); None unbinds."""
        for key, arr in inputs.items():
            bid = self.plan.buf(key.replace("_", ".", 1)).id
            if arr is None:
                self.arrays.pop(bid, None)
            else:
                self.arrays[bid] = arr

    def addresses(self) -> list:
        """The address of every buffer, by id (0: not bound)."""
        out = []
        for buf in self.plan.bufs:
            arr = self.arrays.get(buf.id)
            out.append(0 if arr is None or arr.size == 0 else address(arr))
        return out

    # -- the model's arrays as views ---------------------------------------------------------
    def param_views(self) -> list:
        """The trainable weights' views of "params", in Keras order."""
        return [self.named(n) for n in self.plan.param_names]

    def grad_views(self) -> list:
        return [self.named(n.replace(".", ".grad.", 1)) for n in self.plan.param_names]

    def _weight_views(self, i, layer) -> list:
        """Layer i's weights (trainable or not) as views, in its weight_names order."""
        return [self.named(f"layer{i}.{n}") for n in layer.weight_names()]

    def state_views(self) -> list:
        """Per parameter, {buffer name: view of opt.<name>} (the optimizer's state)."""
        out, off = [], 0
        for size, p in zip(self.plan.param_sizes, self.param_views()):
            out.append({name: self.named(f"opt.{name}")[off:off + size].reshape(p.shape)
                        for name in self.plan.opt_buffers})
            off += size
        return out

    def adopt(self, layers, optimizer) -> None:
        """Copy the layers' weights (and the optimizer's state, when it has some for
        these parameters) into the arena, then point them at the arena's views."""
        views = self.param_views()
        for i, layer in enumerate(layers):
            mine = self._weight_views(i, layer)
            for dst, src in zip(mine, layer.weights()):
                if dst is not src:
                    dst[...] = self.xp.asarray(src)
            layer.set_weight_arrays(mine)
        if optimizer is None:
            return
        state = self.state_views()
        if len(optimizer.state) == len(views):
            for dst, src in zip(state, optimizer.state):
                for name in dst:
                    if name in src and src[name] is not dst[name]:
                        dst[name][...] = self.xp.asarray(src[name])
        else:
            for dst in state:
                for arr in dst.values():
                    arr[...] = 0
        optimizer.state = state

    def owns(self, layers, optimizer) -> bool:
        """Whether the layers (and optimizer) already hold this arena's views."""
        views = self.param_views()
        for i, layer in enumerate(layers):
            if any(w is not v for w, v in zip(layer.weights(), self._weight_views(i, layer))):
                return False
        if optimizer is not None and self.plan.opt_buffers:
            state = optimizer.state
            if len(state) != len(views):
                return False
            mine = self.state_views()
            for s, m in zip(state, mine):
                for name in m:
                    arr = s.get(name)
                    if arr is None or address(arr) != address(m[name]):
                        return False
        return True
