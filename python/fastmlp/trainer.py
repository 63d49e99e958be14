"""The training loop: epochs, shuffling, progress, callbacks, non-finite checks.

Who owns what: :class:`~fastmlp.model.Sequential` checks and places the user's
arguments and owns the layers, the optimizer and the loss; this module binds the
model's step plan to memory (:func:`bind`), picks the engine
(:func:`fastmlp.engine.choose`) and drives passes over it -- one ``run`` call per
chunk of steps, the metric sums read from engine memory only at progress updates
and at the end of a pass. The engines (:mod:`fastmlp.engine`) run the steps.

Shuffling: epoch ``e`` of a model visits the rows in the order
``ops.random_permutation(rows, model's shuffle seed, e)`` -- the same order on the
CPU and on the GPU (a counter-based generator, computed on the device).
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from . import _nvtx, distributed as _dist, engine as _engine, ops
from ._interop import cupy_module, is_cupy
from .metrics import SLOTS
from .plan import ATTACK, ATTRIBUTE, EVALUATE, PREDICT, TRAIN, build_plan

# evaluate / predict / validation batch when none is given: large enough to keep the
# GEMMs efficient, small enough that the workspaces stay a few MB for usual widths.
EVAL_BATCH = 1024
# Steps per engine call: the CPU checks for a non-finite loss after each call, and
# the progress bar moves a few times per second. CUDA launches run ahead of the
# GPU, so its chunks can be long; the sums are read only at progress updates.
_CHUNK = {"cpu": 64, "python": 16, "cuda": 256}
_PROGRESS_S = 0.25


class _Bound:
    """A model's plan bound to memory on its device, and the engines over it."""

    def __init__(self, key, plan, arena):
        self.key, self.plan, self.arena = key, plan, arena
        self.engines: dict = {}
        self.orders: dict = {}  # shuffling buffers by (array module, rows)

    def engine(self, name, optimizer):
        if name not in self.engines:
            self.engines[name] = _engine.make(name, self.plan, self.arena, optimizer)
        eng = self.engines[name]
        if name == "python":
            eng.optimizer = optimizer
        return eng


def _dp_spec(model, divisor=0.0):
    """The plan's DP-SGD settings for the model's optimizer (None: not private)."""
    from .plan import DPSpec
    from .privacy import is_private

    opt = model.optimizer
    if not is_private(opt):
        return None
    return DPSpec(opt.l2_norm_clip, opt.noise_multiplier, float(divisor), opt._noise_seed)


def _plan_key(model, sample_weight=False, dp=None, world=None):
    opt, loss = model.optimizer, model.loss
    clip = tuple(getattr(opt, k, None) for k in ("clipnorm", "global_clipnorm", "clipvalue"))
    dist = None if world is None else (world.size, world.rank)
    return (model.device, dp, dist,
            tuple((id(l),) + l.signature() for l in model.layers), model._shuffle_seed,
            id(opt), type(opt).__name__, tuple(getattr(opt, "_buffers", ())), clip,
            None if loss is None else loss.signature(), tuple(model.metrics),
            bool(sample_weight), ops._PRECISIONS[ops.get_matmul_precision()])


def _work_doubles(device, total, segments):
    """(clip op, regularized optimizer op) scratch in doubles on ``device``."""
    from . import _C

    mod = _C.cuda if device == "cuda" else _C.cpu
    return (int(mod.grad_clip_work_doubles(total, segments)),
            int(mod.optimizer_work_doubles()))


