"""CPU GEMM: fastmlp's C++ kernel against NumPy's BLAS, same data, same process.

    python benchmarks/bench_cpu_gemm.py [--repeats 15]

Each row: the median GFLOP/s of single calls (perf_counter), the spread
(slowest..fastest call), and NumPy's time over fastmlp's (> 1: fastmlp is
faster). Shared machines are noisy: compare ratios from one run, not absolute
numbers across runs. (The full benchmark suite is a later issue.)
"""
import argparse
import statistics
import time

import numpy as np

import fastmlp as fm

SHAPES = [  # (name, m, n, k, trans_a): C(m, n) = op(A)(m, k) @ B(k, n)
    ("1024^3", 1024, 1024, 1024, False),
    ("B=32 784->128 fwd", 32, 128, 784, False),
    ("B=128 784->128 fwd", 128, 128, 784, False),
    ("B=1024 784->128 fwd", 1024, 128, 784, False),
    ("B=1024 dW = X^T dY", 784, 128, 1024, True),
]


def times(fn, repeats):
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out), min(out), max(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"threads: fastmlp {fm.backends()['cpu_threads']}; NumPy {np.__version__}")
    print("| shape | fastmlp GFLOP/s (slowest..fastest) | NumPy GFLOP/s | NumPy time / fastmlp time |")
    print("|---|---|---|---|")
    for name, m, n, k, ta in SHAPES:
        a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        c = np.empty((m, n), np.float32)
        op_a = a.T if ta else a
        fm.ops.gemm(a, b, trans_a=ta, out=c)
        assert np.allclose(c, op_a @ b, rtol=1e-3, atol=1e-3 * np.sqrt(k)), name
        f = times(lambda: fm.ops.gemm(a, b, trans_a=ta, out=c), args.repeats)
        r = times(lambda: np.matmul(op_a, b, out=c), args.repeats)
        gf = lambda s: 2.0 * m * n * k / s / 1e9  # noqa: E731
        print(f"| {name} | {gf(f[0]):.0f} ({gf(f[2]):.0f}..{gf(f[1]):.0f}) | "
              f"{gf(r[0]):.0f} ({gf(r[2]):.0f}..{gf(r[1]):.0f}) | {r[0] / f[0]:.2f} |")


if __name__ == "__main__":
    main()
