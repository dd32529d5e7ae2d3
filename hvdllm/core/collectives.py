"""The collective protocol every backend implements, and the numpy engine of the mpi and local backends.

Backends speak in framework tensors; the mpi and local ones are written once here over numpy arrays
(CPU tensors convert without copies), the horovod ones live in each adapter because Horovod's ops are
framework-specific.
"""
from __future__ import annotations

import pickle
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from hvdllm.core.ops import Average, ReduceOp, parse_op, require_native
from hvdllm.core.process_sets import WORLD, ProcessSet
from hvdllm.core.join import JoinChannel, zeros_like_desc
from hvdllm.core.waiting import wait_until
from hvdllm.core.world import World


class Handle(Protocol):
    """An in-flight asynchronous collective; ``wait()`` blocks and returns the result."""

    def wait(self) -> Any: ...


class Done:
    """The handle of a collective that already completed (backends without asynchronous ops)."""

    def __init__(self, result: Any) -> None:
        self._result = result

    def wait(self) -> Any:
        return self._result

    def poll(self) -> bool:
        return True


class Deferred:
    """The handle of an in-flight collective: ``finish()`` completes it (once), ``ready()`` polls it."""

    def __init__(self, finish: Callable[[], Any], ready: Callable[[], bool] = lambda: True) -> None:
        self._finish, self._ready, self._result, self._done = finish, ready, None, False

    def wait(self) -> Any:
        if not self._done:
            self._result, self._done = self._finish(), True
        return self._result

    def poll(self) -> bool:
        return self._done or self._ready()


