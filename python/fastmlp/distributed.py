"""Data-parallel training over MPI processes, and over GPUs with NCCL.

Launch one process per core group or per GPU with ``mpiexec`` (Open MPI installs from
PyPI: ``pip install "fastmlp[mpi]"``)::

    mpiexec -n 4 python train.py          # train.py calls fm.distributed.init()
    mpiexec -n 4 fastmlp train ...        # the CLI calls init() itself under mpiexec

After :func:`init`, ``model.fit`` trains data-parallel (ChainerMN's and Horovod's
pattern): every process holds the whole model, ``batch_size`` is per process, step
``t`` of process ``r`` of ``N`` uses rows ``[t*N*b + r*b, t*N*b + (r+1)*b)`` of the
(shuffled: the same seeded permutation everywhere) data, and the gradients are summed
over the processes every step inside the engine's training step -- the ``allreduce``
op of the step plan (:mod:`fastmlp.plan`): each process's flat gradients times its
rows, all-reduced with the row counts, divided by their total. So all processes hold
the same weights, equal (up to the floating-point order of the sum) to one process
training with batch ``N*b``; a last global batch that does not divide evenly is split
as evenly as possible and weighted by rows. On the CPU the all-reduce is mpi4py's
``Allreduce`` on the gradient buffer (no pickling); on GPUs one GPU per process (the
process's rank on its node picks it) and NCCL (CuPy's ``cupy.cuda.nccl``) all-reduces
on the engine's stream, inside the step's CUDA Graph, the NCCL id broadcast over MPI.

Only rank 0 prints progress and writes files (``model.save``, ModelCheckpoint,
BackupAndRestore, CSVLogger); ``evaluate`` and the validation metrics are computed on
each process's shard of the rows and summed; the History is the same everywhere. An
exception on one process aborts them all (``MPI_Abort``) after printing that process's
message, so no process waits forever in a collective.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import traceback

import numpy as np

__all__ = ["init", "is_initialized", "rank", "size", "local_rank", "barrier",
           "launched_by_mpi"]

# Environment variables the common MPI launchers set in each process they start.
_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE",
                  "MPI_LOCALNRANKS")

_world = None  # the World of init() (or of a test's _using)


class World:
    """One process alone: the collectives are identities. The base of the MPI world and
    what the tests use to run the distributed code path in one process."""
    rank, size, local_rank = 0, 1, 0

    def allreduce(self, arr, op: str = "sum"):
        """``arr`` (a NumPy array) reduced over the processes, in place; returns it."""
        return arr

    def bcast(self, arr, root: int = 0):
        """``arr`` (a NumPy array) overwritten with the root's, in place; returns it."""
        return arr

    def bcast_object(self, obj, root: int = 0):
        return obj

    def allgather_rows(self, arr):
        """The rows of every process's ``arr`` (a NumPy array), in rank order."""
        return arr

    def barrier(self) -> None:
        pass

    def abort(self, message: str) -> None:
        raise SystemExit(message)

    def engine_hook(self, device: str):
        """The engine's all-reduce for the allreduce op: ``fn(address, count, stream)``
        summing ``count`` float32 at ``address`` in place."""
        return _identity_hook


def _identity_hook(address, count, stream):
    pass


def _host_view(address: int, count: int) -> np.ndarray:
    """A float32 NumPy view of ``count`` floats of host memory at ``address``."""
    return np.ctypeslib.as_array((ctypes.c_float * count).from_address(address))


class _NcclHook:
    """The CUDA engine's all-reduce: NCCL's in place on the engine's stream (CuPy)."""

    def __init__(self, comm, nccl):
        self.comm, self.nccl = comm, nccl

    def __call__(self, address, count, stream):
        self.comm.allReduce(address, address, count, self.nccl.NCCL_FLOAT32,
                            self.nccl.NCCL_SUM, stream)


class LocalWorld(World):
    """One process; ``nccl=True`` makes the CUDA engine all-reduce through a real
    one-process NCCL communicator (the GPU check exercises the NCCL path with it)."""

    def __init__(self, nccl: bool = False):
        self._nccl = nccl
        self._hook = None

    def engine_hook(self, device):
        if device != "cuda" or not self._nccl:
            return _identity_hook
        if self._hook is None:
            nccl = _nccl_module()
            self._hook = _NcclHook(nccl.NcclCommunicator(1, nccl.get_unique_id(), 0), nccl)
        return self._hook


