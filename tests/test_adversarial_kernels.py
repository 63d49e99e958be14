"""The adversarial-example kernels of issue 18: ``ops.adversarial_init`` (the attack's
start: a clipped copy, or a uniform random start in the eps-ball) and
``ops.adversarial_step`` (FGSM / PGD's sign step, projection and clip, in place).

Both are exact float32 operation sequences (a product eps * u or alpha * sign rounded
once, adds and selects), so the kernels equal the float32 NumPy reference and torch's
float32 computation of torchattacks' formulas bit for bit; the random start's bits are
Philox's, the same on every device.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastmlp as fm
from fastmlp import reference as ref
from fastmlp._interop import address
from helpers import assert_meaningful, normal, shape_id

SHAPES = [(0, 5), (1, 1), (7, 13), (97, 31), (1000, 784)]
CLIPS = [(0.0, 1.0), None, (-0.25, 0.5)]


def _bits_equal(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype == np.float32, (got.shape,
                                                                                want.shape)
    same = got.view(np.uint32) == want.view(np.uint32)
    assert same.all(), (f"{what}: {int((~same).sum())} of {got.size} differ; first at "
                        f"{np.argwhere(~same)[0].tolist()}: got {got[~same][0]!r}, "
                        f"expected {want[~same][0]!r}")


def _images(rng, shape):
    """Pixel-like data in [0, 1], some exactly at the ends (the clip's edge cases)."""
    x = rng.uniform(0, 1, shape).astype(np.float32)
    flat = x.reshape(-1)
    flat[::17] = 0.0
    flat[5::23] = 1.0
    return x


def _raw(backend, name, *args):
    mod = fm._C.cuda if backend.is_gpu else fm._C.cpu
    extra = (backend.xp.cuda.get_current_stream().ptr,) if backend.is_gpu else ()
    getattr(mod, name)(*args, *extra)
    backend.sync()


# ---------------------------------------------------------------------------- adversarial_init


@pytest.mark.parametrize("clip", CLIPS, ids=["01", "noclip", "narrow"])
@pytest.mark.parametrize("rows,cols", SHAPES, ids=[shape_id(*s) for s in SHAPES])
def test_init_without_seed_is_clipped_copy(backend, rng, rows, cols, clip):
    x = normal(rng, (rows, cols))
    out = backend.nan((rows, cols))
    got = fm.ops.adversarial_init(backend.to(x), eps=0.1, clip=clip, out=out)
    assert got is out
    lo, hi = (-np.inf, np.inf) if clip is None else clip
    want = np.clip(x, np.float32(lo), np.float32(hi))
    assert_meaningful(want)
    _bits_equal(backend.host(got), want, "adversarial_init copy")
    _bits_equal(backend.host(got), ref.adversarial_init(x, eps=0.1, clip=clip), "vs reference")


@pytest.mark.parametrize("clip", CLIPS, ids=["01", "noclip", "narrow"])
@pytest.mark.parametrize("rows,cols", SHAPES, ids=[shape_id(*s) for s in SHAPES])
def test_init_random_start_vs_reference(backend, rng, rows, cols, clip):
    x, eps = _images(rng, (rows, cols)), 8.0 / 255.0
    out = backend.nan((rows, cols))
    got = backend.host(fm.ops.adversarial_init(backend.to(x), eps=eps, clip=clip, seed=1234,
                                               step=5, out=out))
    want = ref.adversarial_init(x, eps=eps, clip=clip, seed=1234, step=5)
    _bits_equal(got, want, "adversarial_init random start")
    if rows * cols >= 50:
        assert (got != np.clip(x, *(clip or (-np.inf, np.inf)))).mean() > 0.2  # it moved
    # Within the eps-ball (up to the rounding of x + eps u) where x is inside the clip
    # range (outside it, the clip alone can move an element further), and in the range.
    lo, hi = (-np.inf, np.inf) if clip is None else clip
    inside = (x >= np.float32(lo)) & (x <= np.float32(hi))
    d = got.astype(np.float64) - x
    assert (np.abs(d[inside]) <= eps * (1 + 1e-6) + 1e-7).all()
    assert ((got >= np.float32(lo)) & (got <= np.float32(hi))).all()


def test_init_uniform_statistics(backend):
    """u = (adv - x) / eps (no clip, x = 0 so adv = eps u exactly): in (-1, 1), never 0,
    mean ~ 0 and variance ~ 1/3 over 784k draws (sd of the mean 6.5e-4)."""
    x, eps = np.zeros((1000, 784), np.float32), 0.5
    got = backend.host(fm.ops.adversarial_init(backend.to(x), eps=eps, clip=None, seed=7))
    u = got.astype(np.float64) / eps
    assert (np.abs(u) < 1).all() and (u != 0).all()
    assert abs(u.mean()) < 5e-3
    assert abs(u.var() - 1.0 / 3.0) < 5e-3
    # exact: eps u with u = k 2^-24, k odd, as the reference draws them
    np.testing.assert_array_equal(u.reshape(-1), ref.adversarial_uniform(u.size, 7, 0))
    counts, _ = np.histogram(u, bins=10, range=(-1, 1))
    assert (np.abs(counts / u.size - 0.1) < 0.005).all()


def test_init_seeds_and_steps(backend, rng):
    x = _images(rng, (33, 65))
    xd = backend.to(x)

    def draw(seed, step):
        return backend.host(fm.ops.adversarial_init(xd, eps=0.1, clip=None, seed=seed, step=step))

    a = draw(1, 0)
    np.testing.assert_array_equal(a, draw(1, 0))  # same seed and step: identical
    for other in (draw(2, 0), draw(1, 1), draw(2**40 + 1, 0)):
        assert (other != a).mean() > 0.9
    # step as a (1,) int64 array on the device: the same draw as the int
    np.testing.assert_array_equal(draw(3, 9), draw(3, backend.to(np.array([9], np.int64))))


def test_init_in_place_and_nan(backend, rng):
    x = _images(rng, (5, 8))
    x[1, 2], x[3, 4] = np.nan, np.inf
    xd = backend.to(x)
    got = fm.ops.adversarial_init(xd, eps=0.1, seed=3, out=xd)  # adv may be x itself
    assert got is xd
    h = backend.host(got)
    want = ref.adversarial_init(x, eps=0.1, seed=3)
    _bits_equal(h, want, "adversarial_init in place")
    assert np.isnan(h[1, 2]) and h[3, 4] == 1.0  # NaN stays NaN (torch.clamp); inf clipped


def test_init_errors(backend, rng):
    x = backend.to(_images(rng, (4, 6)))
    for eps in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="'eps' must be a finite number >= 0"):
            fm.ops.adversarial_init(x, eps=eps)
    with pytest.raises(ValueError, match="'clip' must have lo <= hi"):
        fm.ops.adversarial_init(x, eps=0.1, clip=(1.0, 0.0))
    with pytest.raises(ValueError, match="'clip' must be None or a pair"):
        fm.ops.adversarial_init(x, eps=0.1, clip=1.0)
    with pytest.raises(TypeError, match="'x' must be float32"):
        fm.ops.adversarial_init(backend.to(np.zeros((2, 2), np.float64)), eps=0.1)
    with pytest.raises(ValueError, match="'step' must be >= 0"):
        fm.ops.adversarial_init(x, eps=0.1, seed=1, step=-2)
    with pytest.raises(ValueError, match="'out' partially overlaps 'x'"):
        fm.ops.adversarial_init(x[1:], eps=0.1, out=x[:3])
    with pytest.raises(ValueError, match="eps must be a finite number"):  # the kernel's check
        _raw(backend, "adv_init", address(x), address(x), 4, 6, -1.0, 0.0, 1.0, 0, 0, 0)
    with pytest.raises(ValueError, match="partially overlaps"):
        _raw(backend, "adv_init", address(x), address(x) + 4, 2, 6, 0.1, 0.0, 1.0, 0, 0, 0)


