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


# -- the epoch section: PyTorch peers, rows, accuracy floors, targets --------------------------------

def tiny_classes(rng, n, d=784, classes=10):
    """n rows whose label is the arg-max of their first `classes` features: learnable in a few steps."""
    x = rng.random((n, d), dtype=np.float32)
    return x, x[:, :classes].argmax(axis=1).astype(np.int64)


def test_torch_peer_eager_epoch_on_the_cpu(run):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x, y = tiny_classes(rng, 100)  # 3 full batches of 32 and a partial one of 4
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    peer = run.TorchMLP(torch, "cpu", 32, seed=3)
    loss, train_acc = peer.epoch(X, Y)
    assert np.isfinite(loss) and loss > 0 and 0.0 <= train_acc <= 1.0
    assert 0.0 <= peer.accuracy(X, Y) <= 1.0
    assert peer.opt.state, "the epoch ran no optimizer step"


def test_torch_peer_reset_is_a_fresh_start(run):
    """reset(seed) must equal a new peer built with that seed: same weights, zeroed Adam state,
    so every timed run (graphs reuse their tensors) starts where a fresh model would."""
    torch = pytest.importorskip("torch")
    x, y = tiny_classes(np.random.default_rng(1), 64)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    used = run.TorchMLP(torch, "cpu", 16, seed=0)
    used.epoch(X, Y)
    used.reset(7)
    fresh = run.TorchMLP(torch, "cpu", 16, seed=7)
    for p, q in zip(used.model.parameters(), fresh.model.parameters()):
        assert torch.equal(p, q)
    for state in used.opt.state.values():
        assert all(float(v.abs().max()) == 0.0 for v in state.values() if torch.is_tensor(v))
    # ... and both then train identically (same seed: same shuffle, same steps).
    torch.manual_seed(11)
    a = used.epoch(X, Y)
    torch.manual_seed(11)
    b = fresh.epoch(X, Y)
    assert a == pytest.approx(b, rel=1e-6)


def test_torch_graphs_peer_refuses_cpu_data(run):
    torch = pytest.importorskip("torch")
    X, Y = torch.zeros((8, 784)), torch.zeros(8, dtype=torch.int64)
    with pytest.raises(ValueError, match="CUDA Graphs need"):
        run.TorchMLP(torch, "cpu", 4, seed=0, capture_with=(X, Y))


def test_bench_torch_epoch_runner_on_the_cpu(run):
    torch = pytest.importorskip("torch")
    bench = run.Bench(harness.CpuDevice(), quick=True)
    rng = np.random.default_rng(2)
    x, y = tiny_classes(rng, 96)
    xt, yt = tiny_classes(rng, 40)
    tensors = tuple(torch.from_numpy(a) for a in (x, y, xt, yt))
    fn, capture_s = bench.torch_epoch(tensors, 32)
    seconds, acc, info = fn(0)
    assert capture_s is None and info is None
    assert np.isfinite(seconds) and seconds > 0 and 0.0 <= acc <= 1.0


