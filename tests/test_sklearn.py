"""fastmlp.sklearn: scikit-learn's conformance suite, the same steps as scikit-learn's
MLP, the scikit-learn workflows (pipelines, cross-validation, grid search, pickling,
pandas) and the estimator's own rules (partial_fit, warm_start, early stopping)."""
import copy
import inspect
import pickle
import warnings

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")
from sklearn import neural_network as sk_nn  # noqa: E402
from sklearn.datasets import load_digits, make_friedman1, make_multilabel_classification  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from fastmlp.sklearn import MLPClassifier, MLPRegressor  # noqa: E402

# Fits cut short on purpose (a few epochs) warn that they did not converge: expected here;
# the tests that are about that warning catch it themselves.
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

# ---------------------------------------------------------------- conformance suite
# The one check expected to fail, for both estimators. Minibatch training on weighted
# rows is not the same sequence of steps as on repeated rows (the batches differ, and
# so do the updates): the check compares the two fits to 1e-7. scikit-learn's own MLPs
# pass it only in special settings (its test suite runs it with solver="lbfgs" for
# MLPClassifier, and with a tolerance that ends an SGD fit early for MLPRegressor).
SAMPLE_WEIGHT_REASON = ("minibatch Adam/SGD on weighted rows takes other steps than on "
                        "repeated rows; scikit-learn's MLPs pass it only with L-BFGS or an "
                        "early stop")
EXPECTED_FAILED = {
    "check_sample_weight_equivalence_on_dense_data": SAMPLE_WEIGHT_REASON,
    "check_sample_weight_equivalence_on_sparse_data": SAMPLE_WEIGHT_REASON,
}
_CHECKED = [MLPClassifier(max_iter=100, device="cpu"),
            MLPRegressor(max_iter=100, device="cpu"),
            MLPClassifier(solver="sgd", hidden_layer_sizes=(7, 5), activation="tanh",
                          learning_rate_init=0.1, max_iter=100, device="cpu")]
if "expected_failed_checks" in inspect.signature(parametrize_with_checks).parameters:
    _checks = parametrize_with_checks(_CHECKED, expected_failed_checks=lambda e: EXPECTED_FAILED)
else:  # scikit-learn < 1.6: these checks do not exist there
    _checks = parametrize_with_checks(_CHECKED)


@_checks
def test_sklearn_conformance(estimator, check):
    check(estimator)


