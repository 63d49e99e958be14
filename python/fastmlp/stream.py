"""Data larger than memory: memory-mapped arrays and streamed batches.

Two ways in, one training loop:

* ``fit(dataset, y=None, ...)``: ``dataset`` is any iterable of ``(x, y)`` batches (a
  generator, a list, an object with ``__iter__``). A background thread
  (:class:`Prefetcher`) reads, validates and converts the next batch (float32, and
  on a CUDA model copied to the GPU on its own stream) while the current step runs.
* ``fit(x, y)`` with ``x`` an ``np.memmap`` (e.g. ``fm.datasets.read_idx(path,
  mmap=True)``) that the C++ engine cannot read in place (not float32 C-contiguous,
  or a CUDA model): :class:`MemmapBatches` gathers each batch's rows on the host --
  the rows the in-memory fit would take, in the same order -- and converts only
  them. (A float32 C-contiguous memmap on the CPU needs none of this: the engine
  gathers its rows from the mapping directly, through the in-memory path.)

A step on a streamed batch is one engine *pass* of one step: the batch is bound as
the training data (no order buffer), ``set_schedule`` gets this step's learning rate,
``begin_pass`` / ``run(TRAIN, rows, capacity, 0, 1)``, and ``state()`` gives the
step's sums, which :func:`_add_sums` adds up on the host in the order the engine
would (running double sums from 0.0). So a streamed epoch whose batches are the
in-memory epoch's batches gives the same History and weights, bit for bit. On CUDA
the engine's graphs are keyed on buffer addresses: one staging pair (``capacity``
rows of x and y) is allocated per pass on the device, bound once, and each batch is
copied into its first rows (:class:`_Feed`).

Evaluation and prediction of a memmap run in chunks of whole batches
(:data:`CHUNK_BATCHES` batches per chunk, read and converted at once); evaluation
again runs one step per pass and adds the sums on the host, so it equals the
in-memory result bit for bit.
"""
from __future__ import annotations

import itertools
import math
import queue
import threading
import time

import numpy as np

from . import _nvtx, distributed as _dist, engine as _engine, ops, trainer as _trainer
from ._interop import cupy_module, is_cupy
from .plan import EVALUATE, TRAIN

__all__ = ["MemmapBatches", "Prefetcher", "fit_stream", "fit_memmap", "evaluate_host",
           "predict_host", "needs_host_gather", "is_dataset"]

# Batches read and converted at once by evaluate / predict of a memmap.
CHUNK_BATCHES = 64
# Batches the prefetch thread holds ready (besides the one being trained on).
QUEUE_BATCHES = 2
# How often a blocked prefetch thread looks at its stop flag, in seconds.
_POLL_S = 0.05


def is_dataset(x) -> bool:
    """Whether ``x`` is an iterable of batches rather than an array: not a NumPy /
    CuPy array, not a DLPack or CUDA-array-interface array, but iterable."""
    if isinstance(x, np.ndarray) or is_cupy(x):
        return False
    if hasattr(x, "__cuda_array_interface__") or hasattr(x, "__dlpack__"):
        return False
    return hasattr(x, "__iter__")


def needs_host_gather(model, x) -> bool:
    """Whether the rows of ``x`` must be gathered on the host, batch by batch: a memmap
    the model's engine cannot read in place (not float32 C-contiguous, or a CUDA
    model). Converting it whole would read all of the file into memory."""
    return isinstance(x, np.memmap) and (model.device == "cuda" or x.dtype != np.float32
                                         or not x.flags.c_contiguous)


# ----------------------------------------------------------------------------- batches


