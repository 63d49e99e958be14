"""The CUDA GEMM tuning table: which kernel of the tuned family runs each shape class.

fastmlp's CUDA GEMM (``gemm_ex``, behind ``fm.ops.gemm`` and the Dense ops) has
two paths: the foundation kernel (``gemm_tiled_f32`` + an epilogue pass), the
default, and a family of tuned kernels (``csrc/cuda/gemm_family*``: SIMT FP32
configurations, TF32 tensor-core ones, split-K). A family kernel runs only
where the *tuning table* names it for the current GPU and the call's shape
class, and the table only lists kernels that ``benchmarks/tune_gemm.py``
checked against a float64 reference *on that GPU* and found faster than the
foundation. A GPU without an entry (or a shape class without one) runs the
foundation kernel.

The table ships in the wheel as ``fastmlp/gemm_tuning.json``; it is matched by
the GPU's name (``cudaDeviceProp.name``, e.g. ``"NVIDIA H200"``). The
environment variable ``FASTMLP_GEMM_TABLE`` overrides it: a path to another
table file, or ``none`` to switch the family off (foundation kernel only).
It is read once per process and device, at the first CUDA GEMM.

Precision: an fp32 call uses only fp32 entries (SIMT kernels, exact float32
FMAs). A tf32 call (``fm.set_matmul_precision("tf32")`` or ``precision=``)
uses the tf32 class's entry when the table has one, else the fp32 entry, else
the foundation: TF32 needs both the user's opt-in and a GPU-verified kernel.

Shape classes: ``"<fp32|tf32>:<nn|nt|tn|tt>:m<b>:n<b>:k<b>"`` where the
letters give trans_a/trans_b and ``b = clamp(ceil(log2(size)), 4, 14)``
(``size_bucket``; the C++ dispatcher computes the same).

The pure functions here (classes, table validation, building a table from
measurements) need no GPU and are unit-tested on the CPU.
"""
from __future__ import annotations

import json
import math
import os
import warnings

SCHEMA = 1
TABLE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gemm_tuning.json")
ENV_VAR = "FASTMLP_GEMM_TABLE"
PRECISIONS = {"fp32": 0, "tf32": 1}
TRANS = {(False, False): "nn", (False, True): "nt", (True, False): "tn", (True, True): "tt"}
FOUNDATION = "foundation"   # the default kernel's name in measurements
MIN_BUCKET, MAX_BUCKET = 4, 14
MAX_SPLITS = 64


# ---- shape classes -------------------------------------------------------------------
def size_bucket(x: int) -> int:
    """clamp(ceil(log2(x)), 4, 14): <= 16 -> 4, 17..32 -> 5, ..., > 8192 -> 14."""
    x = int(x)
    b = 0
    while b < MAX_BUCKET and (1 << b) < x:
        b += 1
    return max(b, MIN_BUCKET)


def shape_class(precision: str, trans_a: bool, trans_b: bool, m: int, n: int, k: int) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return (f"{precision}:{TRANS[(bool(trans_a), bool(trans_b))]}:"
            f"m{size_bucket(m)}:n{size_bucket(n)}:k{size_bucket(k)}")


def parse_class(key: str) -> tuple:
    """"fp32:tn:m10:n7:k13" -> (0, True, False, 10, 7, 13); ValueError if malformed."""
    parts = key.split(":") if isinstance(key, str) else []
    ok = len(parts) == 5 and parts[0] in PRECISIONS and parts[1] in TRANS.values()
    buckets = []
    if ok:
        for part, letter in zip(parts[2:], "mnk"):
            if not (part[:1] == letter and part[1:].isdigit()):
                ok = False
                break
            b = int(part[1:])
            if not MIN_BUCKET <= b <= MAX_BUCKET:
                ok = False
                break
            buckets.append(b)
    if not ok:
        raise ValueError(f"malformed shape class {key!r}: expected "
                         f"'<fp32|tf32>:<nn|nt|tn|tt>:m<b>:n<b>:k<b>' with b in "
                         f"[{MIN_BUCKET}, {MAX_BUCKET}]")
    ta, tb = parts[1][0] == "t", parts[1][1] == "t"
    return (PRECISIONS[parts[0]], ta, tb, *buckets)


# ---- the table file ---------------------------------------------------------------------
def empty_table() -> dict:
    return {"schema": SCHEMA,
            "about": ("fastmlp CUDA GEMM tuning table: per GPU name, the GPU-verified kernel of "
                      "the tuned family for each shape class (see fastmlp/_gemm_tuning.py). "
                      "Written by benchmarks/tune_gemm.py; no entry = the foundation kernel."),
            "gpus": {}}


