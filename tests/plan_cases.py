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

    def data(self, seed=0):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((self.n, self.d)).astype(np.float32)
        y = rng.integers(0, self.classes, self.n).astype(np.int64)
        if self.onehot:
            y = np.eye(self.classes, dtype=np.float32)[y]
        return x, y

    def model(self, seed=3):
        fm.set_seed(seed)
        model = fm.Sequential(self.layers())
        loss = "categorical_crossentropy" if self.onehot else "sparse_categorical_crossentropy"
        model.compile(optimizer=self.optimizer(), loss=loss, metrics=["accuracy"])
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
BY_ID = {c.id: c for c in CASES}