# ---------------------------------------------------------------- the same steps
def _data(n=320, d=7, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.randn(n, d)
    return rng, X


def _targets(kind, rng, X):
    n, d = X.shape
    if kind == "multiclass":
        return rng.randint(0, 3, n)
    if kind == "binary":
        return np.where(X[:, 0] + 0.5 * rng.randn(n) > 0, "yes", "no")
    if kind == "multilabel":
        return (X[:, :4] + 0.5 * rng.randn(n, 4) > 0).astype(int)
    if kind == "regression":
        return X @ rng.randn(d) + 0.1 * rng.randn(n)
    return X @ rng.randn(d, 3) + 0.1 * rng.randn(n, 3)  # multi-output regression


def _pair(kind):
    return (sk_nn.MLPRegressor, MLPRegressor) if "regression" in kind \
        else (sk_nn.MLPClassifier, MLPClassifier)


@pytest.mark.parametrize("kind", ["multiclass", "binary", "multilabel", "regression",
                                  "multi-output regression"])
@pytest.mark.parametrize("solver,activation", [("sgd", "relu"), ("sgd", "logistic"),
                                               ("sgd", "tanh"), ("sgd", "identity"),
                                               ("adam", "relu"), ("adam", "tanh")])
def test_same_steps_as_sklearn(backend, kind, solver, activation):
    """Unshuffled, with 10 full batches an epoch: scikit-learn's initial weights from the
    same random_state, its penalty and its step sizes give its weights and its loss
    curve, up to float32 rounding (Adam: also where epsilon is added)."""
    rng, X = _data()
    y = _targets(kind, rng, X)
    kw = dict(hidden_layer_sizes=(16, 8), activation=activation, solver=solver, alpha=0.01,
              batch_size=32, max_iter=5, shuffle=False, random_state=1,
              learning_rate_init=0.01, tol=0.0)
    sk_cls, fm_cls = _pair(kind)
    ref = sk_cls(**kw).fit(X, y)
    got = fm_cls(**kw, device=backend.name.replace("gpu", "cuda")).fit(X, y)
    # SGD is a contraction here: float32 rounding stays ~1e-6 of the weights. Adam
    # divides by the root of the second moment: a float32 gradient near zero can flip
    # the sign of an early step, so its weights agree to a few learning rates' worth.
    atol = 2e-4 if solver == "sgd" else 5e-2
    for a, b in zip(ref.coefs_ + ref.intercepts_, got.coefs_ + got.intercepts_):
        assert b.shape == a.shape
        np.testing.assert_allclose(b, a, atol=atol)
    np.testing.assert_allclose(got.loss_curve_, ref.loss_curve_, rtol=2e-3 if solver == "sgd"
                               else 1e-2)
    assert got.n_iter_ == ref.n_iter_ == 5
    assert got.out_activation_ == ref.out_activation_
    assert got.n_outputs_ == ref.n_outputs_ and got.n_layers_ == ref.n_layers_
    if hasattr(ref, "classes_"):
        np.testing.assert_array_equal(got.classes_, ref.classes_)
        np.testing.assert_array_equal(got.predict(X[:50]).shape, ref.predict(X[:50]).shape)
        np.testing.assert_allclose(got.predict_proba(X), ref.predict_proba(X), atol=0.05)
    else:
        assert got.predict(X).shape == ref.predict(X).shape


def test_initial_weights_are_sklearns():
    """max_iter=1 with a zero learning rate is impossible; one SGD step with a tiny rate
    shows the initial draw: scikit-learn's Glorot bounds (factor 2 for logistic)."""
    rng, X = _data()
    y = rng.randint(0, 2, len(X))
    for act in ("relu", "logistic"):
        kw = dict(hidden_layer_sizes=(30,), activation=act, solver="sgd", max_iter=1,
                  learning_rate_init=1e-12, momentum=0.0, random_state=3)
        ref = sk_nn.MLPClassifier(**kw).fit(X, y)
        got = MLPClassifier(**kw, device="cpu").fit(X, y)
        np.testing.assert_allclose(got.coefs_[0], ref.coefs_[0], rtol=1e-6, atol=1e-7)
        bound = np.sqrt((2.0 if act == "logistic" else 6.0) / (7 + 30))
        assert 0.9 * bound < np.abs(got.coefs_[0]).max() <= bound


@pytest.mark.parametrize("schedule", ["invscaling", "adaptive"])
def test_sgd_learning_rate_schedules_as_sklearn(schedule):
    """invscaling: lr_init / (samples seen + 1) ** power_t after each epoch; adaptive:
    divided by 5 after n_iter_no_change epochs without improvement (here at once:
    tol is huge), the fit stops when it falls under 1e-6."""
    rng, X = _data()
    y = rng.randint(0, 3, len(X))
    kw = dict(hidden_layer_sizes=(16,), solver="sgd", learning_rate=schedule, batch_size=32,
              max_iter=30, shuffle=False, random_state=0, learning_rate_init=0.1,
              power_t=0.25)
    if schedule == "adaptive":
        kw.update(tol=10.0, n_iter_no_change=1)
    ref = sk_nn.MLPClassifier(**kw).fit(X, y)
    got = MLPClassifier(**kw, device="cpu").fit(X, y)
    assert got.n_iter_ == ref.n_iter_
    np.testing.assert_allclose(got.loss_curve_, ref.loss_curve_, rtol=2e-3)
    for a, b in zip(ref.coefs_, got.coefs_):
        np.testing.assert_allclose(b, a, atol=2e-4)
    if schedule == "adaptive":  # every 2nd epoch the rate / 5: under 1e-6 after 16 epochs
        assert 15 <= got.n_iter_ < 30


# ---------------------------------------------------------------- quality
def test_digits_quality_next_to_sklearn():
    """The issue's case: digits, hidden 128, batch 32, 60 epochs (and scikit-learn's
    default stopping rule): test accuracy within 0.02 of scikit-learn's (both ~0.97)."""
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16, y, test_size=0.25, random_state=0)
    kw = dict(hidden_layer_sizes=(128,), batch_size=32, max_iter=60, random_state=0)
    ref = sk_nn.MLPClassifier(**kw).fit(Xtr, ytr).score(Xte, yte)
    got = MLPClassifier(**kw, device="cpu").fit(Xtr, ytr).score(Xte, yte)
    assert got >= 0.95
    assert abs(got - ref) <= 0.02, (got, ref)