def bind(model, capacity: int, max_steps: int = 1, sample_weight: bool = False,
         dp_divisor=None, world=None) -> _Bound:
    """The model's bound plan for batches of up to ``capacity`` rows and passes of up
    to ``max_steps`` steps: rebuilt when the model changed (layers, optimizer, loss,
    metrics, device, matmul precision, sample weights, DP settings) or needs more room;
    the layers and the optimizer then hold views into its arena. ``dp_divisor``: DP-SGD's
    divisor of the noisy sum (0: the step's rows; None: the bound plan's, for evaluation
    and prediction, which do not run the training list). ``world``: a
    :class:`fastmlp.distributed.World` to train over (the plan all-reduces the gradients);
    None: this process alone, or, for evaluation and prediction, the bound plan's."""
    from .metrics import resolve

    opt, loss = model.optimizer, model.loss
    dp = _dp_spec(model, dp_divisor or 0.0)
    if dp_divisor is None and dp is not None and model._bound is not None:
        bound_dp = model._bound.plan.dp  # keep the divisor fit bound, if the rest agrees
        if bound_dp is not None and dataclasses.replace(bound_dp, divisor=0.0) == dp:
            dp = bound_dp
    if world is None and model._bound is not None and model._bound.key[2] is not None:
        world = _dist.active()  # evaluate / predict keep the distributed plan fit bound
    key = _plan_key(model, sample_weight, dp, world)
    b = model._bound
    if b is None or b.key != key or not b.arena.fits(capacity, max_steps):
        if b is not None and b.key == key:  # grow, never shrink: no thrashing
            capacity = max(capacity, b.arena.capacity)
            max_steps = max(max_steps, b.arena.max_steps)
        total = sum(p.size for p in model.params())
        plan = build_plan(model.layers, _engine.optimizer_kind(opt),
                          getattr(opt, "_buffers", ()) if opt is not None else (),
                          np.int32 if loss is None or loss.sparse else np.float32, key[-1],
                          seed=model._shuffle_seed, loss=loss,
                          metrics=resolve(model.metrics, loss, model.output_dim)
                          if loss is not None else (),
                          sample_weight=sample_weight,
                          clipnorm=getattr(opt, "clipnorm", None),
                          global_clipnorm=getattr(opt, "global_clipnorm", None),
                          clipvalue=getattr(opt, "clipvalue", None),
                          work_doubles=_work_doubles(model.device, total,
                                                     len(model.params())), dp=dp,
                          dist=world is not None, rank=0 if world is None else world.rank)
        arena = _engine.Arena(plan, model.device, capacity, max_steps)
        arena.adopt(model.layers, opt)
        b = model._bound = _Bound(key, plan, arena)
    elif not b.arena.owns(model.layers, opt):
        b.arena.adopt(model.layers, opt)
    return b


def _labels_host(y):
    return cupy_module().asnumpy(y) if is_cupy(y) else y


# ----------------------------------------------------------------------------- fit


def fit(model, x, y, **kw):
    """Train ``model`` on prepared (x, y) (on the model's device, or on the host when
    too large for the GPU); ``val`` is prepared (x_val, y_val) or None;
    ``sample_weight``: prepared (n,) float32 weights of the samples' losses, or None;
    ``poisson_sampling``: DP-SGD's exact sampling (see :class:`_Poisson`);
    ``adversarial``: a :class:`fastmlp.plan.AttackSpec` (each batch replaced by its
    adversarial rows, made in the training step) or None. Distributed
    (:mod:`fastmlp.distributed`): over the processes of the world, an exception
    aborting them all."""
    world = _dist.active()
    if world is None:
        return _fit(model, x, y, world=None, **kw)
    try:
        return _fit(model, x, y, world=world, **kw)
    except BaseException as e:
        _dist.abort_on_error(e)
        raise


def shard_positions(n: int, size: int, rank: int, batch: int) -> np.ndarray:
    """Where process ``rank`` of ``size`` finds its rows in an epoch's row order of ``n``
    rows, step after step: step t's ``batch`` positions ``t*size*batch + rank*batch ..``;
    the last global batch (m < size*batch rows) split as evenly as possible (the first
    m % size processes take one row more)."""
    gb = size * batch
    full = n // gb
    pos = (np.arange(full, dtype=np.int64)[:, None] * gb + rank * batch
           + np.arange(batch, dtype=np.int64)).reshape(-1)
    m = n - full * gb
    if m:
        base, extra = divmod(m, size)
        start = full * gb + rank * base + min(rank, extra)
        pos = np.concatenate([pos, np.arange(start, start + base + (rank < extra),
                                             dtype=np.int64)])
    return pos


def shard_range(n: int, size: int, rank: int) -> tuple:
    """Process ``rank``'s contiguous share [lo, hi) of ``n`` rows (evaluation)."""
    return rank * n // size, (rank + 1) * n // size


def _check_same_everywhere(world, where, **values):
    """ValueError (on every process) unless every process passed the same ``values``:
    different data sizes or batch sizes would leave processes waiting for each other."""
    names = list(values)
    vec = np.array([values[k] for k in names], np.float64)
    lo, hi = world.allreduce(vec.copy(), "min"), world.allreduce(vec.copy(), "max")
    bad = [f"{k} ({int(a)} .. {int(b)})" for k, a, b in zip(names, lo, hi) if a != b]
    if bad:
        raise ValueError(f"{where}: the processes disagree on {', '.join(bad)}; a distributed "
                         f"{where} needs the same data and arguments on every process (each "
                         "process passes all the rows: it reads only its share)")


