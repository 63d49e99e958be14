"""fastmlp benchmarks: GEMM, memory-bound kernels and training, each against a peer.

    python benchmarks/run.py [--quick] [--device cpu|cuda|all] [--out DIR]

Writes DIR/results.json (every row, with the run's commit, date, device and
library versions), DIR/results.md (the tables) and DIR/plots.png (GEMM rate
vs size with the peers' curves, a roofline of every kernel, training step time
vs batch size). DIR defaults to benchmarks/results/<device>/ (e.g. h200,
cpu-amd-epyc-2c); with --device all and --out DIR, each device writes to
DIR/<device>/.

Sections (each device):
  ceilings  measured copy bandwidth (read + write counted), the FP32 FLOP/s
            roof derived from the hardware, the best measured matmul rate;
  gemm      square sizes and the 784-128-10 MLP products (forward, dX, dW)
            vs NumPy's BLAS and PyTorch (CPU) or cuBLAS via cupy.matmul and
            PyTorch (GPU), FP32 (TF32 off everywhere);
  memory    bias_add, bias_grad, relu, relu_backward, softmax-CE forward and
            backward, SGD and Adam steps, tiny to several times the cache,
            in GB/s vs the copy bandwidth and vs fastmlp.reference (NumPy/CuPy);
  training  784-128-10 + Adam, time per step and per Fashion-MNIST epoch at
            batch 32, 128, 1024 vs a PyTorch eager loop on the same device;
  epoch     one real Fashion-MNIST epoch at batch 32, 128, 1024, fit() on device
            arrays vs PyTorch eager and (GPU) PyTorch CUDA Graphs on the same
            arrays, with test accuracy; then 10 epochs at batch 32 as a whole job
            from host arrays through the test accuracy (time to accuracy; GPU, and
            the CPU without --quick). The training-engine issue's H200 targets are
            recorded in the rows (target, target_met), never asserted.

Method: every fastmlp output (and every GEMM peer's) is checked against a
reference once before it is timed (outputs poisoned with NaN first); a
failed check is reported as FAIL and the script exits 1; a training run
(fastmlp's or a peer's) whose test accuracy is below its floor fails alike.
Timing: warm-up, then the median of many single calls (min and max kept) in
blocks per implementation, repeated over a few rounds; GPU: CUDA events, L2
flushed before each call; CPU: time.perf_counter. Whole epochs and jobs:
time.perf_counter to a device sync, one run of each implementation in turn
per round. Ratios compare implementations measured in the same run.

Exit status: 0 ok; 1 a check failed or a section crashed; 2 a requested
device cannot run (e.g. --device cuda without a usable GPU): nothing measured.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import os
import platform
import sys
import time
import traceback

os.environ.setdefault("CUPY_TF32", "0")  # before CuPy is imported: it reads this once
# Before NumPy loads OpenBLAS: its idle workers otherwise spin-yield for ~0.1 s after
# every call, and on a 2-core machine that stalls the next library's OpenMP threads
# until the 4 ms scheduler tick (measured: fastmlp, NumPy and PyTorch all 2-5x slower
# in one process). 2^4 cycles: they sleep at once; NumPy's own times do not change.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
# Peers at their best: some machines set OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (older
# OpenBLAS builds crash without them on their CPUs), which pin NumPy's OpenBLAS to an
# old kernel. This process is a benchmark, never a test: unset both before NumPy loads
# and record what was unset (results.json "env"; threadpoolctl names the kernel).
UNSET_FOR_PEERS = {k: os.environ.pop(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
                   if k in os.environ}
# OMP_WAIT_POLICY is left alone: fastmlp no longer uses OpenMP (its own pool's idle
# workers sleep after ~50 us), and PASSIVE made PyTorch's own loop 3x slower (2.7
# instead of 0.86 s per Fashion-MNIST epoch here), which would flatter fastmlp.

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import report  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FASHION_MNIST_TRAIN = 60000
SECTIONS = ["ceilings", "gemm", "memory", "denormal", "training", "epoch"]
GEMM_TOL = 1e-4  # FP32 lands near 1e-6 for k <= 8192; TF32 (~3e-4) cannot pass


class Skip(Exception):
    """A section that cannot run here; the reason is printed and recorded."""


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def load_torch(dev):
    """PyTorch on dev's device with TF32 off, or (None, why not)."""
    try:
        import torch
    except Exception as e:
        return None, f"PyTorch not installed ({type(e).__name__})"
    if dev.kind == "cuda":
        if not torch.cuda.is_available():
            return None, "PyTorch sees no CUDA device"
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return torch, ""


# -- the epoch section (the training-engine issue) -------------------------------------------------
EPOCH_BATCHES = (32, 128, 1024)
# Test-accuracy floors: below one, a run did not train and its time means nothing. One epoch
# lands at 0.82-0.86 at B=32/128 and 0.78-0.80 at B=1024 (59 steps; CPU, fastmlp and PyTorch);
# 10 epochs at B=32 near 0.88.
EPOCH_FLOOR = {32: 0.80, 128: 0.80, 1024: 0.70}
TTA_EPOCHS, TTA_BATCH, TTA_FLOOR = 10, 32, 0.85
# The issue's H200 targets, recorded in the rows next to the numbers and never asserted.
EPOCH_TARGET = {32: {"PyTorch eager": 10.0, "PyTorch CUDA Graphs": 1.5}}
TTA_TARGET = {"accuracy": 0.875, "seconds": 0.5, "stretch_seconds": 0.1}


def graphs_variant(n, batch):
    rest = n % batch
    return ("CUDA Graphs: whole step (forward, CE loss, backward, Adam capturable, loss/correct sums) "
            "captured once, inputs gathered into static tensors per step; partial last batch "
            + (f"of {rest}: its own graph" if rest else "none"))


