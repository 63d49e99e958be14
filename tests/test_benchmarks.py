"""The benchmark harness (benchmarks/): rows, ratios, checks and the report, on tiny fake runs.

Nothing here times anything or asserts a speed: speed lives in the benchmarks.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
harness = pytest.importorskip("harness")
report = pytest.importorskip("report")


@pytest.fixture
def run():
    """benchmarks/run.py as a module (its import-time thread settings do not leak into os.environ)."""
    saved = dict(os.environ)
    try:
        import run as module
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return module


def timing(median, lo=None, hi=None):
    return {"median_s": median, "min_s": lo or median, "max_s": hi or median, "repeats": 3}


def test_row_rates_and_peer_ratio():
    row = harness.make_row("gemm", "gemm", "2x3x4", "A@B", "fastmlp", timing(2e-3),
                           flops=4e9, nbytes=1e8, checked=True, rel_err=1e-7)
    peer = harness.make_row("gemm", "gemm", "2x3x4", "A@B", "NumPy", timing(1e-3), flops=4e9, nbytes=1e8)
    harness.add_peers(row, {"NumPy": peer})
    assert row["gflops"] == pytest.approx(2000.0)
    assert row["gbps"] == pytest.approx(50.0)
    assert row["intensity"] == pytest.approx(40.0)
    # ratio = peer time / our time: 0.5 means fastmlp runs at half the peer's rate
    assert row["vs"]["NumPy"]["ratio"] == pytest.approx(0.5)
    assert row["vs"]["NumPy"]["gflops"] == pytest.approx(4000.0)


def test_check_rejects_wrong_and_nan_outputs():
    want = np.array([1.0, -2.0, 4.0])
    assert harness.check("ok", want + 1e-7, want, 1e-6) < 1e-6
    with pytest.raises(harness.CheckFailed, match="bad"):
        harness.check("bad", want * 1.01, want, 1e-4)
    with pytest.raises(harness.CheckFailed):
        harness.check("nan", np.array([1.0, np.nan, 4.0]), want, 1e-4)


def test_cuda_slug_and_cpu_device():
    assert harness.slug("NVIDIA H200") == "nvidia-h200"
    dev = harness.CpuDevice()
    assert dev.slug.startswith("cpu-") and dev.slug.endswith(f"-{dev.cores}c")
    t = dev.time({"a": lambda: None, "b": lambda: None}, repeats=6, rounds=3, warmup=1)
    assert set(t) == {"a", "b"} and t["a"]["repeats"] == 6
    assert t["a"]["min_s"] <= t["a"]["median_s"] <= t["a"]["max_s"]


def test_gemm_section_rows_are_complete_and_checked(monkeypatch, run):
    bench = run.Bench(harness.CpuDevice(), quick=True)
    bench.repeats, bench.min_time = 3, 0.0
    bench.ceilings = {"peak_gflops": 100.0, "peak_how": "assumed for the test"}
    monkeypatch.setattr(bench, "gemm_shapes", lambda: [("tiny", "dW=X^T@dY", 5, 3, 7, True, False),
                                                       ("tiny", "dX=dY@W^T", 4, 6, 3, False, True)])
    bench.run_gemm()
    assert not bench.failures
    ours = [r for r in bench.rows if r["impl"] == "fastmlp"]
    assert len(ours) == 2
    for r in ours:
        assert r["checked"] and r["rel_err"] < 1e-5
        assert {"op", "shape", "variant", "median_s", "min_s", "max_s", "gflops", "pct_of_roof"} <= set(r)
        assert "NumPy" in r["vs"] and r["vs"]["NumPy"]["ratio"] > 0
    md = report.markdown({"meta": {"device": "test", "commit": "x", "date": "d", "quick": True, "wall_s": 0,
                                   "versions": {}, "device_kind": "cpu", "env": {}},
                          "ceilings": bench.ceilings, "rows": bench.rows,
                          "skipped": {"training": "not run"}, "failures": []})
    assert "| tiny | dW=X^T@dY | 5x3x7 |" in md and "Not measured: not run" in md


def test_a_wrong_kernel_output_is_reported_as_a_failure(monkeypatch, run):
    import fastmlp as fm
    bench = run.Bench(harness.CpuDevice(), quick=True)
    bench.repeats, bench.min_time = 3, 0.0
    monkeypatch.setattr(bench, "gemm_shapes", lambda: [("tiny", "A@B", 4, 4, 4, False, False)])
    real = fm.ops.gemm

    def broken(a, b, **kw):
        out = real(a, b, **kw)
        out[0, 0] += 1.0
        return out

    monkeypatch.setattr(fm.ops, "gemm", broken)
    bench.run_gemm()
    assert bench.failures and "fastmlp" in bench.failures[0]
    assert not next(r for r in bench.rows if r["impl"] == "fastmlp")["checked"]
