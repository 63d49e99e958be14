"""The elementwise activations (issue 15): fm.ops.activation / activation_backward and
the same activations fused into dense_forward / dense_backward_input, against the
float64 reference, float64 finite differences and PyTorch, on the CPU and (the `gpu`
twins through the `backend` fixture) on the GPU.

Tolerances. The kernels evaluate each activation with a few float32 operations
whose building blocks (exp, expm1, log1p, tanh, erf) are within 3 ulp (kernel_math.h
states the measured bounds; CUDA's are <= 2 ulp). An intermediate can carry an
absolute error of a few ulp of max(|z|, 1) (gelu's 1 + erf(z / sqrt 2) cancels for
z << 0, softplus adds max(z, 0)), and a derivative of a few ulp of |dy| (1 + |z|)
(1 - y in sigmoid', z * pdf in gelu'). ACT_ULPS = 16 ulp of those scales: ~5x the
worst case of the formulas, yet 1/100 of the error of a tanh-approximated gelu
(~1e-3) or of a float16-grade exp, so a wrong or cheapened formula fails.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import fastmlp as fm
from fastmlp import ops
from fastmlp import reference as ref
from fastmlp._interop import address
from helpers import F32_EPS, F32_TINY, assert_close, assert_meaningful, f64, gemm_tol, normal, \
    shape_id

torch = pytest.importorskip("torch")

ACT_ULPS = 16
NAMES = ["linear", "relu", "sigmoid", "tanh", "gelu", "silu", "swish", "elu", "softplus",
         "leaky_relu"]
NEEDS_INPUT = {"gelu", "silu", "swish", "softplus"}
FROM_OUTPUT = [n for n in NAMES if n not in NEEDS_INPUT]
# The largest |act'(z)| of any of them (gelu' peaks at 1.129, silu' at 1.100).
MAX_SLOPE = 1.2

TORCH = {
    "relu": torch.nn.ReLU(), "sigmoid": torch.nn.Sigmoid(), "tanh": torch.nn.Tanh(),
    "gelu": torch.nn.GELU(), "silu": torch.nn.SiLU(), "swish": torch.nn.SiLU(),
    "elu": torch.nn.ELU(), "softplus": torch.nn.Softplus(),
    "leaky_relu": torch.nn.LeakyReLU(0.2), "linear": torch.nn.Identity(),
}

SHAPES = [(0, 5), (5, 0), (1, 1), (1, 7), (3, 1), (13, 31), (47, 48), (48, 49), (97, 97),
          (257, 129)]


def fwd_tol(z64, want64):
    return ACT_ULPS * F32_EPS * (np.abs(want64) + np.abs(z64) + 1.0) + F32_TINY


def bwd_tol(dy64, z64, want64):
    return ACT_ULPS * F32_EPS * (np.abs(want64) + np.abs(dy64) * (1.0 + np.abs(z64))) + F32_TINY


def data(rng, shape, scale=3.0):
    return normal(rng, shape, scale)


# ---------------------------------------------------------------- standalone


@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(*s) for s in SHAPES])
@pytest.mark.parametrize("name", NAMES)
def test_forward_matches_reference(backend, rng, name, shape):
    x = data(rng, shape)
    out = backend.nan(shape)
    y = ops.activation(backend.to(x), name, out=out)
    assert y is out
    want = ref.activation(f64(x), name)
    assert_close(backend.host(y), want, fwd_tol(f64(x), want), f"{name} forward")
    if x.size:
        assert_meaningful(want)


@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(*s) for s in SHAPES])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("from_input", [True, False], ids=["from_input", "from_output"])
def test_backward_matches_reference(backend, rng, name, shape, from_input):
    if not from_input and name in NEEDS_INPUT:
        pytest.skip("gelu/silu/softplus derivatives need the input (refused: see below)")
    z = data(rng, shape)
    dy = normal(rng, shape)
    saved = z if from_input else ops.activation(z, name)
    dx = ops.activation_backward(backend.to(dy), backend.to(saved), name,
                                 saved_is_input=from_input, out=backend.nan(shape))
    want = ref.activation_backward(f64(dy), f64(saved), name, saved_is_input=from_input)
    assert_close(backend.host(dx), want, bwd_tol(f64(dy), f64(z), want), f"{name} backward")


@pytest.mark.parametrize("name", NAMES)
def test_any_rank_and_in_place(backend, rng, name):
    x = data(rng, (3, 4, 5))
    want = ref.activation(f64(x), name)
    xb = backend.to(x)
    y = ops.activation(xb, name, out=xb)  # out may be x
    assert y is xb
    assert_close(backend.host(y), want, fwd_tol(f64(x), want), f"{name} in place, 3-D")
    s = ops.activation(backend.to(np.float32(0.5)), name)
    assert_close(backend.host(s), ref.activation(np.float64(0.5), name), 1e-6, "0-d")


@pytest.mark.parametrize("name", NAMES)
def test_backward_against_finite_differences(backend, rng, name):
    """The kernel's derivative against central differences of the float64 reference
    (h = 1e-6: truncation ~h^2 |f'''| ~ 1e-12, rounding ~1e-16 / h ~ 1e-10), on inputs
    away from the kinks of relu / leaky_relu / elu at 0."""
    z = rng.uniform(0.05, 4.0, (29, 23)) * rng.choice([-1.0, 1.0], (29, 23))
    z = z.astype(np.float32)
    dy = normal(rng, z.shape)
    h = 1e-6
    z64 = f64(z)
    fd = (ref.activation(z64 + h, name) - ref.activation(z64 - h, name)) / (2 * h) * f64(dy)
    dx = ops.activation_backward(backend.to(dy), backend.to(z), name, saved_is_input=True)
    assert_close(backend.host(dx), fd, bwd_tol(f64(dy), z64, fd) + 1e-9, f"{name} vs FD")
    if name not in NEEDS_INPUT:
        y = ops.activation(z, name)
        dx = ops.activation_backward(backend.to(dy), backend.to(y), name)
        assert_close(backend.host(dx), fd, bwd_tol(f64(dy), z64, fd) + 1e-9,
                     f"{name} from the output vs FD")


@pytest.mark.parametrize("name", [n for n in NAMES if n != "linear"])
def test_against_torch(backend, rng, name):
    x = data(rng, (61, 67))
    dy = normal(rng, x.shape)
    t = torch.tensor(x, requires_grad=True)
    yt = TORCH[name](t)
    yt.backward(torch.tensor(dy))
    y = backend.host(ops.activation(backend.to(x), name))
    want = yt.detach().numpy().astype(np.float64)
    # both sides float32 of a few ulp each: the same bound as against the reference
    assert_close(y, want, fwd_tol(f64(x), want), f"{name} vs torch forward")
    dx = backend.host(ops.activation_backward(backend.to(dy), backend.to(x), name,
                                              saved_is_input=True))
    gt = t.grad.numpy().astype(np.float64)
    assert_close(dx, gt, bwd_tol(f64(dy), f64(x), gt), f"{name} vs torch backward")


SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 30.0, -30.0, 100.0, -100.0,
                    1e30, -1e30, 1e-30, -1e-30], dtype=np.float32)


@pytest.mark.parametrize("name", NAMES)
def test_nan_inf_as_torch(backend, name):
    """NaN stays NaN, +-Inf go to the function's limits, forward and backward, as in
    torch (the same positions NaN, infinities equal, the rest within the bound)."""
    x = SPECIAL.copy()
    t = torch.tensor(x, requires_grad=True)
    yt = TORCH[name](t)
    dy = np.ones_like(x)
    yt.backward(torch.tensor(dy))
    y = backend.host(ops.activation(backend.to(x), name))
    want = yt.detach().numpy().astype(np.float64)
    if name == "gelu":
        # torch's CPU GELU returns NaN at +inf (its vectorised erf path); the limit, and
        # torch's CUDA result, is +inf = 0.5 * inf * (1 + erf(inf)). fastmlp gives +inf.
        want[np.isposinf(x)] = np.inf
    assert_close(y, want, fwd_tol(np.nan_to_num(f64(x), posinf=0, neginf=0), np.nan_to_num(want)),
                 f"{name} special forward")
    dx = backend.host(ops.activation_backward(backend.to(dy), backend.to(x), name,
                                              saved_is_input=True))
    gt = t.grad.numpy().astype(np.float64)
    with np.errstate(invalid="ignore"):
        tol = bwd_tol(f64(dy), np.nan_to_num(f64(x), posinf=0, neginf=0), np.nan_to_num(gt))
    assert_close(dx, gt, tol, f"{name} special backward")


@pytest.mark.parametrize("name", sorted(NEEDS_INPUT))
def test_from_output_refused(backend, rng, name):
    x = backend.to(data(rng, (4, 4)))
    with pytest.raises(ValueError, match="needs its input"):
        ops.activation_backward(x, x, name)
    w = backend.to(data(rng, (3, 4)))
    with pytest.raises(ValueError, match="needs its input"):
        ops.dense_backward_input(x, w, activation=name, saved=backend.to(data(rng, (4, 3))))


def test_unknown_name_lists_the_valid_ones(backend):
    x = backend.to(np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="gelu"):
        ops.activation(x, "mish")
    with pytest.raises(ValueError, match="leaky_relu"):
        ops.dense_forward(x, x, activation="softmax")
    with pytest.raises(ValueError, match="saved"):
        ops.activation_backward(x, None, "tanh")


def test_activations_table():
    assert ops.ACTIVATIONS == ref.ACTIVATIONS
    assert ops.ACTIVATIONS["swish"] == ops.ACTIVATIONS["silu"] == 5
    assert set(ops.ACTIVATIONS) >= set(NAMES)


# ---------------------------------------------------------------- fused into the GEMM

DENSE = [(0, 5, 7), (1, 1, 1), (1, 3, 5), (7, 13, 3), (13, 31, 9), (47, 17, 48), (48, 33, 49),
         (97, 97, 97), (32, 784, 128), (129, 65, 257)]


@pytest.mark.parametrize("n,k,m", DENSE, ids=[shape_id(*s) for s in DENSE])
@pytest.mark.parametrize("name", NAMES)
def test_dense_forward_fused(backend, rng, name, n, k, m):
    x, w, b = normal(rng, (n, k)), normal(rng, (k, m), 1 / math.sqrt(max(k, 1))), normal(rng, (m,))
    pre = backend.nan((n, m))
    y = ops.dense_forward(backend.to(x), backend.to(w), backend.to(b), activation=name,
                          preact_out=pre, out=backend.nan((n, m)))
    z64 = f64(x) @ f64(w) + f64(b)
    assert_close(backend.host(pre), z64, gemm_tol(x, w, None, trans_a=False, trans_b=False,
                                                  alpha=1.0, beta=0.0) + 4 * F32_EPS * np.abs(z64),
                 "preact_out")
    # The epilogue on the kernel's own z: the standalone activation of preact_out.
    zk = backend.host(pre)
    want = ref.activation(f64(zk), name)
    assert_close(backend.host(y), want, fwd_tol(f64(zk), want), f"{name} fused forward")
    if backend.name == "cpu":  # one code path for both on the CPU: bit for bit
        np.testing.assert_array_equal(backend.host(y), ops.activation(zk, name))
    y2 = ops.dense_forward(backend.to(x), backend.to(w), backend.to(b), activation=name)
    np.testing.assert_array_equal(backend.host(y2), backend.host(y))  # preact_out changes nothing


@pytest.mark.parametrize("n,k,m", DENSE, ids=[shape_id(*s) for s in DENSE])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("from_input", [True, False], ids=["from_input", "from_output"])
def test_dense_backward_input_fused(backend, rng, name, n, k, m, from_input):
    if not from_input and name in NEEDS_INPUT:
        pytest.skip("needs the input")
    dy, w = normal(rng, (n, m)), normal(rng, (k, m), 1 / math.sqrt(max(m, 1)))
    z = data(rng, (n, k))
    saved = z if from_input else ops.activation(z, name)
    dx = ops.dense_backward_input(backend.to(dy), backend.to(w), activation=name,
                                  saved=backend.to(saved), saved_is_input=from_input,
                                  out=backend.nan((n, k)))
    g64 = f64(dy) @ f64(w).T
    want = ref.activation_backward(g64, f64(saved), name, saved_is_input=from_input)
    gtol = gemm_tol(dy, w, None, trans_a=False, trans_b=True, alpha=1.0, beta=0.0)
    assert_close(backend.host(dx), want, MAX_SLOPE * gtol + bwd_tol(g64, f64(z), want),
                 f"{name} fused backward")


def test_relu_output_is_activation_relu(backend, rng):
    dy, w = normal(rng, (37, 19)), normal(rng, (23, 19))
    y = ops.relu(normal(rng, (37, 23)))
    a = ops.dense_backward_input(backend.to(dy), backend.to(w), relu_output=backend.to(y))
    b = ops.dense_backward_input(backend.to(dy), backend.to(w), activation="relu",
                                 saved=backend.to(y))
    np.testing.assert_array_equal(backend.host(a), backend.host(b))
    with pytest.raises(ValueError, match="relu_output"):
        ops.dense_backward_input(backend.to(dy), backend.to(w), relu_output=backend.to(y),
                                 activation="tanh")


def test_relu_general_path_equals_fast_path(backend, rng):
    """act="relu" through the general epilogue (with preact_out) is bit-identical to the
    relu fast path; so is grad_act="relu" from the input vs relu_output."""
    x, w, b = normal(rng, (53, 41)), normal(rng, (41, 37)), normal(rng, (37,))
    fast = ops.dense_forward(backend.to(x), backend.to(w), backend.to(b), activation="relu")
    gen = ops.dense_forward(backend.to(x), backend.to(w), backend.to(b), activation="relu",
                            preact_out=backend.nan((53, 37)))
    np.testing.assert_array_equal(backend.host(gen), backend.host(fast))
    dy, w2 = normal(rng, (53, 37)), normal(rng, (41, 37))
    z = normal(rng, (53, 41))
    a = ops.dense_backward_input(backend.to(dy), backend.to(w2), relu_output=backend.to(
        ops.relu(z)))
    c = ops.dense_backward_input(backend.to(dy), backend.to(w2), activation="relu",
                                 saved=backend.to(z), saved_is_input=True)
    np.testing.assert_array_equal(backend.host(c), backend.host(a))


def test_fused_all_cpu_drivers(rng):
    """Every CPU GEMM driver (generic / avx2 / avx512, as this CPU allows) and the
    split-K path (few rows, deep k, 2+ threads) apply the epilogue identically."""
    old = fm._C.cpu.set_gemm_isa("auto")
    try:
        results = {}
        x, w, b = normal(rng, (32, 784)), normal(rng, (784, 128), 0.05), normal(rng, (128,))
        for isa in fm._C.cpu.gemm_isas_supported().split(","):
            fm._C.cpu.set_gemm_isa(isa)
            pre = np.empty((32, 128), np.float32)
            y = ops.dense_forward(x, w, b, activation="gelu", preact_out=pre)
            np.testing.assert_array_equal(y, ops.activation(pre, "gelu"))
            results[isa] = y
        for y in results.values():
            assert_close(y, ref.activation(f64(x) @ f64(w) + f64(b), "gelu"), 1e-4, "drivers")
    finally:
        fm._C.cpu.set_gemm_isa(old)


def test_gemm_ex_checks(backend, rng):
    mod = fm._C.cpu if backend.name == "cpu" else fm._C.cuda
    a = backend.to(normal(rng, (4, 4)))
    extra = () if backend.name == "cpu" else (0,)
    p = address(a)
    none = (0, 1.0, 0, 0, 0)

    def call(act=0, preact=0, ld_preact=4, grad_act=0, saved=0, ld_saved=4, relu=False,
             saved_is_input=False):
        mod.gemm_ex(False, False, 4, 4, 4, 1.0, p, 4, p, 4, 0.0, p, 4, 0, relu, 0, 4, 0, 0, 0, 0,
                    act, preact, ld_preact, none, grad_act, saved, ld_saved, saved_is_input,
                    none, *extra)

    with pytest.raises(ValueError, match="act must be"):
        call(act=9)
    with pytest.raises(ValueError, match="grad_act must be"):
        call(grad_act=-1)
    with pytest.raises(ValueError, match="relu and act"):
        call(act=2, relu=True)
    with pytest.raises(ValueError, match="ld_preact"):
        call(act=2, preact=p, ld_preact=3)
    with pytest.raises(ValueError, match="needs saved"):
        call(grad_act=2)
    with pytest.raises(ValueError, match="ld_saved"):
        call(grad_act=2, saved=p, ld_saved=2)
    with pytest.raises(ValueError, match="saved_is_input"):
        call(grad_act=4, saved=p)


@pytest.mark.parametrize("name", ["gelu", "tanh", "softplus"])
def test_cpu_result_independent_of_threads(rng, name):
    """A large array (threaded, ranges starting anywhere) gives the same bits on 1 and 2
    threads, forward and backward, with a dropout: the loops' vector body and scalar
    remainder round alike (activation.cpp is built without FMA contraction)."""
    x = normal(rng, (301, 257), 3.0)
    dy = normal(rng, x.shape)
    d = ops.Dropout(0.3, seed=5, step=11, layer=2)
    old = fm._C.cpu.num_threads()
    try:
        got = []
        for t in (1, 2, 3):
            fm._C.cpu.set_num_threads(t)
            got.append((ops.activation(x, name, dropout=d),
                        ops.activation_backward(dy, x, name, saved_is_input=True, dropout=d)))
    finally:
        fm._C.cpu.set_num_threads(old)
    for y, dx in got[1:]:
        np.testing.assert_array_equal(y, got[0][0])
        np.testing.assert_array_equal(dx, got[0][1])


@pytest.mark.parametrize("name", ["tanh", "gelu", "elu"])
def test_numpy_fast_path_equals_checked_path(rng, name):
    """NumPy arrays take the C++ fast path (bindings.cpp gemm_fast); DLPack arrays (here
    torch's) the checked Python path. Both run the same kernel: the same bits."""
    x, w, b = normal(rng, (45, 29)), normal(rng, (29, 51), 0.2), normal(rng, (51,))
    y_fast = ops.dense_forward(x, w, b, activation=name)
    y_checked = ops.dense_forward(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                                  activation=name)
    np.testing.assert_array_equal(np.asarray(y_checked), y_fast)
    dy, w2, z = normal(rng, (45, 51)), normal(rng, (29, 51), 0.2), normal(rng, (45, 29))
    d_fast = ops.dense_backward_input(dy, w2, activation=name, saved=z, saved_is_input=True)
    d_checked = ops.dense_backward_input(torch.from_numpy(dy), torch.from_numpy(w2),
                                         activation=name, saved=torch.from_numpy(z),
                                         saved_is_input=True)
    np.testing.assert_array_equal(np.asarray(d_checked), d_fast)


def test_preact_out_fast_path_equals_checked_path(rng):
    x, w, b = normal(rng, (37, 23), 2.0), normal(rng, (23, 41), 0.3), normal(rng, (41,))
    for name in (None, "relu", "silu"):
        pre_fast = np.full((37, 41), np.nan, np.float32)
        y_fast = ops.dense_forward(x, w, b, activation=name, preact_out=pre_fast)
        pre_checked = torch.full((37, 41), float("nan"))
        y_checked = ops.dense_forward(torch.from_numpy(x), torch.from_numpy(w),
                                      torch.from_numpy(b), activation=name,
                                      preact_out=pre_checked)
        np.testing.assert_array_equal(pre_checked.numpy(), pre_fast)
        np.testing.assert_array_equal(np.asarray(y_checked), y_fast)
        np.testing.assert_array_equal(y_fast, ops.activation(pre_fast, name or "linear"))
