"""fastmlp: dense neural networks trained with hand-written C++ and CUDA kernels."""
from __future__ import annotations

from . import (_C, _nvtx, adversarial, callbacks, datasets, distributed, explain, layers,
               losses, metrics, ops, optim, privacy, reference, regularizers)
from ._interop import cuda_status, cupy_module
from ._random import set_seed
from .layers import Activation, BatchNormalization, Dense, Dropout, LayerNormalization
from .model import Sequential, load_model
from .ops import get_matmul_precision, set_matmul_precision

__version__ = "0.1.0"
__all__ = ["backends", "ops", "reference", "set_seed", "set_matmul_precision",
           "get_matmul_precision", "set_num_threads", "get_num_threads", "set_flush_denormal",
           "get_flush_denormal", "Dense", "Activation", "Dropout", "BatchNormalization",
           "LayerNormalization", "Sequential", "load_model",
           "adversarial", "callbacks", "datasets", "distributed", "explain", "layers", "losses",
           "metrics", "optim",
           "privacy", "regularizers",
           "__version__"]


def set_num_threads(n: int) -> None:
    """Threads for the CPU kernels, process-wide (default: ``FASTMLP_NUM_THREADS``, else
    ``OMP_NUM_THREADS``, else the CPUs this process may run on), like
    ``torch.set_num_threads``."""
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"set_num_threads: need a positive integer, got {n!r}")
    _C.cpu.set_num_threads(int(n))


def get_num_threads() -> int:
    """Threads the CPU kernels use (see :func:`set_num_threads`)."""
    return int(_C.cpu.num_threads())


def set_flush_denormal(mode: bool) -> bool:
    """Flush-to-zero / denormals-are-zero inside fastmlp's CPU kernels (default: on).

    On, a denormal (subnormal) float32 input reads as zero and a result that would be
    denormal is written as zero, as TensorFlow/Keras run their CPU kernels: denormals
    cost x86 cores a microcode assist per operation (~100x on Intel), and training
    meets them (Adam's moments of always-zero inputs decay into them). The mode is set
    on the calling thread and the kernel pool's workers for the duration of each kernel
    call and restored afterwards, so NumPy and the rest of the process keep IEEE
    arithmetic. Off, the kernels follow IEEE 754 (gradual underflow). Process-wide;
    the GPU kernels are not affected (they keep denormals, at full speed there).

    Returns whether this CPU supports the mode (x86-64 and AArch64 do), like
    ``torch.set_flush_denormal``; where it is unsupported the kernels always run IEEE.
    """
    if not isinstance(mode, (bool, int)) or mode not in (0, 1):
        raise ValueError(f"set_flush_denormal: need True or False, got {mode!r}")
    _C.cpu.set_flush_denormal(bool(mode))
    return bool(_C.cpu.flush_denormal_supported())


def get_flush_denormal() -> bool:
    """Whether fastmlp's CPU kernels flush denormals (see :func:`set_flush_denormal`);
    False where the CPU does not support it."""
    return bool(_C.cpu.flush_denormal()) and bool(_C.cpu.flush_denormal_supported())


def backends() -> dict:
    """What was built and what can run here.

    ``{"cpu": True, "cpu_threads": int, "cpu_gemm": "avx512"/"avx2"/"generic",
    "cpu_flush_denormal": bool,
    "cuda_built": bool, "cuda": bool,
    "cuda_reason": str, "build_info": str}`` -- ``cuda_reason`` says why the
    CUDA kernels cannot run (no CUDA build / no CuPy / no device or driver),
    and is empty when they can.
    """
    usable, why = cuda_status()
    info = {
        "cpu": True,
        "cpu_threads": _C.cpu.num_threads(),
        "cpu_gemm": _C.cpu.gemm_isa(),
        "cpu_flush_denormal": get_flush_denormal(),
        "cuda_built": bool(_C.cuda_built),
        "cuda": usable,
        "cuda_reason": why,
        "build_info": _C.build_info,
    }
    if usable:
        cp = cupy_module()
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        info["cuda_device"] = props["name"].decode() if isinstance(props["name"], bytes) \
            else str(props["name"])
        info["cuda_runtime"] = _C.cuda.runtime_version()
    return info