class MemmapBatches:
    """fit's batches of host arrays ``x`` (a memmap) and ``y`` (labels in memory):
    each ``iter()`` is one epoch, the rows the in-memory fit would visit --
    ``ops.random_permutation(n, model._shuffle_seed, model._shuffle_count)`` when
    ``shuffle`` (advancing the model's count, as the in-memory fit does), else
    ``0..n-1`` -- batch ``s`` being ``order[s * batch:(s + 1) * batch]``. Only those
    rows of ``x`` are read. Distributed (``world``): this process's batches of the
    order (:func:`fastmlp.trainer.shard_positions`; the last may be empty)."""

    def __init__(self, model, x, y, batch_size: int, shuffle: bool, world=None):
        self.model, self.x, self.y = model, x, y
        self.batch, self.shuffle = int(batch_size), bool(shuffle)
        self.positions = None
        if world is not None:
            self.positions = _trainer.shard_positions(len(x), world.size, world.rank,
                                                      self.batch)
            self.steps = math.ceil(len(x) / (world.size * self.batch))

    def __len__(self):
        if self.positions is not None:
            return self.steps
        return math.ceil(len(self.x) / self.batch)

    def __iter__(self):
        n, model = len(self.x), self.model
        order = None
        if self.shuffle:  # now, in the caller's thread: the epoch's order, as fit's
            order = ops.random_permutation(n, model._shuffle_seed, model._shuffle_count)
            model._shuffle_count += 1
        return self._batches(order)

    def _batches(self, order):
        n, b = len(self.x), self.batch
        if self.positions is not None:
            rows = self.positions if order is None else order[self.positions]
            for s in range(self.steps):
                idx = rows[s * b:(s + 1) * b]
                yield self.x[idx], self.y[idx]
            return
        for lo in range(0, n, b):
            idx = slice(lo, lo + b) if order is None else order[lo:lo + b]
            yield self.x[idx], self.y[idx]


class Prefetcher:
    """Reads the batches of ``iterator`` in a background thread, ``prepare(i, item)``
    each (validation, conversion; ``i`` counts from 1), and holds up to
    :data:`QUEUE_BATCHES` of them ready. ``limit``: take at most that many items.
    ``device``: a CuPy device id; ``prepare`` then runs on a non-blocking CuPy stream
    of that device, synchronised before its batch is handed over.

    :meth:`get` returns the next prepared batch, or None at the end; an exception in
    the thread (the iterator raising, a bad batch) is raised from ``get`` -- the same
    object. :meth:`close` stops the thread: it looks at its stop flag between
    batches, and it is a daemon thread, so an iterator that blocks forever cannot
    keep the process (or ``close``) waiting."""

    def __init__(self, iterator, prepare, limit=None, device=None):
        self._it, self._prepare, self._limit, self._device = iterator, prepare, limit, device
        self._q: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="fastmlp-prefetch", daemon=True)
        self._thread.start()

    def _work(self):
        try:
            if self._device is None:
                self._loop(None)
            else:
                cp = cupy_module()
                with cp.cuda.Device(self._device):
                    stream = cp.cuda.Stream(non_blocking=True)
                    with stream:
                        self._loop(stream)
        except BaseException as e:  # noqa: BLE001 -- handed to fit, which raises it
            self._put(("error", e))
        finally:
            self._it = None  # the thread's reference to the user's iterator

    def _loop(self, stream):
        i = 0
        while (self._limit is None or i < self._limit) and not self._stop.is_set():
            try:
                item = next(self._it)
            except StopIteration:
                break
            i += 1
            batch = self._prepare(i, item)
            if stream is not None:
                stream.synchronize()
            del item
            if not self._put(("batch", batch)):
                return
        self._put(("end", None))

    def _put(self, entry) -> bool:
        """Queue ``entry``, waiting for room; False when stopped meanwhile."""
        while not self._stop.is_set():
            try:
                self._q.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def get(self):
        kind, value = self._q.get()
        if kind == "error":
            self._q.put(("error", value))  # every later get raises it too
            raise value
        if kind == "end":
            self._q.put(("end", None))
            return None
        return value

    def close(self, timeout: float = 1.0):
        self._stop.set()
        self._thread.join(timeout)


def _check_pair(item, i, where="fit"):
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ValueError(f"{where}: batch {i} of the dataset must be a tuple (x, y), got "
                         f"{type(item).__name__}" + (f" of {len(item)} items"
                                                     if isinstance(item, (tuple, list)) else ""))


