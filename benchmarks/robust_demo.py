"""Plain vs adversarial training on Fashion-MNIST, and what their attributions look like.

Trains the 784-128-10 classifier (relu, softmax output, Adam 1e-3, batch 64) twice on the
60,000 training images -- plainly, and with PGD adversarial training (eps 0.1, 10 steps of
0.025 from a random start) -- then reports each model's test accuracy on the clean images
and under FGSM and PGD-10 / PGD-40 at eps 0.1 (random start, fresh seeds), and writes
integrated-gradients figures (50 Gauss-Legendre steps, baseline black) of the first test
images for both models:

    python benchmarks/robust_demo.py --out benchmarks/results/cpu-amd-epyc-2c

writes robust_demo.json / robust_demo.md and explain_plain.png / explain_robust.png there.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import fastmlp as fm


def load():
    (xt, yt), (xs, ys) = fm.datasets.load_fashion_mnist()

    def prep(x):
        return x.reshape(len(x), -1).astype(np.float32) / np.float32(255.0)

    return (prep(xt), yt), (prep(xs), ys)


CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Boot")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--index", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    (xt, yt), (xs, ys) = load()
    eps = args.eps
    attacks = {"FGSM": fm.adversarial.FGSM(eps),
               "PGD-10": fm.adversarial.PGD(eps, 2.5 * eps / 10, steps=10, seed=101),
               "PGD-40": fm.adversarial.PGD(eps, 2.5 * eps / 40, steps=40, seed=102)}
    results, models = {}, {}
    for name, adv in (("plain", None),
                      ("PGD-10 training", fm.adversarial.PGD(eps, 2.5 * eps / 10, steps=10,
                                                             seed=7))):
        fm.set_seed(0)
        model = fm.Sequential([fm.Dense(128, activation="relu", input_dim=784),
                               fm.Dense(10, activation="softmax")])
        model.compile(optimizer=fm.optim.Adam(1e-3), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        t0 = time.perf_counter()
        h = model.fit(xt, yt, epochs=args.epochs, batch_size=64, verbose=0, device=args.device,
                      adversarial=adv)
        wall = time.perf_counter() - t0
        row = {"train_s": wall, "epoch_s_median": float(np.median(h.history["time"])),
               "clean": model.evaluate(xs, ys)["accuracy"]}
        for aname, attack in attacks.items():
            row[aname] = model.evaluate(xs, ys, adversarial=attack)["accuracy"]
        results[name] = row
        models[name] = model
        print(name, {k: round(v, 4) for k, v in row.items()}, flush=True)
    x = xs[args.index]
    for name, tag in (("plain", "plain"), ("PGD-10 training", "robust")):
        model = models[name]
        probs = model.predict(x)
        attr = fm.explain.integrated_gradients(model, x, steps=50)
        titles = [f"#{i} {CLASSES[int(ys[i])]}: {CLASSES[int(np.argmax(p))]} "
                  f"{float(np.max(p)):.2f}" for i, p in zip(args.index, probs)]
        fig = fm.explain.plot(attr, x, path=os.path.join(args.out, f"explain_{tag}.png"),
                              titles=titles)
        import matplotlib.pyplot as plt

        plt.close(fig)
    meta = {"eps": eps, "epochs": args.epochs, "device": args.device, "batch_size": 64,
            "model": "784-128(relu)-10(softmax), Adam 1e-3", "date": time.strftime("%Y-%m-%d"),
            "fastmlp": fm.__version__}
    with open(os.path.join(args.out, "robust_demo.json"), "w") as fh:
        json.dump({"meta": meta, "results": results}, fh, indent=1)
    cols = ["clean", *attacks]
    lines = [f"Fashion-MNIST test accuracy (10,000 images), eps = {eps}, {args.epochs} epochs, "
             f"{args.device}", "",
             "| training | " + " | ".join(cols) + " |",
             "| --- |" + " --- |" * len(cols)]
    # (the epoch times are in the JSON; the speed comparison is the benchmarks'
    # robustness section, measured against peers on a quiet machine)
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
    with open(os.path.join(args.out, "robust_demo.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
