"""[issue 16] The fused metrics kernel (fastmlp.ops.metric_sums) and the exact ROC AUC
(fastmlp.ops.roc_auc): against scikit-learn, against fastmlp.reference, and their edge
cases. Every test takes the `backend` fixture: NumPy -> the CPU kernel here, CuPy ->
the CUDA kernel where a GPU is usable (the gpu twins, marked `gpu`).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import F32_EPS, shape_id
from sklearn.metrics import (
    accuracy_score,
    mean_absolute_error,
    mean_squared_error,
    roc_auc_score,
    top_k_accuracy_score,
)

import fastmlp as fm

ALL = ["argmax", "binary", "top_k", "abs", "sq"]
INT_METRICS = ["argmax", "top_k"]   # the metrics integer labels allow
KINDS = ["int32", "int64", "float"]
TRANSFORMS = ["none", "sigmoid", "softmax"]


def _sigmoid64(x):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _softmax64(x):
    z = np.asarray(x, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _transform64(pred, transform):
    if transform == "sigmoid":
        return _sigmoid64(pred)
    if transform == "softmax":
        return _softmax64(pred)
    return np.asarray(pred, dtype=np.float64)


def _labels(rng, kind, rows, cols):
    """Class indices, or float rows of 0/1 (several ones per row: the float label row's
    arg-max is then its first maximum, a rule the kernel must follow)."""
    if kind == "float":
        return (rng.random((rows, cols)) < 0.4).astype(np.float32)
    return rng.integers(0, cols, size=rows).astype(np.int32 if kind == "int32" else np.int64)


def _binary_slack(pred, transform, rows, cols, threshold=0.5):
    """How far the binary sum may differ from the float64 reference: the kernel thresholds
    float32 p, the reference float64 p, so an element within float32 rounding of the
    threshold may land on the other side (each such element moves the sum by 1 / cols).
    Plus the row values' own rounding: each row mean is stored as a float32 (row_scratch),
    within half an ulp (<= eps / 2, the mean is <= 1) of the exact fraction."""
    if rows == 0:
        return 0.0
    p = _transform64(pred, transform)
    near = np.abs(p - threshold) <= 8 * F32_EPS * np.maximum(1.0, np.abs(p))
    return float(near.sum()) / cols + rows * F32_EPS / 2


# --------------------------------------------------------------------------- vs reference

@pytest.mark.parametrize("rows,cols", [(r, c) for r in (0, 1, 5, 1000) for c in (1, 2, 10, 37)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_matches_reference(backend, rng, rows, cols, transform, kind):
    pred = (3.0 * rng.standard_normal((rows, cols))).astype(np.float32)
    labels = _labels(rng, kind, rows, cols)
    metrics = ALL if kind == "float" else INT_METRICS
    got = fm.ops.metric_sums(backend.to(pred), backend.to(labels), metrics, transform=transform)
    want = fm.reference.metric_sums(pred, labels, metrics, transform=transform)
    assert set(got) == set(metrics)
    # Hit counts compare pred (float32 in both): exact.
    assert got["argmax"] == want["argmax"]
    assert got["top_k"] == want["top_k"]
    if kind == "float":
        slack = _binary_slack(pred, transform, rows, cols)
        assert abs(got["binary"] - want["binary"]) <= slack + 1e-9 * rows, (got, want)
        # Row means of float32 p against float64 p: a few float32 ulps of each
        # term, summed over the rows.
        for name in ("abs", "sq"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6 * (rows + 1))
    if rows == 1000:
        # Non-trivial data: some hits and some misses, so neither all-0 nor all-1 passes.
        assert 0 < want["argmax"] < rows or cols == 1
        if kind == "float":
            assert want["abs"] > 0 and want["sq"] > 0 and want["binary"] > 0
    if rows == 0:
        assert all(v == 0.0 for v in got.values())


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("k", [1, 2, 5, 40])
def test_top_k_values_of_k(backend, rng, transform, k):
    pred = (2.0 * rng.standard_normal((300, 37))).astype(np.float32)
    labels = _labels(rng, "int64", 300, 37)
    got = fm.ops.metric_sums(backend.to(pred), backend.to(labels), ["top_k", "argmax"],
                             transform=transform, k=k)
    want = fm.reference.metric_sums(pred, labels, ["top_k", "argmax"], transform=transform, k=k)
    assert got == want
    if k == 1:   # no ties in random float data: top-1 is the arg-max
        assert got["top_k"] == got["argmax"]
    if k >= 37:
        assert got["top_k"] == 300


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.9])
def test_binary_threshold(backend, rng, threshold):
    pred = (3.0 * rng.standard_normal((200, 7))).astype(np.float32)
    labels = rng.random((200, 7)).astype(np.float32)   # soft labels: y > 0.5 is the class
    got = fm.ops.metric_sums(backend.to(pred), backend.to(labels), ["binary"],
                             transform="sigmoid", threshold=threshold)
    want = fm.reference.metric_sums(pred, labels, ["binary"], transform="sigmoid",
                                    threshold=threshold)
    slack = _binary_slack(pred, "sigmoid", 200, 7, threshold)
    assert abs(got["binary"] - want["binary"]) <= slack + 1e-9
    assert 0 < got["binary"] < 200


# --------------------------------------------------------------------------- vs sklearn

def _distinct_pred(rng, rows, cols, scale=0.05):
    """Rows of distinct values (a shuffled grid per row, plus small noise): no ties in
    pred nor in the float64 transform, so tie rules cannot matter."""
    base = np.stack([rng.permutation(cols) for _ in range(rows)]).astype(np.float64)
    return ((base + rng.uniform(0.1, 0.4, size=(rows, cols))) * scale * 10).astype(np.float32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_accuracy_vs_sklearn(backend, rng, kind, transform):
    rows, cols = 500, 10
    pred = _distinct_pred(rng, rows, cols)
    if kind == "float":   # categorical accuracy: one-hot rows
        y = rng.integers(0, cols, size=rows)
        labels = np.eye(cols, dtype=np.float32)[y]
    else:
        labels = _labels(rng, kind, rows, cols)
        y = labels
    got = fm.ops.metric_sums(backend.to(pred), backend.to(labels), ["argmax"],
                             transform=transform)["argmax"]
    p = _transform64(pred, transform)
    want = accuracy_score(y, p.argmax(axis=1), normalize=False)
    assert got == want
    assert 0 < got < rows


@pytest.mark.parametrize("transform", ["none", "sigmoid"])
def test_binary_accuracy_vs_sklearn(backend, rng, transform):
    rows, cols = 400, 6
    mag = rng.uniform(1e-2, 4.0, size=(rows, cols))   # away from the sigmoid's 0.5 at 0
    pred = (np.where(rng.random((rows, cols)) < 0.5, -mag, mag)).astype(np.float32)
    labels = (rng.random((rows, cols)) < 0.5).astype(np.float32)
    threshold = 0.5 if transform == "sigmoid" else 0.0
    if transform == "none":
        pred = pred + np.float32(0.5)   # p itself is compared with 0.5, kept away from it
        threshold = 0.5
    got = fm.ops.metric_sums(backend.to(pred), backend.to(labels), ["binary"],
                             transform=transform, threshold=threshold)["binary"]
    p = _transform64(pred, transform)
    want = accuracy_score(labels.ravel() > 0.5, p.ravel() > threshold)
    # The row means are float32 (row_scratch): each within eps / 2 of the exact fraction.
    np.testing.assert_allclose(got / rows, want, rtol=F32_EPS)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("cols", [10, 37])
def test_top_k_vs_sklearn(backend, rng, transform, cols):
    rows = 600
    pred = _distinct_pred(rng, rows, cols)
    labels = rng.integers(0, cols, size=rows).astype(np.int64)
    got = fm.ops.metric_sums(backend.to(pred), backend.to(labels), ["top_k"],
                             transform=transform, k=5)["top_k"]
    p = _transform64(pred, transform)
    want = top_k_accuracy_score(labels, p, k=5, labels=np.arange(cols), normalize=False)
    assert got == want
    assert 0 < got < rows


def test_top_k_ties_follow_in_top_k(backend):
    """tf.math.in_top_k: the label is in when fewer than k classes score strictly above
    it, so classes tied with it at the boundary all count as in."""
    pred = np.array([[1.0, 2.0, 2.0, 2.0, 0.0]], dtype=np.float32)
    cases = []   # (label, k, hit by the strict-greater rule)
    for label in range(5):
        above = int(np.sum(pred[0] > pred[0, label]))
        for k in (1, 2, 3, 4, 5):
            cases.append((label, k, above < k))
    # The rule really lets ties in: label 3 (value 2, tied with classes 1 and 2) is in at k=1.
    assert (3, 1, True) in cases
    # ... and label 0 (three classes above) is out at k=3, in at k=4.
    assert (0, 3, False) in cases and (0, 4, True) in cases
    for label, k, hit in cases:
        got = fm.ops.metric_sums(backend.to(pred), backend.to(np.array([label], np.int32)),
                                 ["top_k"], k=k)["top_k"]
        assert got == float(hit), (label, k)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_mae_mse_vs_sklearn(backend, rng, transform):
    rows, cols = 300, 8
    pred = (2.0 * rng.standard_normal((rows, cols))).astype(np.float32)
    labels = rng.random((rows, cols)).astype(np.float32)
    got = fm.ops.metric_sums(backend.to(pred), backend.to(labels), ["abs", "sq"],
                             transform=transform)
    p = _transform64(pred, transform)
    # The sum of the row means over rows equals the mean over all elements (equal rows).
    np.testing.assert_allclose(got["abs"] / rows, mean_absolute_error(labels, p), rtol=1e-6)
    np.testing.assert_allclose(got["sq"] / rows, mean_squared_error(labels, p), rtol=1e-6)


# --------------------------------------------------------------------------- probs_out

@pytest.mark.parametrize("rows,cols", [(1, 1), (5, 2), (64, 10), (1000, 37)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_probs_out_is_the_transform(backend, rng, rows, cols, transform):
    pred = (4.0 * rng.standard_normal((rows, cols))).astype(np.float32)
    labels = _labels(rng, "int32", rows, cols)
    out = backend.nan((rows, cols))
    fm.ops.metric_sums(backend.to(pred), backend.to(labels), ["argmax"], transform=transform,
                       probs_out=out)
    got = backend.host(out).astype(np.float64)
    if transform == "none":
        np.testing.assert_array_equal(got, pred)
    elif transform == "sigmoid":
        # sigmoidf: exp within 2 ulp, then 1 + e and the division: a few ulps of p.
        np.testing.assert_allclose(got, 1.0 / (1.0 + np.exp(-pred.astype(np.float64))),
                                   rtol=8 * F32_EPS, atol=0)
    else:
        # A float32 row sum of cols terms: relative error <= cols * eps, plus the exp's.
        np.testing.assert_allclose(got, _softmax64(pred), rtol=(cols + 8) * F32_EPS,
                                   atol=1e-30)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=(cols + 8) * F32_EPS)


def test_probs_out_with_no_metrics(backend, rng):
    pred = rng.standard_normal((20, 5)).astype(np.float32)
    labels = _labels(rng, "float", 20, 5)
    out = backend.nan((20, 5))
    assert fm.ops.metric_sums(backend.to(pred), backend.to(labels), [], transform="softmax",
                              probs_out=out) == {}
    np.testing.assert_allclose(backend.host(out), _softmax64(pred), rtol=16 * F32_EPS)


# --------------------------------------------------------------------------- edge cases

def test_bad_integer_labels_are_misses(backend, rng):
    rows, cols = 40, 6
    pred = rng.standard_normal((rows, cols)).astype(np.float32)
    labels = rng.integers(0, cols, size=rows).astype(np.int64)
    bad = np.array([0, 7, 13, 39])
    labels[bad] = [-1, cols, 2**40, -(2**62)]
    got = fm.ops.metric_sums(backend.to(pred), backend.to(labels), INT_METRICS, k=2)
    good = np.setdiff1d(np.arange(rows), bad)
    want = fm.reference.metric_sums(pred[good], labels[good], INT_METRICS, k=2)
    assert got == want
    assert got["argmax"] > 0
    # int32 too, with the extremes of the type.
    lab32 = labels.astype(np.int32)
    lab32[bad] = [-1, cols, 2**31 - 1, -(2**31)]
    assert fm.ops.metric_sums(backend.to(pred), backend.to(lab32), INT_METRICS, k=2) == want


def test_nan_pred(backend, rng):
    rows, cols = 30, 4
    pred = rng.standard_normal((rows, cols)).astype(np.float32)
    pred[[3, 17], [0, 2]] = np.nan
    labels = _labels(rng, "float", rows, cols)
    got = fm.ops.metric_sums(backend.to(pred), backend.to(labels), ALL, transform="softmax")
    want = fm.reference.metric_sums(pred, labels, ALL, transform="softmax")
    assert np.isnan(got["abs"]) and np.isnan(got["sq"])
    for name in ("argmax", "top_k"):
        assert got[name] == want[name]
    # A NaN row is a miss: the same counts as without those rows.
    keep = np.setdiff1d(np.arange(rows), [3, 17])
    clean = fm.reference.metric_sums(pred[keep], labels[keep], INT_METRICS, transform="softmax")
    assert got["argmax"] == clean["argmax"] and got["top_k"] == clean["top_k"]
    np.testing.assert_allclose(got["binary"], want["binary"], rtol=1e-6)


def test_unrequested_sums_are_written_zero(backend, rng):
    """The raw kernel writes every sum: 0 for a metric not in the flags (sums poisoned)."""
    from fastmlp._interop import address

    rows, cols = 50, 5
    pred = backend.to(rng.standard_normal((rows, cols)).astype(np.float32))
    labels = backend.to(_labels(rng, "float", rows, cols))
    for flag in range(32):
        sums = backend.xp.full((5,), np.nan, dtype=np.float64)
        scratch = backend.xp.empty((5 * rows,), dtype=np.float32)
        if backend.is_gpu:
            mod, extra = fm._C.cuda, (backend.xp.cuda.get_current_stream().ptr,)
        else:
            mod, extra = fm._C.cpu, ()
        mod.metrics_fused(address(pred), address(labels), 2, 0, address(scratch),
                          address(sums), rows, cols, flag, 2, 5, 0.5, *extra)
        got = backend.host(sums)
        for bit in range(5):
            if flag & (1 << bit):
                assert np.isfinite(got[bit])
            else:
                assert got[bit] == 0.0
        names = [ALL[b] for b in range(5) if flag & (1 << b)]
        ref = fm.reference.metric_sums(backend.host(pred), backend.host(labels), names,
                                       transform="softmax")
        for b, name in enumerate(ALL):
            if name in names:
                np.testing.assert_allclose(got[b], ref[name], rtol=1e-5)


def test_errors(backend, rng):
    pred = backend.to(rng.standard_normal((4, 3)).astype(np.float32))
    ints = backend.to(np.array([0, 1, 2, 0], np.int32))
    floats = backend.to(np.zeros((4, 3), np.float32))
    for name in ("binary", "abs", "sq"):
        with pytest.raises(ValueError, match="float32 label rows"):
            fm.ops.metric_sums(pred, ints, [name])
    with pytest.raises(ValueError, match="unknown metric"):
        fm.ops.metric_sums(pred, floats, ["accuracy"])
    with pytest.raises(ValueError, match="transform"):
        fm.ops.metric_sums(pred, floats, ["abs"], transform="tanh")
    with pytest.raises(ValueError, match="'k'"):
        fm.ops.metric_sums(pred, ints, ["top_k"], k=0)
    with pytest.raises(ValueError, match="shape"):
        fm.ops.metric_sums(pred, backend.to(np.zeros((4, 2), np.float32)), ["abs"])
    with pytest.raises(ValueError, match="overlap"):
        fm.ops.metric_sums(pred, floats, ["abs"], probs_out=pred)
    # The C++ launcher refuses what the op refuses (FASTMLP_CHECK -> ValueError).
    from fastmlp._interop import address

    sums = backend.xp.zeros((5,), np.float64)
    scratch = backend.xp.zeros((20,), np.float32)
    mod, extra = (fm._C.cuda, (backend.xp.cuda.get_current_stream().ptr,)) if backend.is_gpu \
        else (fm._C.cpu, ())
    with pytest.raises(ValueError, match="float label rows"):
        mod.metrics_fused(address(pred), address(ints), 0, 0, address(scratch), address(sums),
                          4, 3, 8, 0, 5, 0.5, *extra)
    with pytest.raises(ValueError, match="k >= 1"):
        mod.metrics_fused(address(pred), address(ints), 0, 0, address(scratch), address(sums),
                          4, 3, 4, 0, 0, 0.5, *extra)
    with pytest.raises(ValueError, match="transform"):
        mod.metrics_fused(address(pred), address(ints), 0, 0, address(scratch), address(sums),
                          4, 3, 1, 3, 5, 0.5, *extra)


def test_thread_count_determinism(rng):
    """The CPU sums and probabilities are bit-identical with 1 and 2 threads (rows * cols
    above the parallel threshold, so 2 threads really split the rows)."""
    rows, cols = 5000, 37
    pred = (3.0 * rng.standard_normal((rows, cols))).astype(np.float32)
    labels = rng.random((rows, cols)).astype(np.float32)
    old = fm.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            fm.set_num_threads(n)
            out = np.full((rows, cols), np.nan, np.float32)
            sums = fm.ops.metric_sums(pred, labels, ALL, transform="softmax", probs_out=out)
            results.append((sums, out))
    finally:
        fm.set_num_threads(old)
    (s1, o1), (s2, o2) = results
    assert s1 == s2   # float equality: bit-identical doubles
    np.testing.assert_array_equal(o1, o2)
    assert s1["abs"] > 0


def test_repeats_bit_for_bit(backend, rng):
    pred = backend.to((3.0 * rng.standard_normal((3000, 37))).astype(np.float32))
    labels = backend.to(rng.random((3000, 37)).astype(np.float32))
    first = fm.ops.metric_sums(pred, labels, ALL, transform="sigmoid")
    for _ in range(3):
        assert fm.ops.metric_sums(pred, labels, ALL, transform="sigmoid") == first


# --------------------------------------------------------------------------- ROC AUC

@pytest.mark.parametrize("n", [2, 17, 1000, 20000], ids=lambda n: shape_id(n))
def test_roc_auc_vs_sklearn(backend, rng, n):
    scores = rng.standard_normal(n).astype(np.float32)
    labels = (rng.random(n) < 0.3).astype(np.int32)
    labels[:2] = [0, 1]   # both classes present
    scores = scores + 0.8 * labels   # some signal, so the AUC is not ~0.5 by chance only
    got = fm.ops.roc_auc(backend.to(scores), backend.to(labels))
    want = roc_auc_score(labels, scores)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    if n >= 1000:
        assert 0.6 < got < 0.9


@pytest.mark.parametrize("levels", [2, 3, 10])
def test_roc_auc_many_ties(backend, rng, levels):
    n = 5000
    scores = rng.integers(0, levels, size=n).astype(np.float64)
    labels = (rng.random(n) < 0.5 + 0.1 * (scores - levels / 2)).astype(np.int64)
    got = fm.ops.roc_auc(backend.to(scores), backend.to(labels))
    np.testing.assert_allclose(got, roc_auc_score(labels, scores), rtol=1e-12)


def test_roc_auc_all_tied_is_half(backend, rng):
    labels = (rng.random(100) < 0.5).astype(np.float32)
    scores = np.full(100, 0.25, np.float32)
    got = fm.ops.roc_auc(backend.to(scores), backend.to(labels))
    np.testing.assert_allclose(got, roc_auc_score(labels, scores), rtol=1e-12)


@pytest.mark.parametrize("cols", [1, 3, 10])
def test_roc_auc_multi_column_is_micro(backend, rng, cols):
    rows = 400
    labels = (rng.random((rows, cols)) < 0.25).astype(np.float32)
    labels[0, 0], labels[1, 0] = 0, 1
    # Rounded scores: ties across columns too.
    scores = np.round(_sigmoid64(rng.standard_normal((rows, cols)) + labels), 2).astype(np.float32)
    got = fm.ops.roc_auc(backend.to(scores), backend.to(labels))
    want = roc_auc_score(labels.ravel(), scores.ravel())
    np.testing.assert_allclose(got, want, rtol=1e-12)
    if cols > 1:
        assert np.isclose(want, roc_auc_score(labels, scores, average="micro"), rtol=1e-12)


def test_roc_auc_bool_labels_and_kernel_probs(backend, rng):
    """AUC of the kernel's sigmoid outputs (probs_out), the way fit's auc metric uses it."""
    rows, cols = 300, 4
    pred = (2.0 * rng.standard_normal((rows, cols))).astype(np.float32)
    labels = rng.random((rows, cols)) < _sigmoid64(pred)
    out = backend.nan((rows, cols))
    fm.ops.metric_sums(backend.to(pred), backend.to(labels.astype(np.float32)), ["binary"],
                       transform="sigmoid", probs_out=out)
    got = fm.ops.roc_auc(out, backend.to(labels))
    np.testing.assert_allclose(got, roc_auc_score(labels.ravel(), backend.host(out).ravel()),
                               rtol=1e-12)


def test_roc_auc_errors(backend):
    xp = backend.xp
    with pytest.raises(ValueError, match="one class"):
        fm.ops.roc_auc(xp.asarray([0.1, 0.5, 0.9]), xp.asarray([1, 1, 1]))
    with pytest.raises(ValueError, match="one class"):
        fm.ops.roc_auc(xp.asarray([0.1, 0.5]), xp.asarray([0, 0]))
    with pytest.raises(ValueError, match="same shape"):
        fm.ops.roc_auc(xp.asarray([0.1, 0.5, 0.9]), xp.asarray([0, 1]))
    with pytest.raises(ValueError, match="binary"):
        fm.ops.roc_auc(xp.asarray([0.1, 0.5, 0.9]), xp.asarray([0, 1, 2]))
    with pytest.raises(ValueError, match="NaN"):
        fm.ops.roc_auc(xp.asarray([0.1, float("nan"), 0.9]), xp.asarray([0, 1, 1]))


def test_roc_auc_plain_lists():
    assert fm.ops.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == \
        roc_auc_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