def record_params(history, model, eng, why, world, adversarial, **params):
    """``History.params`` of a fit: ``params`` (epochs, steps, batch_size, samples), the
    device, the engine and why, the processes, the attack."""
    history.params.update(params)
    history.params.update({"device": model.device, "engine": eng.name, "engine_reason": why,
                           "processes": 1 if world is None else world.size})
    if adversarial is not None:
        history.params["adversarial"] = adversarial


def begin_training(model, callbacks, initial_epoch, bound, world):
    """The start of a fit (in memory or streamed): reset ``stop_training``, set the first
    epoch (a callback may move it: BackupAndRestore, as in Keras) and run the callbacks'
    on_train_begin. Distributed, every process then takes rank 0's state
    (BackupAndRestore may have restored rank 0's backup, also where the other processes
    cannot read its files)."""
    model.stop_training = False
    model._initial_epoch = initial_epoch
    for cb in callbacks:
        cb.on_train_begin()
    if world is None:
        return
    opt = model.optimizer
    model._initial_epoch, model._shuffle_count, opt.iterations = world.bcast_object(
        (model._initial_epoch, model._shuffle_count, opt.iterations))
    _sync_from_root(model, bound, world)


def epoch_time(world, t0) -> float:
    """The epoch's seconds since ``t0``; distributed, the slowest process's (the same
    History everywhere)."""
    t = time.perf_counter() - t0
    return t if world is None else float(world.allreduce(np.array([t]), "max")[0])


def _sync_from_root(model, bound, world):
    """Every process takes rank 0's weights, optimizer state and step count (a fit
    starts from the same model everywhere, whatever each process initialised)."""
    arena = bound.arena
    names = ["params"] + (["stats"] if bound.plan.stat_names else []) + \
        [f"opt.{n}" for n in bound.plan.opt_buffers]
    for name in names:
        arr = arena.named(name)
        if arr is None or arr.size == 0:
            continue
        host = np.ascontiguousarray(_labels_host(arr))
        world.bcast(host)
        arr[...] = arena.xp.asarray(host)


def _average_stats(bound, world):
    """The mean over the processes of the weights the optimizer does not train
    (BatchNormalization's moving statistics: each process's follow its own batches)."""
    if not bound.plan.stat_names:
        return
    arr = bound.arena.named("stats")
    host = np.ascontiguousarray(_labels_host(arr), dtype=np.float64)
    world.allreduce(host)
    arr[...] = bound.arena.xp.asarray((host / world.size).astype(np.float32))


def _reduce_state(world, st) -> dict:
    """The pass sums of every process's state added up (the same dict everywhere)."""
    if world is None:
        return st
    vec = np.array([st["loss_sum"], st["correct"], st.get("penalty_sum", 0.0)]
                   + list(st["metric"]), np.float64)
    world.allreduce(vec)
    return {**st, "loss_sum": float(vec[0]), "correct": int(vec[1]),
            "penalty_sum": float(vec[2]), "metric": [float(v) for v in vec[3:]]}


