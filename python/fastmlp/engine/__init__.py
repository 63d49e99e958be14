"""Engines: what runs a :class:`~fastmlp.plan.StepPlan`.

* ``"cpu"`` -- the C++ CPU engine (csrc/cpu/engine.cpp): whole passes in one call.
* ``"cuda"`` -- the C++ CUDA engine (csrc/cuda/engine.cu): CUDA Graph replay.
* ``"python"`` -- the Python executor (:mod:`.python`): op by op through
  :mod:`fastmlp.ops`; the reference the others are tested against bit for bit.

:func:`choose` says which one ``fit`` uses, and why; ``History.params["engine"]``
records it. ``FASTMLP_ENGINE=python`` forces the Python executor (for debugging and
the equivalence tests); there is no silent fallback from a failing engine.
"""
from __future__ import annotations

import os

from .arena import Arena
from .base import Engine
from .native import NativeEngine, optimizer_kind
from .python import PythonExecutor

__all__ = ["Arena", "Engine", "NativeEngine", "PythonExecutor", "choose", "make",
           "optimizer_kind"]

_NATIVE_OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop", "DPSGD", "DPAdam")


def choose(device: str, optimizer=None, host_data: bool = False) -> tuple[str, str]:
    """(engine name, reason). The C++ engine of the device, except:
    ``FASTMLP_ENGINE=python``; an optimizer that is not exactly SGD / Adam / AdamW /
    RMSprop or the DP optimizers (DPSGD, DPAdam) (a subclass may override ``_update``, which only the Python executor calls); data
    left on the host while the model is on the GPU (too large for the device)."""
    forced = os.environ.get("FASTMLP_ENGINE", "").strip().lower()
    if forced not in ("", "native", "python"):
        raise ValueError(f"FASTMLP_ENGINE must be 'native' or 'python', got {forced!r}")
    if forced == "python":
        return "python", "FASTMLP_ENGINE=python"
    if optimizer is not None:
        from .. import optim, privacy

        if type(optimizer) not in (optim.SGD, optim.Adam, optim.AdamW, optim.RMSprop,
                                   privacy.DPSGD, privacy.DPAdam):
            return "python", (f"{type(optimizer).__name__} is not one of the built-in "
                              "optimizers the C++ engines run (SGD, Adam, AdamW, RMSprop)")
    if host_data:
        return "python", "the data stays on the host (too large for the GPU)"
    return device, "default"


def make(name: str, plan, arena, optimizer=None) -> Engine:
    if name == "python":
        return PythonExecutor(plan, arena, optimizer)
    return NativeEngine(plan, arena)
