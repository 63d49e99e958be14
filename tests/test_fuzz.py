"""The two file readers against malformed input (design.md, "Errors"): whatever a file
holds, ``fm.datasets.read_idx`` and ``fm.load_model`` return a result or raise ValueError
naming the file -- no other exception, no allocation the file does not justify.

- tests/fuzz_corpus/{idx,model}: the seeds of fuzz/fuzz_readers.py (small valid files,
  written by fuzz/make_seeds.py), which must load, and every input a fuzzing campaign
  found breaking the contract (crash-*, memory-*, hang-*, timeout-*), which must now raise
  ValueError;
- hypothesis properties over arbitrary bytes, byte edits of the seeds and edits of a
  model file's JSON configuration; read_idx is compared with an independent whole-file
  parser;
- the cases the hardening was for, one by one.
"""
from __future__ import annotations

import copy
import gzip
import json
import math
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastmlp as fm

CORPUS = Path(__file__).parent / "fuzz_corpus"
READERS = {"idx": fm.datasets.read_idx, "model": fm.load_model}
FILES = [(target, p) for target in READERS for p in sorted((CORPUS / target).iterdir())]
SEEDS = {target: [p.read_bytes() for _, p in FILES if _ == target and p.name.startswith("seed-")]
         for target in READERS}
PROPERTY = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def read(target: str, path: Path):
    """The reader's result, or None when it raised ValueError naming ``path``; any other
    exception fails the test."""
    try:
        return READERS[target](path)
    except ValueError as e:
        assert str(path) in str(e), f"the message does not name the file: {e}"
        return None
    except Exception as e:  # the contract: nothing but ValueError
        pytest.fail(f"{target} reader raised {type(e).__name__}, not ValueError: {e}")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# --------------------------------------------------------------------------- the corpus


def test_corpus_has_seeds_and_stays_small():
    assert len(SEEDS["idx"]) >= 12 and len(SEEDS["model"]) >= 1
    assert sum(p.stat().st_size for _, p in FILES) < 1 << 20


@pytest.mark.parametrize("target,path", FILES, ids=[f"{t}/{p.name[:20]}" for t, p in FILES])
def test_corpus_file_loads_or_raises_value_error(target, path):
    result = read(target, path)
    if path.name.startswith("seed-"):
        assert result is not None, "a seed is a valid file"
        if target == "model":
            out = result.predict(np.ones((2, result.input_dim), np.float32))
            assert out.shape == (2, result.layers[-1].units) and np.isfinite(out).all()
        else:
            assert result.dtype.isnative and result.ndim >= 1
    else:
        assert result is None, "a campaign's finding is a malformed file: ValueError"


# --------------------------------------------------------------------------- IDX

IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def reference_idx(data: bytes):
    """An independent whole-file IDX parser: the array, or None for a malformed file."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error):
            return None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_TYPES or data[3] == 0:
        return None
    rank = data[3]
    header = 4 + 4 * rank
    if len(data) < header:
        return None
    shape = struct.unpack(f">{rank}I", data[4:header])
    dtype = np.dtype(IDX_TYPES[data[2]])
    if len(data) - header != math.prod(shape) * dtype.itemsize:
        return None
    try:
        return np.frombuffer(data[header:], dtype).reshape(shape)
    except ValueError:  # more dimensions than NumPy holds, ...
        return None


def check_idx(scratch: Path, data: bytes) -> None:
    path = scratch / "input.idx"
    path.write_bytes(data)
    got, want = read("idx", path), reference_idx(data)
    assert (got is None) == (want is None)
    if got is not None:
        assert got.dtype == want.dtype.newbyteorder("=") and got.dtype.isnative
        np.testing.assert_array_equal(got, want)


# byte edits: (position as a fraction of the length, what, value)
EDITS = st.lists(st.tuples(st.floats(0, 1), st.sampled_from(["set", "insert", "delete", "cut"]),
                           st.integers(0, 255)), min_size=1, max_size=4)


def apply_edits(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for where, op, value in edits:
        i = min(int(where * len(out)), max(len(out) - 1, 0))
        if op == "set" and out:
            out[i] = value
        elif op == "insert":
            out[i:i] = bytes([value])
        elif op == "delete" and out:
            del out[i]
        elif op == "cut":
            del out[i:]
    return bytes(out)


@PROPERTY
@given(data=st.binary(max_size=300))
def test_read_idx_any_bytes(scratch, data):
    check_idx(scratch, data)


@PROPERTY
@given(seed=st.sampled_from(SEEDS["idx"]), edits=EDITS, header=st.booleans())
def test_read_idx_edited_seeds(scratch, seed, edits, header):
    """Byte edits of valid files, in the raw bytes or (``header``) in the IDX bytes under
    the gzip layer, recompressed."""
    if header and seed[:2] == b"\x1f\x8b":
        data = gzip.compress(apply_edits(gzip.decompress(seed), edits), mtime=0)
    else:
        data = apply_edits(seed, edits)
    check_idx(scratch, data)


def idx_file(scratch, code: int, shape, data: bytes = b"", compress=False) -> Path:
    raw = struct.pack(">BBBB", 0, 0, code, len(shape)) + struct.pack(f">{len(shape)}I", *shape)
    path = scratch / "case.idx"
    path.write_bytes(gzip.compress(raw + data) if compress else raw + data)
    return path


def test_read_idx_sizes_are_python_ints(scratch):
    """Sizes whose product overflows int64 (np.prod wrapped around): the exact count."""
    big = 2**32 - 1
    path = idx_file(scratch, 0x0E, (big, big, big), b"\0" * 8)
    with pytest.raises(ValueError, match=f"IDX data truncated: .* needs {16 + 8 * big**3} bytes"):
        fm.datasets.read_idx(path)
    path = idx_file(scratch, 0x08, (big,) * 255)
    with pytest.raises(ValueError, match=f"needs {4 + 4 * 255 + big**255} bytes, the file has "
                                         f"{4 + 4 * 255}"):
        fm.datasets.read_idx(path)


@pytest.mark.parametrize("shape", [(0, 2**32 - 1, 2**32 - 1), (0,) * 65, (0,) + (2**32 - 1,) * 254])
def test_read_idx_empty_arrays_numpy_cannot_shape(scratch, shape):
    """No data is needed, but NumPy refuses the shape: ValueError naming the file."""
    path = idx_file(scratch, 0x08, shape)
    with pytest.raises(ValueError, match="is not one NumPy can hold") as info:
        fm.datasets.read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_reads_no_more_than_the_header_claims(scratch):
    """A gzip bomb (64 MiB of zeros in 64 KiB) under a header claiming 10 bytes, and a
    header claiming 2^60 bytes over a few: read_idx's memory follows the claim and the
    data, not the other."""
    bomb = idx_file(scratch, 0x08, (10,), b"\0" * (64 << 20), compress=True)
    assert bomb.stat().st_size < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="trailing bytes: shape \\(10,\\) of uint8 needs 18 "
                                             "bytes, the decompressed file has more"):
            fm.datasets.read_idx(bomb)
        peak_bomb = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        for compress in (False, True):
            claim = idx_file(scratch, 0x08, (2**30, 2**30), b"\0" * 100, compress=compress)
            with pytest.raises(ValueError, match="IDX data truncated"):
                fm.datasets.read_idx(claim)
        peak_claim = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak_bomb < 4 << 20 and peak_claim < 4 << 20


# --------------------------------------------------------------------------- model files


def seed_model():
    """(metadata dict, tensors) of the seed model with its Adam state."""
    from safetensors import safe_open

    with safe_open(str(CORPUS / "model" / "seed-adam.safetensors"), framework="numpy") as f:
        return json.loads(f.metadata()["fastmlp"]), {k: f.get_tensor(k) for k in f.keys()}


def write_model(path: Path, meta, tensors: dict) -> Path:
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"fastmlp": json.dumps(meta)})
    return path


def json_paths(value, path=()):
    """Every path to an entry of a JSON value."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    for k, v in items:
        yield path + (k,)
        yield from json_paths(v, path + (k,))


