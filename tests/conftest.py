"""Shared fixtures: the `backend` the op tests run on, and a reproducible `rng`.

`backend` is parametrised over "cpu" (NumPy arrays -> C++ kernels) and "gpu"
(CuPy arrays -> CUDA kernels, marked `gpu`). The gpu parameter skips, with
fastmlp's own reason, when the CUDA backend is not usable here (no CUDA build,
no CuPy, or no device), so `pytest -m gpu` on a GPU machine runs every op test
on the device and the same test ids run on the CPU everywhere.
"""

from __future__ import annotations

import os
import sys
import zlib

import numpy as np
import pytest

# helpers.py sits next to this file; make it importable whatever pytest's import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastmlp as fm  # noqa: E402


class Backend:
    """Where an op test's arrays live, and how to move data there and back."""

    def __init__(self, name: str, xp):
        self.name = name
        self.xp = xp  # numpy or cupy

    def __repr__(self):
        return f"Backend({self.name})"

    @property
    def is_gpu(self) -> bool:
        return self.name == "gpu"

    def to(self, a):
        """A copy of a host array (any dtype) as a C-contiguous array of this backend.

        Always a copy, also on the CPU: kernels write into these arrays, and the test's
        host data must stay intact for the reference."""
        return self.xp.array(a, copy=True, order="C")

    def host(self, a):
        """A backend array (or 0-d array) as a NumPy array."""
        if self.is_gpu:
            return self.xp.asnumpy(a)
        return np.asarray(a)

    def nan(self, shape, dtype=np.float32):
        """A poisoned output buffer: every element must be overwritten by the kernel."""
        return self.xp.full(shape, np.nan, dtype=dtype)

    def sync(self):
        if self.is_gpu:
            self.xp.cuda.get_current_stream().synchronize()


def cuda_usable() -> tuple[bool, str]:
    b = fm.backends()
    return bool(b.get("cuda")), str(b.get("cuda_reason", ""))


def gpu_backend() -> Backend:
    """The GPU Backend, or skip (with fastmlp's reason) when CUDA is not usable."""
    ok, why = cuda_usable()
    if not ok:
        if os.environ.get("FASTMLP_REQUIRE_GPU"):
            # The GPU check sets this: there, a skipped GPU test is a failure.
            pytest.fail(f"FASTMLP_REQUIRE_GPU is set but CUDA is not usable: {why}")
        pytest.skip(f"CUDA backend not usable: {why or 'no reason given'}")
    import cupy

    return Backend("gpu", cupy)


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def backend(request) -> Backend:
    if request.param == "gpu":
        return gpu_backend()
    return Backend("cpu", np)


@pytest.fixture
def gpu() -> Backend:
    """For tests that only make sense on the GPU (mark them `gpu` too)."""
    return gpu_backend()


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test id: every test draws the same data every run."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def fashion():
    """Fashion-MNIST from Debian's dataset-fashion-mnist package, as the CLI feeds it:
    ((x_train, y_train), (x_test, y_test)) with x float32 rows of 784 values in [0, 1].

    CI installs the package, so a missing dataset is a failure here, not a skip."""
    (xt, yt), (xs, ys) = fm.datasets.load_fashion_mnist()

    def prep(x):
        return x.reshape(len(x), -1).astype(np.float32) / np.float32(255.0)

    return (prep(xt), yt), (prep(xs), ys)
