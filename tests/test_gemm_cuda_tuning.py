"""The CUDA GEMM tuning table without a GPU: shape classes (Python == C++), table
validation, building a GPU's block from (fake) measurements, the C++ dispatch
table's lookup rules, the shipped table, and tune_gemm.py refusing to run
without a GPU. GPU behaviour of the kernels: test_gemm_cuda.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastmlp import _C
from fastmlp import _gemm_tuning as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cuda_built = pytest.mark.skipif(not getattr(_C, "cuda_built", False),
                                reason="fastmlp was built without its CUDA part")


def test_size_bucket_edges():
    assert [T.size_bucket(x) for x in (1, 16, 17, 32, 33, 784, 1024, 1025, 8192, 8193, 10 ** 9)] == \
        [4, 4, 5, 5, 6, 10, 10, 11, 13, 14, 14]


@cuda_built
def test_size_bucket_matches_cpp():
    for x in list(range(1, 70)) + [127, 128, 129, 783, 784, 4095, 4096, 4097, 8192, 8193, 1 << 40]:
        assert T.size_bucket(x) == _C.cuda.gemm_size_bucket(x), x


def test_shape_class_roundtrip():
    key = T.shape_class("fp32", True, False, 784, 128, 8192)
    assert key == "fp32:tn:m10:n7:k13"
    assert T.parse_class(key) == (0, True, False, 10, 7, 13)
    assert T.parse_class("tf32:nt:m4:n14:k5") == (1, False, True, 4, 14, 5)
    for bad in ("fp16:nn:m4:n4:k4", "fp32:xn:m4:n4:k4", "fp32:nn:m3:n4:k4", "fp32:nn:m4:n4",
                "fp32:nn:n4:m4:k4", "fp32:nn:m15:n4:k4", 7):
        with pytest.raises(ValueError, match="malformed shape class"):
            T.parse_class(bad)


def fake(config, m, n, k, t_us, *, splits=1, ta=False, tb=False, prec="fp32", passed=True,
         cublas_us=100.0):
    return {"precision": prec, "trans_a": ta, "trans_b": tb, "m": m, "n": n, "k": k,
            "config": config, "splits": splits, "passed": passed, "rel_err": 1e-7,
            "median_s": t_us * 1e-6 if passed else None, "cublas_s": cublas_us * 1e-6}


def test_build_block_picks_fastest_verified_and_skips_failures():
    rows = [
        fake("foundation", 784, 128, 8192, 300, ta=True),
        fake("simt_a", 784, 128, 8192, 90, ta=True),                   # fastest but ...
        fake("simt_a", 784, 128, 8192, 0, ta=True, splits=8, passed=False),   # failed check
        fake("simt_b", 784, 128, 8192, 120, ta=True, splits=8),
        fake("foundation", 4096, 4096, 4096, 1000),
        fake("simt_a", 4096, 4096, 4096, 1100),                        # slower than foundation
        fake("foundation", 32, 128, 784, 10),
        fake("simt_b", 32, 128, 784, 5, passed=False),                 # the only family kernel fails
    ]
    block = T.build_gpu_block(rows, gpu="NVIDIA Test", date="2030-01-01", commit="abc")
    e = block["entries"]
    assert set(e) == {"fp32:tn:m10:n7:k13"}
    assert e["fp32:tn:m10:n7:k13"]["config"] == "simt_a" and e["fp32:tn:m10:n7:k13"]["splits"] == 1
    assert e["fp32:tn:m10:n7:k13"]["ratio_vs_cublas"] == pytest.approx(100 / 90, rel=1e-3)
    assert e["fp32:tn:m10:n7:k13"]["speedup_vs_foundation"] == pytest.approx(300 / 90, rel=1e-3)
    assert e["fp32:tn:m10:n7:k13"]["verified"] is True
    assert "fp32:nn:m12:n12:k12" in block["kept_foundation"]
    assert "fp32:nn:m5:n7:k10" in block["kept_foundation"]
    assert any("failed the check" in v for v in block["rejected"].values())


def test_build_block_needs_every_shape_of_a_class():
    """Two shapes in one class: a kernel measured (or passing) on only one is not eligible."""
    rows = [fake("foundation", 1000, 1000, 1000, 100), fake("foundation", 900, 1000, 1000, 90),
            fake("simt_a", 1000, 1000, 1000, 50),                           # only one shape
            fake("simt_b", 1000, 1000, 1000, 80), fake("simt_b", 900, 1000, 1000, 70)]
    block = T.build_gpu_block(rows, gpu="g", date="d", commit="c")
    assert block["entries"]["fp32:nn:m10:n10:k10"]["config"] == "simt_b"


def test_tables_validate_and_merge(tmp_path):
    block = T.build_gpu_block([fake("foundation", 64, 64, 64, 10), fake("simt_a", 64, 64, 64, 5),
                               fake("foundation", 64, 64, 64, 10, prec="tf32"),
                               fake("tf32_x", 64, 64, 64, 2, prec="tf32")],
                              gpu="NVIDIA Test", date="2030-01-01", commit="abc")
    table = T.merge(T.empty_table(), "NVIDIA Test", block)
    kinds = {"simt_a": "simt", "tf32_x": "tf32"}
    T.validate_table(table, config_names=set(kinds), config_kinds=kinds)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    assert T.gpu_entries(T.load_table(str(path)), "NVIDIA Test") == [
        (0, False, False, 6, 6, 6, "simt_a", 1), (1, False, False, 6, 6, 6, "tf32_x", 1)]
    assert T.gpu_entries(table, "Some Other GPU") == []
    # What the validator refuses:
    for mutate, words in [
        (lambda t: t.update(schema=2), "schema"),
        (lambda t: t["gpus"]["NVIDIA Test"]["entries"]["fp32:nn:m6:n6:k6"].update(config="tf32_x"),
         "cannot use the tf32"),
        (lambda t: t["gpus"]["NVIDIA Test"]["entries"]["fp32:nn:m6:n6:k6"].update(splits=0), "splits"),
        (lambda t: t["gpus"]["NVIDIA Test"]["entries"]["fp32:nn:m6:n6:k6"].update(verified=False),
         "verified"),
        (lambda t: t["gpus"]["NVIDIA Test"]["entries"]["fp32:nn:m6:n6:k6"].update(config="nope"),
         "unknown config"),
        (lambda t: t["gpus"]["NVIDIA Test"].pop("date"), "date"),
        (lambda t: t["gpus"]["NVIDIA Test"]["entries"].update({"bad": {}}), "malformed"),
    ]:
        broken = json.loads(json.dumps(table))
        mutate(broken)
        with pytest.raises(ValueError, match=words):
            T.validate_table(broken, config_names=set(kinds), config_kinds=kinds)
    bad_file = tmp_path / "bad.json"
    bad_file.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        T.load_table(str(bad_file))


def test_shipped_table_is_valid_and_in_the_package():
    assert os.path.isfile(T.TABLE_FILE), "gemm_tuning.json must ship inside the package"
    table = T.load_table(T.TABLE_FILE)
    if getattr(_C, "cuda_built", False):
        cfgs = _C.cuda.gemm_configs()
        T.validate_table(table, config_names={c["name"] for c in cfgs},
                         config_kinds={c["name"]: c["kind"] for c in cfgs})
    for block in table["gpus"].values():   # every listed GPU says when and from what it was tuned
        assert block["date"] and block["commit"]


def test_table_source_env(monkeypatch):
    monkeypatch.delenv(T.ENV_VAR, raising=False)
    assert T.table_source()[0] == T.TABLE_FILE
    monkeypatch.setenv(T.ENV_VAR, "none")
    assert T.table_source()[0] is None
    monkeypatch.setenv(T.ENV_VAR, "/some/table.json")
    assert T.table_source()[0] == "/some/table.json"


@cuda_built
def test_cpp_table_lookup_rules():
    """The C++ dispatch table (no GPU needed): validation, tf32 only for tf32 calls."""
    C = _C.cuda
    cfgs = C.gemm_configs()
    simt = next(c["name"] for c in cfgs if c["kind"] == "simt")
    tf32 = next(c["name"] for c in cfgs if c["kind"] == "tf32")
    dev = 63   # an ordinal no test machine has: never touches a real device's table
    try:
        C.set_gemm_table(dev, [(0, True, False, 10, 7, 13, simt, 16),
                               (1, False, False, 12, 12, 12, tf32, 1)])
        assert C.gemm_dispatch(dev, 0, True, False, 784, 128, 8192) == (simt, 16)
        assert C.gemm_dispatch(dev, 1, True, False, 784, 128, 8192) == (simt, 16)  # tf32 -> fp32 entry
        assert C.gemm_dispatch(dev, 1, False, False, 4096, 4096, 4096) == (tf32, 1)
        assert C.gemm_dispatch(dev, 0, False, False, 4096, 4096, 4096) is None      # never tf32 for fp32
        assert C.gemm_dispatch(dev, 0, False, True, 784, 128, 8192) is None        # other transposes
        assert C.gemm_workspace_floats(dev, 0, True, False, 784, 128, 8192) == \
            C.gemm_config_workspace_floats(784, 128, 16) == 16 * (784 * 128 + 128)
        assert C.gemm_workspace_floats(dev, 1, False, False, 4096, 4096, 4096) == 0
        with pytest.raises(ValueError, match="cannot use the tf32"):
            C.set_gemm_table(dev, [(0, False, False, 12, 12, 12, tf32, 1)])
        with pytest.raises(ValueError, match="unknown configuration"):
            C.set_gemm_table(dev, [(0, False, False, 12, 12, 12, "nope", 1)])
        with pytest.raises(ValueError, match="splits"):
            C.set_gemm_table(dev, [(0, False, False, 12, 12, 12, simt, 0)])
        with pytest.raises(ValueError, match="bucket"):
            C.set_gemm_table(dev, [(0, False, False, 3, 12, 12, simt, 1)])
        assert len(C.gemm_table(dev)) == 2   # a refused table leaves the old one in place
    finally:
        C.set_gemm_table(dev, [])
    assert C.gemm_table(dev) == [] and C.gemm_dispatch(dev, 0, True, False, 784, 128, 8192) is None


@cuda_built
def test_config_registry():
    cfgs = _C.cuda.gemm_configs()
    assert {c["kind"] for c in cfgs} == {"simt", "tf32"}
    for c in cfgs:
        assert c["threads"] % 32 == 0 and c["smem_bytes"] <= 227 * 1024 and c["min_cc"] >= 80
        assert c["name"].startswith(c["kind"])


def test_tune_gemm_refuses_without_gpu(tmp_path):
    """No usable GPU here: a clear message, exit 2, nothing written."""
    from fastmlp._interop import cuda_status
    if cuda_status()[0]:
        pytest.skip("a GPU is usable here: tune_gemm.py would run")
    out = tmp_path / "tune"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "tune_gemm.py"),
                        "--out", str(out), "--budget-s", "5"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert "needs a usable CUDA GPU" in r.stderr
    assert not out.exists() or not any(out.iterdir())


def test_tune_gemm_shapes_and_candidates():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import tune_gemm
    finally:
        sys.path.pop(0)
    shapes = tune_gemm.tune_shapes()
    assert len([s for s in shapes if s["layer"] in ("784->128", "128->10")]) == 24
    assert {s["op"] for s in shapes} == {"fwd X@W+b", "dX=dY@W^T", "dW=X^T@dY", "A@B"}
    dw = next(s for s in shapes if s["op"] == "dW=X^T@dY" and s["batch"] == 8192 and s["n"] == 128)
    assert (dw["m"], dw["n"], dw["k"], dw["ta"], dw["tb"], dw["colsum"]) == (784, 128, 8192, True, False, True)
    cfgs = [{"name": "simt_64", "kind": "simt", "bm": 64, "bn": 64, "bk": 16},
            {"name": "tf32_128", "kind": "tf32", "bm": 128, "bn": 128, "bk": 16}]
    cands = tune_gemm.candidates(cfgs, dw, sms=132)
    assert ("foundation", 1) in cands and ("simt_64", 1) in cands and ("simt_64", 16) in cands
    assert not any(c == "tf32_128" for c, _ in cands)   # fp32 shapes never try tf32 kernels
    sq = next(s for s in shapes if s["m"] == 4096 and s["precision"] == "tf32")
    assert [c for c, _ in tune_gemm.candidates(cfgs, sq, sms=132)] == ["foundation", "tf32_128"]
