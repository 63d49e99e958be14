"""The random state fastmlp draws from (initialisers, shuffling, dropout)."""
from __future__ import annotations

import numpy as np

_rng = np.random.default_rng()


def set_seed(seed: int) -> None:
    """Seed everything fastmlp draws from, for repeatable runs.

    NumPy draws (initialisers, shuffles) come from one fastmlp Generator; the
    CuPy generator is seeded too when CuPy is installed. Not the noise of the DP
    optimizers (fm.privacy): it is secret unless their own ``seed=`` is given.
    """
    global _rng
    _rng = np.random.default_rng(seed)
    from ._interop import cupy_module

    cp = cupy_module()
    if cp is not None:
        try:
            cp.random.seed(seed)
        except Exception:  # no usable device: nothing on it to seed
            pass


def generator() -> np.random.Generator:
    """fastmlp's NumPy Generator (reseeded by set_seed)."""
    return _rng
