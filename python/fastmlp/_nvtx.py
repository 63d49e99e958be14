"""NVTX ranges for profilers (Nsight Systems / Nsight Compute), free when absent.

``annotate("fit/forward")`` is a context manager that opens an NVTX range
named after the op or training phase when the ``nvtx`` package is installed,
and a shared do-nothing context otherwise (one attribute lookup, no
allocation). Set ``FASTMLP_NVTX=0`` to turn the ranges off even when ``nvtx``
is installed.
"""
from __future__ import annotations

import os

_DOMAIN = "fastmlp"


class _Null:
    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL = _Null()

try:
    if os.environ.get("FASTMLP_NVTX", "1") == "0":
        raise ImportError("turned off by FASTMLP_NVTX=0")
    import nvtx as _nvtx_mod  # noqa: PLC0415 (optional dependency)
except Exception:  # ImportError, or an nvtx that cannot load its library
    _nvtx_mod = None

enabled = _nvtx_mod is not None


def annotate(name: str):
    """An NVTX range named ``name`` in the ``fastmlp`` domain (or a no-op)."""
    if _nvtx_mod is None:
        return _NULL
    return _nvtx_mod.annotate(name, domain=_DOMAIN)
