"""The Gaussian noise of DP-SGD (issue 17): the generator and the noise step of the
optimizer kernels.

fm.ops.gaussian_noise against fm.reference.gaussian_noise (float64 Box-Muller of the same
Philox bits), bit-for-bit consistency across call boundaries, devices and thread counts,
the distribution (moments and a Kolmogorov-Smirnov test), and SGD / Adam / AdamW /
RMSprop with ``noise_std`` against the reference and against the same kernel fed the
noisy gradient. Every ``backend`` test runs on the CPU and, with CuPy and a GPU, on the
CUDA kernels.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import assert_close, normal

import fastmlp as fm
from fastmlp import _C
from fastmlp import reference as ref

ULP = 2.0**-23


def _noise(backend, size, **kw):
    out = backend.xp.full(size, np.nan, np.float32)
    return backend.host(fm.ops.gaussian_noise(size, out=out, **kw))


def _bound(z):
    """The kernels' float32 Box-Muller against float64 (kernel_math.h: a few ulp of r,
    <= 1.6 ulp of cos / sin; measured over 8.4M draws: 2.2e-7 * max(1, |z|)): 1e-6
    absolute below 1, relative above."""
    return 1e-6 * np.maximum(1.0, np.abs(z))


# ------------------------------------------------------------------------ the generator


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 1000, 2**20 + 3])
@pytest.mark.parametrize("offset", [0, 1, 7, 2**33 + 1])
def test_noise_vs_reference(backend, size, offset):
    for seed, step in ((0, 1), (2**64 - 1, 2**40 + 5)):
        got = _noise(backend, size, seed=seed, step=step, offset=offset)
        want = ref.gaussian_noise(size, seed, step, offset)
        assert got.dtype == np.float32 and got.shape == (size,)
        assert_close(got, want, _bound(want), f"noise seed={seed} step={step}")
    if size >= 1000:  # the float64 reference is itself a Gaussian stream
        assert 0.5 < float(np.std(want)) < 1.5


def test_noise_slices_equal_bit_for_bit(backend):
    """A call from any offset, of any size, gives exactly the elements of a larger call:
    the partial counter blocks at either end (scalar), the vectorised blocks, the CPU's
    2048-element pieces and the GPU's grid all compute each element the same way."""
    big = _noise(backend, 10_000, seed=3, step=9)
    for offset in (0, 1, 2, 3, 5, 7, 2045, 2047, 2048, 2049, 4093):
        for size in (1, 2, 3, 5, 8, 2051, 4100, 5000):
            got = _noise(backend, size, seed=3, step=9, offset=offset)
            np.testing.assert_array_equal(got, big[offset:offset + size], f"{offset} {size}")


def test_noise_streams_differ_by_seed_and_step(backend):
    base = _noise(backend, 1000, seed=1, step=1)
    np.testing.assert_array_equal(base, _noise(backend, 1000, seed=1, step=1))
    for other in (dict(seed=2, step=1), dict(seed=1, step=2), dict(seed=1, step=2**32 + 1)):
        assert np.mean(base == _noise(backend, 1000, **other)) < 0.01, other


def test_noise_thread_count_independent():
    n = 300_001
    old = fm.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            fm.set_num_threads(threads)
            runs.append(fm.ops.gaussian_noise(n, seed=5, step=7, offset=3).tobytes())
    finally:
        fm.set_num_threads(old)
    assert runs[0] == runs[1] == runs[2]


