"""The benchmark harness shared by run.py: devices, timers, checks, result rows.

A Device knows how to make arrays, time calls and measure its ceilings:

- CpuDevice: NumPy arrays (fastmlp's C++ kernels), time.perf_counter around
  single calls;
- CudaDevice: CuPy arrays (fastmlp's CUDA kernels), CUDA events around single
  calls, the L2 cache flushed (a 256 MiB buffer overwritten) before each one,
  which also keeps the GPU busy while Python issues the call.

Timing is blocked, not interleaved: each implementation gets its warm-up and
then a block of calls, and the blocks of all implementations repeat in a few
rounds (so slow drift of a shared machine hits all of them alike). Interleaving
single calls is worse on a CPU: the thread pools of OpenBLAS, PyTorch and
fastmlp's OpenMP keep spinning after a call and slow the next library down
(measured: up to 100x on small GEMMs).
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import subprocess
import time

import numpy as np

FLUSH_BYTES = 256 << 20


class CheckFailed(AssertionError):
    """A benchmarked output disagrees with its reference: nothing it timed counts."""


def rel_err(got, want) -> float:
    """Relative max-norm error of got against want (float64); NaN/Inf -> inf."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    scale = max(float(np.max(np.abs(want))) if want.size else 0.0, 1e-30)
    err = float(np.max(np.abs(got - want))) / scale if want.size else 0.0
    return err if np.isfinite(err) else float("inf")


