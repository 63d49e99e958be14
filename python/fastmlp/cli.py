"""The ``fastmlp`` command: train, evaluate, info.

    fastmlp train                      # 784-128-10 on Fashion-MNIST, Adam 1e-3, batch 32, 10 epochs
    fastmlp train --hidden 256 128 --epochs 5 --device cuda --save model.safetensors
    fastmlp train --adversarial pgd --eps 0.1 --save robust.safetensors
    mpiexec -n 4 fastmlp train         # data-parallel over 4 processes (batch 32 each)
    fastmlp evaluate model.safetensors
    fastmlp evaluate model.safetensors --adversarial pgd --eps 0.1
    fastmlp explain model.safetensors --index 0 5 9 --method integrated_gradients --out fig.png
    fastmlp info
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np

_DATASETS = ("fashion-mnist", "mnist")


def _load(dataset: str, path):
    from . import datasets

    loader = datasets.load_fashion_mnist if dataset == "fashion-mnist" else datasets.load_mnist
    (x_train, y_train), (x_test, y_test) = loader(path)
    # Images -> rows of 784 features in [0, 1]; labels stay uint8 class indices.
    def prep(x):
        return x.reshape(len(x), -1).astype(np.float32) / np.float32(255.0)

    return (prep(x_train), y_train), (prep(x_test), y_test)


def _add_data_args(p):
    p.add_argument("--dataset", choices=_DATASETS, default="fashion-mnist",
                   help="MNIST-format dataset (default: fashion-mnist)")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="folder holding the four IDX files (default: search $FASTMLP_DATA, "
                        "~/.cache/fastmlp/<dataset>, /usr/share/datasets/<dataset>)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to train / evaluate (default: auto = the GPU when usable)")


def _parser():
    parser = argparse.ArgumentParser(prog="fastmlp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an MLP classifier on an MNIST-format dataset",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_data_args(t)
    t.add_argument("--hidden", type=int, nargs="*", default=[128], metavar="UNITS",
                   help="hidden layer sizes (none for a linear classifier)")
    from .layers import ACTIVATIONS

    t.add_argument("--activation", choices=[a for a in ACTIVATIONS if a != "softmax"],
                   default="relu", help="hidden-layer activation")
    t.add_argument("--dropout", type=float, default=0.0, metavar="RATE",
                   help="a Dropout layer of this rate after each hidden layer (0: none)")
    t.add_argument("--batchnorm", action="store_true",
                   help="BatchNormalization after each hidden Dense layer, before its "
                        "activation")
    t.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adam")
    t.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    t.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    t.add_argument("--weight-decay", type=float, default=None,
                   help="weight decay (default: the optimizer's own, as in torch.optim)")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--validation-split", type=float, default=0.1,
                   help="fraction of the training set held out for validation (0 for none)")
    t.add_argument("--limit", type=int, default=None, metavar="N",
                   help="train on the first N training samples only (quick runs)")
    t.add_argument("--seed", type=int, default=0, help="seed for initialisation and shuffling")
    t.add_argument("--save", metavar="PATH", default=None,
                   help="write the trained model (with optimizer state) to PATH (safetensors)")
    t.add_argument("--verbose", type=int, choices=(0, 1, 2), default=2,
                   help="0 quiet, 1 a progress bar per epoch, 2 one line per epoch")

    _add_attack_args(t, "train on the adversarial rows of each batch (adversarial training)")

    e = sub.add_parser("evaluate", help="evaluate a saved model on the test split")
    e.add_argument("model", help="a file written by model.save / fastmlp train --save")
    _add_data_args(e)
    _add_attack_args(e, "also report the accuracy on adversarial test rows (robust "
                        "accuracy)")

    x = sub.add_parser("explain", help="attribution heat maps of test images (PNG)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    x.add_argument("model", help="a file written by model.save / fastmlp train --save")
    _add_data_args(x)
    x.add_argument("--index", type=int, nargs="+", default=[0], metavar="I",
                   help="test images to explain")
    x.add_argument("--method", choices=("integrated_gradients", "saliency",
                                        "gradient_x_input"), default="integrated_gradients")
    x.add_argument("--target", type=int, default=None,
                   help="output column to explain (default: each image's predicted class)")
    x.add_argument("--steps", type=int, default=50, help="integrated gradients' steps")
    x.add_argument("--out", metavar="PATH", default="explain.png", help="the figure's file")

    sub.add_parser("info", help="version, backends, GPU and build options")
    return parser


def _add_attack_args(p, what):
    p.add_argument("--adversarial", choices=("fgsm", "pgd"), default=None, help=what)
    p.add_argument("--eps", type=float, default=0.1,
                   help="the attack's L-infinity radius (inputs are scaled to [0, 1])")
    p.add_argument("--alpha", type=float, default=None,
                   help="PGD's step size (default: 2.5 * eps / steps, Madry et al.)")
    p.add_argument("--attack-steps", type=int, default=10, help="PGD's steps")


def _attack(args):
    """The fm.adversarial configuration the arguments name (None: none)."""
    import fastmlp as fm

    if args.adversarial is None:
        return None
    if args.adversarial == "fgsm":
        return fm.adversarial.FGSM(args.eps)
    alpha = args.alpha if args.alpha is not None else 2.5 * args.eps / args.attack_steps
    return fm.adversarial.PGD(args.eps, alpha, steps=args.attack_steps)


def _version() -> str:
    from . import __version__

    return f"fastmlp {__version__}"


def _train(args) -> int:
    import fastmlp as fm

    if args.epochs < 1 or args.batch_size < 1:
        raise ValueError("--epochs and --batch-size must be >= 1")
    if fm.distributed.launched_by_mpi():  # mpiexec -n N fastmlp train: data-parallel
        fm.distributed.init()
    # distributed: rank 0 prints (and saves: model.save writes on rank 0 only)
    say = print if fm.distributed.is_root() else (lambda *a, **k: None)
    fm.set_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = _load(args.dataset, args.data)
    if args.limit is not None:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]
    classes = 10
    widths = [x_train.shape[1], *args.hidden]
    layers = []
    for d, u in zip(widths, args.hidden):
        if args.batchnorm:
            layers += [fm.Dense(u, input_dim=d), fm.BatchNormalization(),
                       fm.Activation(args.activation)]
        else:
            layers.append(fm.Dense(u, activation=args.activation, input_dim=d))
        if args.dropout:
            layers.append(fm.Dropout(args.dropout))
    model = fm.Sequential(layers + [fm.Dense(classes, input_dim=widths[-1])])
    kw = {} if args.weight_decay is None else {"weight_decay": args.weight_decay}
    if args.optimizer == "sgd":
        opt = fm.optim.SGD(lr=args.lr, momentum=args.momentum, **kw)
    else:
        opt = (fm.optim.Adam if args.optimizer == "adam" else fm.optim.AdamW)(lr=args.lr, **kw)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    sizes = "-".join(str(s) for s in [x_train.shape[1], *args.hidden, classes])
    extras = [args.activation] if args.hidden and args.activation != "relu" else []
    extras += ["BatchNormalization"] if args.hidden and args.batchnorm else []
    extras += [f"Dropout({args.dropout})"] if args.hidden and args.dropout else []
    if extras:
        sizes += f" ({', '.join(extras)})"
    procs = fm.distributed.size()
    per = f" per process x {procs} processes" if procs > 1 else ""
    say(f"fastmlp train: {args.dataset} {sizes} {opt!r} batch {args.batch_size}{per}, "
        f"{args.epochs} epochs, {len(x_train)} samples"
          + (f" ({args.validation_split:g} held out for validation)"
             if args.validation_split else ""), flush=True)
    attack = _attack(args)
    if attack is not None:
        say(f"adversarial training: {attack!r}", flush=True)
    t0 = time.perf_counter()
    history = model.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size,
                        validation_split=args.validation_split, verbose=args.verbose,
                        device=args.device, adversarial=attack)
    total = time.perf_counter() - t0
    times = history.history["time"]
    say(f"trained on {model.device}{f' x {procs} processes' if procs > 1 else ''} in "
        f"{total:.1f} s ({np.median(times):.2f} s/epoch median)")
    result = model.evaluate(x_test, y_test)
    say(f"test loss {result['loss']:.4f} - test accuracy {result['accuracy']:.4f}")
    if attack is not None:
        robust = model.evaluate(x_test, y_test, adversarial=attack)
        say(f"robust test loss {robust['loss']:.4f} - robust test accuracy "
            f"{robust['accuracy']:.4f} ({attack!r})")
    if args.save:
        model.save(args.save)
        say(f"saved {args.save}")
    return 0


def _saved_model(args):
    """The saved model (compiled for class labels when it was saved without), on the
    device the arguments name, and the test split."""
    import fastmlp as fm

    model = fm.load_model(args.model)
    if model.loss is None:
        model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    _, (x_test, y_test) = _load(args.dataset, args.data)
    device = args.device
    if device == "auto":
        device = "cuda" if fm.backends()["cuda"] else "cpu"
    model.to(device)
    return model, x_test, y_test


def _evaluate(args) -> int:
    model, x_test, y_test = _saved_model(args)
    result = model.evaluate(x_test, y_test)
    print(f"{args.model}: test loss {result['loss']:.4f} - test accuracy "
          f"{result['accuracy']:.4f} ({args.dataset}, {len(x_test)} samples, {model.device})")
    attack = _attack(args)
    if attack is not None:
        robust = model.evaluate(x_test, y_test, adversarial=attack)
        print(f"{args.model}: robust test loss {robust['loss']:.4f} - robust test accuracy "
              f"{robust['accuracy']:.4f} ({attack!r})")
    return 0


def _explain(args) -> int:
    import fastmlp as fm

    model, x_test, _ = _saved_model(args)
    bad = [i for i in args.index if not 0 <= i < len(x_test)]
    if bad:
        raise ValueError(f"--index {bad[0]} is not a test image (0..{len(x_test) - 1})")
    x = x_test[args.index]
    if args.method == "integrated_gradients":
        attr = fm.explain.integrated_gradients(model, x, args.target, steps=args.steps)
    else:
        attr = getattr(fm.explain, args.method)(model, x, args.target)
    from .plan import output_activation

    out = model.predict(x)
    side = int(round(np.sqrt(x.shape[1])))
    shape = (side, side) if side * side == x.shape[1] else (1, x.shape[1])
    # the explained output: a probability after a softmax / sigmoid, else a raw score
    what = "p" if output_activation(model.layers) in ("softmax", "sigmoid") else "score"
    titles = [f"#{i}: class {int(np.argmax(o))} ({what} {float(np.max(o)):.2f})"
              for i, o in zip(args.index, out)]
    fm.explain.plot(attr, x, shape=shape, path=args.out, titles=titles)
    print(f"{args.model}: {args.method} of test images {args.index} -> {args.out}")
    return 0


def _info(args) -> int:
    import fastmlp as fm

    b = fm.backends()
    print(_version())
    print(f"python {platform.python_version()} ({sys.executable}), numpy {np.__version__}")
    print(f"build: {b['build_info']}")
    print(f"cpu: yes, {b['cpu_threads']} threads, GEMM driver {b['cpu_gemm']} ({platform.machine()})")
    if b["cuda"]:
        print(f"cuda: yes, {b.get('cuda_device')} (CUDA runtime {b.get('cuda_runtime')})")
    else:
        print(f"cuda: no ({b['cuda_reason']})")
    cp = fm.cupy_module()
    print(f"cupy: {cp.__version__ if cp is not None else 'not installed'}")
    print(f"nvtx ranges: {'on' if fm._nvtx.enabled else 'off (pip install nvtx)'}")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    handler = {"train": _train, "evaluate": _evaluate, "explain": _explain,
               "info": _info}[args.command]
    try:
        return handler(args)
    except (FileNotFoundError, ValueError, RuntimeError, ImportError) as e:
        print(f"fastmlp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