@pytest.mark.gpu
def test_torch_graphs_peer_matches_eager_on_the_gpu(gpu, run):
    """The CUDA Graphs peer (one graph per batch size: 5 x 32 + a partial 12) trains like the
    eager loop from the same seed: same shuffle, same data, Adam capturable vs not."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch sees no CUDA device")
    x, y = tiny_classes(np.random.default_rng(3), 172)
    X, Y = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()
    graphs = run.TorchMLP(torch, "cuda", 32, seed=5, capture_with=(X, Y))
    eager = run.TorchMLP(torch, "cuda", 32, seed=5)
    assert sorted(graphs.graphs) == [12, 32]
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        loss_g, acc_g = graphs.epoch(X, Y)
        torch.manual_seed(seed)
        loss_e, acc_e = eager.epoch(X, Y)
        assert loss_g == pytest.approx(loss_e, rel=1e-3)
    assert graphs.accuracy(X, Y) == pytest.approx(eager.accuracy(X, Y), abs=0.02)


def fake_runner(seconds, acc, info=None):
    return lambda seed: (seconds, acc, info)


def test_accuracy_rows_floors_peers_and_engine(run):
    bench = run.Bench(harness.CpuDevice(), quick=True)
    engine = {"engine": "cpu", "engine_reason": "default"}
    runners = {"fastmlp": fake_runner(0.5, 0.84, engine), "PyTorch eager": fake_runner(2.0, 0.83),
               "PyTorch CUDA Graphs": fake_runner(1.0, 0.10)}
    results = bench.alternate(runners, 3, "test")
    assert [len(v[0]) for v in results.values()] == [3, 3, 3]  # the warm-up call is not kept
    row, peers = bench.accuracy_rows("fit_epoch", "784-128-10 B=32", dict.fromkeys(runners, "v"),
                                     results, 0.80, "after one epoch", batch=32)
    assert row["checked"] and row["history_params_engine"] == "cpu"
    assert row["history_params_engine_reason"] == "default"
    assert row["vs"]["PyTorch eager"]["ratio"] == pytest.approx(4.0)
    assert peers["PyTorch eager"]["checked"]
    # a peer that did not train fails the run: its time would compare different work
    bad = peers["PyTorch CUDA Graphs"]
    assert not bad["checked"] and "0.1000" in bad["error"]
    assert len(bench.failures) == 1 and "PyTorch CUDA Graphs" in bench.failures[0]


def test_a_crashing_peer_is_dropped_and_fails_the_run(run):
    bench = run.Bench(harness.CpuDevice(), quick=True)

    def broken(seed):
        raise RuntimeError("capture went wrong")

    results = bench.alternate({"fastmlp": fake_runner(1.0, 0.85, {}), "PyTorch CUDA Graphs": broken},
                              2, "epoch B=32")
    assert list(results) == ["fastmlp"] and len(results["fastmlp"][0]) == 2
    assert bench.failures == ["epoch B=32 PyTorch CUDA Graphs crashed: RuntimeError: capture went wrong"]


def epoch_report(bench):
    return report.markdown({"meta": {"device": "test", "commit": "x", "date": "d", "quick": True,
                                     "wall_s": 0, "versions": {}, "device_kind": "cpu", "env": {}},
                            "ceilings": {}, "rows": bench.rows, "skipped": {}, "failures": bench.failures})


def test_epoch_section_end_to_end_on_tiny_data(monkeypatch, run):
    """run_epoch on a tiny learnable set (2 batch sizes, then time to accuracy as in a full CPU
    run): complete rows for fastmlp and PyTorch eager, ratios, accuracies, engine, report."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    x, y = tiny_classes(rng, 200)
    xt, yt = tiny_classes(rng, 50)
    bench = run.Bench(harness.CpuDevice(), quick=False)
    monkeypatch.setattr(bench, "fashion_mnist", lambda: (x, y, xt, yt))
    monkeypatch.setattr(run, "EPOCH_BATCHES", (32, 64))
    monkeypatch.setattr(run, "EPOCH_FLOOR", {32: 0.0, 64: 0.0})
    monkeypatch.setattr(run, "TTA_EPOCHS", 2)
    monkeypatch.setattr(run, "TTA_FLOOR", 0.0)
    bench.run_epoch()
    assert not bench.failures
    ours = [r for r in bench.rows if r["impl"] == "fastmlp"]
    assert [(r["op"], r["batch"]) for r in ours] == [("fit_epoch", 32), ("fit_epoch", 64),
                                                    ("time_to_accuracy", 32)]
    for r in ours:
        assert r["checked"] and 0.0 <= r["test_accuracy"] <= 1.0
        assert r["repeats"] == (3 if r["op"] == "time_to_accuracy" else 5)  # full run: 5 epochs, 3 jobs
        assert "history_params_engine" in r and "target" not in r  # the targets are the H200's
        peer = r["vs"]["PyTorch eager"]
        assert peer["ratio"] > 0
    peers = [r for r in bench.rows if r["impl"] == "PyTorch eager"]
    assert len(peers) == 3 and all(0.0 <= r["test_accuracy"] <= 1.0 for r in peers)
    md = epoch_report(bench)
    assert "| epoch, B=64, Adam | PyTorch eager |" in md
    assert "2 epochs B=32 from host arrays (time to accuracy)" in md