def _fit(model, x, y, *, epochs, batch_size, val, shuffle, verbose, callbacks, initial_epoch,
         history, desc_fmt="Epoch {}/{}", sample_weight=None, poisson_sampling=False,
         adversarial=None, world=None):
    from .privacy import is_private

    n = len(x)
    opt = model.optimizer
    private = is_private(opt)
    positions = None
    if world is not None:
        if private:
            raise ValueError("fit: a DP optimizer (fm.privacy) is not supported in "
                             "distributed training (each process would add its own noise); "
                             "train it in one process")
        if world.rank != 0:
            verbose = 0
        _check_same_everywhere(world, "fit", rows=n, batch_size=batch_size, epochs=epochs,
                               initial_epoch=initial_epoch, features=int(x.shape[1]),
                               validation_rows=-1 if val is None else len(val[0]))
        # the same seeds, step count and shuffling position everywhere (rank 0's)
        model._shuffle_seed, model._shuffle_count, opt.iterations = world.bcast_object(
            (model._shuffle_seed, model._shuffle_count, opt.iterations))
        positions = shard_positions(n, world.size, world.rank, batch_size)
        steps = math.ceil(n / (world.size * batch_size))
        rows = len(positions)  # this process's rows of an epoch
        # a process whose share of the last global batch is empty runs that step on no
        # rows (its gradient is zero, its row count 0): it still joins the all-reduce
        empty_last = steps > 0 and rows == (steps - 1) * batch_size
    else:
        steps = math.ceil(n / batch_size)
        rows, empty_last = n, False
    # every epoch's batch sizes up front (a callback may move the first epoch)
    poisson = _Poisson(opt, n, batch_size, epochs, steps) if poisson_sampling else None
    host_data = model.device == "cuda" and not is_cupy(x)
    name, why = _engine.choose(model.device, opt, host_data)
    eval_batch = min(EVAL_BATCH, max(1, len(val[0]))) if val is not None else 0
    capacity = poisson.capacity if poisson else min(batch_size, n)
    bound = bind(model, max(capacity, eval_batch), steps,
                 sample_weight=sample_weight is not None,
                 dp_divisor=float(batch_size) if poisson else 0.0, world=world)
    eng = bound.engine(name, opt)
    if world is not None:
        _sync_from_root(model, bound, world)
        eng.set_allreduce(world.engine_hook(model.device))
    bound.plan.use(TRAIN, adversarial)
    bound.plan.use(EVALUATE, None)  # validation is on the clean rows
    if poisson and bound.plan.has("train.auc_scores"):
        raise ValueError("fit: the 'auc' metric is not available with poisson_sampling=True "
                         "(it stores one prediction per row of a fixed pass); evaluate it "
                         "with model.evaluate or on validation data")
    xp = np if host_data or model.device == "cpu" else cupy_module()
    order = None
    if poisson:  # step s's rows at order[s * capacity:], filled per epoch
        order = xp.zeros((steps * poisson.capacity,), np.int64)
    elif shuffle:  # one buffer per bound plan and size: its address, hence the graphs, stay
        order = bound.orders.get((xp.__name__, n))
        if order is None:
            order = bound.orders[(xp.__name__, n)] = xp.empty((n,), np.int64)
    local = None  # distributed: this process's rows of the epoch's order, step by step
    if world is not None:
        key = ("shard", xp.__name__, n, world.size, world.rank, batch_size)
        if key not in bound.orders:  # the positions, and their rows of the shuffled order
            pos = xp.asarray(positions)
            bound.orders[key] = (pos, xp.empty_like(pos))
        shard_pos, local = bound.orders[key]
        if order is None:  # in order: the positions are the rows
            local = shard_pos
    eng.bind(train_x=x, train_y=y, train_order=order if local is None else local)
    if sample_weight is not None:
        eng.bind(train_sw=sample_weight)
    _bind_auc(bound, eng, "train", rows, bound.arena.xp)
    eng.prepare(TRAIN, batch_size, n)
    if val is not None:
        val_n = len(val[0])
        val_eng, vx, vy = evaluation_share(model, bound, val[0], val[1], eval_batch, world)
        val = (vx, vy)  # this process's share
    record_params(history, model, eng, why, world, adversarial, epochs=epochs, steps=steps,
                  batch_size=batch_size, samples=n)
    delta = None
    if private:
        delta = opt.delta if opt.delta is not None else 1.0 / n
        history.params.update({"delta": delta, "sample_rate": min(1.0, batch_size / n),
                               "poisson_sampling": bool(poisson_sampling)})
    begin_training(model, callbacks, initial_epoch, bound, world)
    for epoch in range(model._initial_epoch, epochs):
        for cb in callbacks:
            cb.on_epoch_begin(epoch)
        t0 = time.perf_counter()
        desc = desc_fmt.format(epoch + 1, epochs)
        with _nvtx.annotate(f"epoch{epoch + 1}"):
            taken = opt.iterations
            try:
                if poisson is not None:
                    sizes = poisson.fill(order, epoch)
                    logs = _train_epoch(model, eng, n, batch_size, steps, verbose, desc,
                                        poisson=(poisson.capacity, sizes))
                else:
                    if order is not None:
                        ops.random_permutation(n, model._shuffle_seed, model._shuffle_count,
                                               out=order)
                        model._shuffle_count += 1
                        if local is not None:
                            xp.take(order, shard_pos, out=local)
                    logs = _train_epoch(model, eng, rows, batch_size, steps, verbose, desc,
                                        source_rows=n, empty_last=empty_last, world=world,
                                        total=n)
            finally:
                if private:  # the steps taken spent privacy, even when a step failed
                    opt.accountant.step(opt.noise_multiplier, min(1.0, batch_size / n),
                                        opt.iterations - taken)
            if private:
                logs["epsilon"] = opt.epsilon(delta)
            if world is not None:
                _average_stats(bound, world)
            if val is not None:
                with _nvtx.annotate("validation"):
                    v = _evaluate_pass(model, val_eng, val[0], val[1], eval_batch, world=world,
                                       total=val_n)
                logs.update({"val_" + k: value for k, value in v.items()})
        logs["time"] = epoch_time(world, t0)
        if verbose == 2:
            print(f"{desc} - " + format_logs(logs), flush=True)
        for cb in callbacks:
            cb.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    for cb in callbacks:
        cb.on_train_end()
    return history