class MPIWorld(World):
    """The processes of an MPI communicator (mpi4py)."""

    def __init__(self, comm):
        from mpi4py import MPI

        self.MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self._views: dict = {}
        self._nccl_hook = None

    _OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}

    def allreduce(self, arr, op="sum"):
        self.comm.Allreduce(self.MPI.IN_PLACE, arr, op=getattr(self.MPI, self._OPS[op]))
        return arr

    def bcast(self, arr, root=0):
        self.comm.Bcast(arr, root=root)
        return arr

    def bcast_object(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def allgather_rows(self, arr):
        arr = np.ascontiguousarray(arr)
        counts = np.array(self.comm.allgather(len(arr)), np.int64)
        out = np.empty((int(counts.sum()),) + arr.shape[1:], arr.dtype)
        row = int(np.prod(arr.shape[1:], dtype=np.int64))
        self.comm.Allgatherv(arr, [out, counts * row])
        return out

    def barrier(self):
        self.comm.Barrier()

    def abort(self, message):
        sys.stderr.write(message if message.endswith("\n") else message + "\n")
        sys.stderr.flush()
        sys.stdout.flush()
        self.comm.Abort(1)

    def engine_hook(self, device):
        if device == "cuda":
            return self._nccl()
        comm, MPI, views = self.comm, self.MPI, self._views

        def allreduce(address, count, stream):
            key = (address, count)
            buf = views.get(key)
            if buf is None:
                views.clear()  # one gradient buffer at a time
                buf = views[key] = _host_view(address, count)
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return allreduce

    def _nccl(self):
        if self._nccl_hook is None:
            from ._interop import cupy_module

            gpus = cupy_module().cuda.runtime.getDeviceCount()
            if self.local_size > gpus:
                raise RuntimeError(f"fastmlp.distributed: {self.local_size} processes on this "
                                   f"node share {gpus} GPU(s); NCCL needs one GPU per "
                                   "process: start at most as many processes per node as "
                                   "it has GPUs (or train on the CPU: device='cpu')")
            nccl = _nccl_module()
            uid = self.comm.bcast(nccl.get_unique_id() if self.rank == 0 else None, root=0)
            self._nccl_hook = _NcclHook(nccl.NcclCommunicator(self.size, uid, self.rank), nccl)
        return self._nccl_hook


def _nccl_module():
    try:
        from cupy.cuda import nccl
    except ImportError as e:  # CuPy without its NCCL binding, or no libnccl
        raise RuntimeError(
            "fastmlp.distributed: training on GPUs needs NCCL through CuPy "
            f"(cupy.cuda.nccl: {e}); install it: pip install nvidia-nccl-cu13") from None
    if not getattr(nccl, "available", True):
        raise RuntimeError("fastmlp.distributed: CuPy was built without NCCL; install "
                           "nvidia-nccl-cu13 (pip) so that cupy.cuda.nccl can load it")
    return nccl


# ----------------------------------------------------------------------------- the API


def launched_by_mpi() -> bool:
    """Whether this process was started by an MPI launcher (``mpiexec``, ``srun``)."""
    return any(v in os.environ for v in _LAUNCHER_VARS)


def init() -> None:
    """Join the MPI world started by ``mpiexec`` (a no-op when already joined). Needs
    mpi4py (``pip install "fastmlp[mpi]"``). Afterwards ``fit`` trains data-parallel,
    a process's uncaught exception aborts every process (after printing its message),
    and, where CUDA is usable, each process uses GPU ``local_rank() % GPUs``. Without
    ``mpiexec`` the world is this one process."""
    global _world
    if isinstance(_world, MPIWorld):
        return
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError("fastmlp.distributed.init needs mpi4py and an MPI library: "
                          f'pip install "fastmlp[mpi]" ({e})') from None
    if not MPI.Is_initialized():
        MPI.Init()
    _world = MPIWorld(MPI.COMM_WORLD)
    if _world.size > 1:
        _install_excepthook(_world)
    from ._interop import cuda_status, cupy_module

    if cuda_status()[0]:
        cp = cupy_module()
        cp.cuda.Device(_world.local_rank % cp.cuda.runtime.getDeviceCount()).use()


def is_initialized() -> bool:
    return _world is not None


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return _world.rank if _world is not None else 0


def size() -> int:
    """The number of processes (1 when not distributed)."""
    return _world.size if _world is not None else 1


def local_rank() -> int:
    """This process's rank among the processes of its node (0 when not distributed)."""
    return _world.local_rank if _world is not None else 0


def barrier() -> None:
    """Wait until every process got here."""
    if _world is not None:
        _world.barrier()


def is_root() -> bool:
    """Whether this process prints and writes files (rank 0)."""
    return rank() == 0


def active():
    """The world ``fit`` / ``evaluate`` train and evaluate over, or None (one process)."""
    if _world is None or (_world.size == 1 and not getattr(_world, "forced", False)):
        return None
    return _world


@contextlib.contextmanager
def _using(world):
    """Tests: run the distributed code path over ``world`` (e.g. LocalWorld()) within
    the block."""
    global _world
    previous, _world = _world, world
    world.forced = True
    try:
        yield world
    finally:
        _world = previous
        world.forced = False


def fail_message(exc: BaseException) -> str:
    """What an aborting process prints: its rank, the exception and its traceback."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return (f"fastmlp: process {rank()} of {size()} failed, aborting all processes: "
            f"{type(exc).__name__}: {exc}\n{tb}")


def abort_on_error(exc: BaseException) -> None:
    """Abort every process with this process's message (when distributed over more
    than one process; else nothing: the caller re-raises)."""
    w = active()
    if w is not None and w.size > 1:
        w.abort(fail_message(exc))


def _install_excepthook(world) -> None:
    previous = sys.excepthook

    def hook(kind, exc, tb):
        if issubclass(kind, SystemExit) and not exc.code:
            return previous(kind, exc, tb)
        world.abort(fail_message(exc.with_traceback(tb)))

    sys.excepthook = hook