def test_noise_distribution(backend):
    """10^6 draws against N(0, 1). False-failure rates under the hypothesis (the
    assertions are on sums of 10^6 terms, normal to ~1e-3 relative):
      |mean| < 5.5 / sqrt(n):                  P(|N(0,1)| > 5.5) ~ 4e-8
      |var - 1| < 5.5 sqrt(2 / n):             ~ 4e-8 (Var of the sample variance: 2 / n)
      KS: sqrt(n) D < 2.5:                     2 exp(-2 * 2.5^2) ~ 7e-6 (Kolmogorov)
      |z| <= sqrt(2 ln 2^25) ~ 5.887 (+ rounding): by construction (u >= 2^-25).
    The KS statistic treats the draws as independent; Box-Muller pairs share their
    radius but each marginal is exactly normal, which is what D measures."""
    n = 10**6
    z = _noise(backend, n, seed=11, step=3).astype(np.float64)
    assert abs(z.mean()) < 5.5 / math.sqrt(n)
    assert abs(z.var() - 1.0) < 5.5 * math.sqrt(2.0 / n)
    assert np.abs(z).max() <= 5.8875
    zs = np.sort(z)
    try:
        from scipy.special import ndtr
        cdf = ndtr(zs)
    except ImportError:
        cdf = 0.5 * (1.0 + np.vectorize(math.erf)(zs / math.sqrt(2.0)))
    i = np.arange(1, n + 1)
    d = max(np.max(i / n - cdf), np.max(cdf - (i - 1) / n))
    assert math.sqrt(n) * d < 2.5, d


def test_noise_errors():
    with pytest.raises(ValueError, match="'size' must be >= 0"):
        fm.ops.gaussian_noise(-1, seed=0, step=1)
    with pytest.raises(ValueError, match="'offset' must be in"):
        fm.ops.gaussian_noise(5, seed=0, step=1, offset=-1)
    with pytest.raises(ValueError, match="'out' must have shape"):
        fm.ops.gaussian_noise(5, seed=0, step=1, out=np.empty(4, np.float32))
    with pytest.raises(TypeError, match="must be float32"):
        fm.ops.gaussian_noise(5, seed=0, step=1, out=np.empty(5, np.float64))
    with pytest.raises(ValueError, match="device must be"):
        fm.ops.gaussian_noise(5, seed=0, step=1, device="tpu")
    p, g = np.zeros(4, np.float32), np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="noise_std"):
        fm.ops.sgd_step(p, g, None, lr=0.1, noise_std=np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="'noise_offset'"):
        fm.ops.sgd_step(p, g, None, lr=0.1, noise_std=np.zeros(1, np.float32), noise_offset=-1)


# ------------------------------------------------------------------------ the optimizers

# (name, kwargs of the step); every config also runs with the other transform steps.
OPTS = {
    "sgd-momentum": ("sgd", dict(lr=0.1, momentum=0.9)),
    "sgd-nesterov-wd": ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "adam": ("adam", dict(lr=0.01, step=3)),
    "adamw": ("adam", dict(lr=0.01, step=3, weight_decay=0.1, decoupled=True)),
    "rmsprop-centered-momentum": ("rmsprop", dict(lr=0.01, momentum=0.9, centered=True)),
}
TRANSFORMS = {
    "noise-only": {},
    "l1-l2-clipvalue": dict(l1=2**-7, l2=2**-4, clipvalue=0.8),
}


def _state(rng, kind, size):
    """Optimizer buffers in mid-training (so Adam / RMSprop are smooth in the gradient:
    at zero state their first step is ~lr sign(g))."""
    if kind == "sgd":
        return [normal(rng, size, 0.1)]
    if kind == "adam":
        return [normal(rng, size, 0.1), rng.uniform(0.5, 1.5, size).astype(np.float32)]
    sq = rng.uniform(1.0, 2.0, size).astype(np.float32)
    return [sq, normal(rng, size, 0.1), normal(rng, size, 0.1)]  # square_avg, buf, grad_avg


def _step(mod, kind, p, g, st, kw):
    if kind == "sgd":
        return mod.sgd_step(p, g, st[0], **kw)
    if kind == "adam":
        return mod.adam_step(p, g, st[0], st[1], **kw)
    return mod.rmsprop_step(p, g, st[0], st[1], st[2], **kw)


# ---------------------------------------------------- the CPU's instruction sets
# cpu/noise.cpp picks the block loop at run time: the explicit AVX-512 one
# (cpu/noise_avx512.cpp) or the generic loop; both must give the scalar floats.

NOISE_ISAS = _C.cpu.noise_isas_supported().split(",")
VECTOR_ISAS = [isa for isa in NOISE_ISAS if isa != "generic"]


