"""MNIST-format datasets: the IDX file reader and the MNIST / Fashion-MNIST loaders.

Nothing is downloaded. The loaders look for the four standard files
(``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each raw or ``.gz``) in, in order:

1. the ``path`` argument (and only there, when it is given);
2. ``$FASTMLP_DATA/<name>``, then ``$FASTMLP_DATA`` itself;
3. ``~/.cache/fastmlp/<name>``;
4. ``/usr/share/datasets/<name>`` (where Debian's ``dataset-fashion-mnist`` package
   installs Fashion-MNIST: ``apt-get install dataset-fashion-mnist``).

``<name>`` is ``fashion-mnist`` or ``mnist``.
"""
from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

__all__ = ["read_idx", "load_fashion_mnist", "load_mnist", "search_dirs"]

# IDX type codes (third byte of the magic number) -> big-endian dtype.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

_HOW_TO_GET = {
    "fashion-mnist": "install Debian's package: apt-get install dataset-fashion-mnist "
                     "(puts the files in /usr/share/datasets/fashion-mnist), or copy the four "
                     "files from https://github.com/zalandoresearch/fashion-mnist into one of "
                     "these folders",
    "mnist": "copy the four MNIST files (train-images-idx3-ubyte.gz, ...) into one of these "
             "folders, or point $FASTMLP_DATA or path= at the folder that holds them",
}


# Bytes per read: the memory a read takes follows what the file holds, never what its
# header claims (a header may claim 2^60 elements; a small gzip file may inflate ~1000x).
_CHUNK = 1 << 20


def _read_at_most(f, n: int) -> bytearray:
    """Up to ``n`` bytes from ``f`` (fewer only where the stream ends), read in chunks."""
    buf = bytearray()
    while len(buf) < n:
        part = f.read(min(_CHUNK, n - len(buf)))
        if not part:
            break
        buf += part
    return buf


def _parse_header(path: Path, f, what: str):
    """(shape, file dtype, header bytes) of the IDX header at the start of stream ``f``
    (``what`` names the stream in messages)."""
    head = _read_at_most(f, 4)
    if len(head) < 4:
        raise ValueError(f"{path}: not an IDX file: {len(head)} bytes, shorter than the "
                         "4-byte magic number")
    zero, code, rank = int.from_bytes(head[0:2], "big"), head[2], head[3]
    if zero != 0 or code not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file: magic number {head.hex()} (expected "
                         "00 00, a type code in 08 09 0b 0c 0d 0e, then the rank)")
    if rank == 0:
        raise ValueError(f"{path}: IDX rank 0 (no dimensions)")
    header = 4 + 4 * rank
    sizes = _read_at_most(f, 4 * rank)
    if len(sizes) < 4 * rank:
        raise ValueError(f"{path}: truncated IDX header: rank {rank} needs {header} bytes, "
                         f"{what} has {4 + len(sizes)}")
    shape = tuple(int.from_bytes(sizes[4 * i: 4 * i + 4], "big") for i in range(rank))
    return shape, _IDX_DTYPES[code], header


