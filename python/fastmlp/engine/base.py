"""The interface every engine implements (see :mod:`fastmlp.engine`)."""
from __future__ import annotations


class Engine:
    """Runs a bound plan's op lists. A *pass* (a training epoch, an evaluation, a
    prediction) is ``set_ops``-independent: ``begin_pass()``, then ``run`` over
    consecutive steps, ``state()`` at progress updates and at the end.

    ``run(lst, rows, batch, first, count)`` runs steps ``first .. first+count-1`` of op
    list ``lst`` over ``rows`` rows in batches of ``batch`` and returns the steps run
    (a training run stops after a step whose loss or updated parameters are not
    finite, except on CUDA, where the caller learns it from ``state()["nonfinite_step"]``
    and ``state()["nonfinite_param_step"]``). ``source_rows``: the rows of the bound data
    when they are not ``rows`` (Poisson sampling lays step s's rows out at ``s * batch``
    of the order buffer, so ``rows`` only sets the step's row count).
    """
    name = "?"

    def __init__(self, plan, arena):
        self.plan, self.arena = plan, arena

    def bind(self, **inputs) -> None:
        """Bind input buffers (``train_x=``, ``train_y=``, ``train_order=``, ``eval_x=``,
        ``eval_y=``, ``predict_x=``, ``predict_out=``)."""
        self.arena.bind(**inputs)

    def prepare(self, lst, batch, rows) -> None:
        """Get op list ``lst`` ready for a pass over ``rows`` rows in batches of
        ``batch`` (before the pass)."""

    def set_schedule(self, lrs, step0, optimizer) -> None:
        """The optimizer's learning rate for each step of the coming pass and the step
        number of its first step (Adam's bias correction counts from 1)."""
        raise NotImplementedError

    def begin_pass(self) -> None:
        raise NotImplementedError

    def run(self, lst, rows, batch, first, count, source_rows=None) -> int:
        raise NotImplementedError

    def state(self) -> dict:
        raise NotImplementedError

    def synchronize(self) -> None:
        pass

    def set_allreduce(self, fn) -> None:
        """The all-reduce of the training list's ``allreduce`` op (distributed training):
        ``fn(address, count, stream)`` sums ``count`` float32 at ``address`` over the
        processes in place (:meth:`fastmlp.distributed.World.engine_hook`); None: none."""
        raise NotImplementedError

    def graphs_captured(self) -> int:
        return 0