class TorchMLP:
    """The epoch section's PyTorch peer: 784-128-10 (ReLU), CrossEntropyLoss, Adam 1e-3, on
    data already on `tdev`, trained the idiomatic eager way or, given capture_with=(X, Y) on
    a GPU, as CUDA Graphs of the whole step (PyTorch's "whole network capture" recipe:
    warm-up on a side stream, then one graph per batch size in the epoch, each in its own
    memory pool, so the partial last batch is replayed from its own graph too).

    The loss sum and correct count accumulate on the device and are read once per epoch,
    as fit's epoch metrics are. Graphs hold the addresses they captured, so reset() writes
    fresh weights and a zeroed Adam state into the same tensors."""

    def __init__(self, torch, tdev, batch, seed, capture_with=None):
        if capture_with is not None and tdev != "cuda":
            raise ValueError(f"CUDA Graphs need the data on a CUDA device, not {tdev!r}")
        self.torch, self.tdev, self.batch = torch, tdev, batch
        self.model = self._init(seed).to(tdev)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3, capturable=capture_with is not None)
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.loss_sum = torch.zeros((), device=tdev)
        self.correct = torch.zeros((), dtype=torch.int64, device=tdev)
        self.graphs = {}  # rows in the batch -> (graph, static x, static y)
        if capture_with is not None:
            self._capture(*capture_with)
            self.reset(seed)  # the warm-up steps trained the weights

    def _init(self, seed):
        # Built on the CPU, as the eager loop always has: one seed gives every peer the same weights.
        nn = self.torch.nn
        self.torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))

    def reset(self, seed):
        fresh = self._init(seed)
        with self.torch.no_grad():
            for p, q in zip(self.model.parameters(), fresh.parameters()):
                p.copy_(q)
        for state in self.opt.state.values():  # step, exp_avg, exp_avg_sq: zero is Adam's start
            for v in state.values():
                if self.torch.is_tensor(v):
                    v.zero_()

    def step(self, xb, yb):
        out = self.model(xb)
        loss = self.loss_fn(out, yb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.loss_sum += loss.detach() * len(yb)
        self.correct += (out.argmax(1) == yb).sum()

    def _capture(self, X, Y):
        torch = self.torch
        sizes = [self.batch] + ([len(X) % self.batch] if len(X) % self.batch else [])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # lazy init (cuBLAS, autograd, Adam's state) outside the capture
            for size in sizes:
                for _ in range(3):
                    self.step(X[:size], Y[:size])
        torch.cuda.current_stream().wait_stream(side)
        for size in sizes:
            xs, ys = X[:size].clone(), Y[:size].clone()
            graph = torch.cuda.CUDAGraph()
            # No .grad: backward inside the capture allocates it from this graph's pool.
            self.opt.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph):
                self.step(xs, ys)
            self.graphs[size] = (graph, xs, ys)

    def epoch(self, X, Y):
        """One shuffled epoch; returns (mean loss, training accuracy), read back from the device."""
        torch, n = self.torch, len(X)
        self.loss_sum.zero_()
        self.correct.zero_()
        perm = torch.randperm(n, device=self.tdev)
        for i in range(0, n, self.batch):
            idx = perm[i:i + self.batch]
            if self.graphs:
                graph, xs, ys = self.graphs[len(idx)]
                # Gathered straight into the static inputs: one kernel each, no temporary.
                torch.index_select(X, 0, idx, out=xs)
                torch.index_select(Y, 0, idx, out=ys)
                graph.replay()
            else:
                self.step(X[idx], Y[idx])
        return float(self.loss_sum) / n, int(self.correct) / n

    def accuracy(self, XT, YT):
        with self.torch.no_grad():
            return float((self.model(XT).argmax(1) == YT).float().mean())