# ---------------------------------------------------------------------------- adversarial_step


@pytest.mark.parametrize("project", [True, False], ids=["pgd", "fgsm"])
@pytest.mark.parametrize("clip", CLIPS, ids=["01", "noclip", "narrow"])
@pytest.mark.parametrize("rows,cols", SHAPES, ids=[shape_id(*s) for s in SHAPES])
def test_step_vs_reference(backend, rng, rows, cols, clip, project):
    x, eps, alpha = _images(rng, (rows, cols)), 8.0 / 255.0, 2.0 / 255.0
    adv0 = ref.adversarial_init(x, eps=eps, clip=clip, seed=11)
    g = normal(rng, (rows, cols))
    g.reshape(-1)[::13] = 0.0  # sign 0: the element stays (then projection / clip)
    adv = backend.to(adv0)
    got = fm.ops.adversarial_step(backend.to(x), adv, backend.to(g), eps=eps, alpha=alpha,
                                  clip=clip, project=project)
    assert got is adv
    want = ref.adversarial_step(x, adv0.copy(), g, eps=eps, alpha=alpha, clip=clip,
                                project=project)
    _bits_equal(backend.host(got), want, "adversarial_step")
    if rows * cols >= 50:  # the step moved many elements (not all: signs 0, the clip)
        assert (backend.host(got) != adv0).mean() > 0.2


