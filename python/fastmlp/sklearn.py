"""scikit-learn estimators on fastmlp's engine: ``MLPClassifier`` and ``MLPRegressor``.

Drop-in replacements for ``sklearn.neural_network.MLPClassifier`` / ``MLPRegressor``
(the ``"adam"`` and ``"sgd"`` solvers), with scikit-learn's parameter names, defaults
and meanings, its fitted attributes and methods, so they work in pipelines,
cross-validation and grid searches unchanged. Training runs on fastmlp's CPU engine or,
with ``device="auto"`` and a usable GPU, its CUDA engine; this module adds no kernels:
it builds a :class:`fastmlp.Sequential` and fits it.

>>> from fastmlp.sklearn import MLPClassifier
>>> clf = MLPClassifier(hidden_layer_sizes=(128,), batch_size=32, random_state=0)
>>> clf.fit(X_train, y_train).score(X_test, y_test)

How scikit-learn's training maps onto fastmlp (the same iterates, up to float32):

* the initial weights are scikit-learn's draws (Glorot-uniform bounds, factor 2 for
  ``logistic``, intercepts from the same bounds) from the same ``random_state``;
* ``alpha`` is scikit-learn's L2 term ``alpha / 2 * sum(W ** 2) / batch_rows`` on the
  coefficients (not the intercepts): an L2 kernel regularizer with the batch size's
  rows (the last, smaller batch of an epoch uses the full batch's coefficient);
* fastmlp's losses are means over the outputs (binary cross-entropy) and the mean
  squared error without scikit-learn's 1/2; the gradient they give is scikit-learn's
  times a constant ``c`` (1 for softmax, 1/outputs for logistic outputs, 2/outputs
  for squared error), so the penalty is scaled by ``c``, SGD's learning rate by ``1/c``
  and Adam's epsilon by ``c``: the steps are scikit-learn's. ``loss_curve_`` is
  scikit-learn's loss: fastmlp's data term and penalty (the trainer reports the
  penalty's share) rescaled each to scikit-learn's;
* Adam's epsilon is added to the bias-corrected root (torch's placement), where
  scikit-learn folds the bias correction into the step size; SGD's momentum and
  Nesterov momentum are scikit-learn's (torch's form; its momentum buffer is rescaled
  when ``invscaling`` or ``adaptive`` change the rate, as scikit-learn's velocity);
* ``shuffle`` draws fastmlp's permutations (seeded from ``random_state``), not
  scikit-learn's: the same distribution, other orders;
* ``sample_weight`` is scaled to mean 1 over the training rows and each batch's
  weighted losses are divided by its rows (scikit-learn divides by the batch's weight).

Not available: ``solver="lbfgs"`` (ValueError), ``MLPRegressor(loss="poisson")``
(ValueError). Sparse inputs are densified. A loss that becomes NaN or infinite stops
the fit with fastmlp's FloatingPointError (scikit-learn trains on with NaN weights).
"""
from __future__ import annotations

import numbers
import warnings

import numpy as np

try:
    import sklearn as _sklearn  # noqa: F401  (the absolute package, not this module)
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
except ImportError as e:  # pragma: no cover - the tests install scikit-learn
    raise ImportError("fastmlp.sklearn needs scikit-learn: pip install 'fastmlp[sklearn]'") \
        from e
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import _check_partial_fit_first_call, type_of_target, unique_labels
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, column_or_1d

from . import callbacks as _callbacks
from . import layers as _layers
from . import losses as _losses
from . import optim as _optim
from . import regularizers as _regularizers
from .model import Sequential, _host, _resolve_device, _to_device

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - scikit-learn 1.3 .. 1.5
    def _validate_data(estimator, *args, **kwargs):
        return estimator._validate_data(*args, **kwargs)

__all__ = ["MLPClassifier", "MLPRegressor"]