def _pipeline_scores(classes, params, Xtr, Xte, ytr, yte):
    """Test scores of scikit-learn's and fastmlp's estimator (``classes``, the pair) with
    the same ``params`` behind a StandardScaler, fitted on the same data."""
    pipes = [make_pipeline(StandardScaler(), cls(**params)).fit(Xtr, ytr) for cls in classes]
    for pipe in pipes:
        assert pipe.predict(Xte).shape == np.shape(yte)
    return [pipe.score(Xte, yte) for pipe in pipes]


def test_regression_quality_next_to_sklearn():
    """Friedman's nonlinear benchmark function (generated): test R^2 within 0.03."""
    X, y = make_friedman1(1500, 10, noise=0.5, random_state=0)
    params = dict(hidden_layer_sizes=(64, 32), max_iter=200, batch_size=32, random_state=0)
    ref, got = _pipeline_scores(_pair("regression"), params,
                                *train_test_split(X, y, test_size=0.25, random_state=0))
    assert got > 0.85
    assert abs(got - ref) <= 0.03, (got, ref)


def test_multilabel_quality_next_to_sklearn():
    """Generated multi-label data, 5 labels: subset accuracy within 0.06."""
    X, Y = make_multilabel_classification(600, 20, n_classes=5, random_state=0)
    params = dict(hidden_layer_sizes=(64,), max_iter=100, random_state=0)
    ref, got = _pipeline_scores(_pair("multilabel"), params,
                                *train_test_split(X, Y, test_size=0.25, random_state=0))
    assert got > 0.3
    assert abs(got - ref) <= 0.06, (got, ref)


# ---------------------------------------------------------------- workflows
@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X[:600].astype(np.float64), y[:600]