def _prepare_batch(model, item, i, capacity, check_finite, device_id, where="fit",
                   allow_empty=False):
    """One dataset batch checked and converted (in the prefetch thread): (x float32,
    y as the loss takes it), C-contiguous, on the model's device. Messages name the
    batch (``i``, counted from 1 in the epoch, or in the fit with steps_per_epoch)."""
    from .model import _as_input, _check_finite

    _check_pair(item, i, where)
    name = f"x of batch {i}"
    x = model._prepare_x(item[0], name)
    rows = len(x)
    if rows == 0 and not allow_empty:  # (a process's empty share of a last global batch)
        raise ValueError(f"{where}: batch {i} of the dataset has no rows")
    if rows > capacity:
        raise ValueError(f"{where}: batch {i} of the dataset has {rows} rows, more than "
                         f"batch_size={capacity} (the largest batch to expect: pass a larger "
                         f"batch_size to {where})")
    y = _as_input(item[1], f"y of batch {i}")
    if y.ndim == 0 or len(y) != rows:
        raise ValueError(f"{where}: batch {i} of the dataset has {rows} rows in x but "
                         f"{'no rows' if y.ndim == 0 else len(y)} in y")
    y = model.loss.labels(y, rows, model.output_dim, where=f"y of batch {i}")
    x_float = x.dtype.kind == "f"
    if is_cupy(x) and device_id is None:
        x = cupy_module().asnumpy(x)
    if is_cupy(y) and device_id is None:
        y = cupy_module().asnumpy(y)
    xp = cupy_module() if is_cupy(x) else np
    x = xp.ascontiguousarray(x, dtype=np.float32)
    if check_finite:
        if x_float:
            _check_finite(x, name, where)
        if y.dtype.kind == "f":
            _check_finite(y, f"y of batch {i}", where)
    if device_id is not None:  # on the prefetch thread's stream
        cp = cupy_module()
        x, y = cp.ascontiguousarray(cp.asarray(x)), cp.ascontiguousarray(cp.asarray(y))
    return x, y


# ----------------------------------------------------------------------------- steps


class _Feed:
    """Puts one batch at a time where op list ``lst`` ("train" / "eval") reads its
    data. CPU: the batch is bound as it is (re-binding only re-sends addresses).
    CUDA: one staging pair of ``capacity`` rows, bound once (the engine's graphs are
    keyed on addresses), each batch copied into its first rows on the current stream."""

    def __init__(self, eng, lst: str, capacity: int):
        self.eng, self.lst, self.capacity = eng, lst, capacity
        self.cuda = eng.arena.device == "cuda"
        self.staging = None

    def put(self, x, y) -> int:
        """Binds batch (x, y); returns the rows of the bound arrays (the pass's source rows)."""
        k = len(x)
        if not self.cuda:
            if k == 0:  # an empty step reads nothing, but its buffers must be bound
                x = np.zeros((1,) + x.shape[1:], np.float32)
                y = np.zeros((1,) + y.shape[1:], y.dtype)
            self.eng.bind(**{f"{self.lst}_x": x, f"{self.lst}_y": y})
            return k
        cp = cupy_module()
        s = self.staging
        if s is None or s[0].shape[1:] != x.shape[1:] or s[1].shape[1:] != y.shape[1:] \
                or s[1].dtype != y.dtype:
            s = self.staging = (cp.empty((self.capacity,) + x.shape[1:], np.float32),
                                cp.empty((self.capacity,) + y.shape[1:], y.dtype))
            self.eng.bind(**{f"{self.lst}_x": s[0], f"{self.lst}_y": s[1]})
        s[0][:k] = cp.asarray(x)
        s[1][:k] = cp.asarray(y)
        return self.capacity

    def release(self):
        self.eng.bind(**{f"{self.lst}_x": None, f"{self.lst}_y": None})
        self.staging = None


def _fresh_sums() -> dict:
    """An empty pass state, as the engines' begin_pass leaves it."""
    from .metrics import SLOTS

    return {"step": 0, "correct": 0, "loss_sum": 0.0, "nonfinite_step": -1,
            "nonfinite_param_step": -1, "metric": [0.0] * len(SLOTS), "penalty_sum": 0.0}


