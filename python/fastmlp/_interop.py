"""Array interop and validation for fastmlp.ops.

Every op argument goes through here: it becomes a NumPy array (CPU kernels)
or a CuPy array (CUDA kernels) without copying -- DLPack producers (PyTorch,
JAX) and ``__cuda_array_interface__`` objects included -- and is checked for
dtype, rank, shape, contiguity and device. Errors name the op, the argument,
what was expected and what came.
"""
from __future__ import annotations

import functools

import numpy as np

from . import _C

# DLPack device types (dlpack.h): CPU, CUDA, CUDA pinned host memory.
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST = 1, 2, 3

_INSTALL_CUDA_BUILD = (
    "fastmlp was built without its CUDA part ({why}). Reinstall with the CUDA "
    "toolkit's nvcc on PATH: FASTMLP_CUDA=ON pip install --force-reinstall ."
)
_INSTALL_CUPY = "CuPy is not installed: pip install 'fastmlp[cuda]' (installs cupy-cuda13x)"


@functools.lru_cache(maxsize=1)
def cupy_module():
    """CuPy, or None when it is not installed (or fails to import)."""
    try:
        import cupy
    except Exception:  # ImportError, or a broken CUDA install under CuPy
        return None
    return cupy


@functools.lru_cache(maxsize=1)
def cuda_status() -> tuple[bool, str]:
    """(usable, reason): whether the CUDA kernels can run here, and why not."""
    if not _C.cuda_built:
        return False, _INSTALL_CUDA_BUILD.format(why=_C.cuda_build_note)
    if cupy_module() is None:
        return False, _INSTALL_CUPY
    count, why = _C.cuda.device_count()
    if count == 0:
        hint = ""
        if "InsufficientDriver" in why:
            hint = ("; no NVIDIA driver was found, or it is older than the CUDA runtime "
                    f"fastmlp was built with ({_C.cuda.runtime_version()})")
        return False, f"no usable CUDA device ({why or 'none found'}{hint})"
    return True, ""


def require_cuda(op: str) -> None:
    ok, why = cuda_status()
    if not ok:
        raise RuntimeError(f"{op}: the CUDA kernels cannot run here: {why}")


def is_cupy(arr) -> bool:
    cp = cupy_module()
    return cp is not None and isinstance(arr, cp.ndarray)


def as_array(x, name: str, op: str):
    """x as a NumPy or CuPy array sharing its memory (no copy)."""
    if isinstance(x, np.ndarray) or is_cupy(x):
        return x
    if hasattr(x, "__cuda_array_interface__"):
        cp = cupy_module()
        if cp is None:
            raise RuntimeError(f"{op}: '{name}' is a CUDA array; {_INSTALL_CUPY}")
        return cp.asarray(x)
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        dev_type, _ = x.__dlpack_device__()
        try:
            if dev_type in (_DL_CPU, _DL_CUDA_HOST):
                return np.from_dlpack(x)
            if dev_type == _DL_CUDA:
                cp = cupy_module()
                if cp is None:
                    raise RuntimeError(f"{op}: '{name}' is a CUDA array; {_INSTALL_CUPY}")
                return cp.from_dlpack(x)
        except (BufferError, TypeError, ValueError) as e:
            raise TypeError(f"{op}: '{name}' could not be shared through DLPack: {e}") from e
        raise TypeError(f"{op}: '{name}' lives on DLPack device type {dev_type}; "
                        "expected the CPU (1) or a CUDA GPU (2)")
    raise TypeError(f"{op}: '{name}' must be an array (NumPy, CuPy, or any DLPack / "
                    f"__cuda_array_interface__ array), got {type(x).__name__}")


def device_of(arr) -> str:
    return f"cuda:{arr.device.id}" if is_cupy(arr) else "cpu"


def address(arr) -> int:
    return int(arr.data.ptr) if is_cupy(arr) else int(arr.ctypes.data)


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