def test_an_untrained_epoch_is_a_failure(monkeypatch, run):
    """Random labels cannot reach the real floors: every row is a FAIL, fastmlp's and the peer's."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    x, xt = rng.random((64, 784), dtype=np.float32), rng.random((32, 784), dtype=np.float32)
    y, yt = rng.integers(0, 10, 64), rng.integers(0, 10, 32)
    bench = run.Bench(harness.CpuDevice(), quick=True)
    monkeypatch.setattr(bench, "fashion_mnist", lambda: (x, y, xt, yt))
    monkeypatch.setattr(run, "EPOCH_BATCHES", (32,))
    bench.run_epoch()
    assert {r["impl"]: r["checked"] for r in bench.rows} == {"fastmlp": False, "PyTorch eager": False}
    assert len(bench.failures) == 2 and all("test accuracy" in f and "< 0.8" in f for f in bench.failures)
    assert "**FAIL** test accuracy" in epoch_report(bench)


def test_report_prints_the_targets(run):
    row = harness.make_row("epoch", "fit_epoch", "784-128-10 B=32", "v", "fastmlp", timing(0.1),
                           batch=32, test_accuracy=0.85, test_accuracy_all=[0.85], checked=True,
                           rel_err=None, history_params_engine="cuda_graph",
                           history_params_engine_reason="default", target="H200: >= 10x PyTorch eager",
                           target_met=False)
    peer = harness.make_row("epoch", "fit_epoch", "784-128-10 B=32", "v", "PyTorch eager", timing(0.5),
                            batch=32, test_accuracy=0.84, test_accuracy_all=[0.84], checked=True, rel_err=None)
    harness.add_peers(row, {"PyTorch eager": peer})
    bench = run.Bench(harness.CpuDevice(), quick=True)
    bench.rows = [row, peer]
    md = epoch_report(bench)
    assert "5.0x faster than PyTorch eager; target H200: >= 10x PyTorch eager: not met" in md
    assert "- epoch, B=32, Adam: H200: >= 10x PyTorch eager: **not met**" in md
    assert "engine cuda_graph (default)" in md


def test_cuda_branches_of_the_epoch_section_with_fake_runners(monkeypatch, run):
    """The GPU-only orchestration (the CUDA Graphs peer, its capture time, the H200 targets,
    time to accuracy in --quick) driven on the CPU: the device says "cuda", the runners are fakes."""
    pytest.importorskip("torch")
    bench = run.Bench(harness.CpuDevice(), quick=True)
    monkeypatch.setattr(bench.dev, "kind", "cuda")
    rng = np.random.default_rng(6)
    x, y = tiny_classes(rng, 64)
    monkeypatch.setattr(bench, "fashion_mnist", lambda: (x, y, x, y))
    monkeypatch.setattr(run, "EPOCH_BATCHES", (32,))
    engine = {"engine": "cuda_graph", "engine_reason": "default"}
    monkeypatch.setattr(bench, "fastmlp_fit", lambda data, batch, epochs, seed, whole_job:
                        (0.05 if whole_job else 0.1, 0.88, engine))
    monkeypatch.setattr(bench, "torch_epoch", lambda tensors, batch, graphs=False:
                        (fake_runner(0.2 if graphs else 1.2, 0.85), 0.7 if graphs else None))
    monkeypatch.setattr(bench, "torch_job", lambda host, graphs=False: fake_runner(3.0, 0.88))
    bench.run_epoch()
    assert not bench.failures
    epoch, tta = [r for r in bench.rows if r["impl"] == "fastmlp"]
    assert set(epoch["vs"]) == {"PyTorch eager", "PyTorch CUDA Graphs"}
    assert epoch["vs"]["PyTorch eager"]["ratio"] == pytest.approx(12.0)
    # 12x eager meets its target, 2x CUDA Graphs meets 1.5x: met
    assert epoch["target_met"] is True and "10x PyTorch eager" in epoch["target"]
    assert next(r for r in bench.rows if r["impl"] == "PyTorch CUDA Graphs"
                and r["op"] == "fit_epoch")["capture_s"] == 0.7
    assert tta["op"] == "time_to_accuracy" and tta["repeats"] == 2  # --quick: 2 jobs each
    assert tta["target_met"] is True and tta["target_stretch_met"] is True
    assert tta["history_params_engine"] == "cuda_graph"
    md = epoch_report(bench)
    assert "warm-up + capture 0.70 s" in md and "met, stretch met" in md


def test_budget_skips_the_sections_that_would_start_late(monkeypatch, run):
    """--budget-s: once spent, no further section starts; they are reported as skipped
    (so a GPU check whose step would time out still writes what it measured)."""
    bench = run.Bench(harness.CpuDevice(), quick=True)
    ran = []
    monkeypatch.setattr(bench, "run_gemm", lambda: ran.append("gemm"), raising=False)
    monkeypatch.setattr(bench, "run_memory", lambda: ran.append("memory"), raising=False)
    bench.run(["gemm", "memory"], budget_s=-1.0)
    assert ran == [] and set(bench.skipped) == {"gemm", "memory"}
    assert "budget" in bench.skipped["gemm"]
    bench.skipped.clear()
    bench.run(["gemm", "memory"], budget_s=60.0)
    assert ran == ["gemm", "memory"] and not bench.skipped


def test_denormal_section_rows_and_report(run):
    """The denormal section: a row per op and mode, each with its normal-data twin, the
    data really denormal, and the process's flush mode as it was before."""
    import fastmlp as fm
    bench = run.Bench(harness.CpuDevice(), quick=True)
    bench.repeats, bench.min_time = 3, 0.0
    before = fm.get_flush_denormal()
    bench.run_denormal()
    assert fm.get_flush_denormal() is before
    assert not bench.failures
    ours = [r for r in bench.rows if r["section"] == "denormal" and r["impl"] == "fastmlp"]
    assert [(r["op"], "flush on" in r["variant"]) for r in ours] == \
        [("gemm", True), ("gemm", False), ("adam_step", True), ("adam_step", False)]
    for r in ours:
        assert r["vs"]["fastmlp, normal data"]["ratio"] > 0
    assert any(r["impl"] == "NumPy" for r in bench.rows)
    md = report.markdown({"meta": {"device": "test", "commit": "x", "date": "d", "quick": True, "wall_s": 0,
                                   "versions": {}, "device_kind": "cpu", "env": {}},
                          "ceilings": {}, "rows": bench.rows, "skipped": {}, "failures": []})
    assert "## Denormal data" in md and "flush off (IEEE)" in md