def _add_sums(acc: dict, st: dict, step: int) -> None:
    """Adds one single-step pass's state ``st`` (step ``step`` of the pass ``acc`` adds
    up) to ``acc``, as the engine's step_end would: each sum is the running sum plus
    this step's value (``0.0 + v == v`` exactly), the non-finite flags mapped to
    ``step``."""
    acc["loss_sum"] += st["loss_sum"]
    acc["correct"] += st["correct"]
    acc["penalty_sum"] += st.get("penalty_sum", 0.0)
    acc["metric"] = [a + v for a, v in zip(acc["metric"], st["metric"])]
    for flag in ("nonfinite_step", "nonfinite_param_step"):
        if st.get(flag, -1) >= 0 and acc[flag] < 0:
            acc[flag] = step
    acc["step"] = step + 1


def _finish_epoch_state(model, st: dict, seen: int, world=None):
    """The epoch's summed state and rows before its logs are made: distributed, every
    process's added up."""
    if world is None:
        return st, seen
    return _trainer._reduce_state(world, st), int(world.allreduce(np.array([seen]))[0])


def _train_step(model, eng, feed, x, y, capacity) -> dict:
    """One optimizer step on batch (x, y) as a one-step engine pass; its state."""
    opt = model.optimizer
    source_rows = feed.put(x, y)
    eng.set_schedule(_trainer.learning_rates(opt, 1), opt.iterations + 1, opt)
    eng.begin_pass()
    with _nvtx.annotate("train_steps"):
        done = eng.run(TRAIN, len(x), capacity, 0, 1, source_rows=source_rows)
    opt.iterations += done
    return eng.state()


def _stream_epoch(model, eng, feed, pf, count, capacity, verbose, desc, epoch, steps_hint,
                  world=None):
    """One epoch over the prefetched batches: ``count`` of them (steps_per_epoch) or
    until the prefetcher ends. Returns (logs, steps run, rows seen)."""
    acc, seen, s = _fresh_sums(), 0, 0
    bar = _trainer._progress(steps_hint, desc) if verbose == 1 else None
    last_shown = time.perf_counter()
    try:
        while count is None or s < count:
            batch = pf.get()
            if batch is None:
                if count is not None:
                    raise ValueError(
                        f"fit: the dataset ran out in epoch {epoch + 1}: it gave {s} of the "
                        f"{count} batches of steps_per_epoch={count}; pass a dataset that "
                        "yields steps_per_epoch * epochs batches (e.g. one that repeats)")
                break
            x, y = batch
            st = _train_step(model, eng, feed, x, y, capacity)
            _add_sums(acc, st, s)
            s += 1
            seen += len(x)
            _trainer._check_finite_state(model, acc, desc)
            if bar is not None:
                bar.update(1)
                now = time.perf_counter()
                if now - last_shown > _trainer._PROGRESS_S:
                    last_shown = now
                    bar.set_postfix(_trainer._logs(model, eng, acc, seen, "train", auc=False),
                                    refresh=False)
        if s == 0:
            raise ValueError(
                f"fit: the dataset gave no batch in epoch {epoch + 1}; each epoch iterates "
                "it afresh (iter(dataset)), and a generator is used up after one epoch: "
                "pass a dataset that can be iterated again (a list, an object whose "
                "__iter__ starts over) or steps_per_epoch (one iterator for the whole fit)")
        local = seen
        acc, seen = _finish_epoch_state(model, acc, seen, world)
        logs = _trainer._logs(model, eng, acc, seen, "train", world=world, local_rows=local)
        if bar is not None:
            bar.set_postfix(logs, refresh=True)
        return logs, s, seen
    finally:
        if bar is not None:
            bar.close()


# ----------------------------------------------------------------------------- fit


def _refuse(what: str, source: str):
    raise ValueError(f"fit: {what} does not apply to {source}")