def validate_table(table, config_names=None, config_kinds=None, where="tuning table") -> dict:
    """The table if it is well formed, else ValueError naming what is wrong.

    config_names: the known kernel names (from _C.cuda.gemm_configs()); config_kinds:
    name -> "simt"/"tf32", to refuse a tf32 kernel in an fp32 class.
    """
    def bad(msg):
        raise ValueError(f"{where}: {msg}")

    if not isinstance(table, dict):
        bad(f"expected a JSON object, got {type(table).__name__}")
    if table.get("schema") != SCHEMA:
        bad(f"schema must be {SCHEMA}, got {table.get('schema')!r}")
    gpus = table.get("gpus")
    if not isinstance(gpus, dict):
        bad("'gpus' must be an object mapping GPU names to their entries")
    for gpu, block in gpus.items():
        if not isinstance(block, dict) or not isinstance(block.get("entries"), dict):
            bad(f"GPU {gpu!r}: needs an 'entries' object")
        for field in ("date", "commit"):
            if not isinstance(block.get(field), str) or not block.get(field):
                bad(f"GPU {gpu!r}: needs '{field}' (when and from which commit it was tuned)")
        for key, e in block["entries"].items():
            prec = parse_class(key)[0]
            if not isinstance(e, dict) or not isinstance(e.get("config"), str):
                bad(f"GPU {gpu!r} class {key!r}: needs a 'config' name")
            if e["config"] == FOUNDATION:
                bad(f"GPU {gpu!r} class {key!r}: the foundation kernel needs no entry")
            if config_names is not None and e["config"] not in config_names:
                bad(f"GPU {gpu!r} class {key!r}: unknown config {e['config']!r}")
            if config_kinds is not None and prec == 0 and config_kinds.get(e["config"]) == "tf32":
                bad(f"GPU {gpu!r} class {key!r}: an fp32 class cannot use the tf32 config "
                    f"{e['config']!r}")
            splits = e.get("splits", 1)
            if not isinstance(splits, int) or not 1 <= splits <= MAX_SPLITS:
                bad(f"GPU {gpu!r} class {key!r}: splits must be an integer in [1, {MAX_SPLITS}], "
                    f"got {splits!r}")
            if e.get("verified") is not True:
                bad(f"GPU {gpu!r} class {key!r}: only kernels verified on the GPU may be "
                    f"listed ('verified': true)")
    return table


