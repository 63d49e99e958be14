"""IDX reading and the dataset loaders: real Fashion-MNIST files, and every broken-file case."""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest

import fastmlp as fm
from fastmlp.datasets import read_idx, search_dirs

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def idx_bytes(arr: np.ndarray, code: int) -> bytes:
    """An IDX file's bytes, written independently of read_idx (struct, big-endian)."""
    big = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(big).tobytes()


@pytest.mark.parametrize("code,dtype", [(0x08, np.uint8), (0x09, np.int8), (0x0B, np.int16),
                                        (0x0C, np.int32), (0x0D, np.float32),
                                        (0x0E, np.float64)])
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trips_every_type(tmp_path, code, dtype, compress):
    rng = np.random.default_rng(code)
    arr = (rng.standard_normal((3, 5, 7)) * 50).astype(dtype)
    data = idx_bytes(arr, code)
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(data) if compress else data)
    got = read_idx(path)
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, arr)


def test_read_idx_rank1_and_empty(tmp_path):
    p = tmp_path / "l.idx"
    p.write_bytes(idx_bytes(np.arange(10, dtype=np.uint8), 0x08))
    np.testing.assert_array_equal(read_idx(p), np.arange(10))
    p.write_bytes(idx_bytes(np.zeros((0, 28, 28), np.uint8), 0x08))
    assert read_idx(p).shape == (0, 28, 28)


GOOD = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), 0x08)


@pytest.mark.parametrize("content,message", [
    (b"", "shorter than the 4-byte magic"),
    (b"\x00\x00", "shorter than the 4-byte magic"),
    (b"\x00\x01\x08\x03" + GOOD[4:], "magic number 00010803"),
    (b"\x00\x00\x07\x03" + GOOD[4:], "magic number 00000703"),
    (b"PK\x03\x04" + GOOD[4:], "not an IDX file"),
    (b"\x00\x00\x08\x00", "rank 0"),
    (GOOD[:10], "truncated IDX header"),
    (GOOD[:-1], "truncated: shape (2, 3, 4) of uint8 needs 40 bytes, the file has 39"),
    (GOOD + b"\x00", "trailing bytes"),
    (gzip.compress(GOOD)[:-12], "corrupt or truncated gzip"),
    (gzip.compress(GOOD)[:15] + b"\xff" * 20, "corrupt or truncated gzip"),
])
def test_read_idx_rejects_bad_files_naming_file_and_problem(tmp_path, content, message):
    path = tmp_path / "bad-images-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


def write_fake_dataset(folder, n_train=6, n_test=4, compress=True, labels_max=9):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    parts = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
             "train-labels-idx1-ubyte": np.linspace(0, labels_max, n_train).astype(np.uint8),
             "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
             "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 10}
    for name, arr in parts.items():
        data = idx_bytes(arr, 0x08)
        if compress:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return parts


@pytest.mark.parametrize("compress", [False, True])
def test_loader_reads_path(tmp_path, compress):
    parts = write_fake_dataset(tmp_path / "d", compress=compress)
    (xt, yt), (xs, ys) = fm.datasets.load_mnist(tmp_path / "d")
    np.testing.assert_array_equal(xt, parts["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(yt, parts["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(xs, parts["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(ys, parts["t10k-labels-idx1-ubyte"])


def test_loader_search_order(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMLP_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    dirs = search_dirs("mnist")
    assert dirs == [tmp_path / "env" / "mnist", tmp_path / "env",
                    tmp_path / "home" / ".cache" / "fastmlp" / "mnist",
                    type(dirs[0])("/usr/share/datasets/mnist")]
    # the cache folder is used when $FASTMLP_DATA has nothing
    write_fake_dataset(tmp_path / "home" / ".cache" / "fastmlp" / "mnist", n_train=3)
    assert len(fm.datasets.load_mnist()[0][0]) == 3
    # $FASTMLP_DATA itself wins over the cache
    write_fake_dataset(tmp_path / "env", n_train=5)
    assert len(fm.datasets.load_mnist()[0][0]) == 5
    # ... and $FASTMLP_DATA/<name> over $FASTMLP_DATA
    write_fake_dataset(tmp_path / "env" / "mnist", n_train=7)
    assert len(fm.datasets.load_mnist()[0][0]) == 7
    # an explicit path is the only place looked at
    with pytest.raises(FileNotFoundError):
        fm.datasets.load_mnist(tmp_path / "empty")


def test_loader_missing_files_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMLP_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError) as info:
        fm.datasets.load_mnist()
    msg = str(info.value)
    assert str(tmp_path / "env" / "mnist") in msg and "/usr/share/datasets/mnist" in msg
    assert "train-images-idx3-ubyte" in msg and "FASTMLP_DATA" in msg
    with pytest.raises(FileNotFoundError) as info:
        fm.datasets.load_fashion_mnist(tmp_path / "nothing")
    assert "apt-get install dataset-fashion-mnist" in str(info.value)


def test_loader_rejects_inconsistent_files(tmp_path):
    folder = tmp_path / "d"
    write_fake_dataset(folder)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(3, np.uint8), 0x08)))
    with pytest.raises(ValueError, match="has 4 images but .* has 3 labels"):
        fm.datasets.load_mnist(folder)
    write_fake_dataset(folder, labels_max=12)
    with pytest.raises(ValueError, match="label 12 is outside"):
        fm.datasets.load_mnist(folder)


def test_fashion_mnist_real_files():
    """The real files from Debian's dataset-fashion-mnist package (CI installs it)."""
    assert os.path.isdir(FASHION_DIR), (
        f"{FASHION_DIR} is missing: apt-get install dataset-fashion-mnist")
    (xt, yt), (xs, ys) = fm.datasets.load_fashion_mnist()
    assert xt.shape == (60000, 28, 28) and xs.shape == (10000, 28, 28)
    assert xt.dtype == np.uint8 and yt.dtype == np.uint8
    # Balanced classes: 6000 / 1000 of each of the 10.
    np.testing.assert_array_equal(np.bincount(yt), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(ys), np.full(10, 1000))
    assert 0 < xt.mean() < 255 and xt.max() == 255
    # The published first training labels (ankle boot, T-shirt, T-shirt, dress, ...).
    np.testing.assert_array_equal(yt[:6], [9, 0, 0, 3, 0, 2])
