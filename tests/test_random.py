"""Counter-based random numbers: Philox4x32-10 and the shuffling permutation.

The permutation fit uses to shuffle is computed per element from (seed, epoch) by the
same kernel_math.h code on the CPU and the GPU; fm.reference writes it out again in
NumPy, independently of the C++.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastmlp as fm

# Known-answer vectors of Philox4x32-10 published with Random123 (kat_vectors).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_known_answers(ctr, key, want):
    assert tuple(fm._C.philox4x32_10(list(ctr), list(key))) == want
    assert tuple(int(v) for v in fm.reference.philox4x32_10(ctr, key)) == want


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 31, 64, 97, 1000, 4097, 60000])
def test_permutation_is_a_bijection_equal_to_the_reference(backend, n):
    for seed, counter in ((0, 0), (12345, 7), (2**64 - 1, 2**40 + 1)):
        out = backend.to(np.full(n, -1, np.int64))
        got = backend.host(fm.ops.random_permutation(n, seed, counter, out=out))
        np.testing.assert_array_equal(np.sort(got), np.arange(n))
        np.testing.assert_array_equal(got, fm.reference.random_permutation(n, seed, counter))


def test_permutations_differ_by_epoch_and_seed():
    base = fm.ops.random_permutation(1000, 1, 0)
    assert not np.array_equal(base, fm.ops.random_permutation(1000, 1, 1))
    assert not np.array_equal(base, fm.ops.random_permutation(1000, 2, 0))
    np.testing.assert_array_equal(base, fm.ops.random_permutation(1000, 1, 0))


def test_permutation_spreads_every_element_uniformly():
    """Where element i lands, over 2000 epochs of a 10-row set: each of the 10 positions
    should get ~200 of them. A chi-square test per element at 9 degrees of freedom: the
    0.1% critical value is 27.9; the largest of 10 statistics under uniformity exceeds
    it with probability ~1%, so the bound is 35 (p ~ 7e-5 each)."""
    n, epochs = 10, 2000
    counts = np.zeros((n, n))
    for e in range(epochs):
        perm = fm.ops.random_permutation(n, 99, e)
        counts[perm, np.arange(n)] += 1  # element perm[p] sits at position p
    expected = epochs / n
    chi2 = ((counts - expected) ** 2 / expected).sum(axis=1)
    assert chi2.max() < 35, chi2


def test_permutation_errors():
    with pytest.raises(ValueError, match="non-negative integer"):
        fm.ops.random_permutation(-1, 0)
    with pytest.raises(ValueError, match="'out' must have shape"):
        fm.ops.random_permutation(5, 0, out=np.empty(4, np.int64))
    with pytest.raises(TypeError, match="must be int64"):
        fm.ops.random_permutation(5, 0, out=np.empty(5, np.int32))
    with pytest.raises(ValueError, match="device must be"):
        fm.ops.random_permutation(5, 0, device="tpu")
