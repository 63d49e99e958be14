"""Autotune fastmlp's CUDA GEMM kernel family on this GPU and write its dispatch table.

    python benchmarks/tune_gemm.py --out DIR [--budget-s 300] [--repeats 15]

For every benchmark shape (the 784-128-10 MLP products: forward X@W+b (+ReLU),
dX = dY@W^T (with the ReLU mask where the model has one), dW = X^T@dY with the
bias gradient, at batch 32, 128, 1024, 8192; then 4096^3 in FP32 and TF32; then
8192^3 in FP32 while the budget lasts) and every candidate kernel (each family
configuration x each useful split-K factor, plus the foundation kernel):

1. check: the output (and the fused bias gradient) are poisoned with NaN, the
   kernel runs, and the result is compared with a float64 reference computed on
   the GPU (relative max-norm error <= 1e-4 for FP32; relative Frobenius error
   <= 1e-3 and max-norm <= 1e-2 for TF32, whose expected error is ~3e-4); a
   second run must be bit-identical (deterministic split-K). Failing kernels
   are recorded and never enter the table;
2. time: CUDA events around single calls, L2 flushed before each (harness.py),
   warm-up, median of --repeats, in blocks over 3 rounds; cuBLAS (cupy.matmul,
   TF32 compute type for the TF32 shapes) is timed the same way on the same
   data as the reference point.

Then it writes, into DIR:
  gemm_tuning.json  the packaged table (python/fastmlp/gemm_tuning.json) with
                    this GPU's block replaced: per shape class the fastest
                    verified kernel that beats the foundation, its ratio vs
                    cuBLAS, GPU name, date, commit. Copy it over the packaged
                    file and commit it to make it the default.
  tune_report.md    every measurement (kernel, error, time, ratio vs cuBLAS),
                    the winners, and what did not fit the budget.

Exit status: 0 ok (some kernels may have failed their check: see the report);
1 an unexpected error; 2 no usable GPU here (nothing measured).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback

os.environ.setdefault("CUPY_TF32", "0")  # before CuPy is imported: cuBLAS in exact FP32 by default

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness as H  # noqa: E402

FP32_TOL = 1e-4          # relative max-norm; FP32 lands near 1e-6 at k <= 8192 (run.py's GEMM_TOL)
TF32_FRO_TOL = 1e-3      # relative Frobenius; TF32 (10-bit mantissa, rounded) lands near 3e-4
TF32_MAX_TOL = 1e-2      # relative max-norm for TF32
MAX_SPLITS = 32


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def tune_shapes():
    """Benchmark shapes in priority order: dicts with the op, sizes, transposes, epilogue."""
    out = []
    for batch in (32, 128, 1024, 8192):
        for d_in, d_out in ((784, 128), (128, 10)):
            layer = f"{d_in}->{d_out}"
            hidden = d_out == 128   # the 784->128 layer has the ReLU; 128->10 reads its output
            out.append(dict(op="fwd X@W+b", layer=layer, batch=batch, precision="fp32", m=batch,
                            n=d_out, k=d_in, ta=False, tb=False, bias=True, relu=hidden,
                            mask=False, colsum=False))
            out.append(dict(op="dX=dY@W^T", layer=layer, batch=batch, precision="fp32", m=batch,
                            n=d_in, k=d_out, ta=False, tb=True, bias=False, relu=False,
                            mask=not hidden, colsum=False))
            out.append(dict(op="dW=X^T@dY", layer=layer, batch=batch, precision="fp32", m=d_in,
                            n=d_out, k=batch, ta=True, tb=False, bias=False, relu=False,
                            mask=False, colsum=True))
    for s, prec in ((4096, "fp32"), (4096, "tf32"), (8192, "fp32")):
        out.append(dict(op="A@B", layer=f"square {s}", batch=None, precision=prec, m=s, n=s, k=s,
                        ta=False, tb=False, bias=False, relu=False, mask=False, colsum=False))
    return out


def candidates(configs, shape, sms):
    """(config name, splits) pairs worth trying on this shape, plus the foundation."""
    out = [("foundation", 1)]
    for c in configs:
        if (c["kind"] == "tf32") != (shape["precision"] == "tf32"):
            continue
        out.append((c["name"], 1))
        tiles = -(-shape["m"] // c["bm"]) * -(-shape["n"] // c["bn"])
        if tiles >= sms:
            continue   # the grid already fills the GPU: split-K only adds a pass
        s = 2
        while s <= MAX_SPLITS and shape["k"] >= 2 * c["bk"] * s and tiles * s <= 4 * sms:
            out.append((c["name"], s))
            s *= 2
    return out


class Tuner:
    def __init__(self, dev, args):
        import cupy as cp

        import fastmlp as fm
        from fastmlp import _C, _gemm_tuning
        self.dev, self.cp, self.fm, self.C, self.T = dev, cp, fm, _C.cuda, _gemm_tuning
        self.args = args
        self.device_id = cp.cuda.Device().id
        self.sms = int(dev.props["multiProcessorCount"])
        self.configs = self.C.gemm_configs()
        self.rng = np.random.default_rng(0)
        self.rows, self.skipped, self.notes = [], [], []
        self.stream = cp.cuda.get_current_stream().ptr
        # The foundation must be what gemm_ex runs while we tune: no table.
        _gemm_tuning.set_table(self.device_id, [])

    def rand(self, *shape):
        return self.cp.asarray(self.rng.standard_normal(shape, dtype=np.float32))

    def _cublas_tf32(self, fn):
        """Run fn with CuPy's matmul in TF32 compute mode (restored after)."""
        from cupy._core import _routines_linalg as L
        old = L.get_compute_type(self.cp.float32)
        L.set_compute_type(self.cp.float32, L.COMPUTE_TYPE_TF32)
        try:
            return fn()
        finally:
            L.set_compute_type(self.cp.float32, old)

    def run_shape(self, sh):
        cp, C = self.cp, self.C
        m, n, k, ta, tb = sh["m"], sh["n"], sh["k"], sh["ta"], sh["tb"]
        a = self.rand(*((k, m) if ta else (m, k)))
        b = self.rand(*((n, k) if tb else (k, n)))
        bias = self.rand(n) if sh["bias"] else None
        mask = cp.maximum(self.rand(m, n), 0) if sh["mask"] else None
        c = cp.empty((m, n), cp.float32)
        colsum = cp.empty((n,), cp.float32) if sh["colsum"] else None
        op_a, op_b = (a.T if ta else a), (b.T if tb else b)
        ref = cp.matmul(op_a.astype(cp.float64), op_b.astype(cp.float64))
        if bias is not None:
            ref += bias.astype(cp.float64)
        if sh["relu"]:
            ref = cp.maximum(ref, 0.0)
        if mask is not None:
            ref = cp.where(mask > 0, ref, 0.0)
        ref_colsum = op_b.astype(cp.float64).sum(axis=0) if colsum is not None else None
        tf32 = sh["precision"] == "tf32"
        prec = 1 if tf32 else 0
        addr = lambda x: 0 if x is None else int(x.data.ptr)  # noqa: E731
        common = (m, n, k, 1.0, addr(a), a.shape[1], addr(b), b.shape[1], 0.0, addr(c), n,
                  addr(bias), bool(sh["relu"]), addr(mask), n, addr(colsum))

        def runner(config, splits):
            if config == "foundation":
                return lambda: C.gemm_ex(ta, tb, *common, prec, 0, 0, self.stream)
            need = C.gemm_config_workspace_floats(m, n, splits)
            ws = cp.empty((max(need, 1),), cp.float32)
            return lambda: C.gemm_config(config, splits, ta, tb, *common, addr(ws), need,
                                         self.stream)

        c_peer = cp.empty((m, n), cp.float32)
        peer = lambda: cp.matmul(op_a, op_b, out=c_peer)  # noqa: E731
        if tf32:
            peer_fn = lambda: self._cublas_tf32(peer)  # noqa: E731
        else:
            peer_fn = peer
        t_peer = self.dev.time({"cuBLAS": peer_fn}, repeats=self.args.repeats)["cuBLAS"]["median_s"]

        for config, splits in candidates(self.configs, sh, self.sms):
            row = dict(sh, config=config, splits=splits, trans_a=ta, trans_b=tb,
                       cublas_s=t_peer, passed=False, rel_err=None, median_s=None, note="")
            try:
                fn = runner(config, splits)
                c.fill(float("nan"))
                if colsum is not None:
                    colsum.fill(float("nan"))
                fn()
                first = c.copy()
                first_cs = None if colsum is None else colsum.copy()
                fn()
                same = bool(cp.array_equal(first, c)) and (
                    colsum is None or bool(cp.array_equal(first_cs, colsum)))
                diff = c.astype(cp.float64) - ref
                scale = float(cp.max(cp.abs(ref))) or 1e-30
                err = float(cp.max(cp.abs(diff))) / scale
                fro = float(cp.linalg.norm(diff) / max(float(cp.linalg.norm(ref)), 1e-30))
                err = err if math.isfinite(err) else float("inf")
                fro = fro if math.isfinite(fro) else float("inf")
                cs_err = 0.0
                if colsum is not None:
                    cs_scale = float(cp.max(cp.abs(ref_colsum))) or 1e-30
                    cs_err = float(cp.max(cp.abs(colsum.astype(cp.float64) - ref_colsum))) / cs_scale
                    cs_err = cs_err if math.isfinite(cs_err) else float("inf")
                if config == "foundation" or not tf32:
                    ok = err <= FP32_TOL
                else:
                    ok = fro <= TF32_FRO_TOL and err <= TF32_MAX_TOL
                ok = ok and cs_err <= FP32_TOL and same
                row.update(rel_err=err, fro_err=fro, colsum_err=cs_err, deterministic=same,
                           passed=ok)
                if not same:
                    row["note"] = "two runs differ"
                if ok:
                    t = self.dev.time({"k": fn}, repeats=self.args.repeats)["k"]
                    row["median_s"] = t["median_s"]
                    row["min_s"] = t["min_s"]
            except Exception as e:  # a launch or precondition error: recorded, not fatal
                row["note"] = f"{type(e).__name__}: {e}"
            self.rows.append(row)

    def run(self):
        t0 = time.perf_counter()
        budget = self.args.budget_s
        last = None
        for sh in tune_shapes():
            elapsed = time.perf_counter() - t0
            flops = 2.0 * sh["m"] * sh["n"] * sh["k"]
            # Predict from the previous shape's cost per FLOP (plus a fixed part).
            guess = 0.0 if last is None else last[0] * flops / max(last[1], 1.0) * 0.5
            if elapsed + guess > budget:
                self.skipped.append(f"{sh['layer']} {sh['op']} {sh['precision']}: "
                                    f"budget ({elapsed:.0f} s used, ~{guess:.0f} s more needed)")
                continue
            ts = time.perf_counter()
            self.run_shape(sh)
            dt = time.perf_counter() - ts
            last = (dt, flops) if flops > 1e10 else last
            best = [r for r in self.rows[-64:] if r["m"] == sh["m"] and r["n"] == sh["n"]
                    and r["k"] == sh["k"] and r["median_s"]]
            if best:
                w = min(best, key=lambda r: r["median_s"])
                log(f"  {sh['layer']:12s} {sh['op']:10s} {sh['precision']} {sh['m']}x{sh['n']}x{sh['k']}: "
                    f"best {w['config']}/{w['splits']} {w['median_s'] * 1e6:9.1f} us, cuBLAS "
                    f"{w['cublas_s'] * 1e6:9.1f} us ({dt:.1f} s)")
        return time.perf_counter() - t0