def check_stream_options(model, source: str, *, sample_weight=None, class_weight=None,
                         poisson_sampling=False, validation_split=0.0, shuffle=None):
    """ValueError for the fit options a streamed fit does not take (``source`` names
    the data in the message: "a dataset", "a memory-mapped x ...")."""
    from .privacy import is_private

    if sample_weight is not None:
        _refuse("sample_weight", source)
    if class_weight is not None:
        _refuse("class_weight", source)
    if poisson_sampling:
        _refuse("poisson_sampling", source)
    if is_private(model.optimizer):
        _refuse("a DP optimizer (fm.privacy: its accountant needs the dataset's size and "
                "its sampling)", source)
    if validation_split:
        _refuse("validation_split (pass validation_data)", source)
    if shuffle is not None:
        _refuse("shuffle (the dataset decides its order)", source)


def fit_stream(model, source, **kw):
    """:func:`_fit_stream`; distributed, an exception aborts every process."""
    world = _dist.active()
    try:
        return _fit_stream(model, source, world=world, **kw)
    except BaseException as e:
        _dist.abort_on_error(e)
        raise


def _fit_stream(model, source, *, epochs, steps_per_epoch=None, batch_size=None, val=None,
                verbose=1, callbacks=(), initial_epoch=0, history, check_finite=True,
                adversarial=None, desc_fmt="Epoch {}/{}", samples=None, world=None):
    """Train ``model`` on the batches of ``source`` (an iterable of (x, y) batches; a
    :class:`MemmapBatches`). ``steps_per_epoch`` None: every epoch iterates ``source``
    afresh until it ends; S: one iterator for the whole fit, S batches per epoch.
    ``batch_size``: the largest batch to expect (None: the first batch's rows).
    ``val``: an :class:`ArrayEval` (arrays on the model's device), a :class:`HostEval`
    (a memmap evaluated in chunks), None, or a callable giving one of these once the
    model is built. ``samples``: the rows
    of an epoch when known (History params). Distributed (``world``): each process
    trains on its own batches (a dataset: its own shard, ``steps_per_epoch`` required;
    a memmap: its share of each global batch), the gradients all-reduced."""
    opt = model.optimizer
    if world is not None:
        if steps_per_epoch is None and not isinstance(source, MemmapBatches):
            raise ValueError("fit: a distributed fit on a dataset of batches needs "
                             "steps_per_epoch (every process must take the same number of "
                             "steps; each process's dataset is its own share of the data)")
        _trainer._check_same_everywhere(world, "fit", epochs=epochs,
                                        initial_epoch=initial_epoch,
                                        steps_per_epoch=steps_per_epoch or -1,
                                        features=model.input_dim if model.built else -1)
        if world.rank != 0:
            verbose = 0
        model._shuffle_seed, model._shuffle_count, opt.iterations = world.bcast_object(
            (model._shuffle_seed, model._shuffle_count, opt.iterations))
    pending = None  # the first epoch's (or the fit's) iterator, when its first batch was read
    if batch_size is None or not model.built:
        # the first batch sets the batch size and builds the model (read here, not in the
        # thread: the model must be built before the thread checks batches against it)
        it = iter(source)
        try:
            first = next(it)
        except StopIteration:
            raise ValueError("fit: the dataset gave no batch") from None
        _check_pair(first, 1)
        x0 = model._prepare_x(first[0], "x of batch 1")
        if batch_size is None:
            batch_size = max(1, len(x0))
        pending = itertools.chain([first], it)
    capacity = int(batch_size)
    if callable(val):  # made once the model is built
        val = val()
    eval_batch = val.eval_batch if val is not None else 0
    name, why = _engine.choose(model.device, opt)
    bound = _trainer.bind(model, max(capacity, eval_batch), 1, world=world)
    eng = bound.engine(name, opt)
    if world is not None:
        eng.set_allreduce(world.engine_hook(model.device))
    bound.plan.use(TRAIN, adversarial)
    bound.plan.use(EVALUATE, None)  # validation is on the clean rows
    if bound.plan.has("train.auc_scores"):
        raise ValueError("fit: the 'auc' metric is not available when fit streams its batches "
                         "(a dataset, or a memory-mapped x gathered on the host): it stores one "
                         "prediction per row of a fixed pass; evaluate it with model.evaluate "
                         "on arrays")
    eng.bind(train_order=None)
    feed = _Feed(eng, "train", capacity)
    if val is not None:
        val.setup(model, bound)
    steps_hint = steps_per_epoch if steps_per_epoch is not None else \
        (len(source) if hasattr(source, "__len__") else None)
    _trainer.record_params(history, model, eng, why, world, adversarial, epochs=epochs,
                           steps=steps_hint, batch_size=capacity, samples=samples)
    device_id = cupy_module().cuda.Device().id if model.device == "cuda" else None
    empty_ok = world is not None and isinstance(source, MemmapBatches)

    def prepare(i, item):
        return _prepare_batch(model, item, i, capacity, check_finite, device_id,
                              allow_empty=empty_ok)

    shared = None
    try:
        _trainer.begin_training(model, callbacks, initial_epoch, bound, world)
        if steps_per_epoch is not None:  # one iterator, exactly the batches the epochs take
            shared = Prefetcher(pending if pending is not None else iter(source), prepare,
                                limit=steps_per_epoch * max(0, epochs - model._initial_epoch),
                                device=device_id)
        for epoch in range(model._initial_epoch, epochs):
            for cb in callbacks:
                cb.on_epoch_begin(epoch)
            t0 = time.perf_counter()
            desc = desc_fmt.format(epoch + 1, epochs)
            with _nvtx.annotate(f"epoch{epoch + 1}"):
                pf = shared
                if pf is None:
                    pf = Prefetcher(pending if pending is not None else iter(source), prepare,
                                    device=device_id)
                    pending = None
                try:
                    logs, steps, seen = _stream_epoch(model, eng, feed, pf, steps_per_epoch,
                                                      capacity, verbose, desc, epoch,
                                                      steps_hint, world)
                finally:
                    if pf is not shared:
                        pf.close()
                if history.params.get("steps") is None:
                    history.params["steps"] = steps_hint = steps
                if history.params.get("samples") is None:
                    history.params["samples"] = seen
                if world is not None:
                    _trainer._average_stats(bound, world)
                if val is not None:
                    with _nvtx.annotate("validation"):
                        v = val.evaluate(model)
                    logs.update({"val_" + k: value for k, value in v.items()})
            logs["time"] = _trainer.epoch_time(world, t0)
            if verbose == 2:
                print(f"{desc} - " + _trainer.format_logs(logs), flush=True)
            for cb in callbacks:
                cb.on_epoch_end(epoch, logs)
            if model.stop_training:
                break
    finally:
        if shared is not None:
            shared.close()
        feed.release()
    for cb in callbacks:
        cb.on_train_end()
    return history