def _parse_idx(path: Path, f, what: str) -> np.ndarray:
    """The IDX array in stream ``f`` (``what`` names it in messages): the header, then
    at most one byte more than the header's sizes claim."""
    shape, dtype, header = _parse_header(path, f, what)
    # Python ints: 255 sizes of up to 2^32 - 1 would overflow int64 (np.prod).
    nbytes = math.prod(shape) * dtype.itemsize
    data = _read_at_most(f, nbytes + 1)  # one byte beyond the claim reveals trailing data
    if len(data) != nbytes:
        what_data = "truncated" if len(data) < nbytes else "has trailing bytes"
        has = header + len(data) if len(data) < nbytes else "more"
        raise ValueError(f"{path}: IDX data {what_data}: shape {shape} of {dtype.name} needs "
                         f"{header + nbytes} bytes, {what} has {has}")
    try:
        arr = np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError as e:
        # The data matched the sizes, so the array is small; NumPy still refuses more
        # dimensions than it supports (32 or 64), or a 0 among sizes whose product overflows.
        raise ValueError(f"{path}: IDX shape {shape} is not one NumPy can hold ({e})") from None
    # The bytearray is ours: a one-byte type keeps it (no second copy); wider types are
    # swapped into a new array of the native byte order.
    return arr.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path, mmap: bool = False) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a NumPy array.

    The magic number, the rank, the sizes and the data length are checked; a
    file that does not match raises ValueError naming the file and the problem.
    The result has the native byte order and the file's element type (uint8 for
    the MNIST files). It reads at most one byte more than the header's sizes claim,
    so a gzip bomb stops early.

    ``mmap=True`` maps an uncompressed file instead of reading it: the result is a
    read-only ``np.memmap`` (mode "r") over the file's data, after the same header
    checks (the file's size must be the header's plus the data's bytes). Pages are
    read when touched, so ``fit`` / ``evaluate`` / ``predict`` can train on data
    larger than memory. The wider types keep the file's big-endian byte order
    (dtype ``'>i2'``, ``'>i4'``, ``'>f4'``, ``'>f8'``; values are the same, NumPy
    swaps on access); uint8 and int8 have none. (No data, a 0 among the sizes: a
    read-only empty ndarray, as mmap cannot map 0 bytes.) A gzip file cannot be mapped:
    ValueError (decompress it first, e.g. ``gunzip -k file.gz``).
    """
    path = Path(path)
    with open(path, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"  # the gzip magic number, whatever the file is called
        raw.seek(0)
        if mmap:
            if gz:
                raise ValueError(f"{path}: a gzip-compressed IDX file cannot be memory-mapped; "
                                 f"decompress it first (e.g. gunzip -k {path.name}) and map "
                                 "the raw file")
            return _map_idx(path, raw)
        if not gz:
            return _parse_idx(path, raw, "the file")
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                return _parse_idx(path, f, "the decompressed file")
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from None


def _map_idx(path: Path, raw) -> np.ndarray:
    """The raw IDX file open as ``raw`` as a read-only np.memmap, after the header
    checks of :func:`_parse_idx` (the data's length from the file's size: nothing of
    the data is read here)."""
    size = os.fstat(raw.fileno()).st_size
    shape, dtype, header = _parse_header(path, raw, "the file")
    nbytes = math.prod(shape) * dtype.itemsize
    if size != header + nbytes:
        what_data = "truncated" if size < header + nbytes else "has trailing bytes"
        raise ValueError(f"{path}: IDX data {what_data}: shape {shape} of {dtype.name} needs "
                         f"{header + nbytes} bytes, the file has {size}")
    if nbytes == 0:  # mmap cannot map zero bytes: an empty, read-only array instead
        arr = np.zeros(shape, dtype)
        arr.flags.writeable = False
        return arr
    try:
        return np.memmap(path, dtype=dtype, mode="r", offset=header, shape=shape)
    except ValueError as e:
        raise ValueError(f"{path}: IDX shape {shape} is not one NumPy can hold ({e})") from None


def search_dirs(name: str, path=None) -> list[Path]:
    """The folders the loader for dataset ``name`` looks in, in order."""
    if path is not None:
        return [Path(path).expanduser()]
    dirs = []
    env = os.environ.get("FASTMLP_DATA")
    if env:
        dirs += [Path(env).expanduser() / name, Path(env).expanduser()]
    dirs += [Path.home() / ".cache" / "fastmlp" / name, Path("/usr/share/datasets") / name]
    return dirs


def _find(folder: Path, stem: str):
    for candidate in (folder / (stem + ".gz"), folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _load(name: str, path, classes: int = 10):
    dirs = search_dirs(name, path)
    for folder in dirs:
        files = {key: _find(folder, stem) for key, stem in _FILES.items()}
        if all(files.values()):
            break
    else:
        looked = "\n  ".join(str(d) for d in dirs)
        raise FileNotFoundError(
            f"{name}: the four files ({', '.join(_FILES.values())}, raw or .gz) are not in "
            f"any of:\n  {looked}\nTo get them: {_HOW_TO_GET[name]}.")
    arrays = {key: read_idx(f) for key, f in files.items()}
    for split in ("train", "test"):
        x, y = arrays["x_" + split], arrays["y_" + split]
        if x.ndim != 3 or x.dtype != np.uint8:
            raise ValueError(f"{files['x_' + split]}: expected uint8 images of rank 3, got "
                             f"{x.dtype} of shape {x.shape}")
        if y.ndim != 1 or y.dtype != np.uint8:
            raise ValueError(f"{files['y_' + split]}: expected uint8 labels of rank 1, got "
                             f"{y.dtype} of shape {y.shape}")
        if len(x) != len(y):
            raise ValueError(f"{files['x_' + split]} has {len(x)} images but "
                             f"{files['y_' + split]} has {len(y)} labels")
        if len(y) and int(y.max()) >= classes:
            raise ValueError(f"{files['y_' + split]}: label {int(y.max())} is outside "
                             f"[0, {classes})")
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])


def load_fashion_mnist(path=None):
    """Fashion-MNIST as ``(x_train, y_train), (x_test, y_test)``, like Keras.

    Images are uint8 of shape (60000, 28, 28) / (10000, 28, 28), labels uint8
    class indices 0..9. See the module docstring for where it looks.
    """
    return _load("fashion-mnist", path)


def load_mnist(path=None):
    """MNIST as ``(x_train, y_train), (x_test, y_test)``, like Keras (see load_fashion_mnist)."""
    return _load("mnist", path)
