"""Arrays that are not NumPy/CuPy: torch tensors and bare DLPack producers are shared
zero-copy; results come back as NumPy (CuPy) arrays; out= / in-place arguments of any
such kind are written in place. Plus fm.backends()."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close, assert_equal_f32, away_from_zero, f64, gemm_tol, normal

import fastmlp as fm
from fastmlp import reference as ref


def _torch():
    return pytest.importorskip(
        "torch", reason="torch is not installed: the interop tests with torch tensors need it"
    )


class DLPackOnly:
    """An array that speaks only DLPack (no __array__, no buffer protocol, no
    __array_interface__): what a foreign framework's tensor looks like to fastmlp."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, *args, **kwargs):
        return self._a.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_backends_dict():
    b = fm.backends()
    assert b["cpu"] is True
    assert isinstance(b["cuda"], bool)
    assert isinstance(b["cuda_reason"], str)
    assert (b["cuda_reason"] == "") == b["cuda"], (
        "cuda_reason must be empty exactly when CUDA is usable"
    )
    if not b["cuda"]:
        assert len(b["cuda_reason"]) > 10, "say why the CUDA backend is not usable"


# ----------------------------------------------------------------------------- bare DLPack


def test_dlpack_only_inputs(rng):
    a, b = normal(rng, (13, 7)), normal(rng, (7, 5))
    c = fm.ops.gemm(DLPackOnly(a), DLPackOnly(b))
    assert isinstance(c, np.ndarray) and c.dtype == np.float32
    assert_close(
        c, ref.gemm(*f64(a, b)), gemm_tol(a, b, None, trans_a=False, trans_b=False, alpha=1, beta=0)
    )
    x = away_from_zero(rng, (9, 4))
    assert_equal_f32(fm.ops.relu(DLPackOnly(x)), ref.relu(f64(x)))
    labels = rng.integers(0, 4, 9).astype(np.int64)
    loss, probs = fm.ops.softmax_cross_entropy(DLPackOnly(x), DLPackOnly(labels))
    want_loss, want_probs = ref.softmax_cross_entropy(f64(x), labels)
    assert abs(float(loss) - float(want_loss)) < 1e-5 * float(want_loss)
    assert_close(probs, want_probs, 1e-6)


def test_dlpack_only_written_in_place(rng):
    """Zero-copy for real: an in-place op on a DLPack-only param updates the owner's memory."""
    p0, g = normal(rng, 17), normal(rng, 17)
    owner = p0.copy()
    fm.ops.sgd_step(DLPackOnly(owner), DLPackOnly(g), None, lr=0.5)
    assert_close(owner, f64(p0) - 0.5 * f64(g), 2**-23 * (np.abs(p0) + np.abs(g)))
    x = away_from_zero(rng, (6, 5))
    out = np.full((6, 5), np.nan, np.float32)
    fm.ops.relu(DLPackOnly(x), out=DLPackOnly(out))
    assert_equal_f32(out, ref.relu(f64(x)))


def test_dlpack_only_errors_are_named(rng):
    with pytest.raises(TypeError, match="'x'.*float64|float64.*'x'"):
        fm.ops.relu(DLPackOnly(np.zeros(3)))
    with pytest.raises(ValueError, match="'b'"):
        fm.ops.gemm(
            DLPackOnly(np.zeros((2, 3), np.float32)),
            DLPackOnly(np.zeros((4, 3), np.float32)[:, ::2]),
        )


# ----------------------------------------------------------------------------- torch (CPU)


def test_torch_inputs_and_out(rng):
    torch = _torch()
    a, b = normal(rng, (31, 13)), normal(rng, (13, 7))
    ta, tb = torch.from_numpy(a.copy()), torch.from_numpy(b.copy())
    c = fm.ops.gemm(ta, tb)
    assert isinstance(c, np.ndarray), "results come back as NumPy arrays"
    tol = gemm_tol(a, b, None, trans_a=False, trans_b=False, alpha=1, beta=0)
    assert_close(c, ref.gemm(*f64(a, b)), tol)
    # out= a torch tensor: written in place (NaN poison must be gone everywhere)
    tout = torch.full((31, 7), float("nan"))
    fm.ops.gemm(ta, tb, out=tout)
    assert_close(tout.numpy(), ref.gemm(*f64(a, b)), tol)
    # mixed torch / numpy on the CPU is one device: fine
    assert_close(fm.ops.gemm(ta, b), ref.gemm(*f64(a, b)), tol)