def _bind_auc(bound, eng, lst, rows, xp):
    """The pass's prediction and target buffers of the ``auc`` metric (rows x outputs on
    the model's device, also when the data stays on the host), kept with the bound plan
    while the size stays."""
    plan = bound.plan
    if not plan.has(f"{lst}.auc_scores"):
        return
    key = ("auc", lst, xp.__name__, rows)
    if key not in bound.orders:
        bound.orders[key] = tuple(xp.empty((rows, plan.classes), np.float32) for _ in range(2))
    scores, labels = bound.orders[key]
    eng.bind(**{f"{lst}_auc_scores": scores, f"{lst}_auc_labels": labels})


def learning_rates(opt, steps: int) -> list:
    """The learning rate of each of the next ``steps`` steps: the optimizer's float, or
    its schedule at the step's 0-based number (one per batch, as Keras)."""
    first = opt.iterations
    return [float(opt.lr_at(first + s)) for s in range(steps)]


class _Poisson:
    """DP-SGD's Poisson sampling: each of the ``steps = ceil(n / batch)`` steps of an
    epoch takes every row independently with probability ``q = batch / n`` (the
    accountant's assumption), so batches vary in size (and may be empty). The draw
    comes from NumPy's Philox generator keyed by the optimizer's noise seed (secret by
    default: the guarantee's amplification by sampling assumes nobody knows the batches)
    with the number of the epoch's first optimizer step as its counter (fresh batches in
    every epoch of every fit): a step's size from Binomial(n, q), then its rows uniformly
    without replacement (the same distribution as independent coins). ``capacity``: the
    largest batch of all the fit's epochs, drawn up front so the arena is sized once."""

    def __init__(self, opt, n, batch, epochs, steps):
        self.opt, self.n, self.steps = opt, n, steps
        self.q = min(1.0, batch / n)
        self.first_step = opt.iterations  # the optimizer's steps before this fit
        self.sizes = {e: self._rng(e).binomial(n, self.q, size=steps) for e in range(epochs)}
        self.capacity = max(1, max((int(s.max()) for s in self.sizes.values()), default=1))

    def _rng(self, epoch):
        key = np.array([self.opt._noise_seed & (2 ** 64 - 1), 0x504F4953], np.uint64)  # "POIS"
        counter = self.first_step + epoch * self.steps
        return np.random.Generator(np.random.Philox(counter=[counter, 0, 0, 0], key=key))

    def fill(self, order, epoch):
        """Writes the epoch's batches into ``order`` (step s's rows at s * capacity) and
        returns the batch sizes."""
        rng = self._rng(epoch)
        sizes = rng.binomial(self.n, self.q, size=self.steps)  # = self.sizes[epoch]
        if int(sizes.max(initial=0)) > self.capacity:  # an epoch not drawn up front
            raise ValueError(f"fit: epoch {epoch} was not planned for Poisson sampling")
        host = np.zeros((self.steps, self.capacity), np.int64)
        for s, k in enumerate(sizes):
            host[s, :k] = rng.choice(self.n, size=int(k), replace=False)
        if isinstance(order, np.ndarray):
            order[...] = host.reshape(-1)
        else:
            order.set(host.reshape(-1))
        return [int(k) for k in sizes]


