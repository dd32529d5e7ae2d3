"""The Horovod-style module API (init, rank, size, ...), written once for both adapters.

Each adapter's ``basics`` module holds its one :class:`Frontend` (around the adapter's backend factory)
and binds its methods to module names, which the adapter's ``__init__`` re-exports: so
``hvdllm.torch.rank`` and ``hvdllm.tensorflow.rank`` share code, and every submodule reaches the
backend through ``basics`` without importing its package.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from hvdllm.core.collectives import Collectives, Handle
from hvdllm.core.horovod_api import HorovodApi, _ps
from hvdllm.core.ops import resolve_op
from hvdllm.core.process_sets import WORLD, ProcessSet
from hvdllm.core.world import allowed_cores, bind_to_cores


class Frontend(HorovodApi):
    """One adapter's Horovod-style API over the backend its ``init`` starts (``create(process_sets)``)."""

    def __init__(self, framework: str, create: Callable[[Any], Any],
                 is_tensor: Callable[[Any], bool] | None = None) -> None:
        self._framework, self._create, self._backend = framework, create, None
        self._process_sets: Any = None
        self._is_tensor = is_tensor

    def _tensor(self, op: str, tensor: Any) -> Any:
        """``tensor`` when the adapter accepts it for ``op``; else a TypeError naming what was passed."""
        if self._is_tensor is not None and not self._is_tensor(tensor):
            raise TypeError(f"hvd.{op}: expected a {self._framework} tensor, got {type(tensor).__name__} "
                            f"{str(tensor)[:40]}")
        return tensor

    def init(self, comm: Any = None, process_sets: Sequence[ProcessSet | Sequence[int]] | None = None) -> None:
        """Start the backend (idempotent). ``process_sets`` lists rank subsets for later collectives.

        Horovod's signature. ``comm`` (Horovod: an mpi4py communicator or a list of ranks to run on) may
        name the whole launched world (``MPI.COMM_WORLD``, ``list(range(size))``); hvdllm runs every
        launched rank, so a subset is a ValueError (launch only the ranks you need, or use a process
        set). A list of process sets passed first, as ``init([ps])`` did before ``comm`` existed, still
        means ``process_sets``.
        """
        if process_sets is None and _looks_like_process_sets(comm):
            comm, process_sets = None, comm
        if self._backend is None:
            backend = self._create(process_sets)
            problem = _comm_problem(comm, backend.world.rank, backend.world.size)
            if problem:
                backend.shutdown()
                raise ValueError(problem)
            self._backend, self._process_sets = backend, process_sets

    def is_initialized(self) -> bool:
        return self._backend is not None

    def collectives(self) -> Collectives:
        """The backend object (implements :class:`hvdllm.core.collectives.Collectives`), for code that
        passes it explicitly."""
        if self._backend is None:
            raise ValueError(f"hvdllm.{self._framework} has not been initialized; call hvd.init() first")
        return self._backend

    def shutdown(self) -> None:
        if self._backend is not None:
            self._backend.shutdown()
            self._backend = None

    def reinit(self) -> None:
        """Shut the backend down and start it again with the same process sets: an elastic reset,
        after which rank and size reflect the new set of workers."""
        process_sets = self._process_sets
        self.shutdown()
        self.init(process_sets=process_sets)

    def rank(self) -> int:
        return self.collectives().world.rank

    def size(self) -> int:
        return self.collectives().world.size

    def local_rank(self) -> int:
        return self.collectives().world.local_rank

    def local_size(self) -> int:
        return self.collectives().world.local_size

    def backend(self) -> str:
        """"horovod", "mpi" or "local"."""
        return self.collectives().name

    def threads_per_rank(self) -> int:
        """CPU threads each rank should use so that the ranks on a host share its cores."""
        return self.collectives().world.threads_per_rank()

    def bind_to_cores(self) -> list[int]:
        """Pin this rank to its share of the host's cores (:meth:`World.core_share`; call once, after
        init) and return the cores; the caller runs ``len(cores)`` compute threads."""
        cores = self.collectives().world.core_share(allowed_cores())
        bind_to_cores(cores)
        return cores

    # ``name``: Horovod matches ops across ranks by name (unnamed ones are numbered per process, so ranks
    # that issue different numbers of ops must name the ones they share); mpi/local match by call order.
    def allreduce(self, tensor: Any, op: Any = None, process_set: Any = WORLD, name: str | None = None, *,
                  average: Any = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> Any:
        """Reduce ``tensor`` over the ranks (Average by default); returns a new tensor. Horovod's
        deprecated ``average=`` (also as a bool second argument) and scale factors are accepted."""
        return self.collectives().allreduce(self._tensor("allreduce", tensor), resolve_op(op, average),
                                            _ps(process_set), name, prescale_factor, postscale_factor)

    def allreduce_async_(self, tensor: Any, op: Any = None, process_set: Any = WORLD,
                         name: str | None = None, *, average: Any = None, prescale_factor: float = 1.0,
                         postscale_factor: float = 1.0) -> Handle:
        """Start a reduction of ``tensor`` (in place where the framework's tensors are mutable); the
        returned handle's ``wait()`` (or ``synchronize(handle)``) completes it and returns the result."""
        return self.collectives().allreduce_async_(self._tensor("allreduce_async_", tensor), resolve_op(op, average),
                                                   _ps(process_set), name, prescale_factor, postscale_factor)

    def grouped_allreduce(self, tensors: Sequence[Any], op: Any = None, process_set: Any = WORLD,
                          name: str | None = None, *, average: Any = None, prescale_factor: float = 1.0,
                          postscale_factor: float = 1.0) -> list:
        """Reduce several tensors as one operation; returns the reduced tensors in order."""
        return self.collectives().grouped_allreduce(list(tensors), resolve_op(op, average), _ps(process_set), name,
                                                    prescale_factor, postscale_factor)

    def broadcast(self, tensor: Any, root_rank: int, process_set: ProcessSet = WORLD, name: str | None = None) -> Any:
        """Return root_rank's value of ``tensor`` on every rank."""
        return self.collectives().broadcast(self._tensor("broadcast", tensor), root_rank, process_set, name=name)

    def allgather(self, tensor: Any, process_set: ProcessSet = WORLD, name: str | None = None) -> Any:
        """Concatenate the ranks' tensors along the first dimension (sizes there may differ)."""
        return self.collectives().allgather(self._tensor("allgather", tensor), process_set, name=name)

    def barrier(self, process_set: ProcessSet = WORLD) -> None:
        self.collectives().barrier(process_set)

    def broadcast_object(self, obj: Any, root_rank: int = 0, process_set: ProcessSet = WORLD,
                         name: str | None = None) -> Any:
        """Return root_rank's picklable ``obj`` on every rank."""
        return self.collectives().broadcast_object(obj, root_rank, process_set, name=name)

    def add_process_set(self, process_set: ProcessSet | Sequence[int]) -> ProcessSet:
        """Register a process set after init (a collective call on every rank)."""
        ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
        self.collectives().add_process_set(ps)
        return ps


def _looks_like_process_sets(value: Any) -> bool:
    """A non-empty sequence of ProcessSets or of rank lists (``comm`` as a list of ranks holds ints)."""
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(v, ProcessSet) or (isinstance(v, (list, tuple)) and not isinstance(v, str)) for v in value)


def _comm_problem(comm: Any, rank: int, size: int) -> str:
    """Why ``comm`` (Horovod's ``init(comm=...)``) is not the whole world of ``size`` ranks ('' if it is)."""
    if comm is None:
        return ""
    if hasattr(comm, "Get_size") and hasattr(comm, "Get_rank"):
        if (comm.Get_size(), comm.Get_rank()) == (size, rank):
            return ""
        return (f"init(comm=<communicator of {comm.Get_size()} ranks, this one {comm.Get_rank()}>): hvdllm runs "
                f"on every launched rank ({size}); allowed: comm=None or the world communicator (use a process "
                "set for a subset of ranks)")
    if isinstance(comm, (list, tuple)) and all(isinstance(r, int) and not isinstance(r, bool) for r in comm):
        if sorted(comm) == list(range(size)):
            return ""
        return (f"init(comm={list(comm)}): hvdllm runs on every launched rank; allowed: None or all ranks "
                f"{list(range(size))} (use a process set for a subset of ranks)")
    return (f"init(comm={comm!r}): allowed: None, an mpi4py communicator of the whole world, or the list of "
            "all ranks")