def test_torch_in_place_ops(rng):
    torch = _torch()
    x = away_from_zero(rng, (8, 9))
    tx = torch.from_numpy(x.copy())
    fm.ops.relu(tx, out=tx)  # out aliasing the input, both torch
    assert_equal_f32(tx.numpy(), ref.relu(f64(x)))
    tb = torch.from_numpy(normal(rng, 9))
    fm.ops.bias_add(tx, tb, out=tx)
    assert_equal_f32(tx.numpy(), ref.bias_add(ref.relu(f64(x)), f64(tb.numpy())))
    # optimizer state as torch tensors, updated in place
    p0, g = normal(rng, 50), normal(rng, 50)
    tp, tm, tv = torch.from_numpy(p0.copy()), torch.zeros(50), torch.zeros(50)
    fm.ops.adam_step(tp, torch.from_numpy(g), tm, tv, step=1, lr=0.01)
    p, m, v = p0.copy(), np.zeros(50, np.float32), np.zeros(50, np.float32)
    ref.adam_step(p, g, m, v, step=1, lr=0.01)
    assert_close(tp.numpy(), p, 4 * 2**-23 * (np.abs(p0) + 0.01) + 1e-30)
    assert_close(tm.numpy(), m, 2 * 2**-23 * np.abs(m))
    assert not np.array_equal(tp.numpy(), p0)


def test_torch_softmax_xent_and_backward(rng):
    torch = _torch()
    logits = normal(rng, (21, 6), 2.0)
    labels = rng.integers(0, 6, 21)
    tl, ty = torch.from_numpy(logits), torch.from_numpy(labels)
    loss, probs = fm.ops.softmax_cross_entropy(tl, ty)
    tt = tl.double().requires_grad_()
    tloss = torch.nn.functional.cross_entropy(tt, ty)
    tloss.backward()
    assert abs(float(loss) - tloss.item()) < 1e-5 * tloss.item()
    grad = fm.ops.softmax_cross_entropy_backward(torch.from_numpy(probs), ty)
    assert_close(grad, tt.grad.numpy(), 1e-7)


def test_torch_bad_tensors_are_named():
    torch = _torch()
    with pytest.raises(TypeError, match="'a'"):
        fm.ops.gemm(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="'b'"):
        fm.ops.gemm(torch.zeros(2, 3), torch.zeros(2, 3).t())  # a transposed view: not C-contiguous
    with pytest.raises(ValueError, match="'out'"):
        fm.ops.relu(torch.zeros(4), out=torch.zeros(5))
    with pytest.raises(ValueError, match=r"(?<!\d)7(?!\d)"):
        fm.ops.softmax_cross_entropy(torch.zeros(3, 4), torch.tensor([0, 7, 1]))


# ----------------------------------------------------------------------------- GPU interop


@pytest.mark.gpu
def test_torch_cuda_tensors(gpu, rng):
    torch = _torch()
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    a, b = normal(rng, (33, 17)), normal(rng, (17, 9))
    ta, tb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
    c = fm.ops.gemm(ta, tb)
    assert isinstance(c, gpu.xp.ndarray), "results on the GPU come back as CuPy arrays"
    tol = gemm_tol(a, b, None, trans_a=False, trans_b=False, alpha=1, beta=0)
    assert_close(gpu.host(c), ref.gemm(*f64(a, b)), tol)
    tout = torch.full((33, 9), float("nan"), device="cuda")
    fm.ops.gemm(ta, tb, out=tout)
    torch.cuda.synchronize()
    assert_close(tout.cpu().numpy(), ref.gemm(*f64(a, b)), tol)
    x = away_from_zero(rng, (5, 7))
    tx = torch.from_numpy(x).cuda()
    fm.ops.relu(tx, out=tx)
    torch.cuda.synchronize()
    assert_equal_f32(tx.cpu().numpy(), ref.relu(f64(x)))


@pytest.mark.gpu
def test_dlpack_only_cuda(gpu, rng):
    x = away_from_zero(rng, (11, 3))
    y = fm.ops.relu(DLPackOnly(gpu.to(x)))
    assert isinstance(y, gpu.xp.ndarray)
    assert_equal_f32(gpu.host(y), ref.relu(f64(x)))