def _train_epoch(model, eng, n, batch, steps, verbose, desc, poisson=None, source_rows=None,
                 empty_last=False, world=None, total=None) -> dict:
    """One training pass over ``n`` rows; ``poisson``: (capacity, the steps' batch sizes)
    of Poisson sampling, run one engine call per step (step s reads its rows from s *
    capacity). Distributed (``world``): ``n`` is this process's rows of the epoch (of
    ``source_rows`` in the data, ``total`` in all processes' shares), and
    ``empty_last``: its last step has no rows (it still joins the all-reduce)."""
    opt = model.optimizer
    eng.set_schedule(learning_rates(opt, steps), opt.iterations + 1, opt)
    eng.begin_pass()
    if poisson is not None:
        return _train_epoch_poisson(model, eng, n, steps, verbose, desc, *poisson)
    chunk = _CHUNK.get(eng.name, 64)
    cheap_state = eng.name != "cuda"  # reading the CUDA engine's sums waits for the GPU
    bar = _progress(steps, desc) if verbose == 1 else None
    last_shown = time.perf_counter()
    first = 0
    full = steps - 1 if empty_last else steps
    try:
        while first < steps:
            count = min(chunk, full - first) if first < full else 1
            with _nvtx.annotate("train_steps"):
                done = eng.run(TRAIN, n, batch, first, count, source_rows=source_rows)
            opt.iterations += done
            first += done
            now = time.perf_counter()
            show = bar is not None and (now - last_shown > _PROGRESS_S or first == steps)
            if cheap_state or show:
                st = eng.state()
                _check_finite_state(model, st, desc)
                if show:
                    last_shown = now
                    bar.update(first - bar.n)
                    bar.set_postfix(_logs(model, eng, st, max(1, min(n, first * batch)),
                                          "train", auc=False), refresh=False)
        st = eng.state()
        _check_finite_state(model, st, desc)
        logs = _logs(model, eng, _reduce_state(world, st), n if world is None else total,
                     "train", world=world, local_rows=n)
        if bar is not None:
            bar.update(steps - bar.n)
            bar.set_postfix(logs, refresh=True)
        return logs
    finally:
        if bar is not None:
            bar.close()


def _train_epoch_poisson(model, eng, n, steps, verbose, desc, capacity, sizes) -> dict:
    opt = model.optimizer
    bar = _progress(steps, desc) if verbose == 1 else None
    seen = 0
    try:
        for s, k in enumerate(sizes):
            with _nvtx.annotate("train_steps"):
                done = eng.run(TRAIN, s * capacity + k, capacity, s, 1, source_rows=n)
            opt.iterations += done
            seen += k
            if eng.name != "cuda" or s == steps - 1:
                _check_finite_state(model, eng.state(), desc)
            if bar is not None:
                bar.update(1)
        st = eng.state()
        _check_finite_state(model, st, desc)
        # the mean loss over the rows the epoch drew (the losses are means over each step)
        logs = _logs(model, eng, st, max(seen, 1), "train")
        if bar is not None:
            bar.set_postfix(logs, refresh=True)
        return logs
    finally:
        if bar is not None:
            bar.close()


def _logs(model, eng, st, seen, lst, auc=True, penalty=None, world=None,
          local_rows=None) -> dict:
    """The pass's logs from the engine state: the mean loss (with the regularization
    penalty), then the metrics in compile's order (``auc`` over the stored predictions,
    only at the end of a pass). Distributed (``world``): ``st`` holds every process's
    sums, ``seen`` their rows, ``local_rows`` this process's (its stored predictions)."""
    loss = (st["loss_sum"] + st.get("penalty_sum", 0.0)) / seen
    if penalty is not None:
        loss += penalty
    if lst == "train":  # the penalty's share of the loss (fastmlp.sklearn reports it apart)
        model._train_penalty = st.get("penalty_sum", 0.0) / seen
    logs = {"loss": loss}
    plan = eng.plan
    metrics = plan.metrics or (_default_metrics(model, plan) if lst == "eval" else ())
    for m in metrics:
        if m.kind == "auc":
            if auc:
                if world is not None:
                    logs[m.name] = _auc(*(world.allgather_rows(
                        _labels_host(_auc_rows(eng, f"{lst}.auc_{part}", local_rows)))
                        for part in ("scores", "labels")))
                    continue
                scores = eng.arena.named(f"{lst}.auc_scores")
                labels = eng.arena.named(f"{lst}.auc_labels")
                logs[m.name] = _auc(scores[:seen], labels[:seen])
        elif m.kind == "argmax" and plan.loss_kind == "xent":
            logs[m.name] = st["correct"] / seen
        else:
            logs[m.name] = st["metric"][SLOTS[m.kind]] / seen
    return logs


def _auc_rows(eng, name, rows):
    """The first ``rows`` rows of a pass's stored predictions or targets (none bound: a
    process with no rows of the pass)."""
    arr = eng.arena.named(name)
    if arr is None or rows == 0:
        return np.zeros((0, eng.plan.classes), np.float32)
    return arr[:rows]


def _auc(scores, labels) -> float:
    try:
        return float(ops.roc_auc(scores, labels))
    except ValueError:  # one class only in the pass: undefined (sklearn raises, Keras gives 0)
        return float("nan")