# -- the layers section (issue 15) ---------------------------------------------------------------

def tiny_layers_bench(run, monkeypatch):
    bench = run.Bench(harness.CpuDevice(), quick=True)
    bench.repeats, bench.min_time = 3, 0.0
    bench.ceilings = {"copy_gbps": 10.0, "copy_bytes": 1 << 20, "peak_gflops": 100.0, "peak_how": "assumed"}
    monkeypatch.setattr(bench, "layer_sizes", lambda: [(33, 128)])
    monkeypatch.setattr(bench, "fused_shapes", lambda: [(40, 24, 17)])
    return bench


def test_layers_section_rows_are_complete_checked_and_reported(monkeypatch, run):
    """Every activation forward and backward, dropout, batch and layer norm, and the fused
    Dense rows: checked against fastmlp.reference, with PyTorch (and the unfused fastmlp
    calls) as peers, and both tables in the report."""
    pytest.importorskip("torch")
    bench = tiny_layers_bench(run, monkeypatch)
    bench.run_layers()
    assert not bench.failures
    ours = [r for r in bench.rows if r["section"] == "layers" and r["impl"] == "fastmlp"]
    elementwise = [r for r in ours if not r.get("fused")]
    assert [(r["op"], r["variant"].split(",")[0]) for r in elementwise if r["op"].startswith("activation")] == \
        [(op, a) for a in run.LAYER_ACTS for op in ("activation", "activation_backward")]
    assert [r["op"] for r in elementwise[-6:]] == ["dropout", "dropout_backward", "batch_norm_forward",
                                                   "batch_norm_backward", "layer_norm_forward",
                                                   "layer_norm_backward"]
    for r in elementwise:
        assert r["checked"] and r["rel_err"] is not None and r["shape"] == "33x128"
        assert r["gbps"] > 0 and r["pct_of_roof"] > 0 and r["traffic"]
        assert r["vs"]["PyTorch"]["ratio"] > 0
    fused = [r for r in ours if r.get("fused")]
    assert len(fused) == 2 * (len(run.LAYER_ACTS) - 1)
    for r in fused:
        assert r["checked"] and r["rel_err"] < run.GEMM_TOL and r["problem"] == "40->24 B=17"
        assert set(r["vs"]) == {"fastmlp unfused", "PyTorch"}
    # every peer row was checked too, and names the overload that ran
    peers = [r for r in bench.rows if r["section"] == "layers" and r["impl"] != "fastmlp"]
    assert peers and all(r["checked"] and r["peer_variant"] for r in peers)
    bn = next(r for r in peers if r["op"] == "batch_norm_backward")
    assert len(bn["candidates"]) == 2  # the allocating and the out= overload, the faster kept
    md = epoch_report(bench)
    assert "## Layers: activations, dropout, normalisation" in md
    assert "| activation_backward (gelu, saved input z) | 33x128 |" in md
    assert "## Fused Dense + activation vs unfused" in md and "| 40->24 B=17 | dense_forward | silu |" in md