_ACTIVATIONS = {"identity": "linear", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu"}
_ADAPTIVE_MIN_LR = 1e-6  # scikit-learn's: below it an adaptive SGD stops


def _check_number(est, name, lo, hi=None, *, integral=False, lo_open=False, allow_inf=False):
    value = getattr(est, name)
    if allow_inf and isinstance(value, numbers.Real) and value == np.inf:
        return
    kind = numbers.Integral if integral else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, (bool, np.bool_))
    if ok:
        ok = np.isfinite(value) and (value > lo if lo_open else value >= lo) \
            and (hi is None or value <= hi)
    if not ok:
        what = "an integer" if integral else "a number"
        rng = f"{'>' if lo_open else '>='} {lo}" + ("" if hi is None else f" and <= {hi}")
        raise ValueError(f"{type(est).__name__}: '{name}' must be {what} {rng}, got {value!r}")


def _check_option(est, name, options):
    value = getattr(est, name)
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{type(est).__name__}: '{name}' must be one of "
                         f"{sorted(options)}, got {value!r}")


class _Monitor(_callbacks.Callback):
    """scikit-learn's end-of-epoch bookkeeping inside fastmlp's fit: the loss curve,
    the no-improvement count (training loss, or the validation score with
    early_stopping), the SGD learning-rate schedules, and stopping."""

    def __init__(self, est, n_samples, val):
        super().__init__()
        self.est, self.n_samples, self.val = est, n_samples, val
        self.converged = False

    def on_epoch_end(self, epoch, logs=None):
        est = self.est
        loss = est._sklearn_loss(float(logs["loss"]), self.model._train_penalty)
        est.n_iter_ += 1
        est.loss_ = loss
        est.t_ += self.n_samples
        est.loss_curve_.append(loss)
        if est.verbose:
            print("Iteration %d, loss = %.8f" % (est.n_iter_, loss))
        est._update_no_improvement_count(self.val, self.model)
        # the schedule of the optimizer in use (scikit-learn's _optimizer), not the
        # parameters as set_params may have changed them since
        schedule, lr_init, power_t = est._schedule
        if schedule == "invscaling":
            est._lr = lr_init / (est.t_ + 1) ** power_t
        if est._no_improvement_count > est.n_iter_no_change:
            what = "Validation score" if self.val is not None else "Training loss"
            msg = ("%s did not improve more than tol=%f for %d consecutive epochs."
                   % (what, est.tol, est.n_iter_no_change))
            if schedule == "adaptive" and est._lr > _ADAPTIVE_MIN_LR:
                est._lr /= 5.0
                est._no_improvement_count = 0
                if est.verbose:
                    print(msg + " Setting learning rate to %f" % est._lr)
            else:
                if est.verbose:
                    print(msg + (" Learning rate too small. Stopping."
                                 if schedule == "adaptive" else " Stopping."))
                self.converged = True
                self.model.stop_training = True
        if schedule is not None:
            _set_sgd_lr(self.model.optimizer, est._lr / est._scale)


def _set_sgd_lr(opt, lr):
    """Change SGD's rate the way scikit-learn's does. Its velocity holds the rate
    (``v = momentum v - lr g``), torch's momentum buffer does not (``p -= lr (momentum
    buf + g)``): the buffer is rescaled by old / new so that the next steps are
    scikit-learn's."""
    old = float(opt.lr)
    if lr != old and old > 0:
        for state in opt.state:
            buf = state.get("momentum_buffer")
            if buf is not None:
                buf *= np.float32(old / lr)
    opt.lr = lr