class Bench:
    def __init__(self, dev, quick):
        self.dev, self.quick = dev, quick
        self.rng = np.random.default_rng(0)
        self.rows, self.failures, self.skipped = [], [], {}
        self.torch, self.torch_reason = load_torch(dev)
        self.repeats = (9 if quick else 30) if dev.kind == "cpu" else (15 if quick else 50)
        self.min_time = (0.3 if quick else 1.0) if dev.kind == "cpu" else 0.0
        self.ceilings = {}

    def rand(self, *shape):
        return self.dev.asarray(self.rng.standard_normal(shape, dtype=np.float32))

    def time(self, fns, **kw):
        kw.setdefault("repeats", self.repeats)
        kw.setdefault("min_time", self.min_time)
        return self.dev.time(fns, **kw)

    # -- ceilings ------------------------------------------------------------------
    def run_ceilings(self):
        nbytes = (128 if self.quick else 256) << 20
        if self.dev.kind == "cuda":
            nbytes = 1 << 30  # many times the L2
        cb = self.dev.copy_bandwidth(nbytes, repeats=self.repeats)
        t = cb["timing"]
        peak, how = self.dev.peak_flops()
        self.ceilings = {"copy_gbps": cb["bytes"] / t["median_s"] / 1e9, "copy_variant": cb["variant"],
                         "copy_bytes": cb["bytes"],
                         "copy_all": {k: cb["bytes"] / v["median_s"] / 1e9 for k, v in cb["all"].items()},
                         "peak_gflops": peak / 1e9 if peak else None, "peak_how": how}
        self.rows.append(H.make_row("ceilings", "copy", f"{cb['bytes'] // 2 >> 20} MiB", cb["variant"],
                                    "copy", t, nbytes=cb["bytes"]))
        log(f"copy bandwidth {self.ceilings['copy_gbps']:.1f} GB/s ({cb['variant']}); "
            f"FP32 roof {self.ceilings['peak_gflops'] or float('nan'):.0f} GFLOP/s = {how}")

    # -- GEMM ----------------------------------------------------------------------
    def gemm_shapes(self):
        """(problem, variant, m, n, k, trans_a, trans_b): C(m,n) = op(A)(m,k) @ op(B)(k,n)."""
        if self.dev.kind == "cpu":
            squares = [128, 256, 512, 1024, 2048] if self.quick else \
                [128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
        else:
            squares = [256, 1024, 4096, 8192] if self.quick else \
                [256, 512, 1024, 2048, 4096, 6144, 8192]
        out = [(f"square {s}", "A@B", s, s, s, False, False) for s in squares]
        for batch in (32, 128, 1024, 8192):
            for d_in, d_out in ((784, 128), (128, 10)):
                p = f"{d_in}->{d_out} B={batch}"
                out.append((p, "fwd X@W", batch, d_out, d_in, False, False))
                out.append((p, "dX=dY@W^T", batch, d_in, d_out, False, True))
                out.append((p, "dW=X^T@dY", d_in, d_out, batch, True, False))
        return out

    def gemm_peers(self, op_a, op_b, m, n):
        """{name: (callable, output)} of the peers computing op_a @ op_b."""
        xp, peers = self.dev.xp, {}
        c_peer = xp.empty((m, n), np.float32)
        name = "NumPy" if self.dev.kind == "cpu" else "cuBLAS"
        peers[name] = (lambda: xp.matmul(op_a, op_b, out=c_peer), c_peer)
        if self.torch is not None:  # DLPack shares the (possibly transposed) views, no copy
            torch = self.torch
            ta, tb = torch.from_dlpack(op_a), torch.from_dlpack(op_b)
            tc = torch.empty((m, n), dtype=torch.float32, device=ta.device)
            peers["PyTorch"] = (lambda: torch.matmul(ta, tb, out=tc), tc)
        return peers

    def run_gemm(self):
        import fastmlp as fm
        dev, xp = self.dev, self.dev.xp
        for problem, variant, m, n, k, ta, tb in self.gemm_shapes():
            a = self.rand(*((k, m) if ta else (m, k)))
            b = self.rand(*((n, k) if tb else (k, n)))
            op_a, op_b = (a.T if ta else a), (b.T if tb else b)
            c = xp.empty((m, n), np.float32)
            want = dev.to_host(op_a).astype(np.float64) @ dev.to_host(op_b).astype(np.float64) \
                if dev.kind == "cpu" else dev.to_host(xp.matmul(op_a.astype(xp.float64), op_b.astype(xp.float64)))
            ours = lambda: fm.ops.gemm(a, b, trans_a=ta, trans_b=tb, out=c)  # noqa: E731
            peers = self.gemm_peers(op_a, op_b, m, n)
            errs = {}
            for name, (fn, out) in {"fastmlp": (ours, c), **peers}.items():
                is_torch = hasattr(out, "fill_")
                (out.fill_ if is_torch else out.fill)(float("nan"))  # unwritten elements fail the check
                fn()
                errs[name] = H.rel_err(out.cpu().numpy() if is_torch else dev.to_host(out), want)
            t = self.time({"fastmlp": ours, **{k_: fn for k_, (fn, _) in peers.items()}})
            flops, nbytes = 2.0 * m * n * k, 4.0 * (m * k + k * n + m * n)
            shape = f"{m}x{n}x{k}"
            peer_rows = {}
            for name in peers:
                peer_rows[name] = H.make_row("gemm", "gemm", shape, variant, name, t[name], flops=flops,
                                             nbytes=nbytes, problem=problem, rel_err=errs[name],
                                             checked=errs[name] <= GEMM_TOL)
            row = H.make_row("gemm", "gemm", shape, variant, "fastmlp", t["fastmlp"], flops=flops,
                             nbytes=nbytes, problem=problem, rel_err=errs["fastmlp"],
                             checked=errs["fastmlp"] <= GEMM_TOL)
            self._finish(row, peer_rows, roof=self.ceilings.get("peak_gflops"))
            log(f"  gemm {problem:22s} {variant:10s} fastmlp {row['gflops']:8.1f} GFLOP/s  " +
                "  ".join(f"{k_} {v['gflops']:8.1f}" for k_, v in peer_rows.items()) +
                ("" if row["checked"] else f"  FAIL err {row['rel_err']:.1e}"))
        best = max((r for r in self.rows if r["section"] == "gemm"), key=lambda r: r["gflops"])
        self.ceilings.update(matmul_gflops=best["gflops"],
                             matmul_how=f"{best['impl']} {best['problem']} {best['variant']}")
        if dev.kind == "cuda":
            self.run_gemm_cuda_extras()

    # -- GPU-only GEMM rows (issue 6): TF32 vs cuBLAS TF32, fused Dense ops vs cuBLAS + CuPy --------
    def run_gemm_cuda_extras(self):
        """TF32 GEMM (fastmlp precision="tf32" vs cuBLAS with the TF32 compute type) and the
        fused Dense ops vs cuBLAS followed by CuPy's elementwise ops, same data, same process.

        fastmlp's tf32 runs a tensor-core kernel only where the GPU's tuning table lists a
        verified one (fastmlp/_gemm_tuning.py), else its FP32 path: the row's "kernel" field
        says which ran."""
        import fastmlp as fm
        from cupy._core import _routines_linalg as L
        from fastmlp import _C, _gemm_tuning
        dev, xp = self.dev, self.dev.xp
        device_id = xp.cuda.Device().id
        _gemm_tuning.ensure_loaded(device_id)

        def kernel_for(prec, ta, tb, m, n, k):
            hit = _C.cuda.gemm_dispatch(device_id, prec, ta, tb, m, n, k)
            return "foundation" if hit is None else f"{hit[0]}/{hit[1]}"

        def cublas_tf32(fn):
            old = L.get_compute_type(xp.float32)
            L.set_compute_type(xp.float32, L.COMPUTE_TYPE_TF32)
            try:
                return fn()
            finally:
                L.set_compute_type(xp.float32, old)

        def fro(got, want):
            got, want = xp.asarray(got, dtype=xp.float64), xp.asarray(want, dtype=xp.float64)
            e = float(xp.linalg.norm(got - want) / max(float(xp.linalg.norm(want)), 1e-30))
            return e if math.isfinite(e) else float("inf")

        for size in ([1024, 4096] if self.quick else [1024, 4096, 8192]):
            a, b = self.rand(size, size), self.rand(size, size)
            c, c_peer = xp.empty((size, size), np.float32), xp.empty((size, size), np.float32)
            want = xp.matmul(a.astype(xp.float64), b.astype(xp.float64))
            ours = lambda: fm.ops.gemm(a, b, out=c, precision="tf32")  # noqa: E731
            peer = lambda: cublas_tf32(lambda: xp.matmul(a, b, out=c_peer))  # noqa: E731
            c.fill(float("nan"))
            c_peer.fill(float("nan"))
            ours()
            peer()
            errs = {"fastmlp": fro(c, want), "cuBLAS TF32": fro(c_peer, want)}
            t = self.time({"fastmlp": ours, "cuBLAS TF32": peer})
            flops, nbytes = 2.0 * size ** 3, 12.0 * size * size
            tol = 1e-3  # relative Frobenius: TF32 lands near 3e-4 (FP32 far below)
            peer_row = H.make_row("gemm", "gemm", f"{size}x{size}x{size}", "TF32 A@B", "cuBLAS TF32",
                                  t["cuBLAS TF32"], flops=flops, nbytes=nbytes, problem=f"square {size}",
                                  rel_err=errs["cuBLAS TF32"], checked=errs["cuBLAS TF32"] <= tol)
            row = H.make_row("gemm", "gemm", f"{size}x{size}x{size}", "TF32 A@B", "fastmlp", t["fastmlp"],
                             flops=flops, nbytes=nbytes, problem=f"square {size}", rel_err=errs["fastmlp"],
                             checked=errs["fastmlp"] <= tol,
                             kernel=kernel_for(1, False, False, size, size, size))
            self._finish(row, {"cuBLAS TF32": peer_row})
            log(f"  gemm TF32 {size}: fastmlp {row['gflops']:8.1f} GFLOP/s ({row['kernel']}, err "
                f"{errs['fastmlp']:.1e})  cuBLAS TF32 {peer_row['gflops']:8.1f} (err {errs['cuBLAS TF32']:.1e})")

        # Fused Dense ops (FP32) at the MLP shapes: one fastmlp call vs cuBLAS + CuPy elementwise.
        for batch in ((1024, 8192) if self.quick else (32, 128, 1024, 8192)):
            x, w, bias = self.rand(batch, 784), self.rand(784, 128), self.rand(128)
            y, y_peer = xp.empty((batch, 128), np.float32), xp.empty((batch, 128), np.float32)
            dy = self.rand(batch, 128)
            dw, db = xp.empty((784, 128), np.float32), xp.empty((128,), np.float32)
            dw_peer, db_peer = xp.empty((784, 128), np.float32), xp.empty((128,), np.float32)
            x64, w64, dy64 = x.astype(xp.float64), w.astype(xp.float64), dy.astype(xp.float64)
            cases = [
                ("fused X@W+b relu", (batch, 128, 784, False, False),
                 lambda: fm.ops.dense_forward(x, w, bias, activation="relu", out=y),
                 lambda: xp.maximum(xp.add(xp.matmul(x, w, out=y_peer), bias, out=y_peer), 0, out=y_peer),
                 [(y, xp.maximum(x64 @ w64 + bias.astype(xp.float64), 0.0))], [(y_peer, None)]),
                ("fused dW=X^T@dY + db", (784, 128, batch, True, False),
                 lambda: fm.ops.dense_backward_weight(x, dy, out=dw, bias_out=db),
                 lambda: (xp.matmul(x.T, dy, out=dw_peer), xp.sum(dy, axis=0, out=db_peer)),
                 [(dw, x64.T @ dy64), (db, dy64.sum(axis=0))], [(dw_peer, None), (db_peer, None)]),
            ]
            for variant, (m, n, k, ta, tb), ours, peer, checks, peer_outs in cases:
                errs = {}
                for name, fn, outs in (("fastmlp", ours, checks),
                                       ("cuBLAS+CuPy", peer, [(o, w_) for (o, _), (_, w_) in zip(peer_outs, checks)])):
                    for o, _ in outs:
                        o.fill(float("nan"))
                    fn()
                    errs[name] = max(H.rel_err(dev.to_host(o), dev.to_host(w_)) for o, w_ in outs)
                t = self.time({"fastmlp": ours, "cuBLAS+CuPy": peer})
                flops, nbytes = 2.0 * m * n * k, 4.0 * (m * k + k * n + m * n)
                shape, problem = f"{m}x{n}x{k}", f"784->128 B={batch}"
                peer_row = H.make_row("gemm", "gemm", shape, variant, "cuBLAS+CuPy", t["cuBLAS+CuPy"],
                                      flops=flops, nbytes=nbytes, problem=problem,
                                      rel_err=errs["cuBLAS+CuPy"], checked=errs["cuBLAS+CuPy"] <= GEMM_TOL)
                row = H.make_row("gemm", "gemm", shape, variant, "fastmlp", t["fastmlp"], flops=flops,
                                 nbytes=nbytes, problem=problem, rel_err=errs["fastmlp"],
                                 checked=errs["fastmlp"] <= GEMM_TOL, kernel=kernel_for(0, ta, tb, m, n, k))
                self._finish(row, {"cuBLAS+CuPy": peer_row})
                log(f"  {variant:22s} {problem:18s} fastmlp {row['median_s'] * 1e6:8.1f} us ({row['kernel']})"
                    f"  cuBLAS+CuPy {peer_row['median_s'] * 1e6:8.1f} us")

    def _finish(self, row, peer_rows, roof=None, roof_key="gflops"):
        H.add_peers(row, peer_rows)
        if roof and row.get(roof_key):
            row["pct_of_roof"] = 100.0 * row[roof_key] / roof
        for name, p in peer_rows.items():
            if not p.get("checked", True):
                self.failures.append(f"{p['op']} {p['shape']} {p['variant']} {name}: "
                                     f"{p.get('error') or 'rel err %.2e' % p['rel_err']}")
        if not row["checked"]:
            self.failures.append(f"{row['op']} {row['shape']} {row['variant']} fastmlp: "
                                 f"{row.get('error') or 'rel err %.2e' % row['rel_err']}")
        self.rows.append(row)
        self.rows.extend(peer_rows.values())

    # -- memory-bound kernels -------------------------------------------------------
    def memory_sizes(self):
        """Element counts: tiny, in cache, and several times the last-level cache."""
        if self.dev.kind == "cpu":  # 1 MiB L2 per core, 32 MiB L3 here; 4 bytes each
            return [1 << 12, 1 << 18, 1 << 22] if self.quick else \
                [1 << 12, 1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24]
        return [1 << 16, 1 << 20, 1 << 24, 1 << 26] if self.quick else \
            [1 << 12, 1 << 16, 1 << 20, 1 << 22, 1 << 24, 1 << 26, 1 << 27]

    def memory_cases(self, size):
        """(op, shape, bytes moved, nominal flops, tol, fastmlp fn, reference fn, check fn)."""
        import fastmlp as fm
        R, xp = fm.reference, self.dev.xp
        f = 128  # the MLP's hidden width
        n = max(1, size // f)
        x, dy, bias = self.rand(n, f), self.rand(n, f), self.rand(f)
        N = n * f

        def nans(*shape):  # outputs start as NaN: an element a kernel does not write fails the check
            return xp.full(shape, np.nan, dtype=np.float32)

        def pair(got, want):
            return lambda tol, what: H.check(what, self.dev.to_host(got), self.dev.to_host(want), tol)

        z, z_ref = nans(n, f), nans(n, f)
        yield ("bias_add", (n, f), 8 * N + 4 * f, N, 1e-6,
               lambda: fm.ops.bias_add(x, bias, out=z), lambda: R.bias_add(x, bias, out=z_ref), pair(z, z_ref))
        db, db_ref = nans(f), nans(f)
        yield ("bias_grad", (n, f), 4 * N + 4 * f, N, 1e-4,
               lambda: fm.ops.bias_grad(dy, out=db), lambda: R.bias_grad(dy, out=db_ref), pair(db, db_ref))
        y, y_ref = nans(n, f), nans(n, f)
        yield ("relu", (n, f), 8 * N, N, 0.0,
               lambda: fm.ops.relu(x, out=y), lambda: R.relu(x, out=y_ref), pair(y, y_ref))
        dx, dx_ref = nans(n, f), nans(n, f)
        yield ("relu_backward", (n, f), 12 * N, N, 0.0,
               lambda: fm.ops.relu_backward(dy, x, out=dx), lambda: R.relu_backward(dy, x, out=dx_ref),
               pair(dx, dx_ref))

        classes = 10  # the MLP's output width
        rows = max(1, size // classes)
        logits = self.rand(rows, classes)
        labels = self.dev.asarray(self.rng.integers(0, classes, rows).astype(np.int64))
        probs = fm.ops.softmax_cross_entropy(logits, labels)[1]
        g, g_ref = nans(rows, classes), nans(rows, classes)
        M = rows * classes
        res = {}

        sce_out = nans(rows, classes)

        def sce_fwd():  # check_labels=False: no device->host read of the bad-label flag (as fit)
            res["fm"] = fm.ops.softmax_cross_entropy_forward(logits, labels, check_labels=False, out=sce_out)

        def sce_ref():
            res["ref"] = R.softmax_cross_entropy(logits, labels)

        def sce_check(tol, what):
            H.check(what + " probs", self.dev.to_host(res["fm"][1]), self.dev.to_host(res["ref"][1]), tol)
            return H.check(what + " loss", self.dev.to_host(res["fm"][0]), self.dev.to_host(res["ref"][0]), tol)

        yield ("softmax_cross_entropy", (rows, classes), 8 * M + 12 * rows, 5 * M, 1e-5,
               sce_fwd, sce_ref, sce_check)
        yield ("softmax_cross_entropy_backward", (rows, classes), 8 * M + 8 * rows, 2 * M, 1e-5,
               lambda: fm.ops.softmax_cross_entropy_backward(probs, labels, out=g, check_labels=False),
               lambda: R.softmax_cross_entropy_backward(probs, labels, out=g_ref), pair(g, g_ref))

        # Optimizer steps update in place: the check runs on copies, the timing on the
        # originals (fastmlp) and on a second set (the reference).
        state = [self.rand(size) for _ in range(3)] + [xp.abs(self.rand(size))]  # p, buf, m, v >= 0
        ref_state = [a.copy() for a in state]
        grad = self.rand(size)

        def sgd(mod, p, buf, m, v):
            mod.sgd_step(p, grad, buf, lr=1e-3, momentum=0.9)

        def adam(mod, p, buf, m, v):
            mod.adam_step(p, grad, m, v, step=10, lr=1e-3)

        def opt_check(call):
            def check(tol, what):
                mine, ref = [a.copy() for a in state], [a.copy() for a in state]
                call(fm.ops, *mine)
                call(R, *ref)
                return max(H.check(f"{what} {name}", self.dev.to_host(a), self.dev.to_host(b), tol)
                           for name, a, b in zip(("param", "buf", "m", "v"), mine, ref))
            return check

        for op, call, nbytes, flops in (("sgd_step", sgd, 20, 4), ("adam_step", adam, 28, 12)):
            yield (op, (size,), nbytes * size, flops * size, 1e-5,
                   lambda call=call: call(fm.ops, *state), lambda call=call: call(R, *ref_state),
                   opt_check(call))

    def run_memory(self):
        copy = self.ceilings["copy_gbps"]
        peer = "NumPy ref" if self.dev.kind == "cpu" else "CuPy ref"
        for size in self.memory_sizes():
            for op, shape, nbytes, flops, tol, ours, ref, check in self.memory_cases(size):
                variant = "momentum 0.9" if op == "sgd_step" else \
                    "no host label check" if op.startswith("softmax") else ""
                shape_s = "x".join(map(str, shape))
                err, error = None, None
                try:
                    ours()
                    ref()
                    self.dev.sync()
                    err = check(tol, f"{op} {shape_s}")
                except H.CheckFailed as e:
                    error = str(e)
                t = self.time({"fastmlp": ours, peer: ref})
                row = H.make_row("memory", op, shape_s, variant, "fastmlp", t["fastmlp"], flops=flops,
                                 nbytes=nbytes, rel_err=err, checked=error is None, error=error)
                peer_row = H.make_row("memory", op, shape_s, variant, peer, t[peer], flops=flops,
                                      nbytes=nbytes)
                self._finish(row, {peer: peer_row}, roof=copy, roof_key="gbps")
                log(f"  {op:32s} {shape_s:>12s} fastmlp {row['gbps']:7.1f} GB/s "
                    f"({row['pct_of_roof']:5.1f}% of copy)  {peer} {peer_row['gbps']:7.1f}"
                    + ("" if error is None else f"  FAIL {error}"))

    # -- denormal data (CPU) ------------------------------------------------------------
    def run_denormal(self):
        """GEMM and adam_step on denormal vs normal data, with fastmlp's flush-to-zero mode
        on (the default) and off (IEEE), and NumPy's GEMM (IEEE) for comparison. A row's
        ratio is the normal-data time / the denormal-data time (1.0: denormals cost
        nothing; the target with flush on is >= 0.83, i.e. at most 1.2x slower)."""
        if self.dev.kind != "cpu":
            raise Skip("flush-to-zero is a CPU mode; the GPU kernels keep denormals")
        import fastmlp as fm
        tiny = np.float32(1e-39)  # every |x| <= ~5 * 1e-39 is denormal (FLT_MIN = 1.18e-38)
        s = 512 if self.quick else 1024
        a_norm, b = self.rand(s, s), self.rand(s, s)
        a_den = (np.clip(a_norm, -5, 5) * tiny).astype(np.float32)
        assert np.all(np.abs(a_den) < np.finfo(np.float32).tiny)
        c = np.empty((s, s), np.float32)
        n = 1 << 18  # adam_step: 1 MiB per array, in cache
        p = self.rand(n)
        m_norm, v_norm = self.rand(n) * np.float32(1e-3), np.abs(self.rand(n)) * np.float32(1e-6)
        m_den = (np.clip(self.rand(n), -5, 5) * tiny).astype(np.float32)
        v_den = np.abs(m_den)
        m, v = np.empty(n, np.float32), np.empty(n, np.float32)

        def adam(m0, v0, grad):
            def step():  # restore the moments first: a step changes them (both variants alike)
                np.copyto(m, m0)
                np.copyto(v, v0)
                fm.ops.adam_step(p, grad, m, v, step=900, lr=1e-3)
            return step

        zero_g = np.zeros(n, np.float32)  # the always-zero pixels' weights: zero gradient
        cases = [("gemm", f"{s}x{s}x{s}", 2.0 * s ** 3, 12.0 * s * s, "A",
                  lambda: fm.ops.gemm(a_norm, b, out=c), lambda: fm.ops.gemm(a_den, b, out=c),
                  lambda: np.matmul(a_norm, b, out=c), lambda: np.matmul(a_den, b, out=c)),
                 ("adam_step", f"{n}", 12.0 * n, 44.0 * n, "m, v (zero gradient), incl. restoring them",
                  adam(m_norm, v_norm, zero_g), adam(m_den, v_den, zero_g), None, None)]
        before = fm.get_flush_denormal()
        try:
            for op, shape, flops, nbytes, what, ours_norm, ours_den, np_norm, np_den in cases:
                for mode in (True, False):
                    fm.set_flush_denormal(mode)
                    fns = {"denormal": ours_den, "normal": ours_norm}
                    if np_norm is not None and mode:
                        fns.update({"NumPy denormal": np_den, "NumPy normal": np_norm})
                    t = self.time(fns)
                    variant = f"denormal {what}; flush {'on (default)' if mode else 'off (IEEE)'}"
                    row = H.make_row("denormal", op, shape, variant, "fastmlp", t["denormal"],
                                     flops=flops, nbytes=nbytes, checked=True)
                    peer = {"fastmlp, normal data": H.make_row("denormal", op, shape, variant, "fastmlp, normal data",
                                                               t["normal"], flops=flops, nbytes=nbytes)}
                    self._finish(row, peer)
                    msg = f"  {op:10s} {variant:60s} normal/denormal time {row['vs']['fastmlp, normal data']['ratio']:.2f}"
                    if "NumPy denormal" in t:
                        nrow = H.make_row("denormal", op, shape, f"denormal {what}; IEEE", "NumPy",
                                          t["NumPy denormal"], flops=flops, nbytes=nbytes, checked=True)
                        self._finish(nrow, {"NumPy, normal data": H.make_row(
                            "denormal", op, shape, f"denormal {what}; IEEE", "NumPy, normal data",
                            t["NumPy normal"], flops=flops, nbytes=nbytes)})
                        msg += f"   NumPy {nrow['vs']['NumPy, normal data']['ratio']:.2f}"
                    log(msg)
        finally:
            fm.set_flush_denormal(before)

    # -- training ---------------------------------------------------------------------
    def run_training(self):
        import fastmlp as fm
        if not hasattr(fm, "Sequential"):
            raise Skip("fastmlp.Sequential not available (the model API is not installed yet)")
        dev = self.dev
        device = dev.kind
        n_max = 1024 * (16 if self.quick else 48)
        x_host = self.rng.random((n_max, 784), dtype=np.float32)  # Fashion-MNIST-shaped
        y_host = self.rng.integers(0, 10, n_max).astype(np.int64)
        x, y = dev.asarray(x_host), dev.asarray(y_host)
        where = "data on the device"
        for batch in (32, 128, 1024):
            steps = {32: 60, 128: 40, 1024: 12}[batch] * (1 if self.quick else 4)
            n = steps * batch
            fits = 5 if self.quick else 9
            fm.set_seed(0)
            model = fm.Sequential([fm.Dense(128, activation="relu", input_dim=784), fm.Dense(10)])
            model.compile(optimizer=fm.optim.Adam(lr=1e-3), loss="sparse_categorical_crossentropy",
                          metrics=["accuracy"])
            xs, ys = x[:n], y[:n]

            def fit():
                return model.fit(xs, ys, epochs=1, batch_size=batch, shuffle=True, verbose=0, device=device)

            try:
                hist = fit()  # warm-up, and the check
            except (TypeError, ValueError) as e:
                if dev.kind != "cuda":
                    raise
                xs, ys, where = x_host[:n], y_host[:n], f"x on the host (fit refused CuPy arrays: {e})"
                hist = fit()
            hist = getattr(hist, "history", hist)
            loss = float(hist["loss"][-1])
            error = None if math.isfinite(loss) and loss < 10 else f"training loss {loss} after one epoch"
            samples = []
            for _ in range(fits):
                t0 = time.perf_counter()
                fit()
                dev.sync()
                samples.append((time.perf_counter() - t0) / steps)
            t = H.summarize(samples)
            epoch_steps = math.ceil(FASHION_MNIST_TRAIN / batch)
            row = H.make_row("training", "train_step", f"784-128-10 B={batch}", "Adam, fit()", "fastmlp", t,
                             flops=6.0 * batch * (784 * 128 + 128 * 10), batch=batch, steps_per_fit=steps,
                             epoch_s=t["median_s"] * epoch_steps, epoch_steps=epoch_steps, data=where,
                             loss=loss, checked=error is None, error=error, rel_err=None)
            peers = {}
            if self.torch is not None:
                pt = self.torch_training(batch, steps, fits, x_host[:n], y_host[:n])
                peers["PyTorch"] = H.make_row("training", "train_step", row["shape"], "Adam, eager loop",
                                              "PyTorch", pt["timing"], flops=row["flops"], batch=batch,
                                              epoch_s=pt["timing"]["median_s"] * epoch_steps,
                                              loss=pt["loss"], checked=math.isfinite(pt["loss"]))
            self._finish(row, peers)
            log(f"  train B={batch:5d} fastmlp {t['median_s'] * 1e3:8.3f} ms/step" +
                "".join(f"  {k} {v['median_s'] * 1e3:8.3f}" for k, v in peers.items()) +
                ("" if error is None else f"  FAIL {error}"))

    # -- Fashion-MNIST epochs and time to accuracy ------------------------------------------
    def run_epoch(self):
        """One Fashion-MNIST epoch (60,000 images, 784-128-10, Adam 1e-3, shuffled) at each
        batch of EPOCH_BATCHES: fit() on data already on the device against PyTorch eager and
        (CUDA) PyTorch CUDA Graphs on the same device arrays, timed end to end, alternating,
        each run from fresh weights; all report test accuracy. Then the time-to-accuracy
        job (CUDA; the CPU in full runs only: PyTorch eager takes ~8 s per job there)."""
        x, y, xt, yt = self.fashion_mnist()
        dev = self.dev
        on_device = tuple(dev.asarray(a) for a in (x, y, xt, yt))
        # The peers read the very arrays fastmlp reads (DLPack shares them, no copy).
        tensors = tuple(self.torch.from_dlpack(a) for a in on_device) if self.torch is not None else None
        reps = 3 if self.quick else 5
        for batch in EPOCH_BATCHES:
            runners = {"fastmlp": lambda seed, b=batch: self.fastmlp_fit(on_device, b, 1, seed, whole_job=False)}
            variants = {"fastmlp": "Fashion-MNIST, Adam 1e-3, fit() on device arrays"}
            capture_s = None
            if tensors is not None:
                runners["PyTorch eager"], _ = self.torch_epoch(tensors, batch)
                variants["PyTorch eager"] = "eager loop: randperm, index, forward, backward, Adam step"
                if dev.kind == "cuda":
                    try:
                        runners["PyTorch CUDA Graphs"], capture_s = self.torch_epoch(tensors, batch, graphs=True)
                        variants["PyTorch CUDA Graphs"] = graphs_variant(len(x), batch)
                    except Exception as e:  # the other rows still count; the run fails
                        traceback.print_exc()
                        self.failures.append(f"epoch B={batch} PyTorch CUDA Graphs: capture failed: "
                                             f"{type(e).__name__}: {e}")
            results = self.alternate(runners, reps, f"epoch B={batch}")
            row, peers = self.accuracy_rows(
                "fit_epoch", f"784-128-10 B={batch}", variants, results, EPOCH_FLOOR[batch],
                "after one epoch", flops=6.0 * len(x) * (784 * 128 + 128 * 10), batch=batch,
                steps=math.ceil(len(x) / batch))
            if "PyTorch CUDA Graphs" in peers:
                peers["PyTorch CUDA Graphs"]["capture_s"] = capture_s
            if dev.kind == "cuda" and batch in EPOCH_TARGET:
                want = EPOCH_TARGET[batch]
                row["target"] = "H200: " + ", ".join(f">= {r:g}x {p}" for p, r in want.items())
                row["target_met"] = all((row["vs"].get(p) or {}).get("ratio", 0) >= r for p, r in want.items())
            self.log_accuracy_row(f"epoch B={batch:4d}", row, peers)
        if dev.kind == "cuda" or not self.quick:
            self.run_time_to_accuracy((x, y, xt, yt))

    def run_time_to_accuracy(self, host):
        """TTA_EPOCHS epochs at TTA_BATCH as a whole job from host NumPy arrays: the clock
        runs from building the model (upload included) through the test-set accuracy."""
        runners = {"fastmlp": lambda seed: self.fastmlp_fit(host, TTA_BATCH, TTA_EPOCHS, seed, whole_job=True)}
        variants = {"fastmlp": "host arrays: Sequential, compile, fit, evaluate"}
        if self.torch is not None:
            runners["PyTorch eager"] = self.torch_job(host)
            variants["PyTorch eager"] = "host arrays: upload, build, eager loop, test accuracy"
            if self.dev.kind == "cuda":
                runners["PyTorch CUDA Graphs"] = self.torch_job(host, graphs=True)
                variants["PyTorch CUDA Graphs"] = ("host arrays: upload, build, warm-up + capture, "
                                                   + graphs_variant(len(host[0]), TTA_BATCH))
        # No warm-up call: the epoch rows before this one have warmed every library.
        results = self.alternate(runners, 2 if self.quick else 3, "time to accuracy", warmup=False)
        row, peers = self.accuracy_rows(
            "time_to_accuracy", f"784-128-10 B={TTA_BATCH}, {TTA_EPOCHS} epochs", variants, results,
            TTA_FLOOR, f"after {TTA_EPOCHS} epochs", batch=TTA_BATCH, epochs=TTA_EPOCHS)
        if self.dev.kind == "cuda":
            acc, med = row["test_accuracy"], row["median_s"]
            row["target"] = (f"H200: test accuracy >= {TTA_TARGET['accuracy']} in <= "
                             f"{TTA_TARGET['seconds']} s (stretch {TTA_TARGET['stretch_seconds']} s)")
            row["target_met"] = acc >= TTA_TARGET["accuracy"] and med <= TTA_TARGET["seconds"]
            row["target_stretch_met"] = acc >= TTA_TARGET["accuracy"] and med <= TTA_TARGET["stretch_seconds"]
        self.log_accuracy_row(f"{TTA_EPOCHS} epochs B={TTA_BATCH}", row, peers)

    def fashion_mnist(self):
        """Fashion-MNIST as fit takes it: float32 rows of 784 values in [0, 1], int64 labels."""
        import fastmlp as fm
        try:
            (x, y), (xt, yt) = fm.datasets.load_fashion_mnist()
        except (FileNotFoundError, OSError, ValueError) as e:
            raise Skip(f"Fashion-MNIST not found ({e})")
        x = (x.reshape(len(x), -1) / np.float32(255)).astype(np.float32)
        xt = (xt.reshape(len(xt), -1) / np.float32(255)).astype(np.float32)
        return x, y.astype(np.int64), xt, yt.astype(np.int64)

    def fastmlp_fit(self, data, batch, epochs, seed, whole_job):
        """(seconds, test accuracy, {engine, engine_reason} from fit's history.params) of a fresh model
        trained on data = (x, y, x_test, y_test). whole_job: the clock runs from building the
        model through evaluate (time to accuracy; host arrays make it include the upload);
        otherwise it covers fit alone."""
        import fastmlp as fm
        x, y, xt, yt = data
        fm.set_seed(seed)
        t0 = time.perf_counter()
        model = fm.Sequential([fm.Dense(128, activation="relu", input_dim=784), fm.Dense(10)])
        model.compile(optimizer=fm.optim.Adam(lr=1e-3), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        if not whole_job:
            t0 = time.perf_counter()
        hist = model.fit(x, y, epochs=epochs, batch_size=batch, verbose=0, device=self.dev.kind)
        self.dev.sync()
        fit_s = time.perf_counter() - t0
        acc = model.evaluate(xt, yt)["accuracy"]
        # Which engine ran, and why: the training engine's keys (fits before it set neither).
        params = getattr(hist, "params", None) or {}
        engine = {k: params.get(k) for k in ("engine", "engine_reason")}
        return (time.perf_counter() - t0 if whole_job else fit_s), acc, engine

    def _torch_sync(self):
        if self.dev.kind == "cuda":
            self.torch.cuda.synchronize()

    def torch_epoch(self, tensors, batch, graphs=False):
        """(run, capture seconds): run(seed) -> (seconds, test accuracy, None) trains one
        PyTorch epoch on tensors = (X, Y, X_test, Y_test), already on the device, from fresh
        weights. graphs: the CUDA Graphs peer, captured once here (capture seconds: None
        for eager), each run replaying the same graphs from reset weights."""
        torch = self.torch
        X, Y, XT, YT = tensors
        t0 = time.perf_counter()
        peer = TorchMLP(torch, X.device.type, batch, seed=0, capture_with=(X, Y) if graphs else None)
        self._torch_sync()
        capture_s = time.perf_counter() - t0 if graphs else None

        def run(seed):
            peer.reset(seed)
            self._torch_sync()
            t0 = time.perf_counter()
            peer.epoch(X, Y)
            self._torch_sync()
            dt = time.perf_counter() - t0
            return dt, peer.accuracy(XT, YT), None

        return run, capture_s

    def torch_job(self, host, graphs=False):
        """run(seed) -> (seconds, test accuracy, None): the time-to-accuracy job in PyTorch,
        from host NumPy arrays: upload, build (graphs: warm up and capture), TTA_EPOCHS
        epochs, test accuracy."""
        torch, tdev = self.torch, self.dev.kind

        def run(seed):
            self._torch_sync()
            t0 = time.perf_counter()
            X, Y, XT, YT = (torch.from_numpy(a).to(tdev) for a in host)
            peer = TorchMLP(torch, tdev, TTA_BATCH, seed, capture_with=(X, Y) if graphs else None)
            for _ in range(TTA_EPOCHS):
                peer.epoch(X, Y)
            acc = peer.accuracy(XT, YT)  # a read-back: the device has finished
            return time.perf_counter() - t0, acc, None

        return run

    def alternate(self, runners, reps, label, warmup=True):
        """{name: (seconds, accuracies, infos)} over reps rounds, seeds 0..reps-1, each round
        running every runner once in turn (slow drift of a shared machine hits all alike),
        after one warm-up call each (seed 100, not kept). A peer that raises is dropped,
        and the run fails; fastmlp raising fails the section."""
        out = {name: ([], [], []) for name in runners}
        runners = dict(runners)
        for seed, keep in ([(100, False)] if warmup else []) + [(rep, True) for rep in range(reps)]:
            for name, fn in list(runners.items()):
                try:
                    got = fn(seed)
                except Exception as e:
                    if name == "fastmlp":
                        raise
                    traceback.print_exc()
                    self.failures.append(f"{label} {name} crashed: {type(e).__name__}: {e}")
                    del runners[name], out[name]
                    continue
                if keep:
                    for kept, value in zip(out[name], got):
                        kept.append(value)
        return out

    def accuracy_rows(self, op, shape, variants, results, floor, when, flops=None, **extra):
        """(fastmlp's row, {peer: row}) from alternate's results, finished: a median test
        accuracy below floor marks that row FAIL (it did not train, so its time means nothing)."""
        rows = {}
        for name, (secs, accs, infos) in results.items():
            acc = statistics.median(accs)
            error = None if acc >= floor else f"test accuracy {acc:.4f} {when} (< {floor})"
            rows[name] = H.make_row("epoch", op, shape, variants[name], name, H.summarize(secs),
                                    flops=flops, test_accuracy=acc, test_accuracy_all=accs,
                                    accuracy_floor=floor, checked=error is None, error=error,
                                    rel_err=None, **extra)
        row = rows.pop("fastmlp")
        for key in ("engine", "engine_reason"):
            seen = list(dict.fromkeys(info.get(key) for info in results["fastmlp"][2]))
            row[f"history_params_{key}"] = seen[0] if len(seen) == 1 else seen
        self._finish(row, rows)
        return row, rows

    @staticmethod
    def log_accuracy_row(label, row, peers):
        log(f"  {label} fastmlp {row['median_s']:.3f} s (acc {row['test_accuracy']:.4f}, engine "
            f"{row['history_params_engine']})" +
            "".join(f"  {k} {v['median_s']:.3f} s (acc {v['test_accuracy']:.4f}, "
                    f"x{row['vs'][k]['ratio']:.2f})" for k, v in peers.items()) +
            (f"  [{row['target']}: {'met' if row['target_met'] else 'not met'}]" if row.get("target") else "") +
            "".join(f"  FAIL {r['impl']}: {r['error']}" for r in [row, *peers.values()] if r.get("error")))

    def torch_training(self, batch, steps, fits, x_host, y_host):
        """The same work in PyTorch eager (TorchMLP's loop): shuffle, index the batches on
        the device, Adam, loss and accuracy sums read back once per epoch."""
        torch, tdev = self.torch, self.dev.kind
        x, y = torch.from_numpy(x_host).to(tdev), torch.from_numpy(y_host).to(tdev)
        peer = TorchMLP(torch, tdev, batch, seed=0)
        loss, _ = peer.epoch(x, y)  # warm-up
        samples = []
        for _ in range(fits):
            t0 = time.perf_counter()
            loss, _ = peer.epoch(x, y)
            self._torch_sync()
            samples.append((time.perf_counter() - t0) / steps)
        return {"timing": H.summarize(samples), "loss": loss}

    def run(self, sections, budget_s=None):
        start = time.perf_counter()
        for name in sections:
            if budget_s is not None and time.perf_counter() - start > budget_s:
                # Out of time: later sections are reported as skipped, and the results
                # so far are still written (a killed run would write nothing).
                self.skipped[name] = f"not run: the --budget-s {budget_s:.0f} s was spent"
                log(f"   {name} skipped: budget spent")
                continue
            log(f"== {name} on {self.dev.name}")
            t0 = time.perf_counter()
            try:
                getattr(self, f"run_{name}")()
            except Skip as e:
                self.skipped[name] = str(e)
                log(f"   {name} skipped: {e}")
            except Exception as e:  # a crashed section fails the run, the others still run
                traceback.print_exc()
                self.failures.append(f"section {name} crashed: {type(e).__name__}: {e}")
            log(f"   {name}: {time.perf_counter() - t0:.1f} s")


def meta(dev, bench, args, wall_s):
    import fastmlp as fm
    versions = {"fastmlp": fm.__version__, "numpy": np.__version__, "python": platform.python_version(),
                "torch": getattr(bench.torch, "__version__", None)}
    if dev.kind == "cuda":
        versions["cupy"] = dev.cp.__version__
    return {"commit": H.git_commit(), "date": H.now_utc(), "device": dev.name, "device_kind": dev.kind,
            "slug": dev.slug, "quick": args.quick, "versions": versions, "torch_note": bench.torch_reason,
            "torch_threads": bench.torch.get_num_threads() if bench.torch is not None else None,
            # PyTorch's CPU GEMM library and the instruction set it dispatches to
            "torch_cpu": (f"{bench.torch.backends.cpu.get_cpu_capability()}, MKL "
                          f"{bench.torch.backends.mkl.is_available()}, oneDNN "
                          f"{bench.torch.backends.mkldnn.is_available()}")
            if bench.torch is not None and dev.kind == "cpu" else None,
            "host": platform.node(), "wall_s": wall_s, "env": dev.info(), "nvtx_enabled": _nvtx_enabled(),
            "tf32": False, "repeats": bench.repeats, "min_time_s": bench.min_time,
            "unset_for_peers": UNSET_FOR_PEERS}


def _nvtx_enabled():
    from fastmlp import _nvtx
    return _nvtx.enabled


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()[:2]]
    except OSError:
        return None


def run_device(dev, args, out_dir):
    t0 = time.perf_counter()
    load_start = load_average()
    if dev.kind == "cpu" and load_start and load_start[0] > 0.5:
        log(f"note: load average {load_start}: other processes are running, expect noisy CPU numbers")
    bench = Bench(dev, args.quick)
    if bench.torch is None:
        log(f"PyTorch rows skipped: {bench.torch_reason}")
    bench.run(args.sections, args.budget_s)
    bench_meta = meta(dev, bench, args, time.perf_counter() - t0)
    bench_meta.update(load_start=load_start, load_end=load_average())
    run_info = {k: bench_meta[k] for k in ("commit", "date", "device")}
    run_info["versions"] = bench_meta["versions"]
    for r in bench.rows:
        r["run"] = run_info
    result = {"meta": bench_meta, "ceilings": bench.ceilings, "rows": bench.rows,
              "skipped": bench.skipped, "failures": bench.failures}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    md = report.markdown(result)
    with open(os.path.join(out_dir, "results.md"), "w") as fh:
        fh.write(md)
    written = "results.json, results.md, plots.png"
    try:
        report.plots(result, os.path.join(out_dir, "plots.png"))
    except ImportError as e:  # the tables and the JSON are the results; the plot is a view of them
        log(f"plots.png not written: {e} (pip install matplotlib)")
        written = "results.json, results.md"
    print(md)
    log(f"wrote {written} in {out_dir} ({bench_meta['wall_s']:.0f} s)")
    for f in bench.failures:
        log(f"FAIL: {f}")
    return 1 if bench.failures else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats (CPU: < 3 min on 2 cores)")
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                    help="all (default): the CPU, and the GPU when one is usable (says why not otherwise)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>/)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)} (ceilings always run)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no section after this many seconds (the rest are reported "
                         "as skipped; the results so far are written)")
    args = ap.parse_args(argv)
    args.sections = ["ceilings"] + [s for s in args.sections.split(",") if s and s != "ceilings"]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {SECTIONS}")

    devices = []
    if args.device in ("cpu", "all"):
        devices.append(H.CpuDevice())
    if args.device in ("cuda", "all"):
        cuda, why = H.cuda_device_or_reason()
        if cuda is None:
            if args.device == "cuda":
                log(f"run.py: --device cuda: {why}; nothing measured.")
                return 2
            log(f"run.py: GPU benchmarks NOT run: {why}")
        else:
            devices.append(cuda)
    rc = 0
    for dev in devices:
        if args.out is None:
            out_dir = os.path.join(HERE, "results", dev.slug)
        else:
            out_dir = os.path.join(args.out, dev.slug) if len(devices) > 1 else args.out
        rc = max(rc, run_device(dev, args, out_dir))
    return rc


if __name__ == "__main__":
    sys.exit(main())