def test_pipeline_and_cross_val_score(digits):
    X, y = digits
    pipe = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(32,),
                                                         batch_size=32, max_iter=30,
                                                         random_state=0, device="cpu"))
    scores = cross_val_score(pipe, X, y, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.75 and scores.mean() > 0.8


def test_grid_search_two_jobs(digits):
    """n_jobs=2 runs the fits in worker processes: the estimators travel pickled."""
    X, y = digits
    grid = GridSearchCV(MLPClassifier(batch_size=32, max_iter=20, random_state=0,
                                      device="cpu"),
                        {"hidden_layer_sizes": [(16,), (32,)], "alpha": [1e-4, 1e-2]},
                        cv=2, n_jobs=2)
    grid.fit(X / 16, y)
    assert len(grid.cv_results_["mean_test_score"]) == 4
    assert grid.best_score_ > 0.8
    assert isinstance(grid.best_estimator_, MLPClassifier)
    assert grid.best_estimator_.score(X / 16, y) > 0.85


def test_string_labels_and_proba_columns(digits):
    X, y = digits
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven",
                      "eight", "nine"], dtype=object)
    clf = MLPClassifier(hidden_layer_sizes=(32,), batch_size=32, max_iter=40,
                        random_state=0, device="cpu")
    clf.fit(X / 16, names[y])
    np.testing.assert_array_equal(clf.classes_, np.sort(names))
    proba = clf.predict_proba(X / 16)
    assert proba.shape == (len(X), 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(clf.predict(X / 16), clf.classes_[proba.argmax(axis=1)])
    assert (clf.predict(X / 16) == names[y]).mean() > 0.9


def test_binary_string_labels():
    rng, X = _data()
    y = _targets("binary", rng, X)
    clf = MLPClassifier(hidden_layer_sizes=(8,), batch_size=32, max_iter=50,
                        random_state=0, device="cpu")
    clf.fit(X, y)
    assert list(clf.classes_) == ["no", "yes"] and clf.out_activation_ == "logistic"
    assert clf.coefs_[-1].shape == (8, 1)
    proba = clf.predict_proba(X)
    assert proba.shape == (len(X), 2)
    np.testing.assert_array_equal(clf.predict(X), clf.classes_[(proba[:, 1] > 0.5).astype(int)])
    assert clf.score(X, y) > 0.8


@pytest.mark.parametrize("cls", [MLPClassifier, MLPRegressor])
def test_pickle_and_deepcopy_give_identical_predictions(cls, digits):
    X, y = digits
    est = cls(hidden_layer_sizes=(16,), max_iter=10, random_state=0, device="cpu")
    est.fit(X / 16, y)
    for clone in (pickle.loads(pickle.dumps(est)), copy.deepcopy(est)):
        np.testing.assert_array_equal(clone.predict(X / 16), est.predict(X / 16))
        for a, b in zip(clone.coefs_, est.coefs_):
            np.testing.assert_array_equal(a, b)
        assert clone.loss_curve_ == est.loss_curve_


@pytest.mark.parametrize("params", [dict(solver="adam"),
                                    dict(solver="sgd", learning_rate="adaptive", tol=10.0,
                                         n_iter_no_change=1)])
def test_pickled_estimator_continues_partial_fit_as_the_original(digits, params):
    """The optimizer state (Adam's moments, its step count; SGD's momentum and its
    adapted rate) and the shuffle stream travel with the pickle: partial_fit after a
    round trip equals partial_fit without."""
    X, y = digits
    a = MLPClassifier(hidden_layer_sizes=(16,), random_state=0, device="cpu", **params)
    for _ in range(3):  # adaptive: the rate is divided by 5 after the 2nd epoch
        a.partial_fit(X / 16, y, classes=np.arange(10))
    b = pickle.loads(pickle.dumps(a))
    for _ in range(2):
        a.partial_fit(X / 16, y)
        b.partial_fit(X / 16, y)
    for wa, wb in zip(a.coefs_ + a.intercepts_, b.coefs_ + b.intercepts_):
        np.testing.assert_array_equal(wa, wb)
    assert a.loss_curve_ == b.loss_curve_


def test_seeded_fits_repeat(digits):
    X, y = digits
    fits = []
    for _ in range(2):
        fits.append(MLPClassifier(hidden_layer_sizes=(16,), max_iter=15, random_state=7,
                                  device="cpu").fit(X / 16, y))
    a, b = fits
    assert a.loss_curve_ == b.loss_curve_
    for wa, wb in zip(a.coefs_ + a.intercepts_, b.coefs_ + b.intercepts_):
        np.testing.assert_array_equal(wa, wb)
    other = MLPClassifier(hidden_layer_sizes=(16,), max_iter=2, random_state=8,
                          device="cpu").fit(X / 16, y)
    assert not np.array_equal(other.coefs_[0], a.coefs_[0])


def test_pandas_input_feature_names_and_set_output():
    pd = pytest.importorskip("pandas")
    rng, X = _data(200, 4)
    df = pd.DataFrame(X, columns=["a", "b", "c", "d"])
    y = pd.Series(np.where(X[:, 0] > 0, "pos", "neg"))
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=30, random_state=0, device="cpu")
    clf.fit(df, y)
    np.testing.assert_array_equal(clf.feature_names_in_, ["a", "b", "c", "d"])
    assert clf.n_features_in_ == 4
    with pytest.warns(UserWarning, match="feature names"):
        clf.predict(X)  # fitted with names, given none
    with pytest.raises(ValueError, match="feature names"):
        clf.predict(df[["b", "a", "c", "d"]])
    # a pipeline whose scaler outputs DataFrames (set_output): the names reach the MLP
    pipe = make_pipeline(StandardScaler().set_output(transform="pandas"),
                         MLPRegressor(hidden_layer_sizes=(8,), max_iter=30, random_state=0,
                                      device="cpu"))
    pipe.fit(df, X[:, 1] * 2)
    np.testing.assert_array_equal(pipe[-1].feature_names_in_, ["a", "b", "c", "d"])
    assert pipe.predict(df).shape == (200,)