class _BaseMLP(BaseEstimator):
    """What MLPClassifier and MLPRegressor share: parameters, the model, the epochs."""

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False,
                 momentum=0.9, nesterovs_momentum=True, early_stopping=False,
                 validation_fraction=0.1, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                 n_iter_no_change=10, device="auto"):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.device = device

    # -- scikit-learn's estimator tags ---------------------------------------------------
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True  # accepted, densified
        return tags

    def _more_tags(self):  # scikit-learn < 1.6 (1.6 and later: the tests' expected failures)
        reason = ("minibatch Adam/SGD on weighted rows takes other steps than on repeated "
                  "rows")
        return {"multioutput": True,
                "_xfail_checks": {"check_sample_weight_equivalence": reason,
                                  "check_sample_weights_invariance": reason}}

    # -- validation ----------------------------------------------------------------------
    def _check_params(self):
        name = type(self).__name__
        sizes = self.hidden_layer_sizes
        if isinstance(sizes, numbers.Integral) and not isinstance(sizes, (bool, np.bool_)):
            sizes = [sizes]
        try:
            sizes = list(sizes)
        except TypeError:
            raise ValueError(f"{name}: 'hidden_layer_sizes' must be an int or a sequence of "
                             f"ints, got {self.hidden_layer_sizes!r}") from None
        for s in sizes:
            if not isinstance(s, numbers.Integral) or isinstance(s, (bool, np.bool_)) or s < 1:
                raise ValueError(f"{name}: 'hidden_layer_sizes' must hold integers >= 1, got "
                                 f"{self.hidden_layer_sizes!r}")
        _check_option(self, "activation", _ACTIVATIONS)
        if self.solver == "lbfgs":
            raise ValueError(f"{name}: solver='lbfgs' is not available in fastmlp (it "
                             "trains with minibatch 'adam' or 'sgd'); use one of them, or "
                             "scikit-learn's estimator for L-BFGS")
        _check_option(self, "solver", {"adam", "sgd"})
        _check_number(self, "alpha", 0)
        if not (isinstance(self.batch_size, str) and self.batch_size == "auto"):
            _check_number(self, "batch_size", 1, integral=True)
        _check_option(self, "learning_rate", {"constant", "invscaling", "adaptive"})
        _check_number(self, "learning_rate_init", 0, lo_open=True)
        _check_number(self, "power_t", 0)
        _check_number(self, "max_iter", 1, integral=True)
        _check_number(self, "tol", 0)
        _check_number(self, "momentum", 0, 1)
        _check_number(self, "validation_fraction", 0, 1)
        if self.validation_fraction >= 1:
            raise ValueError(f"{name}: 'validation_fraction' must be in [0, 1), got "
                             f"{self.validation_fraction!r}")
        for b in ("beta_1", "beta_2"):
            _check_number(self, b, 0, 1)
            if getattr(self, b) >= 1:
                raise ValueError(f"{name}: '{b}' must be in [0, 1), got {getattr(self, b)!r}")
        _check_number(self, "epsilon", 0, lo_open=True)
        _check_number(self, "n_iter_no_change", 1, integral=True, allow_inf=True)
        for b in ("shuffle", "warm_start", "nesterovs_momentum", "early_stopping"):
            if not isinstance(getattr(self, b), (bool, np.bool_)):
                raise ValueError(f"{name}: '{b}' must be True or False, got "
                                 f"{getattr(self, b)!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"{name}: 'device' must be 'auto', 'cpu' or 'cuda', got "
                             f"{self.device!r}")
        return [int(s) for s in sizes]

    @staticmethod
    def _dense32(X):
        if hasattr(X, "toarray"):
            X = X.toarray()
        return np.ascontiguousarray(X, dtype=np.float32)

    # -- the model -----------------------------------------------------------------------
    @staticmethod
    def _build_model(layers, n_in, loss, l2, optimizer, weights):
        """A compiled Sequential: ``layers`` [(units, fastmlp activation)], an L2
        coefficient on the kernels, ``weights`` [W0, b0, W1, ...] (host arrays)."""
        reg = _regularizers.L2(l2) if l2 else None
        model = Sequential([
            _layers.Dense(u, activation=act, input_dim=n_in if i == 0 else None,
                          kernel_regularizer=reg, kernel_initializer="zeros")
            for i, (u, act) in enumerate(layers)])
        model.compile(optimizer=optimizer, loss=loss)
        model.set_weights(weights)
        return model

    def _initial_weights(self, rng, n_in, units):
        """scikit-learn's _init_coef draws: Glorot-uniform bounds (factor 2 for
        logistic) for the coefficients and the intercepts, layer by layer."""
        factor = 2.0 if self.activation == "logistic" else 6.0
        weights, fan_in = [], n_in
        for fan_out in units:
            bound = np.sqrt(factor / (fan_in + fan_out))
            weights.append(rng.uniform(-bound, bound, (fan_in, fan_out)))
            weights.append(rng.uniform(-bound, bound, fan_out))
            fan_in = fan_out
        return weights

    def _make_optimizer(self):
        """A new optimizer from the parameters (scikit-learn makes one per fit), and
        the schedule it follows until the next."""
        self._lr = float(self.learning_rate_init)
        if self.solver == "sgd":
            self._schedule = (self.learning_rate, float(self.learning_rate_init),
                              float(self.power_t))
            return _optim.SGD(lr=self._lr / self._scale, momentum=float(self.momentum),
                              nesterov=bool(self.nesterovs_momentum) and self.momentum > 0)
        self._schedule = (None, None, None)
        return _optim.Adam(lr=self._lr, betas=(float(self.beta_1), float(self.beta_2)),
                           eps=float(self.epsilon) * self._scale)

    def _l2(self, batch):
        """scikit-learn's penalty alpha / 2 * sum(W ** 2) / batch, times c."""
        return self._scale * float(self.alpha) / (2.0 * batch)

    def _sklearn_loss(self, loss, penalty):
        """scikit-learn's epoch loss from fastmlp's (``loss``: the data term plus the
        mean ``penalty``, which is c times scikit-learn's)."""
        return (loss - penalty) / self._data_scale + penalty / self._scale

    def _resolved_device(self):
        return _resolve_device(self.device, None)

    def _ensure_model(self):
        """The fitted model (rebuilt from the pickled state after unpickling)."""
        if getattr(self, "_model", None) is None:
            self._model = self._model_from_state(self._pickled)
        return self._model

    # -- fitting -------------------------------------------------------------------------
    def _fit(self, X, y, sample_weight, incremental):
        """fit / partial_fit. On an exception the estimator is left as it was (a fit
        that fails does not leave half-trained weights behind)."""
        if incremental and getattr(self, "_model", None) is not None:
            before = self.__getstate__()  # the model trains in place: keep its state
        else:
            before = {k: list(v) if isinstance(v, list) else v
                      for k, v in self.__dict__.items()}
        try:
            return self._fit_epochs(X, y, sample_weight, incremental)
        except BaseException:
            self.__dict__.clear()
            if "_pickled" in before and incremental:
                self.__setstate__(before)
            else:
                self.__dict__.update(before)
            raise

    def _fit_epochs(self, X, y, sample_weight, incremental):
        sizes = self._check_params()
        if self.early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        keep = hasattr(self, "coefs_") and (incremental or self.warm_start)
        X, y = self._check_xy(X, y, not keep, incremental)
        if sample_weight is not None:
            sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float64)
            if not np.all(np.isfinite(sample_weight)) or np.any(sample_weight < 0):
                raise ValueError("sample_weight must be finite and >= 0 (fastmlp weighs "
                                 "each sample's loss; negative weights are refused)")
            if sample_weight.sum() <= 0:
                raise ValueError("sample_weight must not be all zero")
        out_activation, loss, scale, data_scale = self._output(y)
        units = sizes + [y.shape[1]]
        if keep:
            have = [self.coefs_[0].shape[0]] + [c.shape[1] for c in self.coefs_]
            if have != [X.shape[1]] + units:
                raise ValueError(f"{type(self).__name__}: the fitted layer sizes {have} do "
                                 f"not match the parameters and data {[X.shape[1]] + units};"
                                 " set warm_start=False to fit afresh")
        self.n_outputs_ = y.shape[1]
        self.n_layers_ = len(sizes) + 2
        rng = check_random_state(self.random_state)
        weights = None
        if not keep:  # scikit-learn's _initialize: the weights are drawn first
            weights = self._initial_weights(rng, X.shape[1], units)
            self.t_ = 0
            self.loss_curve_ = []
            self._no_improvement_count = 0
            if self.early_stopping:
                self.validation_scores_ = []
                self.best_validation_score_ = -np.inf
                self.best_loss_ = None
            else:
                self.best_loss_ = np.inf
                self.validation_scores_ = None
                self.best_validation_score_ = None
        self.n_iter_ = 0  # scikit-learn counts the epochs of this call
        self._best = None

        val = None
        w_train = sample_weight
        if self.early_stopping:
            stratify = y if self.n_outputs_ == 1 and hasattr(self, "classes_") else None
            parts = train_test_split(X, y, *(() if sample_weight is None else (sample_weight,)),
                                     random_state=rng, test_size=self.validation_fraction,
                                     stratify=stratify)
            X, X_val, y, y_val = parts[:4]
            w_train, w_val = (parts[4], parts[5]) if sample_weight is not None else (None, None)
            if len(X_val) < 2:
                raise ValueError("The validation set is too small. Increase "
                                 "'validation_fraction' or the size of your dataset.")
            val = (X_val, self._val_target(y_val), w_val)
        n_train = len(X)
        if self.batch_size == "auto":
            batch = min(200, n_train)
        else:
            if self.batch_size > n_train:
                warnings.warn("Got `batch_size` less than 1 or larger than sample size. It "
                              "is going to be clipped")
            batch = int(np.clip(self.batch_size, 1, n_train))

        model = self._ensure_model() if incremental and keep else None
        if model is None:  # a fresh fit, warm_start, or the first partial_fit
            if keep:
                weights = [a for pair in zip(self.coefs_, self.intercepts_) for a in pair]
            self._scale, self._data_scale = scale, data_scale
            act = _ACTIVATIONS[self.activation]
            layers = [(u, act) for u in sizes] + [(units[-1], out_activation)]
            model = self._build_model(layers, X.shape[1], loss, self._l2(batch) if self.alpha
                                      else 0.0, self._make_optimizer(), weights)
            # fastmlp's shuffles, seeded from random_state
            model._shuffle_seed = int(rng.randint(2**31 - 1)) << 32 | int(rng.randint(2**31))
        else:  # partial_fit: the model and its optimizer go on; alpha may have changed
            l2 = self._l2(batch) if self.alpha else 0.0
            reg = _regularizers.L2(l2) if l2 else None
            for layer in model.layers:
                layer.kernel_regularizer = reg
        if w_train is not None:
            w_train = (w_train * (len(w_train) / w_train.sum())).astype(np.float32)

        monitor = _Monitor(self, n_train, val)
        epochs = 1 if incremental else int(self.max_iter)
        try:
            model.fit(X, self._train_target(y), epochs=epochs, batch_size=batch,
                      shuffle=bool(self.shuffle), verbose=0, callbacks=[monitor],
                      device=_resolve_device(self.device, X), sample_weight=w_train)
        except KeyboardInterrupt:  # as scikit-learn: keep what was learnt so far
            warnings.warn("Training interrupted by user.")
        if self._best is not None:  # early stopping: the best epoch's weights
            model.set_weights(self._best)
        self._best = None
        self._model = model
        self._pickled = None
        ws = model.get_weights()
        self.coefs_, self.intercepts_ = ws[0::2], ws[1::2]
        if not incremental and not monitor.converged and self.n_iter_ == self.max_iter:
            warnings.warn("Stochastic Optimizer: Maximum iterations (%d) reached and the "
                          "optimization hasn't converged yet." % self.max_iter,
                          ConvergenceWarning)
        return self

    def _update_no_improvement_count(self, val, model):
        """scikit-learn's rule, after each epoch."""
        if val is not None:
            X_val, y_val, w_val = val
            score = self._score_on(model, X_val, y_val, w_val)
            self.validation_scores_.append(score)
            if self.verbose:
                print("Validation score: %f" % score)
            if score < self.best_validation_score_ + self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if score > self.best_validation_score_:
                self.best_validation_score_ = score
                self._best = model.get_weights()
        else:
            if self.loss_curve_[-1] > self.best_loss_ - self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if self.loss_curve_[-1] < self.best_loss_:
                self.best_loss_ = self.loss_curve_[-1]

    def _forward(self, X):
        """The network's output for the rows of ``X`` as a NumPy array of X's float
        type (float32 or float64, as scikit-learn's output; computed in float32)."""
        check_is_fitted(self)
        X = _validate_data(self, X, reset=False, accept_sparse=["csr", "csc", "coo"],
                           dtype=(np.float64, np.float32))
        dtype = X.dtype
        out = self._ensure_model().predict(self._dense32(X), check_finite=False)
        return _host(out).astype(dtype, copy=False)

    # -- pickle / deepcopy: host arrays, the optimizer state, no engine ------------------
    def __getstate__(self):
        state = self.__dict__.copy()
        model = state.pop("_model", None)
        if model is not None:
            opt = model.optimizer
            reg = model.layers[0].kernel_regularizer
            state["_pickled"] = {
                "layers": [(l.units, l.activation or "linear") for l in model.layers],
                "l2": 0.0 if reg is None else reg.l2,
                "loss": model.loss.name,
                "optimizer": (type(opt).__name__, opt.get_config()),
                "weights": model.get_weights(),
                # copies: the engine updates the state in place (a snapshot must not move)
                "opt_state": {k: np.array(_host(v)) for k, v in
                              opt.state_arrays(model.params()).items()},
                "iterations": opt.iterations,
                "shuffle": (model._shuffle_seed, model._shuffle_count),
            }
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._model = None  # rebuilt on first use, on this machine's device

    def _model_from_state(self, saved):
        """The model as it was pickled -- its layers, penalty, loss, optimizer (with
        its state) and shuffle stream, whatever the parameters say now -- on this
        machine's device (``device="auto"``: the GPU if usable, else the CPU)."""
        model = self._build_model(saved["layers"], saved["weights"][0].shape[0],
                                  _losses.get(saved["loss"]), saved["l2"],
                                  _optim.from_config(*saved["optimizer"]), saved["weights"])
        model.to(self._resolved_device())
        model.optimizer.load_state_arrays(saved["opt_state"], model.params(),
                                          saved["iterations"],
                                          # a copy: training updates it in place
                                          lambda a: _to_device(np.array(a), model.device))
        model._shuffle_seed, model._shuffle_count = saved["shuffle"]
        return model


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """scikit-learn's ``MLPClassifier`` (solvers ``adam`` and ``sgd``) trained by
    fastmlp: softmax cross-entropy for several classes, a logistic output for two
    classes and for multi-label indicator targets. See :mod:`fastmlp.sklearn`."""

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags

    def _more_tags(self):  # scikit-learn < 1.6
        return {"multilabel": True}

    def _check_xy(self, X, y, reset, incremental):
        X, y = _validate_data(self, X, y, reset=reset, accept_sparse=["csr", "csc", "coo"],
                              multi_output=True, dtype=(np.float64, np.float32))
        X = self._dense32(X)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        # scikit-learn's rule: the labels are learnt by a fresh fit; warm_start needs
        # the same ones, partial_fit no new ones
        if not hasattr(self, "classes_") or (not self.warm_start and not incremental):
            self._label_binarizer = LabelBinarizer()
            self._label_binarizer.fit(y)
            self.classes_ = self._label_binarizer.classes_
        elif type_of_target(y) != "multilabel-indicator":
            classes, seen = self._label_binarizer.classes_, unique_labels(y)
            if not incremental and set(seen) != set(classes):
                raise ValueError("warm_start can only be used where `y` has the same "
                                 "classes as in the previous call to fit. Previously got "
                                 f"{classes}, `y` has {seen}")
            if incremental and not set(seen) <= set(classes):
                raise ValueError(f"`y` has classes not in `self.classes_`. "
                                 f"`self.classes_` has {classes}. 'y' has {seen}.")
        return X, self._label_binarizer.transform(y).astype(np.float32)

    def _multiclass(self):
        return self._label_binarizer.y_type_ == "multiclass"

    def _output(self, y):
        """(output activation, loss, c, the data term's factor): fastmlp's
        gradient is c times scikit-learn's; its data loss that factor times."""
        if self._multiclass():
            return "softmax", _losses.SparseCategoricalCrossentropy(), 1.0, 1.0
        # binary cross-entropy: a mean over the outputs, scikit-learn sums them
        return "sigmoid", _losses.BinaryCrossentropy(), 1.0 / y.shape[1], 1.0 / y.shape[1]

    def _train_target(self, y):
        if self._multiclass():
            return np.ascontiguousarray(y.argmax(axis=1).astype(np.int32))
        return np.ascontiguousarray(y, dtype=np.float32)

    def _val_target(self, y):
        return self._label_binarizer.inverse_transform(y)

    def _labels(self, out):
        if self._multiclass():
            return self.classes_[out.argmax(axis=1)]
        return self._label_binarizer.inverse_transform(out)

    def _score_on(self, model, X, y, w):
        return accuracy_score(y, self._labels(_host(model.predict(X, check_finite=False))),
                              sample_weight=w)

    def fit(self, X, y, sample_weight=None):
        """Fit the model to data matrix X and target(s) y (class labels, or a 2-D
        indicator matrix for multi-label classification)."""
        self._fit(X, y, sample_weight, incremental=False)
        self.out_activation_ = "softmax" if self._multiclass() else "logistic"
        return self

    def partial_fit(self, X, y, sample_weight=None, classes=None):
        """One epoch over (X, y), keeping the weights and the optimizer state;
        ``classes`` (all the labels) is required on the first call."""
        self._check_params()
        if _check_partial_fit_first_call(self, classes):
            self._label_binarizer = LabelBinarizer()
            if type_of_target(y).startswith("multilabel"):
                self._label_binarizer.fit(y)
            else:
                self._label_binarizer.fit(self.classes_)
        self._fit(X, y, sample_weight, incremental=True)
        self.out_activation_ = "softmax" if self._multiclass() else "logistic"
        return self

    def predict(self, X):
        """The predicted classes (for multi-label targets, the indicator matrix)."""
        return self._labels(self._forward(X))

    def predict_proba(self, X):
        """Probability of each class: (n_samples, n_classes), columns in ``classes_``
        order (for multi-label targets, each label's probability)."""
        p = self._forward(X)
        if self.n_outputs_ == 1 and not self._multiclass():
            p = p.ravel()
            return np.vstack([1 - p, p]).T
        return p

    def predict_log_proba(self, X):
        """``log(predict_proba(X))``."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))


class MLPRegressor(RegressorMixin, _BaseMLP):
    """scikit-learn's ``MLPRegressor`` (solvers ``adam`` and ``sgd``, squared error)
    trained by fastmlp. See :mod:`fastmlp.sklearn`."""

    def __init__(self, loss="squared_error", hidden_layer_sizes=(100,), activation="relu", *,
                 solver="adam", alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False,
                 momentum=0.9, nesterovs_momentum=True, early_stopping=False,
                 validation_fraction=0.1, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                 n_iter_no_change=10, device="auto"):
        super().__init__(hidden_layer_sizes, activation, solver=solver, alpha=alpha,
                         batch_size=batch_size, learning_rate=learning_rate,
                         learning_rate_init=learning_rate_init, power_t=power_t,
                         max_iter=max_iter, shuffle=shuffle, random_state=random_state,
                         tol=tol, verbose=verbose, warm_start=warm_start, momentum=momentum,
                         nesterovs_momentum=nesterovs_momentum,
                         early_stopping=early_stopping,
                         validation_fraction=validation_fraction, beta_1=beta_1,
                         beta_2=beta_2, epsilon=epsilon, n_iter_no_change=n_iter_no_change,
                         device=device)
        self.loss = loss

    def _check_params(self):
        if self.loss == "poisson":
            raise ValueError("MLPRegressor: loss='poisson' is not available in fastmlp; use "
                             "loss='squared_error'")
        _check_option(self, "loss", {"squared_error"})
        return super()._check_params()

    def _check_xy(self, X, y, reset, incremental):
        X, y = _validate_data(self, X, y, reset=reset, accept_sparse=["csr", "csc", "coo"],
                              multi_output=True, y_numeric=True,
                              dtype=(np.float64, np.float32))
        X = self._dense32(X)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if y.ndim == 1:
            y = y.reshape(-1, 1)
        return X, np.asarray(y, dtype=np.float32)

    def _output(self, y):
        # fastmlp's mean squared error averages the outputs without a 1/2: its gradient
        # is 2/k times scikit-learn's (which sums the outputs), its value twice
        # scikit-learn's reported loss (which averages them)
        return "linear", _losses.MeanSquaredError(), 2.0 / y.shape[1], 2.0

    def _train_target(self, y):
        return np.ascontiguousarray(y, dtype=np.float32)

    def _val_target(self, y):
        return y

    def _score_on(self, model, X, y, w):
        return r2_score(y, _host(model.predict(X, check_finite=False)), sample_weight=w)

    def fit(self, X, y, sample_weight=None):
        """Fit the model to data matrix X and target(s) y."""
        self._fit(X, y, sample_weight, incremental=False)
        self.out_activation_ = "identity"
        return self

    def partial_fit(self, X, y, sample_weight=None):
        """One epoch over (X, y), keeping the weights and the optimizer state."""
        self._fit(X, y, sample_weight, incremental=True)
        self.out_activation_ = "identity"
        return self

    def predict(self, X):
        """The predicted values: (n_samples,) for one output, else (n_samples, n_outputs)."""
        out = self._forward(X)
        return out.ravel() if out.shape[1] == 1 else out