def report_md(block, rows, skipped, wall_s, meta):
    lines = [f"# GEMM tuning: {meta['gpu']} ({meta['date']}, commit {meta['commit']})", "",
             f"{len(rows)} kernel runs in {wall_s:.0f} s. Tolerances: FP32 relative max-norm "
             f"<= {FP32_TOL:g}; TF32 relative Frobenius <= {TF32_FRO_TOL:g} and max-norm <= "
             f"{TF32_MAX_TOL:g}; colsum <= {FP32_TOL:g}; two runs bit-identical. Ratio = cuBLAS "
             f"time / kernel time (> 1: faster than cuBLAS); cuBLAS runs the plain product "
             f"(no epilogue), in TF32 for the TF32 shapes.", "",
             "## Table entries (what the dispatcher will run)", "",
             "| class | config | splits | ratio vs cuBLAS | speed-up vs foundation | shapes |",
             "|---|---|---|---|---|---|"]
    for key, e in sorted(block["entries"].items()):
        lines.append(f"| {key} | {e['config']} | {e['splits']} | {e['ratio_vs_cublas']} | "
                     f"{e['speedup_vs_foundation']} | {e['shapes']} |")
    if block["kept_foundation"]:
        lines += ["", "Classes kept on the foundation kernel: " +
                  "; ".join(f"{k} ({v})" for k, v in sorted(block["kept_foundation"].items()))]
    if skipped:
        lines += ["", "## Not measured (budget)", ""] + [f"- {s}" for s in skipped]
    failed = [r for r in rows if not r["passed"]]
    lines += ["", f"## Failed checks: {len(failed)}", ""]
    for r in failed:
        lines.append(f"- {r['config']}/{r['splits']} on {r['m']}x{r['n']}x{r['k']} "
                     f"{r['precision']} ta={r['ta']} tb={r['tb']}: "
                     f"err {r.get('rel_err')} fro {r.get('fro_err')} colsum {r.get('colsum_err')} "
                     f"{r.get('note', '')}")
    lines += ["", "## All measurements", "",
              "| shape | op | prec | config | splits | passed | rel err | time us | cuBLAS us | ratio |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r.get("median_s")
        ratio = f"{r['cublas_s'] / t:.3f}" if t and r.get("cublas_s") else ""
        err = r.get("rel_err")
        lines.append(f"| {r['m']}x{r['n']}x{r['k']} | {r['op']} {r['layer']} | {r['precision']} | "
                     f"{r['config']} | {r['splits']} | {r['passed']} | "
                     f"{'' if err is None else f'{err:.2e}'} | {'' if not t else f'{t * 1e6:.1f}'} | "
                     f"{r['cublas_s'] * 1e6:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for gemm_tuning.json and tune_report.md")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="stop starting new shapes after this many seconds (default 300)")
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per kernel (median)")
    ap.add_argument("--table", default=None,
                    help="the table to extend (default: the packaged python/fastmlp/gemm_tuning.json)")
    args = ap.parse_args(argv)

    dev, why = H.cuda_device_or_reason()
    if dev is None:
        log(f"tune_gemm.py: needs a usable CUDA GPU: {why}. Nothing measured; no table written.")
        return 2
    from fastmlp import _gemm_tuning as T
    os.makedirs(args.out, exist_ok=True)
    tuner = Tuner(dev, args)
    log(f"tune_gemm.py on {dev.name} ({tuner.sms} SMs), budget {args.budget_s:.0f} s, "
        f"{len(tuner.configs)} configurations")
    wall = tuner.run()

    meta = {"gpu": dev.name, "date": H.now_utc(), "commit": H.git_commit(),
            "compute_capability": f"{dev.props['major']}.{dev.props['minor']}", "sms": tuner.sms,
            "cuda_runtime": dev.cp.cuda.runtime.runtimeGetVersion(), "cupy": dev.cp.__version__}
    block = T.build_gpu_block(
        [dict(r, trans_a=r["ta"], trans_b=r["tb"]) for r in tuner.rows],
        gpu=dev.name, date=meta["date"], commit=meta["commit"],
        extra={"compute_capability": meta["compute_capability"], "sms": meta["sms"],
               "cuda_runtime": meta["cuda_runtime"], "cupy": meta["cupy"],
               "tolerances": {"fp32_max_rel": FP32_TOL, "tf32_fro_rel": TF32_FRO_TOL,
                              "tf32_max_rel": TF32_MAX_TOL},
               "not_measured": tuner.skipped})
    base_path = args.table or T.TABLE_FILE
    try:
        base = T.load_table(base_path)
    except ValueError as e:
        log(f"tune_gemm.py: {e}; starting a new table")
        base = T.empty_table()
    kinds = {c["name"]: c["kind"] for c in tuner.configs}
    table = T.validate_table(T.merge(base, dev.name, block), config_names=set(kinds),
                             config_kinds=kinds)
    with open(os.path.join(args.out, "gemm_tuning.json"), "w") as fh:
        json.dump(table, fh, indent=1, sort_keys=True)
        fh.write("\n")
    with open(os.path.join(args.out, "tune_report.md"), "w") as fh:
        fh.write(report_md(block, tuner.rows, tuner.skipped, wall, meta))
    n_fail = sum(not r["passed"] for r in tuner.rows)
    log(f"tune_gemm.py: {len(block['entries'])} table entries, {n_fail} failed checks, "
        f"{len(tuner.skipped)} shapes over budget; wrote {args.out}/gemm_tuning.json and tune_report.md")
    print(f"| class | config | splits | ratio vs cuBLAS |\n|---|---|---|---|")
    for key, e in sorted(block["entries"].items()):
        print(f"| {key} | {e['config']} | {e['splits']} | {e['ratio_vs_cublas']} |")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except Exception:
        traceback.print_exc()
        sys.exit(1)