def test_sparse_input_equals_dense():
    sparse = pytest.importorskip("scipy.sparse")
    rng, X = _data()
    X[X < 0.5] = 0.0
    y = rng.randint(0, 3, len(X))
    kw = dict(hidden_layer_sizes=(8,), max_iter=5, random_state=0, device="cpu")
    a = MLPClassifier(**kw).fit(X, y)
    b = MLPClassifier(**kw).fit(sparse.csr_matrix(X), y)
    np.testing.assert_array_equal(a.coefs_[0], b.coefs_[0])
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(sparse.csr_matrix(X)))


# ---------------------------------------------------------------- the estimator's rules
def test_partial_fit_equals_fit_epoch_by_epoch(digits):
    """Unshuffled, n partial_fit calls are the n epochs of one fit (the optimizer
    state carries over); the first call needs classes."""
    X, y = digits
    kw = dict(hidden_layer_sizes=(16,), shuffle=False, random_state=0, device="cpu")
    with pytest.raises(ValueError, match="classes"):
        MLPClassifier(**kw).partial_fit(X / 16, y)
    inc = MLPClassifier(**kw)
    for _ in range(4):
        inc.partial_fit(X / 16, y, classes=np.arange(10))
    full = MLPClassifier(**kw, max_iter=4, tol=0.0).fit(X / 16, y)
    np.testing.assert_allclose(inc.loss_curve_, full.loss_curve_, rtol=1e-6)
    for a, b in zip(inc.coefs_, full.coefs_):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="classes"):
        inc.partial_fit(X[:5] / 16, np.array([10, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="early_stopping"):
        MLPRegressor(early_stopping=True, device="cpu").partial_fit(X, y)


def test_warm_start_continues_from_the_fitted_weights(digits):
    X, y = digits
    est = MLPClassifier(hidden_layer_sizes=(16,), max_iter=3, warm_start=True,
                        random_state=0, device="cpu")
    est.fit(X / 16, y)
    first = list(est.loss_curve_)
    est.fit(X / 16, y)
    assert len(est.loss_curve_) == 6 and est.loss_curve_[:3] == first
    assert est.loss_curve_[3] < first[0]  # it went on; a fresh start would begin near 2.3
    with pytest.raises(ValueError, match="warm_start"):
        est.fit(X / 16, np.where(y == 0, 10, y))
    est.set_params(hidden_layer_sizes=(20,))
    with pytest.raises(ValueError, match="warm_start"):
        est.fit(X / 16, y)


def test_early_stopping_restores_the_best_epoch(digits):
    """With early_stopping, the held-out score decides: the fitted weights are those of
    the best epoch, equal to a fit run to exactly that epoch."""
    X, y = digits
    kw = dict(hidden_layer_sizes=(16,), early_stopping=True, n_iter_no_change=3,
              max_iter=200, random_state=0, learning_rate_init=0.05, device="cpu")
    est = MLPClassifier(**kw).fit(X / 16, y)
    assert est.best_loss_ is None and len(est.validation_scores_) == est.n_iter_
    assert est.n_iter_ < 200
    best = int(np.argmax(est.validation_scores_))
    assert est.best_validation_score_ == est.validation_scores_[best]
    assert est.n_iter_ == best + 1 + 4  # stopped after n_iter_no_change + 1 worse epochs
    upto = MLPClassifier(**{**kw, "max_iter": best + 1}).fit(X / 16, y)
    for a, b in zip(est.coefs_ + est.intercepts_, upto.coefs_ + upto.intercepts_):
        np.testing.assert_array_equal(a, b)


def test_tol_stops_and_max_iter_warns():
    """A loss that does not fall by tol counts; more than n_iter_no_change such epochs
    in a row stop the fit (here: the first epoch sets best_loss_, the next 3 count)."""
    rng, X = _data()
    y = rng.randint(0, 2, len(X))
    est = MLPClassifier(hidden_layer_sizes=(8,), tol=1.0, n_iter_no_change=2,
                        random_state=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        est.fit(X, y)  # converged: no warning
        ref = sk_nn.MLPClassifier(hidden_layer_sizes=(8,), tol=1.0, n_iter_no_change=2,
                                  random_state=0).fit(X, y)
    assert est.n_iter_ == ref.n_iter_ == 4 and est.best_loss_ == min(est.loss_curve_)
    with pytest.warns(ConvergenceWarning, match="Maximum iterations \\(4\\)"):
        MLPRegressor(max_iter=4, tol=0.0, device="cpu").fit(X, X[:, 0])


def test_verbose_prints_sklearns_lines(capsys):
    rng, X = _data(64, 3)
    est = MLPRegressor(hidden_layer_sizes=(4,), max_iter=2, verbose=True,
                       device="cpu").fit(X, X[:, 0])
    out = capsys.readouterr().out
    assert out.splitlines() == [f"Iteration {i + 1}, loss = {v:.8f}"
                                for i, v in enumerate(est.loss_curve_)]


def test_zero_sample_weights_drop_rows():
    """Full batch, unshuffled, no penalty: weight-0 rows change nothing."""
    rng, X = _data(100, 5)
    y = X @ rng.randn(5)
    w = (rng.rand(100) > 0.3).astype(float)
    kw = dict(hidden_layer_sizes=(8,), alpha=0.0, batch_size=1000, shuffle=False,
              max_iter=20, random_state=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = MLPRegressor(**kw).fit(X, y, sample_weight=w)
        b = MLPRegressor(**kw).fit(X[w > 0], y[w > 0])
    np.testing.assert_allclose(a.loss_curve_, b.loss_curve_, rtol=1e-5)
    np.testing.assert_allclose(a.coefs_[0], b.coefs_[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("params,match", [
    (dict(solver="lbfgs"), "lbfgs"),
    (dict(solver="newton"), "solver"),
    (dict(activation="gelu"), "activation"),
    (dict(hidden_layer_sizes=(10, 0)), "hidden_layer_sizes"),
    (dict(batch_size=0), "batch_size"),
    (dict(learning_rate_init=0.0), "learning_rate_init"),
    (dict(momentum=1.5), "momentum"),
    (dict(beta_2=1.0), "beta_2"),
    (dict(validation_fraction=1.0), "validation_fraction"),
    (dict(n_iter_no_change=0), "n_iter_no_change"),
    (dict(device="tpu"), "device"),
])
def test_bad_parameters_name_themselves(params, match):
    rng, X = _data(20, 2)
    with pytest.raises(ValueError, match=match):
        MLPClassifier(**params).fit(X, rng.randint(0, 2, 20))


def test_regressor_refuses_poisson():
    rng, X = _data(20, 2)
    with pytest.raises(ValueError, match="poisson"):
        MLPRegressor(loss="poisson").fit(X, np.abs(X[:, 0]))


def test_parameters_mirror_sklearn():
    """Every scikit-learn parameter fastmlp supports has its name and default; the
    ones left out are those of L-BFGS."""
    for ours, theirs in ((MLPClassifier(), sk_nn.MLPClassifier()),
                         (MLPRegressor(), sk_nn.MLPRegressor())):
        mine, ref = ours.get_params(), theirs.get_params()
        assert set(ref) - set(mine) == {"max_fun"}
        assert set(mine) - set(ref) == {"device"}
        for k in set(mine) & set(ref):
            assert mine[k] == ref[k], k


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_fit_pickles_to_host_and_predicts_on_cpu(gpu, digits):
    X, y = digits
    kw = dict(hidden_layer_sizes=(32,), max_iter=10, shuffle=False, random_state=0)
    on_gpu = MLPClassifier(**kw, device="cuda").fit(X / 16, y)
    on_cpu = MLPClassifier(**kw, device="cpu").fit(X / 16, y)
    assert all(type(c) is np.ndarray for c in on_gpu.coefs_ + on_gpu.intercepts_)
    np.testing.assert_allclose(on_gpu.loss_curve_, on_cpu.loss_curve_, rtol=1e-4)
    clone = pickle.loads(pickle.dumps(on_gpu))
    clone.set_params(device="cpu")
    np.testing.assert_allclose(clone.predict_proba(X / 16), on_gpu.predict_proba(X / 16),
                               atol=1e-5)


# ---------------------------------------------------------------- the review's cases
def test_failed_fit_leaves_the_estimator_as_it_was(digits):
    """A fit that raises (here: targets whose squared error overflows float32, a
    non-finite loss) changes nothing: a fitted estimator keeps its weights, optimizer
    and predictions, an unfitted one stays unfitted."""
    X, y = digits
    huge = y * 1e30 + 1e30
    est = MLPRegressor(hidden_layer_sizes=(8,), max_iter=3, random_state=0,
                       device="cpu").fit(X / 16, y)
    twin, pickled = copy.deepcopy(est), pickle.dumps(est)
    before, coefs = est.predict(X / 16), [c.copy() for c in est.coefs_]
    with pytest.raises(FloatingPointError):
        est.fit(X / 16, huge)
    np.testing.assert_array_equal(est.predict(X / 16), before)
    for a, b in zip(est.coefs_, coefs):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FloatingPointError):  # partial_fit: the model trains in place
        est.partial_fit(X / 16, huge)
    np.testing.assert_array_equal(est.predict(X / 16), before)
    est.partial_fit(X / 16, y)  # goes on as if the failed calls never happened
    twin.partial_fit(X / 16, y)
    np.testing.assert_array_equal(est.predict(X / 16), twin.predict(X / 16))
    clone = pickle.loads(pickled)  # the same from an unpickled estimator's first call
    with pytest.raises(FloatingPointError):
        clone.partial_fit(X / 16, huge)
    clone.partial_fit(X / 16, y)
    np.testing.assert_array_equal(clone.predict(X / 16), twin.predict(X / 16))
    fresh = MLPRegressor(device="cpu")
    with pytest.raises(FloatingPointError):
        fresh.fit(X / 16, huge)
    with pytest.raises(sklearn.exceptions.NotFittedError):
        fresh.predict(X / 16)


def test_pickle_keeps_the_fitted_network_whatever_the_parameters_say(digits):
    """An unpickled estimator rebuilds the network it fitted (layers, activations,
    optimizer), not one from parameters changed since."""
    X, y = digits
    est = MLPRegressor(hidden_layer_sizes=(8,), max_iter=3, random_state=0,
                       device="cpu").fit(X / 16, y)
    before = est.predict(X / 16)
    est.set_params(activation="tanh", solver="sgd", alpha=1.0)
    for clone in (pickle.loads(pickle.dumps(est)), copy.deepcopy(est)):
        np.testing.assert_array_equal(clone.predict(X / 16), before)
        clone.partial_fit(X / 16, y)  # Adam's state went along: no missing SGD buffer
        assert clone.n_iter_ == 1


def test_initial_weights_with_early_stopping_are_sklearns():
    """The weights are drawn before the validation split, as scikit-learn does."""
    rng, X = _data()
    y = rng.randint(0, 2, len(X))
    kw = dict(hidden_layer_sizes=(30,), solver="sgd", max_iter=1, momentum=0.0,
              learning_rate_init=1e-12, early_stopping=True, random_state=3)
    ref = sk_nn.MLPClassifier(**kw).fit(X, y)
    got = MLPClassifier(**kw, device="cpu").fit(X, y)
    np.testing.assert_allclose(got.coefs_[0], ref.coefs_[0], rtol=1e-6, atol=1e-7)
    assert got.validation_scores_ == pytest.approx(ref.validation_scores_)


def test_early_stopping_split_is_sklearns_for_multiclass():
    """scikit-learn stratifies only one-output targets: a class with a single row is fine."""
    rng, X = _data()
    y = rng.randint(1, 4, len(X))
    y[0] = 0
    kw = dict(hidden_layer_sizes=(8,), early_stopping=True, max_iter=3, random_state=0)
    ref = sk_nn.MLPClassifier(**kw).fit(X, y)
    got = MLPClassifier(**kw, device="cpu").fit(X, y)
    assert len(got.validation_scores_) == len(ref.validation_scores_) == 3


def test_weighted_multi_output_regression_loss_is_sklearns():
    """One full batch, unshuffled: the weighted loss curve of 3 outputs is scikit-learn's
    (its data term averages the outputs, its gradient sums them)."""
    rng, X = _data(96, 4)
    Y = X @ rng.randn(4, 3)
    w = rng.rand(96) + 0.5
    kw = dict(hidden_layer_sizes=(8,), alpha=0.1, batch_size=96, shuffle=False,
              max_iter=5, solver="sgd", learning_rate_init=0.01, random_state=0)
    ref = sk_nn.MLPRegressor(**kw).fit(X, Y, sample_weight=w)
    got = MLPRegressor(**kw, device="cpu").fit(X, Y, sample_weight=w)
    np.testing.assert_allclose(got.loss_curve_, ref.loss_curve_, rtol=1e-4)


def test_failed_warm_start_keeps_the_fitted_input_contract(digits):
    """A warm-start fit on other features is refused before anything changes."""
    pd = pytest.importorskip("pandas")
    X, y = digits
    est = MLPClassifier(hidden_layer_sizes=(8,), max_iter=2, warm_start=True,
                        random_state=0, device="cpu").fit(X[:, :5], y)
    with pytest.raises(ValueError, match="features"):
        est.fit(X[:, :6], y)
    assert est.n_features_in_ == 5 and est.predict(X[:, :5]).shape == (len(X),)
    df = pd.DataFrame(X[:, :5], columns=list("abcde"))
    est = MLPClassifier(hidden_layer_sizes=(8,), max_iter=2, warm_start=True,
                        random_state=0, device="cpu").fit(df, y)
    with pytest.raises(ValueError, match="feature names"):
        est.fit(df.rename(columns={"a": "z"}), y)
    np.testing.assert_array_equal(est.feature_names_in_, list("abcde"))


def test_partial_fit_counts_and_signature_as_sklearn(digits):
    X, y = digits
    ref, got = sk_nn.MLPClassifier(random_state=0), MLPClassifier(random_state=0,
                                                                  device="cpu")
    for _ in range(3):
        ref.partial_fit(X / 16, y, classes=np.arange(10))
        got.partial_fit(X / 16, y, classes=np.arange(10))
    assert got.n_iter_ == ref.n_iter_ == 1 and got.t_ == ref.t_ == 3 * len(X)
    for ours, theirs in ((MLPClassifier, sk_nn.MLPClassifier),
                         (MLPRegressor, sk_nn.MLPRegressor)):
        for method in ("fit", "partial_fit", "predict", "score"):
            assert list(inspect.signature(getattr(ours, method)).parameters) == \
                list(inspect.signature(getattr(theirs, method)).parameters), method


def test_warm_start_needs_the_same_classes(digits):
    X, y = digits
    est = MLPClassifier(hidden_layer_sizes=(8,), max_iter=2, warm_start=True,
                        random_state=0, device="cpu").fit(X, y)
    keep = y < 5  # a subset of the classes
    with pytest.raises(ValueError, match="same classes"):
        est.fit(X[keep], y[keep])


def test_alpha_changed_between_partial_fits_applies():
    """Unshuffled, the 2nd partial_fit after set_params(alpha=...) takes scikit-learn's
    steps with the new penalty."""
    rng, X = _data()
    y = rng.randint(0, 3, len(X))
    kw = dict(hidden_layer_sizes=(16,), batch_size=32, shuffle=False, random_state=0,
              solver="sgd", learning_rate_init=0.05)
    ref, got = sk_nn.MLPClassifier(**kw), MLPClassifier(**kw, device="cpu")
    for est in (ref, got):
        est.partial_fit(X, y, classes=np.arange(3))
        est.set_params(alpha=5.0, solver="adam")  # the solver of a running fit stays
        est.partial_fit(X, y)
    np.testing.assert_allclose(got.loss_curve_, ref.loss_curve_, rtol=2e-3)
    assert got.loss_curve_[1] > got.loss_curve_[0]  # the penalty arrived


def test_inf_patience_scalar_weights_and_output_dtypes():
    rng, X = _data(120, 4)
    y = rng.randint(0, 3, 120)
    est = MLPClassifier(hidden_layer_sizes=(8,), n_iter_no_change=np.inf, max_iter=5,
                        device="cpu").fit(X, y, sample_weight=2.0)
    assert est.n_iter_ == 5
    assert est.predict_proba(X.astype(np.float32)).dtype == np.float32
    assert est.predict_proba(X).dtype == np.float64
    reg = MLPRegressor(hidden_layer_sizes=(8,), max_iter=2, device="cpu").fit(X, X[:, 0])
    assert reg.predict(X.astype(np.float32)).dtype == np.float32
