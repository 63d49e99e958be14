"""One registry of training cases for the engine tests (test_engine.py and, on the GPU,
test_engine_gpu.py): each case is a model, an optimizer, data and fit arguments. A new
layer, loss, optimizer or training mode adds entries here and gets the engine
equivalence, chunking, resume and CPU-vs-GPU checks for free."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

import fastmlp as fm


@dataclass
class Case:
    id: str
    layers: object            # () -> [fm.Dense, fm.Dropout, ...]
    optimizer: object         # () -> fm.optim.Optimizer
    n: int = 203              # rows
    d: int = 37               # features
    classes: int = 7
    onehot: bool = False
    fit: dict = field(default_factory=dict)
    # issue 16: the loss (None: sparse / categorical cross-entropy by `onehot`), the
    # targets ("class": labels; "binary": 0/1 floats; "regression": floats), the
    # metrics, and per-sample / per-class loss weights ("", "sample", "class", "both")
    loss: object = None
    target: str = "class"
    metrics: tuple = ("accuracy",)
    weighted: str = ""

    def data(self, seed=0):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((self.n, self.d)).astype(np.float32)
        if self.target == "binary":
            return x, (rng.random((self.n, self.classes)) < 0.4).astype(np.float32)
        if self.target == "regression":
            return x, rng.standard_normal((self.n, self.classes)).astype(np.float32)
        y = rng.integers(0, self.classes, self.n).astype(np.int64)
        if self.onehot:
            y = np.eye(self.classes, dtype=np.float32)[y]
        return x, y

    def fit_kwargs(self, seed=0):
        """fit's arguments, with the case's sample / class weights."""
        kw = dict(self.fit)
        rng = np.random.default_rng(seed + 100)
        if self.weighted in ("sample", "both"):
            kw["sample_weight"] = rng.uniform(0.1, 2.0, self.n).astype(np.float32)
        if self.weighted in ("class", "both"):
            kw["class_weight"] = {c: 0.5 + c / 4 for c in range(0, max(self.classes, 2), 2)}
        return kw

    def model(self, seed=3):
        fm.set_seed(seed)
        model = fm.Sequential(self.layers())
        loss = self.loss() if callable(self.loss) else self.loss
        if loss is None:
            loss = ("categorical_crossentropy" if self.onehot
                    else "sparse_categorical_crossentropy")
        model.compile(optimizer=self.optimizer(), loss=loss, metrics=list(self.metrics))
        return model


def _two(d=37, h=16, c=7):
    return lambda: [fm.Dense(h, activation="relu", input_dim=d), fm.Dense(c)]


OPTIMIZERS = {
    "adam": lambda: fm.optim.Adam(lr=3e-3),
    "adamw": lambda: fm.optim.AdamW(lr=3e-3, weight_decay=0.05),
    "adam-wd": lambda: fm.optim.Adam(lr=3e-3, weight_decay=0.01),
    "sgd": lambda: fm.optim.SGD(lr=0.05),
    "sgd-nesterov": lambda: fm.optim.SGD(lr=0.05, momentum=0.9, nesterov=True,
                                         weight_decay=1e-3),
}

CASES = []
for _name, _opt in OPTIMIZERS.items():
    for _shuffle in (True, False):
        CASES.append(Case(f"{_name}-{'shuffle' if _shuffle else 'inorder'}", _two(), _opt,
                          fit=dict(epochs=3, batch_size=32, shuffle=_shuffle,
                                   validation_split=0.2)))
CASES += [
    Case("deep-onehot-nobias-relu-last",
         lambda: [fm.Dense(24, activation="relu", input_dim=37),
                  fm.Dense(11, activation="relu", use_bias=False), fm.Dense(9),
                  fm.Dense(7, activation="relu")],
         OPTIMIZERS["adam"], n=150, onehot=True, fit=dict(epochs=2, batch_size=50)),
    Case("softmax-output-onehot", lambda: [fm.Dense(12, activation="relu", input_dim=37),
                                           fm.Dense(7, activation="softmax")],
         OPTIMIZERS["adamw"], n=120, onehot=True, fit=dict(epochs=2, batch_size=16)),
    Case("batch-larger-than-data", _two(h=5), OPTIMIZERS["sgd"], n=150,
         fit=dict(epochs=2, batch_size=1000)),
    Case("batch-1", _two(h=5), OPTIMIZERS["sgd-nesterov"], n=150,
         fit=dict(epochs=1, batch_size=1)),
    Case("prime-sizes", lambda: [fm.Dense(13, activation="relu", input_dim=31),
                                 fm.Dense(5)], OPTIMIZERS["adam"], n=97, d=31, classes=5,
         fit=dict(epochs=2, batch_size=17, validation_data=None)),
]
# Issue 15's layers: every activation fused in a Dense (forward epilogue, and the
# derivative in the next Dense's backward epilogue), from the output or from the saved
# pre-activation, with and without a fused Dropout; the standalone layers.
for _act in ("sigmoid", "tanh", "gelu", "silu", "elu", "softplus", "leaky_relu"):
    CASES.append(Case(f"act-{_act}", lambda a=_act: [fm.Dense(19, activation=a, input_dim=37),
                                                     fm.Dense(7)],
                      OPTIMIZERS["adam"], n=120, fit=dict(epochs=2, batch_size=32)))
    CASES.append(Case(f"act-{_act}-dropout",
                      lambda a=_act: [fm.Dense(19, activation=a, input_dim=37),
                                      fm.Dropout(0.3), fm.Dense(13, activation=a),
                                      fm.Dropout(0.2), fm.Dense(7, activation=a)],
                      OPTIMIZERS["sgd-nesterov"], n=120, fit=dict(epochs=2, batch_size=32)))
CASES += [
    Case("relu-dropout", lambda: [fm.Dense(23, activation="relu", input_dim=37),
                                  fm.Dropout(0.5), fm.Dense(7)],
         OPTIMIZERS["adam"], n=150, fit=dict(epochs=2, batch_size=32, validation_split=0.2)),
    Case("standalone-layers",
         lambda: [fm.Dropout(0.1, input_dim=37), fm.Dense(21), fm.BatchNormalization(),
                  fm.Activation("gelu"), fm.Dropout(0.25), fm.Dense(15, activation="tanh"),
                  fm.LayerNormalization(), fm.Activation("swish"), fm.Dense(7),
                  fm.Activation("softmax")],
         OPTIMIZERS["adamw"], n=130, fit=dict(epochs=2, batch_size=29, validation_split=0.2)),
    Case("batchnorm-first-no-affine",
         lambda: [fm.BatchNormalization(center=False, scale=False, input_dim=37),
                  fm.Dense(16, activation="relu"), fm.BatchNormalization(momentum=0.9),
                  fm.Dense(12), fm.BatchNormalization(center=False, scale=False),
                  fm.Activation("tanh"), fm.LayerNormalization(center=False, scale=False),
                  fm.Dense(7)], OPTIMIZERS["sgd"], n=100, fit=dict(epochs=2, batch_size=16)),
    Case("layernorm-last-onehot",
         lambda: [fm.Dense(16, activation="elu", input_dim=37), fm.LayerNormalization(),
                  fm.Dense(7), fm.LayerNormalization(center=False)],
         OPTIMIZERS["adam-wd"], n=90, onehot=True, fit=dict(epochs=2, batch_size=20)),
]
# Issue 16: losses, metrics, sample / class weights, RMSprop, clipping, regularizers,
# learning-rate schedules.
_OUT = lambda act=None, c=7: lambda: [fm.Dense(16, activation="relu", input_dim=37),  # noqa: E731
                                       fm.Dense(c, activation=act)]
OPTIMIZERS.update({
    "rmsprop": lambda: fm.optim.RMSprop(lr=3e-3),
    "rmsprop-all": lambda: fm.optim.RMSprop(lr=1e-3, alpha=0.9, momentum=0.5, centered=True,
                                            weight_decay=1e-3),
    "sgd-clipnorm": lambda: fm.optim.SGD(lr=0.1, momentum=0.9, clipnorm=0.05),
    "adam-global-clipnorm": lambda: fm.optim.Adam(lr=3e-3, global_clipnorm=0.1),
    "adamw-clipvalue": lambda: fm.optim.AdamW(lr=3e-3, clipvalue=0.002),
    "rmsprop-clip-both": lambda: fm.optim.RMSprop(lr=1e-3, clipnorm=0.1, clipvalue=0.01),
    "adam-exp-decay": lambda: fm.optim.Adam(
        lr=fm.optim.schedules.ExponentialDecay(1e-2, decay_steps=3, decay_rate=0.8)),
    "sgd-cosine-warmup": lambda: fm.optim.SGD(lr=fm.optim.schedules.CosineDecay(
        0.0, decay_steps=10, warmup_target=0.1, warmup_steps=4, alpha=0.1), momentum=0.9),
    "adam-piecewise": lambda: fm.optim.Adam(lr=fm.optim.schedules.PiecewiseConstantDecay(
        [3, 8], [1e-2, 5e-3, 1e-3])),
})
for _name in ("rmsprop", "rmsprop-all", "sgd-clipnorm", "adam-global-clipnorm",
              "adamw-clipvalue", "rmsprop-clip-both", "adam-exp-decay", "sgd-cosine-warmup",
              "adam-piecewise"):
    CASES.append(Case(f"opt-{_name}", _two(), OPTIMIZERS[_name], n=150,
                      fit=dict(epochs=2, batch_size=32, validation_split=0.2)))
_reg = fm.regularizers
CASES += [
    Case("mse-regression", _OUT(c=3), OPTIMIZERS["adam"], classes=3, loss="mse",
         target="regression", metrics=("mae", "mse"),
         fit=dict(epochs=2, batch_size=32, validation_split=0.2)),
    Case("mae-regression-1out", _OUT(c=1), OPTIMIZERS["sgd"], classes=1, loss="mae",
         target="regression", metrics=("mse",), fit=dict(epochs=2, batch_size=25)),
    Case("huber-regression-weighted", _OUT(c=2), OPTIMIZERS["rmsprop"], classes=2,
         loss=lambda: fm.losses.Huber(delta=0.5), target="regression", weighted="sample",
         metrics=("mae",), fit=dict(epochs=2, batch_size=32, validation_split=0.2)),
    Case("bce-sigmoid-1out", _OUT("sigmoid", 1), OPTIMIZERS["adam"], classes=1,
         loss="binary_crossentropy", target="binary",
         metrics=("accuracy", "binary_accuracy", "auc", "mse"),
         fit=dict(epochs=2, batch_size=32, validation_split=0.2)),
    Case("bce-sigmoid-multilabel-class-weight", _OUT("sigmoid", 4), OPTIMIZERS["sgd"],
         classes=4, loss=lambda: fm.losses.BinaryCrossentropy(label_smoothing=0.1),
         target="binary", metrics=("accuracy", "auc"), weighted="both",
         fit=dict(epochs=2, batch_size=30)),
    Case("bce-logits", _OUT(None, 3), OPTIMIZERS["adamw"], classes=3,
         loss="binary_crossentropy", target="binary", metrics=("binary_accuracy",),
         fit=dict(epochs=2, batch_size=32)),
    Case("bce-probs-tanh", _OUT("tanh", 2), OPTIMIZERS["adam"], classes=2,
         loss=lambda: fm.losses.BinaryCrossentropy(from_logits=False), target="binary",
         metrics=("accuracy",), fit=dict(epochs=2, batch_size=32)),
    Case("sparse-cce-smoothing-topk", _two(), OPTIMIZERS["adam"],
         loss=lambda: fm.losses.SparseCategoricalCrossentropy(label_smoothing=0.1),
         metrics=("accuracy", "sparse_top_k_categorical_accuracy"),
         fit=dict(epochs=2, batch_size=32, validation_split=0.2)),
    Case("cce-softmax-smoothing-weighted", _OUT("softmax"), OPTIMIZERS["sgd-nesterov"],
         onehot=True, loss=lambda: fm.losses.CategoricalCrossentropy(label_smoothing=0.2),
         weighted="both", metrics=("accuracy", "mse"), fit=dict(epochs=2, batch_size=32)),
    Case("sparse-cce-class-weight", _two(), OPTIMIZERS["adam"], weighted="class",
         fit=dict(epochs=2, batch_size=32, validation_split=0.2)),
    Case("cce-probs-sigmoid", _OUT("sigmoid"), OPTIMIZERS["adam"], onehot=True,
         loss=lambda: fm.losses.CategoricalCrossentropy(from_logits=False),
         fit=dict(epochs=2, batch_size=32)),
    Case("regularizers", lambda: [
        fm.Dense(16, activation="relu", input_dim=37, kernel_regularizer=_reg.l2(1e-3)),
        fm.Dense(12, activation="tanh", kernel_regularizer=_reg.l1(1e-4),
                 bias_regularizer=_reg.l2(1e-2)),
        fm.Dense(7, kernel_regularizer=_reg.l1_l2(l1=1e-4, l2=1e-3))],
        OPTIMIZERS["sgd-nesterov"], fit=dict(epochs=2, batch_size=32, validation_split=0.2)),
    Case("regularizers-clip-bn", lambda: [
        fm.Dense(16, activation="relu", input_dim=37, kernel_regularizer=_reg.l2(1e-3)),
        fm.BatchNormalization(), fm.Dense(7, kernel_regularizer=_reg.l1(1e-3))],
        OPTIMIZERS["rmsprop-clip-both"], fit=dict(epochs=2, batch_size=32)),
    Case("regularizers-global-clip-mse", lambda: [
        fm.Dense(16, activation="gelu", input_dim=37, kernel_regularizer=_reg.l1_l2(1e-4, 1e-4)),
        fm.Dense(3)], OPTIMIZERS["adam-global-clipnorm"], classes=3, loss="mse",
        target="regression", weighted="sample", metrics=("mae",),
        fit=dict(epochs=2, batch_size=32)),
]
# Issue 17: DP-SGD (per-example clipping, noise in the optimizer, Poisson sampling).
OPTIMIZERS.update({
    "dpsgd": lambda: fm.privacy.DPSGD(lr=0.05, momentum=0.9, l2_norm_clip=0.5,
                                      noise_multiplier=1.1, seed=7),
    "dpadam": lambda: fm.privacy.DPAdam(lr=3e-3, l2_norm_clip=1.0, noise_multiplier=0.8,
                                        seed=8),
})
CASES += [
    Case("dp-sgd", _two(), OPTIMIZERS["dpsgd"],
         fit=dict(epochs=2, batch_size=32, validation_split=0.2)),
    Case("dp-adam-deep-dropout-nobias", lambda: [
        fm.Dense(24, activation="tanh", input_dim=37), fm.Dropout(0.2),
        fm.Dense(11, activation="relu", use_bias=False), fm.Activation("gelu"),
        fm.Dense(7, activation="softmax")], OPTIMIZERS["dpadam"], n=150, onehot=True,
         fit=dict(epochs=2, batch_size=25)),
    Case("dp-adam-poisson", _two(), OPTIMIZERS["dpadam"], n=120,
         fit=dict(epochs=2, batch_size=16, poisson_sampling=True, validation_split=0.2)),
    Case("dp-sgd-poisson-empty-batches", _two(h=5), OPTIMIZERS["dpsgd"], n=60,
         fit=dict(epochs=1, batch_size=1, poisson_sampling=True)),
    Case("dp-adam-regularizers-bce-weighted", lambda: [
        fm.Dense(16, activation="relu", input_dim=37, kernel_regularizer=_reg.l2(1e-3)),
        fm.Dense(3, activation="sigmoid", bias_regularizer=_reg.l1(1e-3))],
        OPTIMIZERS["dpadam"], classes=3, loss="binary_crossentropy", target="binary",
        weighted="sample", metrics=("binary_accuracy",), fit=dict(epochs=2, batch_size=32)),
]
BY_ID = {c.id: c for c in CASES}
# Issue 18: adversarial training (the attack's ops before the training step's forward).
def _PGD(**kw):
    return fm.adversarial.PGD(0.1, 0.04, **{"steps": 2, "clip": None, "seed": 5, **kw})


CASES += [
    Case("adv-pgd-dropout-bn-ln", lambda: [
        fm.Dense(24, activation="relu", input_dim=37), fm.Dropout(0.2),
        fm.BatchNormalization(), fm.Dense(11, activation="gelu"), fm.LayerNormalization(),
        fm.Dense(7, activation="softmax")], OPTIMIZERS["adam"],
         fit=dict(epochs=2, batch_size=32, validation_split=0.2, adversarial=_PGD())),
    Case("adv-fgsm-bce-weighted", lambda: [
        fm.Dense(16, activation="tanh", input_dim=37), fm.Dense(3, activation="sigmoid")],
        OPTIMIZERS["sgd-nesterov"], classes=3, loss="binary_crossentropy", target="binary",
        weighted="sample", metrics=("binary_accuracy",),
        fit=dict(epochs=2, batch_size=32, adversarial=fm.adversarial.FGSM(0.2, clip=(-3, 3)))),
    Case("adv-pgd-mse-clip", lambda: [
        fm.Dense(16, activation="silu", input_dim=37), fm.Dense(3)], OPTIMIZERS["adam"],
        classes=3, loss="mse", target="regression", metrics=("mae",),
        fit=dict(epochs=2, batch_size=25, adversarial=_PGD(steps=3, clip=(-2.0, 2.0)))),
    Case("adv-pgd-smoothing-no-random-start", _two(), OPTIMIZERS["adam"],
         loss=lambda: fm.losses.SparseCategoricalCrossentropy(label_smoothing=0.1),
         fit=dict(epochs=2, batch_size=32, adversarial=_PGD(random_start=False))),
]
BY_ID = {c.id: c for c in CASES}