def test_layers_section_reports_a_wrong_activation(monkeypatch, run):
    import fastmlp as fm
    pytest.importorskip("torch")
    bench = tiny_layers_bench(run, monkeypatch)
    monkeypatch.setattr(run, "LAYER_ACTS", ("relu", "tanh"))
    real = fm.ops.activation

    def broken(x, name, **kw):
        y = real(x, name, **kw)
        if name == "tanh":
            y[0, 0] += 0.5
        return y

    monkeypatch.setattr(fm.ops, "activation", broken)
    bench.run_layers()
    # the tanh forward and the unfused Dense + tanh both used it; nothing else did
    assert len(bench.failures) == 2 and all("tanh" in f and "fastmlp" in f for f in bench.failures)
    bad = [r for r in bench.rows if r["section"] == "layers" and not r["checked"]]
    assert [(r["op"], r["impl"]) for r in bad] == [("activation", "fastmlp"), ("dense_forward", "fastmlp unfused")]


# -- the losses section (issue 16) ---------------------------------------------------------------

def tiny_losses_bench(run, monkeypatch):
    bench = run.Bench(harness.CpuDevice(), quick=True)
    bench.repeats, bench.min_time = 3, 0.0
    bench.ceilings = {"copy_gbps": 10.0, "copy_bytes": 1 << 20, "peak_gflops": 100.0, "peak_how": "assumed"}
    monkeypatch.setattr(bench, "loss_sizes", lambda: [(33, 7)])
    monkeypatch.setattr(bench, "metric_sizes", lambda: [(50, 10)])
    monkeypatch.setattr(bench, "optimizer_sizes", lambda: [1000])
    full = bench.fit_option_data
    monkeypatch.setattr(bench, "fit_option_data", lambda: tuple(a[:300] for a in full()))
    return bench