class ArrayEval:
    """fit's validation data as prepared arrays on the model's device (the in-memory
    validation pass)."""

    def __init__(self, x, y):
        self.x, self.y = x, y
        self.eval_batch = min(_trainer.EVAL_BATCH, max(1, len(x)))
        self.eng = None

    def setup(self, model, bound):
        self.world, self.total = _dist.active(), len(self.x)
        self.eng, self.x, self.y = _trainer.evaluation_share(model, bound, self.x, self.y,
                                                             self.eval_batch, self.world)

    def evaluate(self, model):
        return _trainer._evaluate_pass(model, self.eng, self.x, self.y, self.eval_batch,
                                       world=self.world, total=self.total)


class HostEval:
    """fit's validation data as a memmap and its labels (on the host), evaluated in
    chunks by :func:`evaluate_host`."""

    def __init__(self, x, y, check_finite=True, row0=0, names=("x_val", "y_val")):
        self.x, self.y, self.check_finite, self.row0, self.names = x, y, check_finite, row0, names
        self.eval_batch = min(_trainer.EVAL_BATCH, max(1, len(x)))

    def setup(self, model, bound):
        pass

    def evaluate(self, model):
        return evaluate_host(model, self.x, self.y, self.eval_batch, where="fit",
                             check_finite=self.check_finite, row0=self.row0, name=self.names[0])