def _torchattacks_pgd_step(torch, x, adv, g, eps, alpha, lo, hi, project):
    """torchattacks' PGD update (FGSM without the projection) in torch float32."""
    adv = adv + alpha * g.sign()
    if project:
        delta = torch.clamp(adv - x, min=-eps, max=eps)
        adv = x + delta
    return torch.clamp(adv, min=lo, max=hi)


@pytest.mark.parametrize("project", [True, False], ids=["pgd", "fgsm"])
def test_step_matches_torchattacks(backend, rng, project):
    torch = pytest.importorskip("torch")
    x = _images(rng, (257, 784))
    eps, alpha = np.float32(8.0 / 255.0), np.float32(2.0 / 255.0)
    adv = ref.adversarial_init(x, eps=float(eps), seed=5)
    g = normal(rng, x.shape)
    g.reshape(-1)[::11] = 0.0
    g.reshape(-1)[1::29] = -0.0
    want = _torchattacks_pgd_step(torch, torch.from_numpy(x), torch.from_numpy(adv),
                                  torch.from_numpy(g), float(eps), float(alpha), 0.0, 1.0,
                                  project).numpy()
    got = backend.to(adv)
    fm.ops.adversarial_step(backend.to(x), got, backend.to(g), eps=float(eps), alpha=float(alpha),
                            project=project)
    _bits_equal(backend.host(got), want, "adversarial_step vs torchattacks")


def test_fgsm_matches_torchattacks(backend, rng):
    """FGSM = adversarial_init without seed + one step (alpha = eps, no projection) =
    torchattacks' clamp(x + eps * grad.sign(), 0, 1)."""
    torch = pytest.importorskip("torch")
    x, g, eps = _images(rng, (64, 100)), normal(rng, (64, 100)), 0.1
    xd = backend.to(x)
    adv = fm.ops.adversarial_init(xd, eps=eps)
    fm.ops.adversarial_step(xd, adv, backend.to(g), eps=eps, alpha=eps, project=False)
    tx, tg = torch.from_numpy(x), torch.from_numpy(g)
    want = torch.clamp(tx + float(np.float32(eps)) * tg.sign(), min=0, max=1).numpy()
    _bits_equal(backend.host(adv), want, "FGSM")


def test_pgd_iterations_stay_in_ball(backend, rng):
    """Ten PGD steps from a random start stay within eps of x (up to rounding) and in
    [0, 1], and equal the reference iterated the same way."""
    x, eps, alpha = _images(rng, (50, 40)), 0.03, 0.01
    xd = backend.to(x)
    adv = fm.ops.adversarial_init(xd, eps=eps, seed=2, step=1)
    want = ref.adversarial_init(x, eps=eps, seed=2, step=1)
    for it in range(10):
        g = normal(rng, x.shape)
        fm.ops.adversarial_step(xd, adv, backend.to(g), eps=eps, alpha=alpha)
        ref.adversarial_step(x, want, g, eps=eps, alpha=alpha)
    h = backend.host(adv)
    _bits_equal(h, want, "10 PGD steps")
    assert (np.abs(h.astype(np.float64) - x) <= eps * (1 + 1e-6) + 1e-7).all()
    assert ((h >= 0) & (h <= 1)).all()
    assert (np.abs(h - x) > eps / 2).mean() > 0.3  # the steps went somewhere


def test_step_nan_propagates(backend):
    """sign(NaN) = NaN (torch's CPU sign gives 0 here: fastmlp keeps the NaN visible); a
    NaN in x or adv propagates too; inf gradients are just signs."""
    x = np.array([0.5, 0.5, np.nan, 0.5, 0.5], np.float32)
    adv = np.array([0.5, 0.5, 0.5, np.nan, 0.5], np.float32)
    g = np.array([np.nan, np.inf, 1.0, 1.0, -np.inf], np.float32)
    for project in (True, False):
        a = backend.to(adv)
        fm.ops.adversarial_step(backend.to(x), a, backend.to(g), eps=0.1, alpha=0.05,
                                project=project)
        h = backend.host(a)
        want = ref.adversarial_step(x, adv.copy(), g, eps=0.1, alpha=0.05, project=project)
        _bits_equal(h, want, "adversarial_step NaN")
        assert np.isnan(h[0]) and np.isnan(h[3])
        assert np.isnan(h[2]) == project  # x enters only through the projection
        assert h[1] == np.float32(0.5) + np.float32(0.05) and h[4] == np.float32(0.5) - np.float32(0.05)


