"""An independent training loop built only from ``fm.reference`` (plain NumPy), in float64.

It writes the Dense forward/backward and the optimizer loop out by hand -- none of
fastmlp.model's code -- so a test that holds ``model.fit`` to it checks the model's
composition of the kernels (the order of the backward products, the ReLU masks, the
loss fusion, the optimizer's step count and hyper-parameters), not only the kernels.
"""
from __future__ import annotations

import numpy as np

import fastmlp as fm

R = fm.reference


def forward(weights, activations, x):
    """Returns the list of layer outputs (post-activation; the last is the logits)."""
    outs, a = [], x
    for i, act in enumerate(activations):
        z = R.bias_add(R.gemm(a, weights[2 * i]), weights[2 * i + 1])
        if act == "relu":
            z = R.relu(z)
        outs.append(z)
        a = z
    return outs


def train(weights, activations, batches, opt: dict):
    """Train on ``batches`` [(x, y)] with the optimizer described by ``opt``.

    ``weights``: [W0, b0, W1, b1, ...] (copied to float64). ``opt``: {"name": "adam" |
    "adamw" | "sgd", hyper-parameters}. Returns (per-step losses, final weights).
    """
    w = [np.array(p, dtype=np.float64) for p in weights]
    state = [[np.zeros_like(p), np.zeros_like(p)] for p in w]
    losses = []
    for step, (x, y) in enumerate(batches, start=1):
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y) if np.asarray(y).dtype.kind in "iu" else np.asarray(y, np.float64)
        outs = forward(w, activations, x)
        loss, probs = R.softmax_cross_entropy(outs[-1], y)
        losses.append(float(loss))
        dz = R.softmax_cross_entropy_backward(probs, y)
        grads = [None] * len(w)
        for i in range(len(activations) - 1, -1, -1):
            if activations[i] == "relu":
                dz = R.relu_backward(dz, outs[i])
            a_prev = x if i == 0 else outs[i - 1]
            grads[2 * i] = R.gemm(a_prev, dz, trans_a=True)
            grads[2 * i + 1] = R.bias_grad(dz)
            if i > 0:
                dz = R.gemm(dz, w[2 * i], trans_b=True)
        for p, g, (s1, s2) in zip(w, grads, state):
            if opt["name"] == "sgd":
                R.sgd_step(p, g, s1, lr=opt["lr"], momentum=opt.get("momentum", 0.0),
                           nesterov=opt.get("nesterov", False),
                           weight_decay=opt.get("weight_decay", 0.0))
            else:
                R.adam_step(p, g, s1, s2, step=step, lr=opt["lr"],
                            weight_decay=opt.get("weight_decay",
                                                 1e-2 if opt["name"] == "adamw" else 0.0),
                            decoupled=opt["name"] == "adamw")
    return losses, w
