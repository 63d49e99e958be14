"""fm.adversarial: FGSM / PGD examples, adversarial evaluation and training (issue 18).

The attacks are held to a PyTorch computation on the same weights (the gradient of the
same loss, torchattacks' update), to their constraints (the eps-ball, the clip range),
to each other (evaluate(adversarial=) scores exactly the rows pgd() returns), and the
C++ engines to the Python executor bit for bit; adversarial training on Fashion-MNIST
must raise the accuracy under PGD well above the plain model's.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastmlp as fm


def _model(d=20, c=4, seed=0, hidden="relu", softmax=True, dropout=0.0):
    fm.set_seed(seed)
    layers = [fm.Dense(24, activation=hidden, input_dim=d)]
    if dropout:
        layers.append(fm.Dropout(dropout))
    layers.append(fm.Dense(c, activation="softmax" if softmax else None))
    model = fm.Sequential(layers)
    model.compile(optimizer=fm.optim.Adam(1e-2), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def _data(rng, n=96, d=20, c=4):
    """Separable blobs in [0, 1], so that a trained model has something to lose."""
    y = rng.integers(0, c, size=n)
    centers = rng.random((c, d), dtype=np.float32)
    x = np.clip(centers[y] + 0.15 * rng.standard_normal((n, d)).astype(np.float32), 0, 1)
    return x.astype(np.float32), y


def _torch_net(model):
    torch = pytest.importorskip("torch")
    w0, b0, w1, b1 = model.get_weights()
    net = torch.nn.Sequential(torch.nn.Linear(w0.shape[0], w0.shape[1]), torch.nn.ReLU(),
                              torch.nn.Linear(w1.shape[0], w1.shape[1]))
    with torch.no_grad():
        for lin, w, b in ((net[0], w0, b0), (net[2], w1, b1)):
            lin.weight.copy_(torch.from_numpy(w.T.copy()))
            lin.bias.copy_(torch.from_numpy(b))
    return torch, net


def _torch_pgd(torch, net, x, y, eps, alpha, steps, project=True):
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    adv, grads = xt.clone(), []
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(net(adv), yt)
        g, = torch.autograd.grad(loss, adv)
        grads.append(g.numpy())
        adv = adv.detach() + alpha * g.sign()
        if project:
            adv = xt + torch.clamp(adv - xt, -eps, eps)
        adv = torch.clamp(adv, 0.0, 1.0)
    return adv.numpy(), grads


def _agree(got, want, grads, what, frac=2e-3):
    """Equal, except where the sign of a vanishing gradient may differ in float32."""
    diff = got != want
    assert diff.mean() <= frac, f"{what}: {diff.mean():.4f} of the elements differ"
    if diff.any() and len(grads) == 1:
        g = np.abs(grads[0])
        assert g[diff].max() <= 1e-4 * g.max(), f"{what}: a sign differs where |grad| is large"


def test_fgsm_matches_pytorch(backend, rng):
    model = _model()
    x, y = _data(rng)
    model.fit(x, y, epochs=3, batch_size=16, verbose=0, device="cpu")
    torch, net = _torch_net(model)
    want, grads = _torch_pgd(torch, net, x, y, 0.1, 0.1, 1, project=False)
    model.to("cuda" if backend.is_gpu else "cpu")
    got = backend.host(fm.adversarial.fgsm(model, backend.to(x), backend.to(y), eps=0.1))
    assert np.abs(got - x).max() > 0.09
    _agree(got, want, grads, "fgsm")


def test_pgd_matches_pytorch(backend, rng):
    model = _model()
    x, y = _data(rng)
    model.fit(x, y, epochs=3, batch_size=16, verbose=0, device="cpu")
    torch, net = _torch_net(model)
    want, grads = _torch_pgd(torch, net, x, y, 0.08, 0.02, 6)
    model.to("cuda" if backend.is_gpu else "cpu")
    got = backend.host(fm.adversarial.pgd(model, backend.to(x), backend.to(y), eps=0.08,
                                          alpha=0.02, steps=6, random_start=False))
    np.testing.assert_allclose(got, want, atol=0.02 * 2 + 1e-6)  # a flipped sign: 2 steps
    _agree(got, want, grads, "pgd", frac=1e-2)


def test_pgd_stays_in_the_ball_and_the_clip_range(backend, rng):
    model = _model()
    x, y = _data(rng)
    model.to("cuda" if backend.is_gpu else "cpu")
    eps = 0.05
    for clip in ((0.0, 1.0), (0.1, 0.9), None):
        adv = backend.host(fm.adversarial.pgd(model, backend.to(x), backend.to(y), eps=eps,
                                              alpha=0.02, steps=5, clip=clip, seed=3))
        lo, hi = clip if clip is not None else (-np.inf, np.inf)
        assert adv.min() >= lo and adv.max() <= hi
        # |adv - x| <= eps up to the rounding of x + delta, and the clip may move x itself
        xc = np.clip(x, lo, hi)
        assert np.abs(adv - x).max() <= eps * (1 + 1e-6) + 1e-7 or \
            np.abs(adv - xc).max() <= eps * (1 + 1e-6) + 1e-7
        assert np.abs(adv - x).max() > 0.5 * eps


def test_random_start_is_seeded(rng):
    model = _model()
    x, y = _data(rng)
    a = fm.adversarial.pgd(model, x, y, eps=0.1, alpha=0.01, steps=1, seed=5)
    b = fm.adversarial.pgd(model, x, y, eps=0.1, alpha=0.01, steps=1, seed=5)
    c = fm.adversarial.pgd(model, x, y, eps=0.1, alpha=0.01, steps=1, seed=6)
    d = fm.adversarial.pgd(model, x, y, eps=0.1, alpha=0.01, steps=1, random_start=False)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.5
    assert (a != d).mean() > 0.5


def test_evaluate_scores_the_rows_pgd_returns(rng):
    model = _model()
    x, y = _data(rng, n=200)
    model.fit(x, y, epochs=4, batch_size=16, verbose=0)
    attack = fm.adversarial.PGD(eps=0.1, alpha=0.03, steps=4, seed=11)
    robust = model.evaluate(x, y, adversarial=attack, batch_size=64)
    adv = fm.adversarial.pgd(model, x, y, eps=0.1, alpha=0.03, steps=4, seed=11, batch_size=64)
    direct = model.evaluate(adv, y, batch_size=64)
    assert robust == direct
    clean = model.evaluate(x, y)
    assert robust["accuracy"] < clean["accuracy"]
    fgsm = model.evaluate(x, y, adversarial=fm.adversarial.FGSM(0.1))
    assert fgsm["accuracy"] < clean["accuracy"]
    assert model.evaluate(x, y) == clean  # the plain evaluation list is back


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_adversarial_training_engines_agree_bit_for_bit(monkeypatch, rng, attack):
    x, y = _data(rng, n=70)
    cfg = (fm.adversarial.FGSM(0.1) if attack == "fgsm"
           else fm.adversarial.PGD(0.1, 0.04, steps=3, seed=2))
    runs = []
    for engine in ("native", "python"):
        monkeypatch.setenv("FASTMLP_ENGINE", engine)
        model = _model(dropout=0.2)
        h = model.fit(x, y, epochs=2, batch_size=16, verbose=0, adversarial=cfg)
        runs.append((model.get_weights(), h.history["loss"]))
    for a, b in zip(runs[0][0], runs[1][0]):
        np.testing.assert_array_equal(a, b)
    assert runs[0][1] == runs[1][1]


def test_adversarial_training_step_trains_on_the_attacked_rows(rng):
    """One SGD step of adversarial training equals one plain step on the rows
    fm.adversarial.fgsm makes from the same weights (FGSM has no random start)."""
    x, y = _data(rng, n=32)
    a, b = _model(seed=4), _model(seed=4)
    for m in (a, b):
        m.compile(optimizer=fm.optim.SGD(0.5), loss="sparse_categorical_crossentropy")
    adv = fm.adversarial.fgsm(b, x, y, eps=0.1)
    a.fit(x, y, epochs=1, batch_size=32, verbose=0, shuffle=False,
          adversarial=fm.adversarial.FGSM(0.1))
    b.fit(adv, y, epochs=1, batch_size=32, verbose=0, shuffle=False)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)


def test_errors(rng):
    x, y = _data(rng)
    model = _model()
    with pytest.raises(ValueError, match="eps"):
        fm.adversarial.PGD(eps=-1, alpha=0.1)
    with pytest.raises(ValueError, match="alpha"):
        fm.adversarial.PGD(eps=0.1, alpha=0)
    with pytest.raises(ValueError, match="steps"):
        fm.adversarial.PGD(eps=0.1, alpha=0.1, steps=0)
    with pytest.raises(ValueError, match="clip"):
        fm.adversarial.FGSM(0.1, clip=(1, 0))
    with pytest.raises(TypeError, match="adversarial"):
        model.fit(x, y, epochs=1, verbose=0, adversarial="pgd")
    with pytest.raises(TypeError, match="adversarial"):
        model.evaluate(x, y, adversarial=0.1)
    dp = _model()
    dp.compile(optimizer=fm.privacy.DPSGD(0.1), loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="DP"):
        dp.fit(x, y, epochs=1, verbose=0, adversarial=fm.adversarial.FGSM(0.1))
    raw = fm.Sequential([fm.Dense(3, input_dim=20)])
    with pytest.raises(ValueError, match="compile"):
        fm.adversarial.fgsm(raw, x, y, eps=0.1)
    with pytest.raises(ValueError, match="label"):
        fm.adversarial.fgsm(model, x, y + 10, eps=0.1)


def test_fashion_mnist_adversarial_training_raises_robust_accuracy(fashion):
    """PGD adversarial training (eps 0.1) against plain training on 12k Fashion-MNIST
    images: the plain model's accuracy under PGD-10 collapses, the adversarially trained
    one keeps a good part of it."""
    (xt, yt), (xs, ys) = fashion
    xt, yt, xs, ys = xt[:12000], yt[:12000], xs[:2000], ys[:2000]
    attack = fm.adversarial.PGD(eps=0.1, alpha=0.025, steps=10, seed=0)
    results = {}
    for name, adv in (("plain", None),
                      ("adversarial", fm.adversarial.PGD(eps=0.1, alpha=0.04, steps=3,
                                                         seed=1))):
        fm.set_seed(0)
        model = fm.Sequential([fm.Dense(128, activation="relu", input_dim=784),
                               fm.Dense(10, activation="softmax")])
        model.compile(optimizer=fm.optim.Adam(1e-3), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        model.fit(xt, yt, epochs=3, batch_size=64, verbose=0, device="cpu", adversarial=adv)
        results[name] = (model.evaluate(xs, ys)["accuracy"],
                         model.evaluate(xs, ys, adversarial=attack)["accuracy"])
    print(results)
    plain, robust = results["plain"], results["adversarial"]
    assert plain[0] > 0.8 and robust[0] > 0.7            # both learn the task
    assert plain[1] < 0.15                               # PGD breaks the plain model
    assert robust[1] > plain[1] + 0.3                    # and much less the robust one