META, TENSORS = seed_model()
META_PATHS = list(json_paths(META))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


def check_model(path: Path) -> None:
    model = read("model", path)
    if model is not None:  # what loads holds the file's weights, as float32
        from safetensors import safe_open

        names = [f"layers.{i}.{name}" for i, layer in enumerate(model.layers)
                 for name in layer.weight_names()]
        weights = model.get_weights()
        assert len(names) == len(weights)
        with safe_open(str(path), framework="numpy") as f:
            for name, w in zip(names, weights):
                assert w.dtype == np.float32
                np.testing.assert_array_equal(w, f.get_tensor(name))


@PROPERTY
@given(data=st.binary(max_size=300))
def test_load_model_any_bytes(scratch, data):
    path = scratch / "any.safetensors"
    path.write_bytes(data)
    check_model(path)


@PROPERTY
@given(seed=st.sampled_from(SEEDS["model"]), edits=EDITS)
def test_load_model_edited_seeds(scratch, seed, edits):
    path = scratch / "edited.safetensors"
    path.write_bytes(apply_edits(seed, edits))
    check_model(path)


@PROPERTY
@given(where=st.sampled_from(META_PATHS), value=JSON, delete=st.booleans())
def test_load_model_edited_configuration(scratch, where, value, delete):
    """Any entry of the JSON configuration replaced by any JSON value, or deleted."""
    meta = copy.deepcopy(META)
    parent = meta
    for key in where[:-1]:
        parent = parent[key]
    if delete:
        del parent[where[-1]]
    else:
        parent[where[-1]] = value
    check_model(write_model(scratch / "config.safetensors", meta, TENSORS))


def edited(where: str, value):
    meta = copy.deepcopy(META)
    *keys, last = where.split(".")
    parent = meta
    for key in keys:
        parent = parent[int(key) if key.isdigit() else key]
    parent[int(last) if last.isdigit() else last] = value
    return meta