def test_losses_section_rows_are_complete_checked_and_reported(monkeypatch, run):
    """Every loss kind unweighted and weighted (cce_logits also smoothed), the metric sums,
    ROC AUC, the optimizer steps and the fit options: checked, with their peers, reported."""
    import fastmlp as fm
    pytest.importorskip("torch")
    bench = tiny_losses_bench(run, monkeypatch)
    bench.run_losses()
    assert not bench.failures
    ours = [r for r in bench.rows if r["section"] == "losses" and r["impl"] == "fastmlp"]
    losses = [r["variant"] for r in ours if r["op"] == "loss_forward_backward"]
    assert losses == [v for k in fm.ops.LOSS_KINDS for v in
                      [k, f"{k}, weighted"] + ([f"{k}, label_smoothing 0.1"] if k == "cce_logits" else [])]
    assert [r["op"] for r in ours if r["op"] != "loss_forward_backward"] == \
        ["metric_sums"] * 2 + ["roc_auc"] + ["rmsprop_step"] * 2 + ["adam_step"] + ["fit_epoch"] * len(run.FIT_OPTIONS)
    kernels = [r for r in ours if r["op"] != "fit_epoch"]
    for r in kernels:
        assert r["checked"] and r["rel_err"] is not None and r["gbps"] > 0
        peer = "sklearn" if r["op"] == "roc_auc" else "PyTorch"
        assert r["vs"][peer]["ratio"] > 0
    peers = [r for r in bench.rows if r["section"] == "losses" and r["impl"] != "fastmlp"]
    assert peers and all(r["checked"] for r in peers)
    assert all(r["peer_variant"] for r in peers if r["op"] != "fit_epoch")
    adam = next(r for r in peers if r["op"] == "adam_step")
    assert len(adam["candidates"]) == 2  # torch.optim foreach False and True, the faster kept
    fits = [r for r in ours if r["op"] == "fit_epoch"]
    assert [r["variant"] for r in fits] == list(run.FIT_OPTIONS)
    assert fits[0]["overhead_vs_plain"] == pytest.approx(1.0)
    for r in fits:
        assert r["checked"] and r["overhead_vs_plain"] > 0 and r["vs"]["PyTorch eager"]["ratio"] > 0
    md = epoch_report(bench)
    assert "## Losses, metrics, ROC AUC, optimizers with transforms (issue 16)" in md
    assert "| loss_forward_backward | cce_logits, label_smoothing 0.1 | 33x7 |" in md
    assert "## Training options: one fit epoch, 784-128-10 B=128, 300 rows (issue 16)" in md
    assert "| clipnorm 1.0 |" in md


def test_losses_section_reports_a_wrong_loss_gradient(monkeypatch, run):
    import fastmlp as fm
    pytest.importorskip("torch")
    bench = tiny_losses_bench(run, monkeypatch)
    monkeypatch.setattr(bench, "metric_sizes", lambda: [])
    monkeypatch.setattr(bench, "optimizer_sizes", lambda: [])
    monkeypatch.setattr(bench, "roc_cases", lambda: iter(()))
    monkeypatch.setattr(bench, "run_fit_options", lambda: None)
    real = fm.ops.loss_forward_backward

    def broken(kind, pred, target, **kw):
        loss, d = real(kind, pred, target, **kw)
        if kind == "huber":
            d[0, 0] += 0.5
        return loss, d

    monkeypatch.setattr(fm.ops, "loss_forward_backward", broken)
    bench.run_losses()
    assert len(bench.failures) == 2 and all("huber" in f and "fastmlp" in f for f in bench.failures)
    bad = [r for r in bench.rows if not r["checked"]]
    assert [(r["variant"], r["impl"]) for r in bad] == [("huber", "fastmlp"), ("huber, weighted", "fastmlp")]


def test_every_losses_peer_candidate_matches_the_reference(run):
    """Not only the fastest: every PyTorch / sklearn candidate of the kernel rows computes the
    same loss, gradient, sums or optimizer state as fastmlp.reference (a slower candidate that
    is wrong would otherwise go unnoticed until it wins a run)."""
    pytest.importorskip("torch")
    bench = run.Bench(harness.CpuDevice(), quick=True)
    cases = [*bench.loss_cases(40, 6), *bench.metric_cases(30, 8), *bench.optimizer_cases(500)]
    checked = 0
    for case in cases:
        for cands in case["peers"].values():
            for variant, fn, check in cands:
                assert check() <= 1e-5, variant
                checked += 1
    assert checked > len(cases)  # PyTorch has two candidates for most rows


