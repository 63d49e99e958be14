"""One process of the distributed tests (tests/test_distributed.py runs it under
``mpiexec -n N``): ``python dist_worker.py CONFIG.json OUTDIR``. It trains (or fails,
or evaluates) as the config says and writes what it saw to OUTDIR/rank<r>.npz:
the weights (w0, w1, ...), the History as JSON, and the scenario's extras."""
import json
import sys

import numpy as np

import fastmlp as fm
from fastmlp import callbacks as cbs


def data(n, features, classes, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = rng.integers(0, classes, n).astype(np.int32)
    return x, y


def model_of(cfg):
    layers = [fm.Dense(cfg.get("hidden", 32), activation="relu", input_dim=cfg["features"])]
    if cfg.get("batchnorm"):
        layers.append(fm.BatchNormalization())
    layers.append(fm.Dense(cfg["classes"]))
    model = fm.Sequential(layers)
    opt = (fm.optim.SGD(lr=0.05, momentum=0.9) if cfg["optimizer"] == "sgd"
           else fm.optim.Adam(lr=1e-2))
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy",
                  metrics=cfg.get("metrics", ["accuracy"]))
    return model


def main(cfg_path, out):
    cfg = json.load(open(cfg_path))
    fm.distributed.init()
    rank = fm.distributed.rank()
    fm.set_seed(cfg.get("seed", 0))
    n = cfg["n"] if rank == 0 else cfg.get("n_others", cfg["n"])
    x, y = data(n, cfg["features"], cfg["classes"])
    source = cfg.get("input")  # how x reaches fit (None: a float32 array in memory)
    if source in ("u8", "memmap_u8"):
        x = np.random.default_rng(7).integers(0, 256, x.shape).astype(np.uint8)
    if source in ("memmap_u8", "memmap_f32"):  # each process maps its own copy of the file
        path = f"{out}/x{rank}.bin"
        x.tofile(path)
        x = np.memmap(path, dtype=x.dtype, mode="r", shape=x.shape)
    fit_kw = {}
    if source == "stream":  # this process's batches by the row rule (shuffle=False)
        from fastmlp.trainer import shard_positions

        b, size = cfg["batch"], fm.distributed.size()
        pos = shard_positions(n, size, rank, b)
        steps = -(-n // (size * b))
        x = [(x[pos[s * b:(s + 1) * b]], y[pos[s * b:(s + 1) * b]]) for s in range(steps)]
        y = None
        fit_kw = {"steps_per_epoch": steps}
    model = model_of(cfg)
    extra = {}
    callbacks = []
    if cfg.get("checkpoint"):
        ckpt = cbs.ModelCheckpoint(cfg["checkpoint"])
        callbacks.append(ckpt)
    if cfg.get("fail_rank") is not None:
        class Fail(cbs.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if rank == cfg["fail_rank"]:
                    raise RuntimeError(f"rank {rank} fails on purpose")
        callbacks.append(Fail())
    if cfg.get("fail_outside") is not None:
        fm.distributed.barrier()
        if rank == cfg["fail_outside"]:
            raise KeyError("an uncaught error outside fit")
        fm.distributed.barrier()  # the others wait here until the abort
    vx, vy = data(cfg["n"], cfg["features"], cfg["classes"])
    val = (vx[:cfg["val"]], vy[:cfg["val"]]) if cfg.get("val") else None
    if source == "stream":
        x = x * cfg["epochs"]  # one iterator for the fit: the batches of every epoch
        fit_kw["x"] = iter(x)
        history = model.fit(epochs=cfg["epochs"], verbose=0, validation_data=val,
                            callbacks=callbacks, **fit_kw)
    else:
        history = model.fit(x, y, epochs=cfg["epochs"], batch_size=cfg["batch"],
                            shuffle=cfg.get("shuffle", True), verbose=0, validation_data=val,
                            callbacks=callbacks)
    if cfg.get("evaluate"):
        ex, ey = data(cfg["n"], cfg["features"], cfg["classes"])
        extra["evaluate"] = json.dumps(model.evaluate(ex, ey, batch_size=cfg.get("eval_batch")))
    if cfg.get("checkpoint"):
        extra["saved"] = json.dumps(ckpt.saved)
    if cfg.get("save"):
        model.save(cfg["save"] + f".{rank}")  # rank 0 writes, the others do nothing
    np.savez(f"{out}/rank{rank}.npz", *model.get_weights(),
             history=json.dumps(history.history), size=fm.distributed.size(),
             **{k: v for k, v in extra.items()})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