def _default_metrics(model, plan):
    """evaluate() reports accuracy when compile named no metric, where the loss gives it
    for free (the softmax-cross-entropy op's hits)."""
    from .metrics import Metric

    return (Metric("accuracy", "argmax"),) if plan.loss_kind == "xent" else ()


def _check_finite_state(model, st, desc):
    """FloatingPointError when a step of the pass had a non-finite loss or left a
    parameter non-finite (the engines record both in their state: no extra read)."""
    loss_step, param_step = st["nonfinite_step"], st.get("nonfinite_param_step", -1)
    if loss_step < 0 and param_step < 0:
        return
    model.stop_training = True
    # The step is exact on every engine; the CPU engines stop right after it, the GPU
    # runs on to the end of its chunk of steps (the weights are non-finite by then).
    where = " (the GPU ran on to the end of its chunk of steps)" if model.device == "cuda" else ""
    advice = ("Lower the learning rate, or check the inputs for NaN/Inf and their scale "
              "(e.g. images divided by 255).")
    if loss_step >= 0 and (param_step < 0 or loss_step <= param_step):
        # The running sum took the step's non-finite loss (NaN stays NaN, +-inf stays
        # inf unless both signs came): say which it was.
        value = st["loss_sum"] if not math.isfinite(st["loss_sum"]) else float("nan")
        raise FloatingPointError(
            f"fit: the loss became {value} in {desc.lower()} at step {loss_step + 1}{where}; "
            f"training stopped. {advice}")
    raise FloatingPointError(
        f"fit: the optimizer update of step {param_step + 1} in {desc.lower()} left a parameter "
        f"NaN or Inf while the loss was finite{where}; training stopped and the model's weights "
        f"now hold non-finite values. {advice}")


# ----------------------------------------------------------------------------- evaluate / predict


def evaluation_share(model, bound, x, y, batch, world):
    """(engine, x, y) of an evaluation pass over prepared (x, y) in batches of ``batch``:
    distributed (``world``), over this process's share of the rows (maybe none: then
    nothing is bound and the pass adds nothing)."""
    if world is not None:
        lo, hi = shard_range(len(x), world.size, world.rank)
        x, y = x[lo:hi], y[lo:hi]
    eng = _evaluation_engine(model, bound, x)
    if len(x):
        eng.bind(eval_x=x, eval_y=y)
        _bind_auc(bound, eng, "eval", len(x), bound.arena.xp)
        eng.prepare(EVALUATE, batch, len(x))
    return eng, x, y


def _evaluation_engine(model, bound, x):
    name, _ = _engine.choose(model.device, None, model.device == "cuda" and not is_cupy(x))
    return bound.engine(name, model.optimizer)


def evaluate(model, x, y, batch_size, adversarial=None) -> dict:
    """``{"loss", <metrics>}`` over prepared (x, y); ``adversarial``: an
    :class:`fastmlp.plan.AttackSpec` (the metrics of the rows it makes) or None.
    Distributed: each process evaluates its share of the rows; the sums are added up."""
    n = len(x)
    if n == 0:
        raise ValueError("evaluate: no samples")
    world = _dist.active()
    try:
        bound = bind(model, min(batch_size, n), sample_weight=_bound_sample_weight(model))
        bound.plan.use(EVALUATE, adversarial)
        if world is not None:
            _check_same_everywhere(world, "evaluate", rows=n, batch_size=batch_size,
                                   features=int(x.shape[1]))
        eng, x, y = evaluation_share(model, bound, x, y, batch_size, world)
        return _evaluate_pass(model, eng, x, y, batch_size, world=world, total=n)
    except BaseException as e:
        _dist.abort_on_error(e)
        raise


def _bound_sample_weight(model) -> bool:
    """Whether the bound plan trains with sample weights (evaluate and predict reuse it
    rather than building another plan)."""
    b = model._bound
    return b is not None and b.plan.sample_weight


def penalty(model) -> float:
    """The regularization penalty of the current weights (what the training loss adds),
    for evaluation passes."""
    total = 0.0
    for layer in model.layers:
        for name in ("kernel", "bias"):
            reg = getattr(layer, f"{name}_regularizer", None)
            if reg is not None and name in layer.weight_names():
                total += float(reg(layer.weights()[layer.weight_names().index(name)]))
    return total