def test_step_errors(backend, rng):
    x, g = backend.to(_images(rng, (4, 6))), backend.to(normal(rng, (4, 6)))
    adv = backend.to(_images(rng, (4, 6)))
    for name, kw in (("eps", {"eps": -1.0, "alpha": 0.1}), ("alpha", {"eps": 0.1, "alpha": -0.1}),
                     ("eps", {"eps": float("nan"), "alpha": 0.1})):
        with pytest.raises(ValueError, match=f"'{name}' must be a finite number >= 0"):
            fm.ops.adversarial_step(x, adv, g, **kw)
    with pytest.raises(ValueError, match="'adv' overlaps 'x'"):
        fm.ops.adversarial_step(x, x, g, eps=0.1, alpha=0.1)
    with pytest.raises(ValueError, match="'adv' overlaps 'grad'"):
        fm.ops.adversarial_step(x, g, g, eps=0.1, alpha=0.1)
    with pytest.raises(ValueError, match=r"'grad' must have shape \(4, 6\)"):
        fm.ops.adversarial_step(x, adv, g[:3], eps=0.1, alpha=0.1)
    with pytest.raises(ValueError, match="'clip' must have lo <= hi"):
        fm.ops.adversarial_step(x, adv, g, eps=0.1, alpha=0.1, clip=(float("nan"), 1.0))
    with pytest.raises(ValueError, match="adv overlaps x or grad"):  # the kernel's own check
        _raw(backend, "adv_step", address(x), address(x), address(g), 4, 6, 0.1, 0.1, 0.0, 1.0,
             True)
    with pytest.raises(ValueError, match="lo <= hi"):
        _raw(backend, "adv_step", address(x), address(adv), address(g), 4, 6, 0.1, 0.1, 1.0, 0.0,
             True)


def test_step_read_only(rng):
    x, g = _images(rng, (3, 3)), normal(rng, (3, 3))
    adv = x.copy()
    adv.flags.writeable = False
    with pytest.raises(ValueError, match="'adv' is written in place but is read-only"):
        fm.ops.adversarial_step(x, adv, g, eps=0.1, alpha=0.1)


def test_adversarial_key():
    """_C.adversarial_key is kernel_math.h's: Philox of {0, 0, "ADVS", 0} under the seed,
    as the reference computes it, and apart from the noise stream's key."""
    for seed in (0, 1, 2**32 + 5, 2**64 - 1):
        assert fm._C.adversarial_key(seed) == ref.adversarial_key(seed)
        assert fm._C.adversarial_key(seed) != fm._C.noise_key(seed)


# ---------------------------------------------------------------------------- CPU vs GPU


@pytest.mark.gpu
def test_gpu_matches_cpu_bitwise(gpu, rng):
    x, g = _images(rng, (1000, 784)), normal(rng, (1000, 784))
    step = gpu.to(np.array([3], np.int64))
    cpu = fm.ops.adversarial_init(x, eps=0.03, seed=99, step=3)
    dev = fm.ops.adversarial_init(gpu.to(x), eps=0.03, seed=99, step=step)
    _bits_equal(gpu.host(dev), cpu, "adversarial_init cpu vs gpu")
    fm.ops.adversarial_step(x, cpu, g, eps=0.03, alpha=0.01)
    fm.ops.adversarial_step(gpu.to(x), dev, gpu.to(g), eps=0.03, alpha=0.01)
    _bits_equal(gpu.host(dev), cpu, "adversarial_step cpu vs gpu")


@pytest.mark.gpu
def test_gpu_mixed_devices(gpu, rng):
    x = gpu.to(_images(rng, (3, 4)))
    with pytest.raises(ValueError, match="'grad' is on cpu"):
        fm.ops.adversarial_step(x, gpu.to(_images(rng, (3, 4))), normal(rng, (3, 4)), eps=0.1,
                                alpha=0.1)
    with pytest.raises(ValueError, match="'step' is on cpu"):
        fm.ops.adversarial_init(x, eps=0.1, seed=1, step=np.zeros(1, np.int64))