def load_table(path: str) -> dict:
    try:
        with open(path) as fh:
            table = json.load(fh)
    except OSError as e:
        raise ValueError(f"tuning table {path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"tuning table {path}: not valid JSON ({e})") from None
    return validate_table(table, where=f"tuning table {path}")


def gpu_entries(table: dict, gpu_name: str) -> list:
    """The set_gemm_table tuples of one GPU: (precision, ta, tb, mb, nb, kb, config, splits)."""
    block = table.get("gpus", {}).get(gpu_name)
    if not block:
        return []
    out = []
    for key, e in sorted(block["entries"].items()):
        prec, ta, tb, mb, nb, kb = parse_class(key)
        out.append((prec, ta, tb, mb, nb, kb, e["config"], int(e.get("splits", 1))))
    return out


def merge(table: dict, gpu_name: str, block: dict) -> dict:
    """A copy of table with gpu_name's block replaced."""
    out = json.loads(json.dumps(table))
    out.setdefault("gpus", {})[gpu_name] = block
    return out


# ---- building a GPU's block from measurements -----------------------------------------------
def _geomean(xs):
    xs = list(xs)
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def build_gpu_block(measurements: list, *, gpu: str, date: str, commit: str,
                    extra: dict | None = None) -> dict:
    """The table block of one GPU from tune_gemm.py's measurements.

    Each measurement: {"precision", "trans_a", "trans_b", "m", "n", "k", "config"
    (a family name or "foundation"), "splits", "passed" (checked against the
    reference on the GPU), "median_s" (None if not timed), "cublas_s" (cuBLAS in
    the same precision, same process; may be None)}.

    Per shape class, a candidate (config, splits) is eligible only if it passed
    on every shape of the class that was measured and was timed on each of them.
    The winner is the eligible candidate with the smallest geometric mean of
    time / foundation time (time / cuBLAS time where the foundation was not
    timed). It gets an entry only if it beats the foundation; otherwise the class
    stays on the foundation (listed under "kept_foundation").
    """
    by_class: dict = {}
    for r in measurements:
        key = shape_class(r["precision"], r["trans_a"], r["trans_b"], r["m"], r["n"], r["k"])
        by_class.setdefault(key, []).append(r)

    entries, kept, rejected = {}, {}, {}
    for key in sorted(by_class):
        rows = by_class[key]
        shapes = sorted({(r["m"], r["n"], r["k"], r["trans_a"], r["trans_b"]) for r in rows})
        base = {}
        for r in rows:
            if r["config"] == FOUNDATION and r.get("passed") and r.get("median_s"):
                base[(r["m"], r["n"], r["k"], r["trans_a"], r["trans_b"])] = r["median_s"]
        cands: dict = {}
        for r in rows:
            cands.setdefault((r["config"], int(r.get("splits", 1))), {})[
                (r["m"], r["n"], r["k"], r["trans_a"], r["trans_b"])] = r
        scored = []
        for (config, splits), per_shape in cands.items():
            if set(per_shape) != set(shapes):
                rejected[f"{key} {config}/{splits}"] = "not measured on every shape of the class"
                continue
            failed = [s for s, r in per_shape.items() if not r.get("passed")]
            if failed:
                rejected[f"{key} {config}/{splits}"] = f"failed the check on {len(failed)} shape(s)"
                continue
            if any(not r.get("median_s") for r in per_shape.values()):
                rejected[f"{key} {config}/{splits}"] = "not timed"
                continue
            ratios = []
            for s, r in per_shape.items():
                ref = base.get(s) or r.get("cublas_s") or 1.0
                ratios.append(r["median_s"] / ref)
            scored.append((_geomean(ratios), config, splits, per_shape))
        if not scored:
            kept[key] = "no candidate passed"
            continue
        scored.sort(key=lambda t: (t[0], t[1], t[2]))
        score, config, splits, per_shape = scored[0]
        if config == FOUNDATION or (len(base) == len(shapes) and score >= 1.0):
            kept[key] = "the foundation kernel was fastest"
            continue
        cublas = [r.get("cublas_s") for r in per_shape.values()]
        ratio = _geomean(c / r["median_s"] for c, r in zip(cublas, per_shape.values())) \
            if all(cublas) else None
        entries[key] = {
            "config": config, "splits": splits, "verified": True,
            "ratio_vs_cublas": None if ratio is None else round(ratio, 4),
            "speedup_vs_foundation": round(1.0 / score, 4) if len(base) == len(shapes) else None,
            "shapes": [list(s[:3]) for s in sorted(per_shape)],
            "median_us": [round(per_shape[s]["median_s"] * 1e6, 3) for s in sorted(per_shape)],
            "cublas_us": [None if not per_shape[s].get("cublas_s") else
                          round(per_shape[s]["cublas_s"] * 1e6, 3) for s in sorted(per_shape)],
            "max_rel_err": max(float(per_shape[s].get("rel_err") or 0.0) for s in per_shape),
        }
    block = {"gpu": gpu, "date": date, "commit": commit, "tool": "benchmarks/tune_gemm.py",
             "entries": entries, "kept_foundation": kept, "rejected": rejected}
    if extra:
        block.update(extra)
    return block


# ---- run time: hand the table to the C++ dispatcher once per device -------------------------
_loaded: dict = {}        # device ordinal -> list of entries given to C++
_source: dict = {}        # device ordinal -> (where the table came from, GPU name)
_ws_cache: dict = {}      # (device, prec, ta, tb, m, n, k) -> workspace floats
_warned = set()


def table_source():
    """(path or None, why): where the table comes from in this process."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env.lower() in ("none", "off", "0", "false"):
        return None, f"{ENV_VAR}={env}: the tuned family is off (foundation kernel only)"
    if env:
        return env, f"{ENV_VAR}={env}"
    return TABLE_FILE, "the table shipped with fastmlp"


def _cuda():
    from . import _C
    return _C.cuda


def set_table(device: int, entries: list) -> None:
    """Replace one device's dispatch table (tuples as gpu_entries returns); [] clears it."""
    _cuda().set_gemm_table(int(device), list(entries))
    _loaded[int(device)] = list(entries)
    _ws_cache.clear()


def ensure_loaded(device: int) -> None:
    """Load the table for this device once (the first CUDA GEMM on it)."""
    if device in _loaded:
        return
    path, why = table_source()
    entries, name = [], None
    if path is not None:
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(device)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        try:
            entries = gpu_entries(load_table(path), name)
        except ValueError as e:
            if path != TABLE_FILE:
                raise   # the user pointed at this file: say what is wrong with it
            if path not in _warned:
                _warned.add(path)
                warnings.warn(f"fastmlp: {e}; using the foundation GEMM kernel", RuntimeWarning)
    set_table(device, entries)
    _source[device] = (why, name)


def workspace(ctx, prec: int, trans_a, trans_b, m, n, k):
    """The split-K scratch for this CUDA call (a CuPy array from its pool), or None."""
    device = ctx.id
    if device not in _loaded:
        ensure_loaded(device)
    if not _loaded[device]:
        return None
    key = (device, prec, bool(trans_a), bool(trans_b), m, n, k)
    floats = _ws_cache.get(key)
    if floats is None:
        floats = _cuda().gemm_workspace_floats(device, prec, bool(trans_a), bool(trans_b), m, n, k)
        _ws_cache[key] = floats
    if not floats:
        return None
    import cupy
    return cupy.empty((floats,), dtype=cupy.float32)


def status() -> dict:
    """What the dispatcher uses per device (for reports and bug reports)."""
    return {dev: {"source": _source.get(dev, ("set directly", None))[0],
                  "gpu": _source.get(dev, (None, None))[1], "entries": len(entries)}
            for dev, entries in _loaded.items()}