class Checker:
    """Validates the arrays of one op call and remembers their device.

    Usage: ``ck = Checker("gemm"); a = ck.f32(a, "a", ndim=2)``; every array
    must be on the device of the first one.
    """

    def __init__(self, op: str):
        self.op = op
        self.device: str | None = None
        self.first: str | None = None

    def array(self, x, name: str, *, dtypes, ndim: int | None = None, shape=None,
              writable: bool = False):
        op = self.op
        arr = as_array(x, name, op)
        if arr.dtype not in dtypes:
            want = " or ".join(np.dtype(d).name for d in dtypes)
            raise TypeError(f"{op}: '{name}' must be {want}, got {arr.dtype}")
        if ndim is not None and arr.ndim != ndim:
            raise ValueError(f"{op}: '{name}' must be {ndim}-D, got {arr.ndim}-D "
                             f"with shape {_fmt_shape(arr.shape)}")
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise ValueError(f"{op}: '{name}' must have shape {_fmt_shape(shape)}, "
                             f"got {_fmt_shape(arr.shape)}")
        if not arr.flags.c_contiguous:
            raise ValueError(f"{op}: '{name}' must be C-contiguous (row-major); got strides "
                             f"{arr.strides}: pass np.ascontiguousarray({name}) / "
                             f"cupy.ascontiguousarray({name})")
        if writable and not is_cupy(arr) and not arr.flags.writeable:
            raise ValueError(f"{op}: '{name}' is written in place but is read-only")
        dev = device_of(arr)
        if self.device is None:
            self.device, self.first = dev, name
        elif dev != self.device:
            raise ValueError(f"{op}: '{name}' is on {dev} but '{self.first}' is on "
                             f"{self.device}; all arrays of one call must be on one device")
        return arr

    def f32(self, x, name: str, **kw):
        return self.array(x, name, dtypes=(np.float32,), **kw)

    def out(self, out, name: str, shape, like):
        """A float32 output of the given shape: `out` checked, or a new array."""
        if out is None:
            return self.empty(shape, np.float32, like)
        return self.f32(out, name, shape=shape, writable=True)

    def empty(self, shape, dtype, like):
        """Workspace on the call's device."""
        if is_cupy(like):
            with like.device:
                return cupy_module().empty(shape, dtype=dtype)
        return np.empty(shape, dtype=dtype)

    def no_overlap(self, out, out_name: str, *others, allow_same: bool = False):
        """Raise when out's memory overlaps one of ``(array, name)`` others.

        With ``allow_same``, out may be exactly an input (the same memory and
        size: elementwise kernels read each element before writing it); a
        partial overlap, which would make the result depend on the order the
        threads run in, is still refused.
        """
        lo, hi = address(out), address(out) + out.nbytes
        for arr, name in others:
            if arr is None or not out.nbytes or not arr.nbytes:
                continue
            a_lo = address(arr)
            if allow_same and a_lo == lo and arr.nbytes == out.nbytes:
                continue
            if lo < a_lo + arr.nbytes and a_lo < hi:
                how = "partially overlaps" if allow_same else "overlaps"
                raise ValueError(f"{self.op}: '{out_name}' {how} '{name}'; pass a separate "
                                 f"output array" + (" (or exactly the input)" if allow_same else ""))

    def disjoint(self, *named):
        """Raise when any two of the ``(array, name)`` pairs share memory."""
        for i, (arr, name) in enumerate(named):
            if arr is not None:
                self.no_overlap(arr, name, *named[i + 1:])

    def backend(self, like):
        """(module of kernels, extra trailing args, device context) for this call."""
        if not is_cupy(like):
            return _C.cpu, (), _NullContext()
        require_cuda(self.op)
        with like.device:  # CuPy's current stream is per device
            stream = cupy_module().cuda.get_current_stream().ptr
        return _C.cuda, (stream,), like.device


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