# -- the privacy section (issue 17) ---------------------------------------------------------------

def test_privacy_section_rows_are_complete_and_reported(monkeypatch, run):
    """DP step and plain step per batch, both libraries (Opacus when it imports), the
    overhead ratios, and the report's table."""
    pytest.importorskip("torch")
    bench = run.Bench(harness.CpuDevice(), quick=True)
    bench.ceilings = {"copy_gbps": 10.0, "copy_bytes": 1 << 20, "peak_gflops": 100.0,
                      "peak_how": "assumed"}
    monkeypatch.setattr(bench, "privacy_cases", lambda: [(8, 3), (16, 2)])
    bench.run_privacy()
    assert not bench.failures
    ours = [r for r in bench.rows if r["section"] == "privacy" and r["impl"] == "fastmlp"]
    assert [r["batch"] for r in ours] == [8, 16]
    for r in ours:
        assert r["checked"] and r["dp_overhead"] > 0 and r["median_s"] > 0
        assert {"fastmlp Adam", "PyTorch Adam"} <= set(r["vs"])
        if "Opacus" in r["vs"]:
            assert r["opacus_overhead"] > 0
    md = epoch_report(bench)
    assert "## Privacy: the DP-SGD step against the plain step (issue 17)" in md
    assert "| 8 |" in md and "| 16 |" in md


# -- the robustness section (issue 18) ------------------------------------------------------------

def test_robustness_section_rows_are_complete_and_reported(monkeypatch, run):
    """Attribution rows (IG, saliency) against Captum when it imports, checked against the
    float64 reference and Captum; adversarial-training epochs against plain ones, both
    libraries, the overhead ratios, and the report's tables."""
    pytest.importorskip("torch")
    bench = run.Bench(harness.CpuDevice(), quick=True)
    monkeypatch.setattr(bench, "robustness_cases", lambda: (6, [(8, 24), (16, 32)]))
    bench.run_robustness()
    assert not bench.failures
    ours = [r for r in bench.rows if r["section"] == "robustness" and r["impl"] == "fastmlp"]
    assert [r["op"] for r in ours] == ["integrated_gradients", "saliency", "adv_train",
                                       "adv_train"]
    for r in ours[:2]:
        assert r["checked"] and r["rel_err"] < 1e-4 and r["images"] == 6
        assert r["images_per_s"] == pytest.approx(1 / r["median_s"])
        if "Captum" in r["vs"]:
            cap = report._peer_row(bench.rows, r, "Captum")
            assert cap["checked"] and cap["rel_err"] < 1e-3
            assert cap["peer_variant"].split(" ", 2)[2] in cap["candidates"]
    if "Captum" in ours[0]["vs"]:
        assert len(report._peer_row(bench.rows, ours[0], "Captum")["candidates"]) == 2
    for r, batch in zip(ours[2:], (8, 16)):
        assert r["checked"] and r["batch"] == batch and r["adv_overhead"] > 0
        assert {"fastmlp plain", "PyTorch PGD-10", "PyTorch plain"} <= set(r["vs"])
        plain = report._peer_row(bench.rows, r, "fastmlp plain")
        assert r["first_epoch_loss"] > plain["first_epoch_loss"]
        assert r["torch_adv_overhead"] > 0
    md = epoch_report(bench)
    assert "## Robustness: attributions and adversarial training (issue 18)" in md
    assert "| integrated_gradients (50 steps, gausslegendre) |" in md
    assert "| 784-128-10 relu, 24 images, B=8 |" in md and "B=16 |" in md


def test_adversarial_epochs_whose_attack_did_not_raise_the_loss_fail(run):
    assert run.adv_loss_error({"adv": [2.9, 2.3], "plain": [2.4, 2.3]}, "adv", "plain") is None
    assert "did not run" in run.adv_loss_error({"adv": [2.4], "plain": [2.4]}, "adv", "plain")
    assert "epoch losses" in run.adv_loss_error({"adv": [float("nan")], "plain": [2.4]},
                                                "adv", "plain")
