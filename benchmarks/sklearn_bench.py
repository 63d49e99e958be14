"""fastmlp.sklearn against scikit-learn: fit time and test score, same hyperparameters.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        python benchmarks/sklearn_bench.py --out benchmarks/results/cpu-amd-epyc-2c

For each configuration both libraries fit ``MLPClassifier`` / ``MLPRegressor`` with the
same parameters (Adam, ``tol=0.0`` and ``n_iter_no_change=max_iter``: no early stop, a
fixed epoch count, so equal work), the same ``random_state`` per repeat (the repeat's
index) and the same float32 inputs (``--dtype``), which both libraries compute in.
First one untimed warm-up fit per library (one epoch: imports, thread pools), then
``--repeats`` timed fits alternating the libraries (sklearn, fastmlp, sklearn, ...).
Reported: median [min, max] fit seconds, sklearn's median / fastmlp's median, the
test score (accuracy, or R^2 for regressors) median [min, max], and ``n_iter_``.

Configurations (X standardized with a StandardScaler fitted on the training rows):

* ``digits`` (load_digits, X/16, 25% test): hidden (128,), batch 32, 60 epochs;
* ``make_classification`` (50 features, 20 informative, 10 classes) and
  ``make_regression`` (50 features, noise 10, y divided by its std), 1k / 10k / 100k
  training rows plus 25% test rows, hidden (100,) and (256, 256), batch "auto"
  (min(200, rows)), 100 / 20 / 5 epochs (each sklearn fit ~0.5-10 s on 2 cores).

scikit-learn runs on NumPy's OpenBLAS. ``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE``
would force an older OpenBLAS kernel on the peer, so the script refuses to run when
either is set. Threads are left at their defaults; the report records them.
``--quick`` is a smoke run (1k rows, 5 epochs, 2 repeats).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

FORCING_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
EPOCHS = {1_000: 100, 10_000: 20, 100_000: 5}  # training rows -> max_iter
HIDDEN = [(100,), (256, 256)]


def datasets(quick, dtype):
    """(name, task, X_train, X_test, y_train, y_test, hidden list, batch, epochs)."""
    import numpy as np
    from sklearn.datasets import load_digits, make_classification, make_regression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    def scaled(xtr, xte):
        sc = StandardScaler().fit(xtr)
        return sc.transform(xtr).astype(dtype), sc.transform(xte).astype(dtype)

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=0.25, random_state=0)
    yield ("digits", "classifier", *scaled(xtr, xte), ytr, yte, [(128,)], 32,
           5 if quick else 60)
    sizes = {1_000: 5} if quick else EPOCHS
    for task in ("classifier", "regressor"):
        for n, epochs in sizes.items():
            m = n + n // 4
            if task == "classifier":
                x, y = make_classification(m, 50, n_informative=20, n_classes=10,
                                           random_state=0)
                name = "make_classification"
            else:
                x, y = make_regression(m, 50, noise=10.0, random_state=0)
                name = "make_regression"
            xtr, xte, ytr, yte = train_test_split(x, y, test_size=n // 4, random_state=0)
            if task == "regressor":
                s = np.std(ytr)
                ytr, yte = ytr / s, yte / s
            yield (name, task, *scaled(xtr, xte), ytr, yte, HIDDEN, "auto", epochs)


def fit_once(cls, params, xtr, ytr, xte, yte):
    est = cls(**params)
    t = time.perf_counter()
    est.fit(xtr, ytr)
    seconds = time.perf_counter() - t
    return seconds, float(est.score(xte, yte)), int(est.n_iter_)


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "all": values}


def run_config(data, hidden, devices, repeats):
    import sklearn.neural_network as sk
    import fastmlp.sklearn as fms

    name, task, xtr, xte, ytr, yte, _, batch, epochs = data
    cls = {"classifier": (sk.MLPClassifier, fms.MLPClassifier),
           "regressor": (sk.MLPRegressor, fms.MLPRegressor)}[task]
    params = dict(hidden_layer_sizes=hidden, batch_size=batch, max_iter=epochs, tol=0.0,
                  n_iter_no_change=epochs, solver="adam", learning_rate_init=1e-3,
                  alpha=1e-4, shuffle=True)
    libs = [("sklearn", cls[0], {})] + [(f"fastmlp-{d}", cls[1], {"device": d})
                                         for d in devices]
    for _, c, extra in libs:  # untimed warm-up: one epoch each
        fit_once(c, {**params, **extra, "max_iter": 1, "n_iter_no_change": 1,
                     "random_state": 0}, xtr, ytr, xte, yte)
    res = {lib: {"seconds": [], "score": [], "n_iter": []} for lib, _, _ in libs}
    for r in range(repeats):  # alternate: sklearn, fastmlp, sklearn, fastmlp, ...
        for lib, c, extra in libs:
            s, score, n_iter = fit_once(c, {**params, **extra, "random_state": r},
                                        xtr, ytr, xte, yte)
            res[lib]["seconds"].append(s)
            res[lib]["score"].append(score)
            res[lib]["n_iter"].append(n_iter)
    rows = []
    sk_res = res["sklearn"]
    for d in devices:
        fm_res = res[f"fastmlp-{d}"]
        sks, fms_ = summary(sk_res["seconds"]), summary(fm_res["seconds"])
        skc, fmc = summary(sk_res["score"]), summary(fm_res["score"])
        rows.append({
            "dataset": name, "task": task, "train_rows": len(xtr), "test_rows": len(xte),
            "features": xtr.shape[1], "hidden": list(hidden),
            "outputs": len(set(ytr)) if task == "classifier" else 1,
            "batch": min(200, len(xtr)) if batch == "auto" else batch, "epochs": epochs,
            "device": d, "sklearn_seconds": sks, "fastmlp_seconds": fms_,
            "ratio": sks["median"] / fms_["median"],
            "sklearn_score": skc, "fastmlp_score": fmc,
            "score_diff": fmc["median"] - skc["median"],
            "sklearn_n_iter": sk_res["n_iter"], "fastmlp_n_iter": fm_res["n_iter"]})
    return rows


def machine_facts(fm, dtype):
    import numpy as np
    import sklearn
    from threadpoolctl import threadpool_info

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    pools = threadpool_info()
    keys = ("user_api", "internal_api", "version", "architecture", "num_threads",
            "threading_layer", "filepath")
    blas = [{k: p.get(k) for k in keys} for p in pools]
    numpy_blas = next((b for b in blas if b["user_api"] == "blas"
                       and "numpy" in (b["filepath"] or "")),
                      next((b for b in blas if b["user_api"] == "blas"), {}))
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "sklearn": sklearn.__version__,
            "fastmlp": fm.__version__, "fastmlp_backends": fm.backends(),
            "fastmlp_threads": fm.get_num_threads(), "numpy_blas": numpy_blas,
            "threadpools": blas, "dtype": dtype, "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


def span(s, fmt):
    return f"{s['median']:{fmt}} [{s['min']:{fmt}}, {s['max']:{fmt}}]"


def report(facts, rows, repeats):
    b = facts["numpy_blas"]
    lines = [
        f"# fastmlp.sklearn vs scikit-learn: fit time and test score ({facts['cpu']}, "
        f"{facts['cpus']} CPUs)", "",
        f"{facts['date']}; `{facts['command']}`", "",
        f"- versions: Python {facts['python']}, NumPy {facts['numpy']}, scikit-learn "
        f"{facts['sklearn']}, fastmlp {facts['fastmlp']}",
        f"- NumPy's BLAS (scikit-learn's): {b.get('internal_api')} {b.get('version')}, "
        f"core {b.get('architecture')}, {b.get('num_threads')} threads "
        f"({b.get('threading_layer')}); `OPENBLAS_CORETYPE` / `OPENBLAS_L2_SIZE` unset",
        f"- fastmlp: {facts['fastmlp_threads']} threads, CPU GEMM "
        f"{facts['fastmlp_backends'].get('cpu_gemm')}, CUDA "
        f"{facts['fastmlp_backends'].get('cuda')}",
        f"- Adam, tol=0, n_iter_no_change=max_iter (fixed epochs), {facts['dtype']} "
        f"standardized inputs, random_state = repeat index; one untimed one-epoch warm-up "
        f"per library, then {repeats} timed fits alternating the libraries; "
        "median [min, max]. Score: test accuracy (classifier) or R^2 (regressor).",
        "- Target: fastmlp >= 5x faster than scikit-learn at equal score.", "",
        "| dataset | task | rows (train/test) | widths | batch | epochs (n_iter_ sk/fm) "
        "| device | sklearn s | fastmlp s | x faster | sklearn score | fastmlp score "
        "| score diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        widths = "-".join(map(str, [r["features"], *r["hidden"], r["outputs"]]))
        iters = "/".join(",".join(map(str, sorted(set(r[k]))))
                         for k in ("sklearn_n_iter", "fastmlp_n_iter"))
        lines.append(
            f"| {r['dataset']} | {r['task']} | {r['train_rows']}/{r['test_rows']} | "
            f"{widths} | {r['batch']} | {r['epochs']} ({iters}) | {r['device']} | "
            f"{span(r['sklearn_seconds'], '.3f')} | {span(r['fastmlp_seconds'], '.3f')} | "
            f"{r['ratio']:.2f}x | {span(r['sklearn_score'], '.4f')} | "
            f"{span(r['fastmlp_score'], '.4f')} | {r['score_diff']:+.4f} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--out", default=None, help="folder for sklearn.md and sklearn.json")
    p.add_argument("--repeats", type=int, default=None, help="5 (2 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 2 repeats")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = p.parse_args()
    forced = [v for v in FORCING_VARS if v in os.environ]
    if forced:
        print(f"error: {', '.join(forced)} set: it forces an older OpenBLAS kernel on "
              "scikit-learn (NumPy's BLAS); the peer must run at its best. Run:\n"
              "    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python "
              "benchmarks/sklearn_bench.py --out DIR", file=sys.stderr)
        sys.exit(2)
    repeats = args.repeats or (2 if args.quick else 5)

    import fastmlp as fm
    from sklearn.exceptions import ConvergenceWarning
    warnings.simplefilter("ignore", ConvergenceWarning)

    devices = ["cpu"] + (["cuda"] if fm.backends().get("cuda") else [])
    rows = []
    for data in datasets(args.quick, args.dtype):
        for hidden in data[6]:
            for r in run_config(data, hidden, devices, repeats):
                rows.append(r)
                print(f"{r['dataset']:20s} {r['train_rows']:7d} {str(r['hidden']):11s} "
                      f"{r['device']:4s} sklearn {span(r['sklearn_seconds'], '.3f')} s  "
                      f"fastmlp {span(r['fastmlp_seconds'], '.3f')} s  {r['ratio']:5.2f}x  "
                      f"score {r['sklearn_score']['median']:.4f} / "
                      f"{r['fastmlp_score']['median']:.4f}", flush=True)
    facts = machine_facts(fm, args.dtype)  # after the fits: every BLAS is loaded
    text = report(facts, rows, repeats)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "sklearn.md").write_text(text)
        Path(args.out, "sklearn.json").write_text(
            json.dumps({"machine": facts, "repeats": repeats, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