def host_labels(model, y, n, name, where, check_finite, row0=0):
    """The labels ``y`` for ``n`` rows, checked as the loss takes them, on the host
    (they are small: read into memory, as the in-memory path does)."""
    from .model import _as_input, _check_finite

    y = _as_input(y, name)
    if len(y) != n:
        raise ValueError(f"'x' has {n} samples but '{name}' has {len(y)}")
    y = model.loss.labels(y, n, model.output_dim, where=name)
    y = cupy_module().asnumpy(y) if is_cupy(y) else np.ascontiguousarray(y)
    if check_finite and y.dtype.kind == "f":
        _check_finite(y, name, where, row0)
    return y


def fit_memmap(model, x, y, *, epochs, batch_size, shuffle, val, verbose, callbacks,
               initial_epoch, history, check_finite, adversarial=None):
    """fit on a memmap ``x`` gathered on the host (see :func:`needs_host_gather`) and
    its labels ``y``: the in-memory fit's batches (the same row order), streamed."""
    n = len(x)
    if n == 0:
        raise ValueError("fit: 'x' has no samples")
    y = host_labels(model, y, n, "y", "fit", check_finite)
    source = MemmapBatches(model, x, y, batch_size, shuffle, _dist.active())
    return fit_stream(model, source, epochs=epochs, batch_size=min(batch_size, n), val=val,
                      verbose=verbose, callbacks=callbacks, initial_epoch=initial_epoch,
                      history=history, check_finite=check_finite, adversarial=adversarial,
                      samples=n)


# ----------------------------------------------------------------------------- evaluate / predict


def evaluate_host(model, x, y, batch_size, where="evaluate", check_finite=True, row0=0,
                  name="x"):
    """``{"loss", <metrics>}`` of host ``x`` (a memmap, any numeric dtype) and host
    labels ``y`` (as the loss takes them): chunks of :data:`CHUNK_BATCHES` batches read
    and converted at once, each batch one engine pass, the sums added on the host in
    the engine's order -- the in-memory evaluation's result, bit for bit."""
    n = len(x)
    if n == 0:
        raise ValueError(f"{where}: no samples")
    world = _dist.active()
    try:
        return _evaluate_host(model, x, y, batch_size, where, check_finite, row0, name, world)
    except BaseException as e:
        _dist.abort_on_error(e)
        raise


def _evaluate_host(model, x, y, batch_size, where, check_finite, row0, name, world):
    from .model import _check_finite

    n = total = len(x)
    if world is not None:  # this process's share of the rows (a memmap slice: a view)
        _trainer._check_same_everywhere(world, where, rows=n, batch_size=batch_size)
        lo, hi = _trainer.shard_range(n, world.size, world.rank)
        x, y, row0, n = x[lo:hi], y[lo:hi], row0 + lo, hi - lo
    cap = max(1, min(batch_size, n))
    bound = _trainer.bind(model, cap, sample_weight=_trainer._bound_sample_weight(model))
    bound.plan.use(EVALUATE, None)
    if bound.plan.has("eval.auc_scores"):
        raise ValueError(f"{where}: the 'auc' metric is not available for a memory-mapped x "
                         "evaluated in chunks (it stores one prediction per row of a fixed "
                         "pass)")
    eng = bound.engine(_engine.choose(model.device)[0], model.optimizer)
    feed = _Feed(eng, "eval", cap)
    acc, step = _fresh_sums(), 0
    chunk = CHUNK_BATCHES * batch_size
    try:
        for lo in range(0, n, chunk):
            xc = np.ascontiguousarray(x[lo:lo + chunk], dtype=np.float32)
            if check_finite and x.dtype.kind == "f":
                _check_finite(xc, name, where, row0 + lo)
            yc = y[lo:lo + chunk]
            if feed.cuda:
                cp = cupy_module()
                xc, yc = cp.asarray(xc), cp.asarray(yc)
            for b0 in range(0, len(xc), batch_size):
                xb, yb = xc[b0:b0 + batch_size], yc[b0:b0 + batch_size]
                source_rows = feed.put(xb, yb)
                eng.begin_pass()
                eng.run(EVALUATE, len(xb), cap, 0, 1, source_rows=source_rows)
                _add_sums(acc, eng.state(), step)
                step += 1
    finally:
        feed.release()
    if world is not None:
        acc = _trainer._reduce_state(world, acc)
    return _trainer._logs(model, eng, acc, total, "eval", penalty=_trainer.penalty(model))