@pytest.mark.parametrize("where,value,message", [
    ("format_version", "2", "format version '2' is not an integer"),
    ("format", ["x"] * 3, "format a JSON list, expected"),
    ("model", [], "has no list of layers"),
    ("model.layers", {}, "has no list of layers"),
    ("model.name", {"a": 1}, "the model's name is a JSON object"),
    ("model.layers.0", "Dense", "layer 0: the configuration is 'Dense', not an object"),
    ("model.layers.0.units", 3.0, "layer 0: 'units' must be a positive integer, got 3.0"),
    ("model.layers.0.units", -3, "'units' must be a positive integer, got -3"),
    ("model.layers.0.input_dim", True, "'input_dim' must be a positive integer, got True"),
    ("model.layers.0.input_dim", None, "layer 0: no 'input_dim'"),
    ("model.layers.1.input_dim", 4, "layer 1: 'input_dim' is 4 but the previous layer has 3"),
    ("model.layers.0.use_bias", "yes", "'use_bias' must be true or false, got 'yes'"),
    ("model.layers.1.activation", [1], "layer 1: 'activation' must be a string"),
    ("model.layers.0.activation", "softmax", "only supported on the last layer"),
    ("compile", 7, "bad compile settings"),
    ("compile.optimizer", ["adam"], "bad compile settings"),
    ("compile.optimizer", "adagrad", "unknown optimizer class 'adagrad'"),
    ("compile.optimizer_config.lr", 10**400, "bad compile settings"),  # float() overflows
    ("compile.optimizer_config.lr", float("nan"), "'lr' must be >= 0, got nan"),
    ("compile.optimizer_config.betas", [0.9, "x"], "bad compile settings"),
    ("compile.optimizer_config.momentum", 0.9, "unexpected keyword argument 'momentum'"),
    ("compile.loss", None, "expected a loss name"),
    ("compile.metrics", "accuracy", "a list of metrics"),
    ("optimizer_iterations", -1, "bad optimizer step count -1"),
    ("optimizer_iterations", None, "bad optimizer step count None"),
    ("optimizer_iterations", 2**64, "bad optimizer step count"),
    ("shuffle", [1, 2], "bad shuffling state"),
    ("shuffle.seed", 1.5, "bad shuffling state"),
    ("shuffle.count", float("inf"), "bad shuffling state"),
])
def test_load_model_refuses_bad_settings(tmp_path, where, value, message):
    path = write_model(tmp_path / "m.safetensors", edited(where, value), TENSORS)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")) as info:
        fm.load_model(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("meta", [[1, 2], 3, "x", None])
def test_load_model_metadata_not_an_object(tmp_path, meta):
    path = write_model(tmp_path / "m.safetensors", meta, TENSORS)
    with pytest.raises(ValueError, match="corrupt fastmlp metadata .*not an object"):
        fm.load_model(path)


def test_load_model_deep_json_and_huge_numbers(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "m.safetensors"
    for raw in ("[" * 100_000 + "]" * 100_000, "1" * 5000):  # RecursionError, int digits
        save_file(TENSORS, str(path), metadata={"fastmlp": raw})
        with pytest.raises(ValueError, match="corrupt fastmlp metadata"):
            fm.load_model(path)


def test_load_model_checks_sizes_before_building(tmp_path):
    """A configuration claiming 10^12 units is refused from the tensors' shapes, before
    Sequential draws any weights (4 x 10^12 floats)."""
    meta = edited("model.layers.0.units", 10**12)
    meta["model"]["layers"][1]["input_dim"] = 10**12
    path = write_model(tmp_path / "m.safetensors", meta, TENSORS)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"weight 0 must have shape \(4, 1000000000000\), "
                                             r"got \(4, 3\)"):
            fm.load_model(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize("key,dtype", [("layers.0.kernel", np.float64),
                                       ("layers.1.bias", np.float16),
                                       ("optimizer.0.exp_avg", np.int32),
                                       ("optimizer.3.exp_avg_sq", np.float64)])
def test_load_model_tensors_must_be_float32(tmp_path, key, dtype):
    """set_weights and load_state_arrays would cast other types silently."""
    tensors = dict(TENSORS, **{key: TENSORS[key].astype(dtype)})
    path = write_model(tmp_path / "m.safetensors", META, tensors)
    with pytest.raises(ValueError, match=f"tensor '{key}' is {np.dtype(dtype).name}; fastmlp "
                                         "writes float32"):
        fm.load_model(path)


@pytest.mark.parametrize("dtype", ["BF16", "F8_E4M3"])
def test_load_model_tensor_types_numpy_lacks(tmp_path, dtype):
    """safetensors' NumPy loader raises TypeError / AttributeError on these."""
    header = json.dumps({"__metadata__": {"fastmlp": json.dumps(META)},
                         "layers.0.kernel": {"dtype": dtype, "shape": [2],
                                             "data_offsets": [0, 2 if dtype == "F8_E4M3" else 4]}})
    path = tmp_path / "m.safetensors"
    body = b"\0" * (2 if dtype == "F8_E4M3" else 4)
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + body)
    with pytest.raises(ValueError, match="tensor 'layers.0.kernel' has a type NumPy cannot hold"):
        fm.load_model(path)


def test_load_model_huge_header_length(tmp_path):
    path = tmp_path / "m.safetensors"
    for length in (2**63, 2**64 - 1, 10**9):
        path.write_bytes(struct.pack("<Q", length) + b"{}")
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            fm.load_model(path)


def test_load_model_nan_weights_are_data(tmp_path):
    tensors = dict(TENSORS)
    tensors["layers.0.kernel"] = np.full_like(TENSORS["layers.0.kernel"], np.nan)
    model = fm.load_model(write_model(tmp_path / "m.safetensors", META, tensors))
    assert np.isnan(model.get_weights()[0]).all()
    np.testing.assert_array_equal(model.get_weights()[1], TENSORS["layers.0.bias"])
