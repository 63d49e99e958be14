"""Write the seed files of the fuzzing corpus (tests/fuzz_corpus/{idx,model}/seed-*).

The seeds are small valid files, one per kind the readers accept: an IDX file of every
type code (raw and gzip), a rank-1 and an empty one; a tiny trained model with and
without its optimizer state, one saved before compile, and one of every layer class. The IDX bytes are written
with struct (independently of read_idx). Rerun after a format change:

    python fuzz/make_seeds.py
"""
from __future__ import annotations

import gzip
import struct
import tempfile
from pathlib import Path

import numpy as np

import fastmlp as fm

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "fuzz_corpus"

# type code -> big-endian dtype of the IDX format
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def idx_bytes(arr: np.ndarray, code: int) -> bytes:
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(IDX_TYPES[code]).tobytes()


def idx_seeds() -> dict:
    rng = np.random.default_rng(0)
    seeds = {}
    for code in IDX_TYPES:
        low, high = (0, 256) if code == 0x08 else (-100, 100)  # uint8 or signed data
        arr = rng.integers(low, high, (2, 3, 4))
        data = idx_bytes(arr, code)
        seeds[f"seed-type{code:02x}.idx"] = data
        # mtime=0: the same bytes on every run
        seeds[f"seed-type{code:02x}.idx.gz"] = gzip.compress(data, mtime=0)
    seeds["seed-labels.idx"] = idx_bytes(np.arange(10, dtype=np.uint8), 0x08)
    seeds["seed-empty.idx"] = idx_bytes(np.zeros((0, 28, 28), np.uint8), 0x08)
    return seeds


def model_seeds() -> dict:
    fm.set_seed(0)
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    y = np.arange(8) % 2
    model = fm.Sequential([fm.Dense(3, activation="relu", input_dim=4),
                           fm.Dense(2, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    model.fit(x, y, epochs=1, batch_size=4, verbose=0, device="cpu")
    bare = fm.Sequential([fm.Dense(2, input_dim=3, use_bias=False)])
    # every layer class (format version 3): BatchNormalization's moving statistics,
    # the normalisation and dropout settings for the loader's checks
    layers = fm.Sequential([fm.Dense(3, input_dim=4), fm.BatchNormalization(momentum=0.9),
                            fm.Activation("gelu"), fm.Dropout(0.25, seed=5),
                            fm.LayerNormalization(center=False), fm.Dense(2)])
    layers.compile("sgd", "sparse_categorical_crossentropy")
    layers.fit(x, y, epochs=1, batch_size=4, verbose=0, device="cpu")
    seeds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, m, opt in (("seed-adam.safetensors", model, True),
                             ("seed-no-optimizer.safetensors", model, False),
                             ("seed-uncompiled.safetensors", bare, False),
                             ("seed-layers.safetensors", layers, True)):
            path = Path(tmp) / name
            m.save(path, include_optimizer=opt)
            seeds[name] = path.read_bytes()
    return seeds


def main() -> None:
    for target, seeds in (("idx", idx_seeds()), ("model", model_seeds())):
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (folder / name).write_bytes(data)
        print(f"{folder}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