def predict_host(model, x, batch_size, check_finite=True):
    """The model's output for the rows of host ``x`` (a memmap) as a NumPy array: chunks
    of :data:`CHUNK_BATCHES` batches converted and predicted by the in-memory path."""
    from .model import _check_finite

    n = len(x)
    out = np.empty((n, model.output_dim), np.float32)
    chunk = CHUNK_BATCHES * batch_size
    for lo in range(0, n, chunk):
        xc = model._place(x[lo:lo + chunk], np.float32)
        if check_finite and x.dtype.kind == "f":
            _check_finite(xc, "x", "predict", lo)
        part = _trainer.predict(model, xc, batch_size)
        out[lo:lo + len(xc)] = cupy_module().asnumpy(part) if is_cupy(part) else part
    return out


def evaluate_dataset(model, dataset, batch_size=None, check_finite=True):
    """``{"loss", <metrics>}`` over an iterable of (x, y) batches (read once, in this
    thread): each batch checked as fit checks it, one engine pass per batch, the sums
    added on the host -- the in-memory evaluation of the concatenated batches when they
    are its batches. ``batch_size``: the largest batch (None: the first batch's rows).
    Distributed: each process's dataset is its share; the sums are added up."""
    try:
        return _evaluate_dataset(model, dataset, batch_size, check_finite)
    except BaseException as e:
        _dist.abort_on_error(e)
        raise


def _evaluate_dataset(model, dataset, batch_size, check_finite):
    it = iter(dataset)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("evaluate: the dataset gave no batch") from None
    _check_pair(first, 1, "evaluate")
    model._require_built("evaluate")
    if batch_size is None:
        batch_size = max(1, len(model._prepare_x(first[0], "x of batch 1")))
    cap = int(batch_size)
    bound = _trainer.bind(model, cap, sample_weight=_trainer._bound_sample_weight(model))
    bound.plan.use(EVALUATE, None)
    if bound.plan.has("eval.auc_scores"):
        raise ValueError("evaluate: the 'auc' metric is not available for a dataset of batches "
                         "(it stores one prediction per row of a fixed pass)")
    eng = bound.engine(_engine.choose(model.device)[0], model.optimizer)
    feed = _Feed(eng, "eval", cap)
    device_id = cupy_module().cuda.Device().id if model.device == "cuda" else None
    acc, seen = _fresh_sums(), 0
    try:
        for step, item in enumerate(itertools.chain([first], it)):
            x, y = _prepare_batch(model, item, step + 1, cap, check_finite, device_id,
                                  "evaluate")
            source_rows = feed.put(x, y)
            eng.begin_pass()
            eng.run(EVALUATE, len(x), cap, 0, 1, source_rows=source_rows)
            _add_sums(acc, eng.state(), step)
            seen += len(x)
    finally:
        feed.release()
    acc, seen = _finish_epoch_state(model, acc, seen, _dist.active())
    return _trainer._logs(model, eng, acc, seen, "eval", penalty=_trainer.penalty(model))


def predict_dataset(model, dataset, batch_size, check_finite=True):
    """The model's output for an iterable of x batches (or of (x, y) batches: y is
    ignored), concatenated: NumPy, or CuPy when the batches are CuPy arrays."""
    outs = []
    for item in dataset:
        x = item[0] if isinstance(item, (tuple, list)) and len(item) == 2 else item
        outs.append(model.predict(x, batch_size=batch_size, check_finite=check_finite))
    if not outs:
        raise ValueError("predict: the dataset gave no batch")
    xp = cupy_module() if is_cupy(outs[0]) else np
    return xp.concatenate([xp.asarray(o) for o in outs])