@pytest.fixture
def noise_isa_restore():
    old = _C.cpu.noise_isa()
    yield
    _C.cpu.set_noise_isa(old)


def _noise_isa(isa, size, **kw):
    old = _C.cpu.set_noise_isa(isa)
    try:
        return fm.ops.gaussian_noise(size, **kw)
    finally:
        _C.cpu.set_noise_isa(old)


def test_noise_isas_reported(noise_isa_restore):
    assert "generic" in NOISE_ISAS
    assert _C.cpu.noise_isa() in NOISE_ISAS
    assert _C.cpu.set_noise_isa("auto") in NOISE_ISAS
    assert _C.cpu.noise_isa() == NOISE_ISAS[0]  # the best supported
    with pytest.raises(ValueError, match="is not one of"):
        _C.cpu.set_noise_isa("sse9")
    with pytest.raises(ValueError, match="no vector Box-Muller"):
        _C.cpu.noise_box_muller_mismatches("generic")


@pytest.mark.parametrize("isa", VECTOR_ISAS)
def test_noise_isa_box_muller_exhaustive(isa):
    """The vector Box-Muller against the scalar one on every uniform a word can give
    (2^25 values for the log, 2^25 for the angle), bit for bit."""
    assert _C.cpu.noise_box_muller_mismatches(isa) == 0


@pytest.mark.parametrize("isa", VECTOR_ISAS)
def test_noise_isa_equals_generic(isa):
    """Bit for bit against the generic loop: sizes around the vector loop's 16 and
    64-block groups and the 2048-element pieces, offsets of every residue mod 4 and
    across a 2^32-block carry of the counter, several seeds and steps."""
    rng = np.random.default_rng(17)
    sizes = [1, 3, 4, 5, 63, 64, 65, 127, 255, 256, 257, 1023, 2048, 2049, 4096 + 61, 70001]
    offsets = [0, 1, 2, 3, 61, 2045, 4 * 2**32 - 9, 4 * (2**32 - 37) + 2, 2**40 + 7]
    streams = [(0, 0), (1, 1), (2**64 - 1, 2**64 - 1), (12345, 2**32 - 1), (7, 2**40 + 5)]
    for seed, step in streams:
        for size in sizes:
            for offset in offsets + [int(rng.integers(0, 2**50))]:
                kw = dict(seed=seed, step=step, offset=offset)
                got = _noise_isa(isa, size, **kw)
                want = _noise_isa("generic", size, **kw)
                np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32),
                                              f"{isa} size={size} {kw}")
    for seed in rng.integers(0, 2**63, 20):  # longer runs, random streams
        kw = dict(seed=int(seed), step=int(rng.integers(0, 2**63)),
                  offset=int(rng.integers(0, 2**45)))
        np.testing.assert_array_equal(_noise_isa(isa, 100_003, **kw).view(np.uint32),
                                      _noise_isa("generic", 100_003, **kw).view(np.uint32))


@pytest.mark.parametrize("isa", VECTOR_ISAS)
@pytest.mark.parametrize("opt", ["sgd-momentum", "adam", "adamw", "rmsprop-centered-momentum"])
def test_optimizer_noise_isa_equals_generic(isa, rng, opt, noise_isa_restore):
    """The optimizer steps with noise (the fused gradient step of the vector loop) equal
    the generic loop's bit for bit, at chunk and block edges."""
    kind, kw = OPTS[opt]
    for size, offset in ((5, 3), (2048 + 67, 1), (40_003, 2**33 + 2), (70_001, 0)):
        p0, g, st0 = normal(rng, size), normal(rng, size, 0.5), _state(rng, kind, size)
        step = dict(kw, l2=2**-4, clipvalue=0.8, noise_std=np.array([0.37], np.float32),
                    noise_seed=5, noise_step=2**32 + 3, noise_offset=offset)
        runs = []
        for name in (isa, "generic"):
            _C.cpu.set_noise_isa(name)
            p, st = p0.copy(), [s.copy() for s in st0]
            _step(fm.ops, kind, p, g, st, step)
            runs.append([p] + st)
        for a, b in zip(*runs):
            np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def test_noise_isa_environment_variable():
    """FASTMLP_CPU_NOISE chooses the loop at load time; a bad value is an error on
    first use."""
    import os
    import subprocess
    import sys
    code = ("import fastmlp as fm; fm.ops.gaussian_noise(10, seed=1, step=1); "
            "print(fm._C.cpu.noise_isa())")
    for name in NOISE_ISAS:
        env = dict(os.environ, FASTMLP_CPU_NOISE=name)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)
        assert out.stdout.strip() == name
    env = dict(os.environ, FASTMLP_CPU_NOISE="sse9")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True)
    assert out.returncode != 0 and "FASTMLP_CPU_NOISE=sse9" in out.stderr