def _evaluate_pass(model, eng, x, y, batch_size, world=None, total=None) -> dict:
    """The logs of one evaluation pass over the bound (x, y); distributed (``world``):
    over this process's share (maybe empty) of ``total`` rows, the sums added up."""
    n = len(x)
    if n:
        eng.prepare(EVALUATE, batch_size, n)
        eng.begin_pass()
        eng.run(EVALUATE, n, batch_size, 0, math.ceil(n / batch_size))
        st = eng.state()
    else:
        st = {"loss_sum": 0.0, "correct": 0, "penalty_sum": 0.0,
              "metric": [0.0] * len(SLOTS)}
    if world is None:
        return _logs(model, eng, st, n, "eval", penalty=penalty(model))
    return _logs(model, eng, _reduce_state(world, st), total, "eval", penalty=penalty(model),
                 world=world, local_rows=n)


def predict(model, x, batch_size):
    """The last layer's output for the rows of ``x`` (on the model's device)."""
    n = len(x)
    xp = cupy_module() if model.device == "cuda" else np
    out = xp.empty((n, model.output_dim), np.float32)
    if n == 0:
        return out
    bound = bind(model, min(batch_size, n), sample_weight=_bound_sample_weight(model))
    eng = bound.engine(_engine.choose(model.device)[0], model.optimizer)
    eng.bind(predict_x=x, predict_out=out)
    _store_pass(eng, PREDICT, batch_size, n)
    eng.bind(predict_x=None, predict_out=None)
    return out


def _store_pass(eng, lst, batch, rows):
    """One pass of op list ``lst`` (predict, attack, attribute: a list that stores its
    results) over ``rows`` rows in batches of ``batch``, finished when it returns."""
    eng.prepare(lst, batch, rows)
    eng.begin_pass()
    eng.run(lst, rows, batch, 0, math.ceil(rows / batch))
    eng.synchronize()


def attack(model, x, y, spec, batch_size):
    """The adversarial rows of prepared (x, y) under ``spec`` (an
    :class:`fastmlp.plan.AttackSpec`), on the model's device."""
    n = len(x)
    xp = cupy_module() if model.device == "cuda" else np
    out = xp.empty((n, model.input_dim), np.float32)
    if n == 0:
        return out
    bound = bind(model, min(batch_size, n), sample_weight=_bound_sample_weight(model))
    bound.plan.use(ATTACK, spec)
    eng = _evaluation_engine(model, bound, x)
    eng.bind(eval_x=x, eval_y=y, attack_out=out)
    _store_pass(eng, ATTACK, batch_size, n)
    eng.bind(attack_out=None)
    return out


def attribute(model, x, targets, baseline, alphas, weights, *, multiply, absolute,
              batch_rows=EVAL_BATCH):
    """Attributions of the rows of prepared ``x`` (float32 on the model's device) for
    output columns ``targets`` (int32): ``len(alphas)`` path points per row
    ``baseline + alphas[m] (x - baseline)`` (``baseline`` None: zeros), the gradient
    of each point's target output, summed with ``weights`` (times ``x - baseline``
    when ``multiply``, absolute values when ``absolute``). One engine pass over all
    points of all rows, whole rows per step (about ``batch_rows`` points)."""
    n, steps = len(x), len(alphas)
    xp = cupy_module() if model.device == "cuda" else np
    out = xp.zeros((n, model.input_dim), np.float32)
    if n == 0:
        return out
    per_step = max(1, min(n, batch_rows // steps))  # images per engine step
    batch, rows = per_step * steps, n * steps
    bound = bind(model, batch, sample_weight=_bound_sample_weight(model))
    bound.plan.use(ATTRIBUTE, (steps, bool(multiply), bool(absolute), baseline is not None))
    eng = bound.engine(_engine.choose(model.device)[0], model.optimizer)
    eng.bind(explain_x=x, explain_baseline=baseline, explain_targets=targets,
             explain_alphas=alphas, explain_weights=weights, explain_out=out)
    _store_pass(eng, ATTRIBUTE, batch, rows)
    eng.bind(explain_x=None, explain_baseline=None, explain_targets=None, explain_alphas=None,
             explain_weights=None, explain_out=None)
    return out


# ----------------------------------------------------------------------------- progress


def format_logs(logs: dict) -> str:
    parts = []
    for k, v in logs.items():
        parts.append(f"{k}: {v:.2f}s" if k == "time" else f"{k}: {v:.4f}")
    return " - ".join(parts)


def _progress(steps: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc=desc, unit="step", dynamic_ncols=True, leave=True)