def check(what: str, got, want, tol: float) -> float:
    """rel_err(got, want), raising CheckFailed unless it is <= tol."""
    err = rel_err(got, want)
    if not err <= tol:
        raise CheckFailed(f"{what}: relative max-norm error {err:.2e} > tolerance {tol:.0e}")
    return err


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def git_commit(dirty_check: bool = True) -> str:
    """HEAD's short hash, '+dirty' when csrc/ or python/ have uncommitted changes."""
    if os.environ.get("FASTMLP_COMMIT"):
        return os.environ["FASTMLP_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, check=True, cwd=here).stdout.strip()
        if dirty_check:
            # ":/": from the repository root (plain paths are relative to cwd, benchmarks/).
            dirty = subprocess.run(["git", "status", "--porcelain", "--", ":/csrc", ":/python"],
                                   capture_output=True, text=True, cwd=here).stdout.strip()
            rev += "+dirty" if dirty else ""
        return rev
    except Exception:
        return "unknown"


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def summarize(samples) -> dict:
    return {"median_s": statistics.median(samples), "min_s": min(samples),
            "max_s": max(samples), "repeats": len(samples)}


class Device:
    kind = ""
    xp = np
    name = ""
    slug = ""

    def sync(self):
        pass

    def _call_seconds(self, fn) -> float:
        raise NotImplementedError

    def time(self, fns: dict, *, repeats: int, min_time: float = 0.0, max_repeats: int = 2000,
             rounds: int = 3, warmup: int = 3) -> dict:
        """{name: summarize(seconds of single calls)} for each callable of fns.

        Each round gives every implementation a warm-up and then a block of
        calls; a block stops after max(repeats/rounds calls, min_time/rounds
        seconds), at most max_repeats/rounds calls.
        """
        samples = {k: [] for k in fns}
        per_round = max(1, -(-repeats // rounds))
        for _ in range(rounds):
            for name, fn in fns.items():
                for _ in range(warmup):
                    fn()
                self.sync()
                t_end = time.perf_counter() + min_time / rounds
                n = 0
                while n < per_round or (time.perf_counter() < t_end and n < max_repeats // rounds):
                    samples[name].append(self._call_seconds(fn))
                    n += 1
        return {k: summarize(v) for k, v in samples.items()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_mhz() -> float | None:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("cpu MHz"):
                    return float(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def numpy_blas_info() -> dict:
    """NumPy's BLAS (name, version, config) and the thread count it will use."""
    info = {"numpy": np.__version__}
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info.update({"blas": blas.get("name"), "blas_version": blas.get("version"),
                     "blas_config": blas.get("openblas configuration")})
    except Exception as e:  # older NumPy: no mode="dicts"
        info["blas"] = f"unknown ({type(e).__name__})"
    # scipy-openblas exports its own thread-count getter; ask it directly.
    try:
        import ctypes
        import glob
        libdir = os.path.dirname(np.__file__) + ".libs"
        for path in glob.glob(os.path.join(libdir, "*openblas*")):
            lib = ctypes.CDLL(path)
            for sym in ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
                        "openblas_get_num_threads64_", "openblas_get_num_threads"):
                if hasattr(lib, sym):
                    info["blas_threads"] = int(getattr(lib, sym)())
                    break
            for sym in ("scipy_openblas_get_corename64_", "openblas_get_corename"):
                if hasattr(lib, sym):
                    getattr(lib, sym).restype = ctypes.c_char_p
                    info["blas_core"] = getattr(lib, sym)().decode()
                    break
    except Exception:
        pass
    # threadpoolctl (the bench extra) names the kernel OpenBLAS picked for this CPU
    # ("architecture"): the one NumPy's GEMMs ran, after run.py unset the overrides.
    try:
        from threadpoolctl import threadpool_info
        for lib in threadpool_info():
            if lib.get("internal_api") == "openblas":
                info["blas_architecture"] = lib.get("architecture")
                info["blas_threads"] = lib.get("num_threads", info.get("blas_threads"))
                break
    except ImportError:
        info["blas_architecture"] = "unknown (threadpoolctl not installed: pip install 'fastmlp[bench]')"
    return info


class CpuDevice(Device):
    kind = "cpu"

    def __init__(self):
        import fastmlp as fm
        self.name = _cpu_model()
        self.cores = os.cpu_count() or 1
        self.slug = f"cpu-{slug(self.name)}-{self.cores}c"
        self.threads = fm.backends()["cpu_threads"]

    def asarray(self, host):
        return np.ascontiguousarray(host)

    def to_host(self, a):
        return np.asarray(a)

    def _call_seconds(self, fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def peak_flops(self) -> tuple[float | None, str]:
        """FP32 FLOP/s roof: cores x FMA pipes x SIMD lanes x 2 x clock, and how it was derived."""
        mhz, flags = _cpu_mhz(), _cpu_flags()
        if not mhz:
            return None, "unknown (no clock in /proc/cpuinfo)"
        lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
        pipes = 2  # assumption: two FMA pipes per core (Zen 4/5, Skylake-SP and later server cores)
        peak = self.cores * pipes * lanes * 2 * mhz * 1e6
        return peak, (f"{self.cores} cores x {pipes} FMA pipes (assumed) x {lanes} fp32 lanes "
                      f"({'AVX-512' if lanes == 16 else 'AVX2' if lanes == 8 else 'SSE'}) x 2 "
                      f"x {mhz / 1e3:.2f} GHz (/proc/cpuinfo; turbo not counted)")

    def copy_bandwidth(self, nbytes: int, repeats: int) -> dict:
        """Best of a 1-thread and an all-cores np.copyto of nbytes (read + write counted)."""
        from concurrent.futures import ThreadPoolExecutor
        src = np.ones(nbytes // 4, np.float32)
        dst = np.zeros_like(src)
        chunks = np.array_split(np.arange(src.size), self.cores)
        bounds = [(int(c[0]), int(c[-1]) + 1) for c in chunks if c.size]
        pool = ThreadPoolExecutor(len(bounds))  # NumPy releases the GIL while it copies

        def threaded():
            list(pool.map(lambda b: np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]]), bounds))

        t = self.time({"1 thread": lambda: np.copyto(dst, src), f"{len(bounds)} threads": threaded},
                      repeats=repeats)
        pool.shutdown()
        if not np.array_equal(dst, src):
            raise CheckFailed("copy bandwidth: the copy is wrong")
        best = min(t, key=lambda k: t[k]["median_s"])
        return {"variant": best, "timing": t[best], "all": t, "bytes": 2 * src.nbytes}

    def info(self) -> dict:
        import fastmlp as fm
        out = {"cpu": self.name, "cores": self.cores, "fastmlp_threads": self.threads,
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
               "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
               "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
               "OPENBLAS_THREAD_TIMEOUT": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
               "fastmlp_build": fm.backends()["build_info"]}
        out.update(numpy_blas_info())
        return out


# FP32 lanes per SM by compute capability major version (CUDA programming guide,
# "arithmetic instructions" throughput table): used only for the roof.
_FP32_LANES_PER_SM = {6: 64, 7: 64, 8: 64, 9: 128, 10: 128, 12: 128}


class CudaDevice(Device):
    kind = "cuda"

    def __init__(self):
        import cupy as cp  # the caller has checked CuPy imports and sees a device
        self.cp = cp
        self.xp = cp
        self.props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        name = self.props["name"]
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        self.slug = slug(re.sub(r"^nvidia\s+", "", self.name, flags=re.I))  # "NVIDIA H200" -> "h200"
        self._flush = cp.empty(FLUSH_BYTES // 4, dtype=cp.float32)
        self._start, self._end = cp.cuda.Event(), cp.cuda.Event()

    def asarray(self, host):
        return self.cp.asarray(np.ascontiguousarray(host))

    def to_host(self, a):
        return self.cp.asnumpy(a)

    def sync(self):
        self.cp.cuda.get_current_stream().synchronize()

    def _call_seconds(self, fn) -> float:
        # fastmlp (CuPy's current stream), CuPy and PyTorch all run on the legacy
        # default stream here, so CuPy's events time all of them.
        self._flush.fill(1.0)
        self._start.record()
        fn()
        self._end.record()
        self._end.synchronize()
        return self.cp.cuda.get_elapsed_time(self._start, self._end) * 1e-3

    def peak_flops(self) -> tuple[float | None, str]:
        p = self.props
        lanes = _FP32_LANES_PER_SM.get(int(p["major"]))
        clock_khz = p.get("clockRate") or 0  # gone from cudaDeviceProp in CUDA 13: ask the attribute
        if not clock_khz:
            try:
                clock_khz = self.cp.cuda.runtime.deviceGetAttribute(13, self.cp.cuda.Device().id)  # ClockRate
            except Exception:
                clock_khz = 0
        if not lanes or not clock_khz:
            return None, f"unknown (compute capability {p['major']}.{p['minor']}, clock {clock_khz} kHz)"
        sms = int(p["multiProcessorCount"])
        peak = sms * lanes * 2 * clock_khz * 1e3
        return peak, (f"{sms} SMs x {lanes} fp32 lanes x 2 x {clock_khz / 1e6:.2f} GHz "
                      f"(boost clock from the device properties; non-tensor FP32)")

    def copy_bandwidth(self, nbytes: int, repeats: int) -> dict:
        cp = self.cp
        src = cp.ones(nbytes // 4, cp.float32)
        dst = cp.zeros_like(src)
        t = self.time({"cupy copy": lambda: cp.copyto(dst, src)}, repeats=repeats)
        if not bool(cp.array_equal(dst, src)):
            raise CheckFailed("copy bandwidth: the copy is wrong")
        return {"variant": "cupy copy", "timing": t["cupy copy"], "all": t, "bytes": 2 * src.nbytes}

    def info(self) -> dict:
        import fastmlp as fm
        cp = self.cp
        b = fm.backends()
        return {"gpu": self.name, "compute_capability": f"{self.props['major']}.{self.props['minor']}",
                "sms": int(self.props["multiProcessorCount"]),
                "l2_bytes": int(self.props.get("l2CacheSize", 0)),
                "cupy": cp.__version__, "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
                "cuda_driver": cp.cuda.runtime.driverGetVersion(),
                "CUPY_TF32": os.environ.get("CUPY_TF32"), "l2_flush_bytes": FLUSH_BYTES,
                "fastmlp_build": b["build_info"], "numpy": np.__version__}


def cuda_device_or_reason():
    """(CudaDevice, "") when fastmlp's CUDA kernels can run here, else (None, why not)."""
    try:
        import cupy as cp
    except Exception as e:  # ImportError, or a CuPy that cannot find its CUDA libraries
        return None, f"CuPy is not usable ({type(e).__name__}: {e})"
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            return None, "CuPy sees no CUDA device"
    except Exception as e:
        return None, f"CuPy sees no CUDA device ({type(e).__name__}: {e})"
    import fastmlp as fm
    b = fm.backends()
    if not b.get("cuda"):
        return None, f"fastmlp's CUDA backend is not usable: {b.get('cuda_reason')}"
    return CudaDevice(), ""


def make_row(section, op, shape, variant, impl, timing, *, flops=None, nbytes=None, **extra) -> dict:
    """One result row: the timing of one implementation on one problem, and its rates."""
    med = timing["median_s"]
    row = {"section": section, "op": op, "shape": shape, "variant": variant, "impl": impl,
           **timing, "flops": flops, "bytes": nbytes,
           "gflops": flops / med / 1e9 if flops and med > 0 else None,
           "gbps": nbytes / med / 1e9 if nbytes and med > 0 else None,
           "intensity": flops / nbytes if flops and nbytes else None}
    row.update(extra)
    return row


def add_peers(row: dict, peers: dict) -> dict:
    """Record each peer row's figures in row["vs"]; ratio = peer time / our time (> 1: we are faster)."""
    row["vs"] = {}
    for name, p in peers.items():
        row["vs"][name] = {"median_s": p["median_s"], "min_s": p["min_s"], "max_s": p["max_s"],
                           "gflops": p.get("gflops"), "gbps": p.get("gbps"),
                           "ratio": p["median_s"] / row["median_s"] if row["median_s"] > 0 else None}
    return row