def _run(backend, kind, p0, g, st0, kw):
    P, G, S = backend.to(p0), backend.to(g), [backend.to(s) for s in st0]
    _step(fm.ops, kind, P, G, S, kw)
    return backend.host(P), [backend.host(s) for s in S]


@pytest.mark.parametrize("tr", TRANSFORMS.values(), ids=TRANSFORMS.keys())
@pytest.mark.parametrize("opt", OPTS.values(), ids=OPTS.keys())
@pytest.mark.parametrize("size", [1, 97, 70001])
def test_optimizer_noise_vs_reference(backend, rng, size, opt, tr):
    """Kernel with noise vs fm.reference (float64, the same noise in float64)."""
    kind, kw = opt
    p0, g, st0 = normal(rng, size), normal(rng, size, 0.5), _state(rng, kind, size)
    std = np.array([0.37], np.float32)
    noise = dict(noise_seed=42, noise_step=2**40 + 5, noise_offset=2**33 + 1)
    P, S = _run(backend, kind, p0, g, st0,
                dict(kw, **tr, **noise, noise_std=backend.to(std)))
    p, s = p0.astype(np.float64), [x.astype(np.float64) for x in st0]
    _step(ref, kind, p, g.astype(np.float64), s,
          dict(kw, **tr, **noise, noise_std=std.astype(np.float64)))
    lr = kw["lr"]
    assert_close(P, p, 1e-5 * (np.abs(p) + lr), "param")
    for i, (a, b) in enumerate(zip(S, s)):
        # momentum / averages: a * state + g' cancels near 0, so the bound is on the
        # terms' size (~1: a few float32 ulp), not only on the result's
        assert_close(a, b, 1e-5 * np.abs(b) + 2e-6, f"state {i}")
    # the noise mattered: without it the result is far off (for size 1 the clipvalue
    # may clip both gradients to the same value)
    if size == 1:
        return
    p1, s1 = p0.astype(np.float64), [x.astype(np.float64) for x in st0]
    _step(ref, kind, p1, g.astype(np.float64), s1, dict(kw, **tr))
    assert np.max(np.abs(P - p1)) > 1e-3 * lr, "degenerate test"


@pytest.mark.parametrize("tr", TRANSFORMS.values(), ids=TRANSFORMS.keys())
@pytest.mark.parametrize("opt", OPTS.values(), ids=OPTS.keys())
@pytest.mark.parametrize("offset", [0, 3, 2**33 + 1])
def test_optimizer_noise_is_the_noisy_gradient(backend, rng, opt, tr, offset):
    """Bit for bit: the step with noise_std = 0.5 equals the same kernel without noise fed
    g + 0.5 z, z from fm.ops.gaussian_noise (the noise step is one fma; with a power of
    two std, 0.5 z is exact and float64 holds g + 0.5 z exactly, so its float32
    rounding is the fma's). Sizes cross the CPU's 2048-element chunks and thread blocks."""
    kind, kw = opt
    size = 40_003
    p0, g, st0 = normal(rng, size), normal(rng, size, 0.5), _state(rng, kind, size)
    z = _noise(backend, size, seed=7, step=12, offset=offset)
    g_noisy = (g.astype(np.float64) + 0.5 * z.astype(np.float64)).astype(np.float32)
    noise = dict(noise_std=backend.to(np.array([0.5], np.float32)), noise_seed=7,
                 noise_step=12, noise_offset=offset)
    P, S = _run(backend, kind, p0, g, st0, dict(kw, **tr, **noise))
    Q, T = _run(backend, kind, p0, g_noisy, st0, dict(kw, **tr, clip_scale=backend.to(
        np.array([1.0], np.float32))))
    np.testing.assert_array_equal(P, Q)
    for a, b in zip(S, T):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("opt", OPTS.values(), ids=OPTS.keys())
