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


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"\x1f\x8b":  # the gzip magic number, whatever the file is called
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from None
    return path.read_bytes()


def read_idx(path) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a NumPy array.

    The magic number, the rank, the sizes and the data length are checked; a
    file that does not match raises ValueError naming the file and the problem.
    The result has the native byte order and the file's element type (uint8 for
    the MNIST files).
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: not an IDX file: {len(data)} bytes, shorter than the "
                         "4-byte magic number")
    zero, code, rank = int.from_bytes(data[0:2], "big"), data[2], data[3]
    if zero != 0 or code not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file: magic number {data[:4].hex()} (expected "
                         "00 00, a type code in 08 09 0b 0c 0d 0e, then the rank)")
    if rank == 0:
        raise ValueError(f"{path}: IDX rank 0 (no dimensions)")
    header = 4 + 4 * rank
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header: rank {rank} needs {header} bytes, "
                         f"the file has {len(data)}")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank))
    dtype = _IDX_DTYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(f"{path}: IDX data {what}: shape {shape} of {dtype.name} needs "
                         f"{expected} bytes, the file has {len(data)}")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


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
