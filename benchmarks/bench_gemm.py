"""FP32 GEMM: fastmlp's CUDA kernel against cuBLAS (through CuPy) and PyTorch.

Validate, then benchmark (llm.c dev/cuda style):
  1. each shape is checked once against cupy.matmul (relative max-norm error),
     with the output poisoned with NaN first, so an unwritten element fails;
  2. each implementation is timed with CUDA events: warm-up, then the median
     (and min/max) of --repeats single calls. Before every timed call the L2
     cache (60 MB on an H200) is flushed by overwriting a 256 MiB buffer; the
     flush also keeps the GPU busy while Python issues the call, so the events
     time the kernel, not the host-side overhead.

TF32 is off everywhere (CUPY_TF32=0, torch allow_tf32 = False): all rows are
true FP32. The products are the square sizes 256..4096 and the GEMMs of the
784-128-10 MLP at several batch sizes (forward, dX = dY @ W^T, dW = X^T @ dY).

    python3 benchmarks/bench_gemm.py [--out results.json] [--repeats 30] [--quick]

Exit status: 0 ok, 1 a validation failed, 2 no usable GPU (no CuPy, no device,
or fastmlp built without CUDA) - nothing was measured.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

os.environ["CUPY_TF32"] = "0"  # before CuPy is imported: it reads this once

# A result whose relative max-norm error vs cuBLAS exceeds this fails. FP32 with
# k <= 8192 lands near 1e-6; TF32 would land near 3e-4, so TF32 cannot pass.
REL_TOL = 1e-4
FLUSH_BYTES = 256 << 20


def shapes(quick):
    """(name, m, n, k, trans_a, trans_b) for C(m,n) = op(A)(m,k) @ op(B)(k,n)."""
    out = []
    squares = [256, 1024, 4096] if quick else [256, 512, 1024, 2048, 4096]
    for s in squares:
        out.append((f"square {s}", s, s, s, False, False))
    for batch in ([128, 8192] if quick else [32, 128, 1024, 8192]):
        for d_in, d_out in [(784, 128), (128, 10)]:
            layer = f"{d_in}->{d_out} B={batch}"
            out.append((f"{layer} fwd X@W", batch, d_out, d_in, False, False))
            out.append((f"{layer} dX=dY@W^T", batch, d_in, d_out, False, True))
            out.append((f"{layer} dW=X^T@dY", d_in, d_out, batch, True, False))
    return out


def fail_no_gpu(msg):
    print(f"bench_gemm: {msg}; nothing measured.", file=sys.stderr)
    sys.exit(2)


def git_commit():
    if os.environ.get("FASTMLP_COMMIT"):
        return os.environ["FASTMLP_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except Exception:
        return "unknown"


def time_calls(fn, flush, events, elapsed_ms, sync, repeats, warmup=3):
    """Median/min/max milliseconds of single calls of fn, each after an L2 flush."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        flush()
        start, end = events()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(elapsed_ms(start, end))
    return statistics.median(times), min(times), max(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per row (>= 20 advised)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    args = ap.parse_args()

    try:
        import cupy as cp
    except Exception as e:  # ImportError, or a CuPy that cannot find its CUDA libraries
        fail_no_gpu(f"CuPy is not usable ({type(e).__name__}: {e}); install cupy-cuda13x on a GPU machine")
    try:
        ndev = cp.cuda.runtime.getDeviceCount()
    except Exception as e:
        fail_no_gpu(f"no CUDA device ({type(e).__name__}: {e})")
    if ndev < 1:
        fail_no_gpu("no CUDA device")
    import fastmlp as fm
    backends = fm.backends()
    if not backends.get("cuda"):
        fail_no_gpu(f"fastmlp has no usable CUDA backend: {backends}")

    torch = None
    if not args.no_torch:
        try:
            import torch as _torch
            if _torch.cuda.is_available():
                torch = _torch
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
                torch.set_float32_matmul_precision("highest")
        except Exception as e:
            print(f"bench_gemm: PyTorch rows skipped ({type(e).__name__}: {e})", file=sys.stderr)

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    device_name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    flush_buf = cp.empty(FLUSH_BYTES // 4, dtype=cp.float32)

    def flush():
        flush_buf.fill(1.0)  # on the current (default) stream, before the start event

    def cp_events():
        return cp.cuda.Event(), cp.cuda.Event()

    def cp_sync():
        cp.cuda.get_current_stream().synchronize()

    cupy_timer = (cp_events, cp.cuda.get_elapsed_time, cp_sync)

    rng = cp.random.default_rng(0)
    rows, failed = [], 0
    for name, m, n, k, ta, tb in shapes(args.quick):
        # Stored operands: A is (k, m) when transposed, B is (n, k) when transposed.
        a = rng.standard_normal((k, m) if ta else (m, k), dtype=cp.float32)
        b = rng.standard_normal((n, k) if tb else (k, n), dtype=cp.float32)
        op_a, op_b = (a.T if ta else a), (b.T if tb else b)
        c = cp.empty((m, n), dtype=cp.float32)
        c_ref = cp.empty((m, n), dtype=cp.float32)

        def run_fm():
            fm.ops.gemm(a, b, trans_a=ta, trans_b=tb, out=c)

        def run_cublas():
            cp.matmul(op_a, op_b, out=c_ref)

        # validate: poison, one call, compare with cuBLAS
        c.fill(cp.nan)
        run_fm()
        ref = cp.matmul(op_a, op_b)
        err = float(cp.max(cp.abs(c - ref)) / cp.max(cp.abs(ref)))  # NaN anywhere -> NaN
        ok = err <= REL_TOL  # False for NaN
        failed += not ok

        flops = 2.0 * m * n * k
        row = {"name": name, "m": m, "n": n, "k": k, "trans_a": ta, "trans_b": tb,
               "rel_err": err, "valid": ok}
        timings = [("fastmlp", run_fm, *cupy_timer), ("cublas", run_cublas, *cupy_timer)]
        if torch is not None:
            ta_t, tb_t = torch.from_dlpack(a), torch.from_dlpack(b)
            op_a_t, op_b_t = (ta_t.T if ta else ta_t), (tb_t.T if tb else tb_t)
            c_t = torch.empty((m, n), dtype=torch.float32, device=ta_t.device)
            timings.append(("torch", lambda: torch.matmul(op_a_t, op_b_t, out=c_t),
                            lambda: (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)),
                            lambda start, end: start.elapsed_time(end), torch.cuda.synchronize))
        for impl, fn, events, elapsed, sync in timings:
            med, lo, hi = time_calls(fn, flush, events, elapsed, sync, args.repeats)
            row[impl] = {"ms_median": med, "ms_min": lo, "ms_max": hi,
                         "gflops": flops / (med * 1e-3) / 1e9}
        row["fastmlp_vs_cublas"] = row["cublas"]["ms_median"] / row["fastmlp"]["ms_median"]
        rows.append(row)
        print(f"  {name:32s} err {err:.1e} {'ok' if ok else 'FAIL'}  "
              f"fastmlp {row['fastmlp']['gflops']:8.0f}  cuBLAS {row['cublas']['gflops']:8.0f} GFLOP/s",
              file=sys.stderr, flush=True)

    # Markdown table
    head = "| shape | m x n x k | op | fastmlp ms (min-max) | GFLOP/s | cuBLAS ms | GFLOP/s |"
    sep = "|---|---|---|---|---|---|---|"
    if torch is not None:
        head += " torch ms | GFLOP/s |"
        sep += "---|---|"
    head += " vs cuBLAS | rel err |"
    sep += "---|---|"
    print(f"\nFP32 GEMM on {device_name} (TF32 off; median of {args.repeats}, L2 flushed)\n")
    print(head)
    print(sep)
    for r in rows:
        op = ("A^T" if r["trans_a"] else "A") + "·" + ("B^T" if r["trans_b"] else "B")
        f, cb = r["fastmlp"], r["cublas"]
        line = (f"| {r['name']} | {r['m']}x{r['n']}x{r['k']} | {op} | "
                f"{f['ms_median']:.4f} ({f['ms_min']:.4f}-{f['ms_max']:.4f}) | {f['gflops']:.0f} | "
                f"{cb['ms_median']:.4f} | {cb['gflops']:.0f} |")
        if torch is not None:
            line += f" {r['torch']['ms_median']:.4f} | {r['torch']['gflops']:.0f} |"
        line += f" {r['fastmlp_vs_cublas']:.2f}x | {r['rel_err']:.1e}{'' if r['valid'] else ' FAIL'} |"
        print(line)

    if args.out:
        meta = {"device": device_name, "commit": git_commit(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "cupy": cp.__version__, "torch": getattr(torch, "__version__", None),
                "python": platform.python_version(), "repeats": args.repeats,
                "tf32": False, "l2_flush_bytes": FLUSH_BYTES, "rel_tol": REL_TOL,
                "fastmlp_backends": backends}
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1, default=str)
        print(f"\nwrote {args.out}")
    if failed:
        print(f"bench_gemm: {failed} shape(s) failed validation", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
