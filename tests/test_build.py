"""What the build produced and what fm.backends() reports about it."""
import pytest

import fastmlp as fm
from fastmlp import _C, _interop


def test_backends_reports_build_and_usability():
    b = fm.backends()
    assert b["cpu"] is True
    assert b["cpu_threads"] >= 1
    assert isinstance(b["cuda_built"], bool) and isinstance(b["cuda"], bool)
    assert b["cuda_built"] == bool(_C.cuda_built)
    assert f"cuda={'ON' if b['cuda_built'] else 'OFF'}" in b["build_info"]
    if b["cuda"]:
        assert b["cuda_reason"] == ""
        assert b["cuda_device"]
    else:
        # Usable or not, the reason must say which piece is missing.
        assert any(s in b["cuda_reason"] for s in ("built without", "CuPy", "no usable CUDA device"))


@pytest.mark.skipif(not _C.cuda_built, reason="needs the CUDA part of the build")
def test_cuda_device_query_never_raises():
    # On a machine without a GPU or driver this must come back as (0, reason),
    # so that the module imports and fm.backends() can say why.
    count, why = _C.cuda.device_count()
    assert isinstance(count, int) and count >= 0
    assert isinstance(why, str)
    if count == 0:
        assert why
    assert _C.cuda.runtime_version() >= 12000


def test_cuda_not_usable_gives_actionable_error():
    usable, why = _interop.cuda_status()
    if usable:
        pytest.skip("a GPU is usable here; the error path is for machines without one")
    with pytest.raises(RuntimeError, match="cannot run here") as exc:
        _interop.require_cuda("gemm")
    assert why in str(exc.value)


def test_build_without_cuda_says_how_to_fix():
    if _C.cuda_built:
        pytest.skip("this build has its CUDA part")
    assert "FASTMLP_CUDA=ON" in fm.backends()["cuda_reason"]