@runtime_checkable
class Collectives(Protocol):
    """The contract every backend implements (torch and TF, each on horovod, mpi and local), in the
    framework's tensors; ``hvd.collectives()`` returns it and ``hvd.allreduce`` etc. forward to it.

    ``name`` keys an op across ranks on Horovod, which matches ops by name and numbers unnamed ones per
    process: ranks that issue different numbers of ops (pipeline stages) must name the ones they share.
    The mpi and local backends match ops by call order and ignore names. ``allreduce_async_`` reduces in
    place where the framework's tensors are mutable (torch); its handle's ``wait()`` returns the result.
    """

    name: str                  # the backend: "horovod", "mpi" or "local"
    world: World

    def allreduce(self, x: Any, op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                  name: str | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> Any: ...
    def allreduce_async_(self, x: Any, op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                         name: str | None = None, prescale_factor: float = 1.0,
                         postscale_factor: float = 1.0) -> Handle: ...
    def grouped_allreduce(self, xs: Sequence[Any], op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                          name: str | None = None, prescale_factor: float = 1.0,
                          postscale_factor: float = 1.0) -> list: ...
    def broadcast(self, x: Any, root_rank: int, process_set: ProcessSet = WORLD, name: str | None = None) -> Any: ...
    def allgather(self, x: Any, process_set: ProcessSet = WORLD, name: str | None = None) -> Any: ...
    def grouped_allgather(self, xs: Sequence[Any], process_set: ProcessSet = WORLD,
                          name: str | None = None) -> list: ...
    def alltoall(self, x: Any, splits: Any = None, process_set: ProcessSet = WORLD,
                 name: str | None = None) -> tuple[Any, Any]: ...
    def reducescatter(self, x: Any, op: ReduceOp = Average, process_set: ProcessSet = WORLD, name: str | None = None,
                      prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> Any: ...
    def grouped_reducescatter(self, xs: Sequence[Any], op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                              name: str | None = None, prescale_factor: float = 1.0,
                              postscale_factor: float = 1.0) -> list: ...
    def start(self, kind: str, *args: Any, **kwargs: Any) -> Handle:
        """The asynchronous form of the collective method ``kind`` (same arguments); a trailing ``_``
        (``allreduce_``, ``grouped_allreduce_``, ``broadcast_``) writes the result into the inputs."""
        ...
    def barrier(self, process_set: ProcessSet = WORLD) -> None: ...
    def broadcast_object(self, obj: Any, root_rank: int = 0, process_set: ProcessSet = WORLD,
                         name: str | None = None) -> Any: ...
    def allgather_object(self, obj: Any, process_set: ProcessSet = WORLD, name: str | None = None) -> list: ...
    def join(self, device: int = -1) -> int: ...
    def add_process_set(self, ps: ProcessSet) -> None: ...
    def remove_process_set(self, ps: ProcessSet) -> bool: ...
    def controller_enabled(self, controller: str) -> bool: ...
    def start_timeline(self, file_path: str, mark_cycles: bool = False) -> None: ...
    def stop_timeline(self) -> None: ...
    def mpi_threads_supported(self) -> bool: ...
    def shutdown(self) -> None: ...


class SelfComm:
    """The subset of mpi4py's communicator API used below, for a world of one process."""

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1

    def Allreduce(self, send: Any, recv: np.ndarray, op: Any = None) -> None:
        if send is not _IN_PLACE:
            recv[...] = send

    def Iallreduce(self, send: Any, recv: np.ndarray, op: Any = None) -> "_DoneRequest":
        self.Allreduce(send, recv, op)
        return _DoneRequest()

    def Bcast(self, buf: np.ndarray, root: int = 0) -> None:
        return None

    def Ibcast(self, buf: np.ndarray, root: int = 0) -> "_DoneRequest":
        return _DoneRequest()

    def Allgather(self, send: np.ndarray, recv: np.ndarray) -> None:
        recv[...] = send.reshape(recv.shape)

    def Allgatherv(self, send: np.ndarray, recv: list) -> None:
        recv[0][...] = send.reshape(recv[0].shape)

    def Alltoallv(self, send: list, recv: list) -> None:
        recv[0][...] = send[0].reshape(recv[0].shape)

    def Reduce_scatter(self, send: np.ndarray, recv: np.ndarray, recvcounts: Any = None, op: Any = None) -> None:
        recv[...] = send.reshape(recv.shape)

    def alltoall(self, objs: list) -> list:
        return list(objs)

    def allgather(self, obj: Any) -> list:
        return [obj]

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return pickle.loads(pickle.dumps(obj))

    def Barrier(self) -> None:
        return None

    def Ibarrier(self) -> "_DoneRequest":
        return _DoneRequest()


class _DoneRequest:
    def Wait(self) -> None:
        return None

    def Test(self) -> bool:
        return True


_IN_PLACE = object()


def _polling(request: Any, during: Callable[[], None] | None) -> Callable[[], bool]:
    """``request.Test``, calling ``during()`` (the join channel's hook) before each test."""
    if during is None:
        return request.Test

    def test() -> bool:
        during()
        return request.Test()

    return test


def split_rows(rows: int, parts: int) -> list[int]:
    """Horovod's reducescatter split of a first dimension: as even as possible, earlier ranks get the
    extra rows."""
    return [rows // parts + (1 if i < rows % parts else 0) for i in range(parts)]


def _scale(buf: np.ndarray, factor: float) -> None:
    if factor != 1.0:
        np.multiply(buf, factor, out=buf, casting="unsafe")


class _Pending:
    """Completes an in-place MPI reduction: wait for it, then apply the op's scale."""

    def __init__(self, request: Any, buf: np.ndarray, scale: float, timeout: float | None = None,
                 during: Callable[[], None] | None = None) -> None:
        self._request, self._buf, self._scale, self._timeout = request, buf, scale, timeout
        self._during = during

    def wait(self) -> np.ndarray:
        if self._request is not None:
            wait_until(_polling(self._request, self._during), timeout=self._timeout, what="an MPI allreduce")
            self._request = None
            _scale(self._buf, self._scale)
        return self._buf


class NumpyCollectives:
    """Collectives over numpy arrays on an mpi4py communicator (or :class:`SelfComm`).

    Sub-communicators for process sets are created collectively at construction, in the order
    given, so every rank must pass the same list (as with ``horovod.init(process_sets=...)``).
    """

    def __init__(self, comm: Any, world: World, process_sets: Sequence[ProcessSet] = (),
                 wait_timeout: float | None = None) -> None:
        self.comm, self.world, self.wait_timeout = comm, world, wait_timeout
        self._comms: dict[ProcessSet, Any] = {WORLD: comm}
        self._join = None if isinstance(comm, SelfComm) or comm.Get_size() == 1 else JoinChannel(comm)
        self._ids: dict[ProcessSet, int] = {WORLD: 0}
        for ps in process_sets:
            self.add_process_set(ps)

    def _create(self, ps: ProcessSet) -> Any:
        if isinstance(self.comm, SelfComm):
            ps.members(1)
            return self.comm
        members = ps.members(self.world.size)
        sub = self.comm.Create_group(self.comm.Get_group().Incl(list(members)))
        return sub if self.world.rank in members else None

    def add_process_set(self, ps: ProcessSet) -> None:
        """Register a new set; a collective call over the whole world."""
        if ps not in self._comms:
            self._comms[ps] = self._create(ps)
            self._ids[ps] = max(self._ids.values()) + 1   # never reused, as Horovod's ids

    def process_set_of(self, process_set_id: int) -> ProcessSet:
        """The registered set numbered ``process_set_id`` (0: the world, then in registration order)."""
        for ps, i in self._ids.items():
            if i == process_set_id and ps in self._comms:
                return ps
        raise ValueError(f"process_set_id={process_set_id!r} is not a registered process set")

    def comm_for(self, process_set: ProcessSet) -> Any:
        if process_set not in self._comms:
            raise ValueError(f"process set {process_set.ranks} was not registered: pass it to "
                             "init(process_sets=[...]) or add_process_set()")
        comm = self._comms[process_set]
        if comm is None:
            raise ValueError(f"rank {self.world.rank} is not a member of process set {list(process_set.ranks)}")
        return comm

    def remove_process_set(self, ps: ProcessSet) -> bool:
        """Forget a registered set (a collective call over the whole world); False if it was unknown."""
        if ps == WORLD or ps not in self._comms:
            return False
        comm = self._comms.pop(ps)
        if comm is not None and comm is not self.comm:
            comm.Free()
        return True

    def _mpi_op(self, op: ReduceOp) -> Any:
        """The MPI reduction realising ``op`` (Average reduces with SUM and is scaled after)."""
        op = require_native(parse_op(op), self.world.backend)
        if isinstance(self.comm, SelfComm):
            return None
        from mpi4py import MPI

        return {ReduceOp.MIN: MPI.MIN, ReduceOp.MAX: MPI.MAX, ReduceOp.PRODUCT: MPI.PROD}.get(op, MPI.SUM)

    def _begin(self, comm: Any, kind: str, describe: Callable[[], dict] | None = None) -> Callable[[], None] | None:
        """Before a collective: on the world communicator, the join channel's bookkeeping (see
        hvdllm.core.join; ``describe`` says how a joined rank serves it). The hook its wait polls."""
        if self._join is None or comm is not self.comm:
            return None
        return self._join.begin(kind, describe)

    def join(self) -> int:
        """Horovod's join (hvdllm.core.join): serve the other ranks' allreduce/broadcast/barrier with
        zeros until every rank joined; returns the last rank to join."""
        if self._join is None:
            return self.world.rank
        return self._join.join(self._serve)

    def _serve(self, desc: dict) -> None:
        """Take part, as a joined rank, in the described world collective."""
        kind = desc["kind"]
        if kind == "barrier":
            request = self.comm.Ibarrier()
        elif kind == "broadcast":
            request = self.comm.Ibcast(zeros_like_desc(desc), root=desc["root"])
        else:
            request = self.comm.Iallreduce(self._in_place(), zeros_like_desc(desc),
                                           op=self._mpi_op(ReduceOp(desc["op"])))
        self._wait(request, f"a {kind} served after join()")

    def _in_place(self) -> Any:
        if isinstance(self.comm, SelfComm):
            return _IN_PLACE
        from mpi4py import MPI

        return MPI.IN_PLACE

    def allreduce_async_(self, buf: np.ndarray, op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                         prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> _Pending:
        """Start an in-place reduction of a contiguous array; ``wait()`` finishes and scales it.

        As in Horovod, ``buf`` is multiplied by ``prescale_factor`` before the reduction and the result
        by ``postscale_factor`` (and 1/size for Average) after it."""
        comm = self.comm_for(process_set)
        if not buf.flags.c_contiguous:
            raise ValueError("allreduce_async_ needs a contiguous buffer")
        mpi_op = self._mpi_op(op)
        during = self._begin(comm, "allreduce", lambda: {"shape": buf.shape, "dtype": buf.dtype.str,
                                                         "op": parse_op(op).value})
        _scale(buf, prescale_factor)
        request = comm.Iallreduce(self._in_place(), buf, op=mpi_op)
        return _Pending(request, buf, postscale_factor * parse_op(op).postscale(comm.Get_size()), self.wait_timeout,
                        during)

    def allreduce(self, x: np.ndarray, op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                  prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> np.ndarray:
        out = np.ascontiguousarray(x).copy()
        return self.allreduce_async_(out, op, process_set, prescale_factor, postscale_factor).wait()

    def reducescatter(self, x: np.ndarray, op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                      prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> np.ndarray:
        """Reduce ``x`` (same shape on every rank) and return this rank's rows of the result: the first
        dimension split as Horovod does (:func:`split_rows`)."""
        comm = self.comm_for(process_set)
        x = np.ascontiguousarray(x).copy()
        if x.ndim == 0:
            raise ValueError("reducescatter needs a tensor with at least one dimension, got a scalar")
        mpi_op = self._mpi_op(op)
        self._begin(comm, "reducescatter")
        _scale(x, prescale_factor)
        n, me = comm.Get_size(), comm.Get_rank()
        rows = split_rows(x.shape[0], n)
        row = int(np.prod(x.shape[1:], dtype=np.int64))
        out = np.empty((rows[me],) + x.shape[1:], dtype=x.dtype)
        comm.Reduce_scatter(x, out, recvcounts=[r * row for r in rows], op=mpi_op)
        _scale(out, postscale_factor * parse_op(op).postscale(n))
        return out

    def alltoall(self, x: np.ndarray, splits: Sequence[int] | None = None,
                 process_set: ProcessSet = WORLD) -> tuple[np.ndarray, np.ndarray]:
        """Send rows ``splits[i]`` of ``x`` (first dimension, in order) to the set's i-th rank; return
        the received rows concatenated in rank order and how many came from each rank (int32)."""
        comm = self.comm_for(process_set)
        x = np.ascontiguousarray(x)
        n = comm.Get_size()
        if x.ndim == 0:
            raise ValueError("alltoall needs a tensor with at least one dimension, got a scalar")
        if splits is None:
            if x.shape[0] % n:
                raise ValueError(f"alltoall without splits needs a first dimension divisible by {n} ranks, "
                                 f"got {x.shape[0]}")
            splits = [x.shape[0] // n] * n
        splits = [int(v) for v in np.asarray(splits).reshape(-1)]
        if len(splits) != n or min(splits) < 0 or sum(splits) != x.shape[0]:
            raise ValueError(f"alltoall splits {splits} must be {n} non-negative counts summing to the first "
                             f"dimension {x.shape[0]}")
        self._begin(comm, "alltoall")
        received = [int(v) for v in comm.alltoall(splits)]
        row = int(np.prod(x.shape[1:], dtype=np.int64))
        out = np.empty((sum(received),) + x.shape[1:], dtype=x.dtype)
        send_counts, recv_counts = [s * row for s in splits], [r * row for r in received]
        comm.Alltoallv([x, (send_counts, _offsets(send_counts))], [out, (recv_counts, _offsets(recv_counts))])
        return out, np.asarray(received, dtype=np.int32)

    def allgather_object(self, obj: Any, process_set: ProcessSet = WORLD) -> list:
        """Every rank's picklable ``obj``, in rank order."""
        comm = self.comm_for(process_set)
        self._begin(comm, "allgather_object")
        return list(comm.allgather(obj))

    def broadcast(self, x: np.ndarray, root_rank: int, process_set: ProcessSet = WORLD) -> np.ndarray:
        comm = self.comm_for(process_set)
        root = process_set.rank_of(root_rank, self.world.size)
        out = np.ascontiguousarray(x).copy()
        during = self._begin(comm, "broadcast", lambda: {"shape": out.shape, "dtype": out.dtype.str, "root": root})
        self._wait(comm.Ibcast(out, root=root), "an MPI broadcast", during)
        return out

    def _wait(self, request: Any, what: str, during: Callable[[], None] | None = None) -> None:
        """Poll a non-blocking MPI request (signal handlers run; a dead peer ends in a timeout)."""
        wait_until(_polling(request, during), timeout=self.wait_timeout, what=what)

    def allgather(self, x: np.ndarray, process_set: ProcessSet = WORLD) -> np.ndarray:
        """Concatenate every rank's array along the first dimension (first dims may differ)."""
        comm = self.comm_for(process_set)
        x = np.ascontiguousarray(x)
        if x.ndim == 0:
            x = x.reshape(1)
        self._begin(comm, "allgather")
        shapes = comm.allgather(x.shape)
        if any(s[1:] != x.shape[1:] for s in shapes):
            raise ValueError(f"allgather needs equal trailing dimensions, got shapes {shapes}")
        if all(s == x.shape for s in shapes):
            out = np.empty((len(shapes) * x.shape[0],) + x.shape[1:], dtype=x.dtype)
            comm.Allgather(x, out)
            return out
        counts = [int(np.prod(s)) for s in shapes]
        out = np.empty((sum(s[0] for s in shapes),) + x.shape[1:], dtype=x.dtype)
        comm.Allgatherv(x, [out, (counts, _offsets(counts))])
        return out

    def barrier(self, process_set: ProcessSet = WORLD) -> None:
        comm = self.comm_for(process_set)
        during = self._begin(comm, "barrier", lambda: {})
        self._wait(comm.Ibarrier(), "an MPI barrier", during)

    def broadcast_object(self, obj: Any, root_rank: int = 0, process_set: ProcessSet = WORLD) -> Any:
        comm = self.comm_for(process_set)
        self._begin(comm, "broadcast_object")
        return comm.bcast(obj, root=process_set.rank_of(root_rank, self.world.size))


def _offsets(counts: Sequence[int]) -> list[int]:
    return [int(v) for v in np.concatenate([[0], np.cumsum(counts)[:-1]])]


def mpi_world() -> tuple[Any, World]:
    """mpi4py's world communicator and this process's World (local ranks via a shared-memory split)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    cross = comm.Split(local.Get_rank(), comm.Get_rank())   # one rank per host: Horovod's cross communicator
    homogeneous = len(set(comm.allgather(local.Get_size()))) == 1
    world = World(comm.Get_rank(), comm.Get_size(), local.Get_rank(), local.Get_size(), backend="mpi",
                  cross_rank=cross.Get_rank(), cross_size=cross.Get_size(), homogeneous=homogeneous)
    local.Free()
    cross.Free()
    return comm, world


def local_world() -> tuple[SelfComm, World]:
    return SelfComm(), World(0, 1, 0, 1, backend="local")