def test_optimizer_zero_std_is_the_plain_step(backend, rng, opt):
    """noise_std = 0: fma(0, z, g) == g for every nonzero g (these gradients have no
    zeros; a zero gradient's sign could become +0), so the step is the plain one. AdamW
    on the CPU: against the identity transform (clip_scale 1) instead -- the CPU's
    plain AdamW loop lets GCC contract p * (1 - lr wd) into the update (optim.cpp), so
    it differs from every transformed AdamW step by a rounding, noise or not."""
    kind, kw = opt
    size = 10_007
    p0, g, st0 = normal(rng, size), normal(rng, size, 0.5), _state(rng, kind, size)
    assert np.all(g != 0)
    P, S = _run(backend, kind, p0, g, st0,
                dict(kw, noise_std=backend.to(np.zeros(1, np.float32)), noise_seed=1))
    plain = dict(kw)
    if kw.get("decoupled") and not backend.is_gpu:
        plain["clip_scale"] = np.ones(1, np.float32)
    Q, T = _run(backend, kind, p0, g, st0, plain)
    np.testing.assert_array_equal(P, Q)
    for a, b in zip(S, T):
        np.testing.assert_array_equal(a, b)


def test_optimizer_noise_thread_count_independent(rng):
    n = 300_001
    p0, g = normal(rng, n), normal(rng, n)
    old = fm.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            fm.set_num_threads(threads)
            p, m, v = p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
            fm.ops.adam_step(p, g, m, v, step=1, lr=0.01, l2=0.01, clipvalue=0.5,
                             noise_std=np.array([0.3], np.float32), noise_seed=9, noise_step=4,
                             noise_offset=5)
            results.append((p.tobytes(), m.tobytes(), v.tobytes()))
    finally:
        fm.set_num_threads(old)
    assert results[0] == results[1] == results[2]


# ------------------------------------------------------------------------ GPU vs CPU


@pytest.mark.gpu
def test_gpu_noise_equals_cpu(gpu):
    for size, offset, seed, step in ((1, 0, 0, 1), (1_000_003, 7, 5, 2**40 + 5),
                                     (4099, 2**33 + 1, 2**64 - 1, 3)):
        cpu = fm.ops.gaussian_noise(size, seed=seed, step=step, offset=offset)
        dev = fm.ops.gaussian_noise(size, seed=seed, step=step, offset=offset, device="cuda")
        np.testing.assert_array_equal(gpu.host(dev), cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("opt", OPTS.values(), ids=OPTS.keys())
def test_gpu_optimizer_noise_equals_cpu(gpu, rng, opt):
    """The noisy step on the GPU equals the CPU's bit for bit (explicit roundings)."""
    kind, kw = opt
    size = 100_003
    p0, g, st0 = normal(rng, size), normal(rng, size, 0.5), _state(rng, kind, size)
    std = np.array([0.37], np.float32)
    tr = dict(kw, l1=2**-7, l2=2**-4, clipvalue=0.8, noise_seed=3, noise_step=2**33 + 2,
              noise_offset=11)
    p, s = p0.copy(), [x.copy() for x in st0]
    _step(fm.ops, kind, p, g, s, dict(tr, noise_std=std))
    P, S = _run(gpu, kind, p0, g, st0, dict(tr, noise_std=gpu.to(std)))
    np.testing.assert_array_equal(P, p)
    for a, b in zip(S, s):
        np.testing.assert_array_equal(a, b)
