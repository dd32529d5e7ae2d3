"""Framework-free halves of the adapters' backends (hvdllm.core.collectives.Collectives): process-set
bookkeeping, Horovod's environment defaults and starting the backend hvdllm.core.backend chose.

The torch and TF adapters subclass these and add only their tensor conversions, so the rules (which
process sets exist, how ops map onto Horovod's, which backend a job gets) are written once here.
"""
from __future__ import annotations

import atexit
import os
from typing import Any, Callable, Sequence

from hvdllm.core import backend as core_backend
from hvdllm.core import launch
from hvdllm.core.collectives import Done, Handle, NumpyCollectives, local_world, mpi_world
from hvdllm.core.failure import (ExitGuard, install_abort_on_failure, install_exit_guard,
                                 uninstall_abort_on_failure)
from hvdllm.core.ops import Average, ReduceOp, parse_op
from hvdllm.core.process_sets import WORLD, ProcessSet, normalize_process_sets
from hvdllm.core import timeline as tl
from hvdllm.core.waiting import DEFAULT_WAIT_TIMEOUT_S, wait_timeout
from hvdllm.core.world import World


# Horovod's background thread negotiates every HOROVOD_CYCLE_TIME ms (default 1) even when idle; on a
# CPU-only host those cycles run on the cores the ranks compute on. For data parallelism (a few large
# reductions per step) 20 ms cuts the thread's CPU per step several-fold (bench/torch_dp.py) for at most
# 20 ms more latency on the step's last bucket. Jobs that register
# process sets (tensor/pipeline parallel grids) issue many small, latency-bound collectives per step
# and keep Horovod's default, as do hosts with accelerators (their host cores are free). A job counts
# as model parallel when it passes ``process_sets`` to init at all, even an empty list: a pipeline of
# two stages on two ranks needs no process set but sends latency-bound activations every micro-batch.
CPU_CYCLE_TIME_MS = "20"
# Horovod's stall inspector (rank 0) warns after HOROVOD_STALL_CHECK_TIME_SECONDS (60) when some ranks
# submitted a tensor the others did not; its shutdown is off by default, which leaves such a job hung
# forever. hvdllm turns it on with the same deadline as its own waits (hvdllm.core.waiting).
STALL_SHUTDOWN_S = str(int(DEFAULT_WAIT_TIMEOUT_S))


def horovod_env_defaults(has_accelerator: bool, model_parallel: bool) -> dict[str, str]:
    """Environment defaults hvdllm gives Horovod before its init; a value the user set always wins."""
    # HOROVOD_TIMELINE=DYNAMIC lets hvd.start_timeline() work at any time (Horovod refuses it otherwise)
    defaults = {"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": STALL_SHUTDOWN_S, tl.ENV: tl.DYNAMIC}
    if not (has_accelerator or model_parallel):
        defaults["HOROVOD_CYCLE_TIME"] = CPU_CYCLE_TIME_MS
    return defaults


class HorovodBase:
    """Horovod initialised with the registered process sets; ``hvd`` is horovod.torch or horovod.tensorflow."""

    name = "horovod"

    def __init__(self, hvd: Any, process_sets: Sequence[ProcessSet], has_accelerator: bool,
                 model_parallel: bool) -> None:
        self.hvd = hvd
        for key, value in horovod_env_defaults(has_accelerator, model_parallel).items():
            os.environ.setdefault(key, value)
        self._sets = {ps: hvd.ProcessSet(list(ps.ranks)) for ps in process_sets}
        hvd.init(process_sets=list(self._sets.values()) or None)
        self._sets[WORLD] = hvd.global_process_set
        self.world = World(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), backend="horovod",
                           cross_rank=hvd.cross_rank(), cross_size=hvd.cross_size(),
                           homogeneous=hvd.mpi_ops.is_homogeneous())   # horovod.torch exports it there only
        self.wait_timeout = wait_timeout()
        install_abort_on_failure(self.world.rank, self.world.size)

    def _ps(self, ps: ProcessSet) -> Any:
        if ps not in self._sets:
            raise ValueError(f"process set {ps.ranks} was not registered: pass it to init(process_sets=[...])")
        return self._sets[ps]

    def _op(self, op: ReduceOp) -> Any:
        op = parse_op(op)
        if op is ReduceOp.ADASUM and not self.hvd.mpi_enabled():
            raise ValueError("hvd.Adasum needs Horovod's MPI controller (horovodrun --mpi); this job runs Gloo")
        return getattr(self.hvd, op.name.capitalize())   # hvd.Average, hvd.Sum, hvd.Min, ...

    def allgather_object(self, obj: Any, process_set: ProcessSet = WORLD, name: str | None = None) -> list:
        """horovod.torch's allgather_object has no process set: inside one, each member broadcasts."""
        name = name or "hvdllm.allgather_object"
        if process_set == WORLD:
            return self.hvd.allgather_object(obj, name=name)
        self._ps(process_set)
        return [self.broadcast_object(obj if root == self.world.rank else None, root, process_set, f"{name}.{root}")
                for root in process_set.members(self.world.size)]

    def process_set_of(self, process_set_id: int) -> ProcessSet:
        """The registered set Horovod numbers ``process_set_id`` (0: the whole world)."""
        for ps, hps in self._sets.items():
            if hps.process_set_id == process_set_id:
                return ps
        raise ValueError(f"process_set_id={process_set_id!r} is not a registered process set")

    def remove_process_set(self, ps: ProcessSet) -> bool:
        if ps == WORLD or ps not in self._sets:
            return False
        return bool(self.hvd.remove_process_set(self._sets.pop(ps)))

    def controller_enabled(self, controller: str) -> bool:
        return bool(getattr(self.hvd, f"{controller}_enabled")())

    def mpi_threads_supported(self) -> bool:
        return bool(self.hvd.mpi_enabled() and self.hvd.mpi_threads_supported())   # Horovod raises under Gloo

    def broadcast_object(self, obj: Any, root_rank: int = 0, process_set: ProcessSet = WORLD,
                         name: str | None = None) -> Any:
        # A fixed default name: Horovod's is type(obj).__name__, which differs when non-root ranks pass
        # None (the usual idiom), and ops of different names never match up: a deadlock.
        return self.hvd.broadcast_object(obj, root_rank, name=name or "hvdllm.broadcast_object",
                                         process_set=self._ps(process_set))

    def add_process_set(self, ps: ProcessSet) -> None:
        if ps not in self._sets:
            self._sets[ps] = self.hvd.add_process_set(list(ps.ranks))

    def start_timeline(self, file_path: str, mark_cycles: bool = False) -> None:
        """Horovod's own timeline (its background thread records negotiation and processing phases)."""
        self.hvd.start_timeline(os.fspath(file_path), mark_cycles)

    def stop_timeline(self) -> None:
        self.hvd.stop_timeline()

    def shutdown(self) -> None:
        uninstall_abort_on_failure()
        self.hvd.shutdown()


# The collective methods the timeline records on the mpi and local backends, and their tensor argument.
TRACED = {"allreduce": "x", "allreduce_async_": "x", "grouped_allreduce": "xs", "broadcast": "x",
          "allgather": "x", "grouped_allgather": "xs", "alltoall": "x", "reducescatter": "x",
          "grouped_reducescatter": "xs", "barrier": "", "broadcast_object": "obj", "allgather_object": "obj"}


class NumpyBase:
    """The mpi and local backends: the core's numpy collectives behind an adapter's tensor conversions.

    Every collective method (:data:`TRACED`), here or in an adapter's subclass, records a timeline event
    while ``start_timeline`` (or ``HOROVOD_TIMELINE``) is recording (hvdllm.core.timeline)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for method, arg in TRACED.items():
            fn = getattr(cls, method, None)
            if fn is not None and not getattr(fn, "traced", False):
                setattr(cls, method, tl.traced(method.rstrip("_").removesuffix("_async"), arg)(fn))

    def __init__(self, name: str, process_sets: Sequence[ProcessSet]) -> None:
        self.name = name
        comm, self.world = mpi_world() if name == "mpi" else local_world()
        self.impl = NumpyCollectives(comm, self.world, process_sets, wait_timeout=wait_timeout())
        self.timeline = tl.Timeline(self.world.rank)
        install_abort_on_failure(self.world.rank, self.world.size)
        if tl.env_path():              # Horovod's HOROVOD_TIMELINE: record from init, written at shutdown/exit
            self.start_timeline(tl.env_path(), tl.env_mark_cycles())
            atexit.register(self._stop_at_exit)
        if name == "mpi" and self.world.size > 1 and not NumpyBase._exit_guarded:
            # a rank's exit must not hang the others (sys.exit(n), or leaving early): hvdllm.core.failure
            NumpyBase._exit_guarded = True
            install_exit_guard(ExitGuard(self.world.rank, self.world.size, comm.Dup().Ibarrier, wait_timeout()))

    _exit_guarded = False   # (one guard per process, however often init() runs)

    def start_timeline(self, file_path: str, mark_cycles: bool = False) -> None:
        """Record each collective of this rank from now on (every rank calls it, as in Horovod)."""
        self.timeline.start(file_path, mark_cycles)

    def stop_timeline(self) -> None:
        """Stop recording; rank 0 gathers every rank's events and writes the file (a collective call)."""
        if not self.timeline.active:
            return
        path, part = self.timeline.path, self.timeline.take()
        parts = self.impl.allgather_object(part)
        if self.world.rank == 0:
            tl.write_atomically(path, tl.trace(parts))

    def _stop_at_exit(self) -> None:
        if self.timeline.active:
            self.stop_timeline()

    def barrier(self, process_set: ProcessSet = WORLD) -> None:
        self.impl.barrier(process_set)

    def grouped_allreduce(self, xs: Sequence[Any], op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                          name: str | None = None, prescale_factor: float = 1.0,
                          postscale_factor: float = 1.0) -> list:
        """One reduction per tensor, in order (MPI matches them by order, as one group would)."""
        return [self.allreduce(x, op, process_set, None, prescale_factor, postscale_factor) for x in xs]

    def grouped_allgather(self, xs: Sequence[Any], process_set: ProcessSet = WORLD, name: str | None = None) -> list:
        return [self.allgather(x, process_set) for x in xs]

    def grouped_reducescatter(self, xs: Sequence[Any], op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                              name: str | None = None, prescale_factor: float = 1.0,
                              postscale_factor: float = 1.0) -> list:
        return [self.reducescatter(x, op, process_set, None, prescale_factor, postscale_factor) for x in xs]

    def start(self, kind: str, *args: Any, **kwargs: Any) -> Handle:
        """MPI's blocking collectives complete here; the handle holds the result (in-place kinds are the
        adapter's ``_in_place``)."""
        if kind.endswith("_"):
            return Done(self._in_place(kind[:-1], *args, **kwargs))
        return Done(getattr(self, kind)(*args, **kwargs))

    def allgather_object(self, obj: Any, process_set: ProcessSet = WORLD, name: str | None = None) -> list:
        return self.impl.allgather_object(obj, process_set)

    def join(self, device: int = -1) -> int:
        """The last rank to join (hvdllm.core.join: joined ranks serve allreduce, broadcast and barrier)."""
        return self.impl.join()

    def process_set_of(self, process_set_id: int) -> ProcessSet:
        """The registered set numbered ``process_set_id`` (0: the world; then in registration order, as
        Horovod numbers them)."""
        return self.impl.process_set_of(process_set_id)

    def remove_process_set(self, ps: ProcessSet) -> bool:
        return self.impl.remove_process_set(ps)

    def controller_enabled(self, controller: str) -> bool:
        return controller == "mpi" and self.name == "mpi"

    def mpi_threads_supported(self) -> bool:
        if self.name != "mpi":
            return False
        from mpi4py import MPI

        return MPI.Query_thread() == MPI.THREAD_MULTIPLE

    def broadcast_object(self, obj: Any, root_rank: int = 0, process_set: ProcessSet = WORLD,
                         name: str | None = None) -> Any:
        return self.impl.broadcast_object(obj, root_rank, process_set)

    def add_process_set(self, ps: ProcessSet) -> None:
        self.impl.add_process_set(ps)

    def shutdown(self) -> None:
        self.stop_timeline()
        uninstall_abort_on_failure()


BUILD_QUERIES = ("mpi_built", "gloo_built", "nccl_built", "ddl_built", "ccl_built", "cuda_built", "rocm_built")


def built(query: str, horovod_module: Callable[[], Any]) -> bool:
    """Horovod's ``*_built()`` answer where Horovod is installed for the framework (``horovod_module()``
    returns it, or None); without Horovod only MPI (mpi4py, the mpi backend) can be built."""
    if query not in BUILD_QUERIES:
        raise ValueError(f"unknown build query {query!r}; allowed: {', '.join(BUILD_QUERIES)}")
    hvd = horovod_module()
    if hvd is not None and bool(getattr(hvd, query)()):
        return True
    return query == "mpi_built" and core_backend.module_available("mpi4py")


def build_query(query: str, horovod_module: Callable[[], Any]) -> Callable[[], bool]:
    """The adapter's module function ``query`` (e.g. ``hvd.mpi_built``), see :func:`built`."""
    def answer() -> bool:
        return built(query, horovod_module)

    answer.__name__ = answer.__qualname__ = query
    return answer


def create_backend(process_sets: Sequence[ProcessSet | Sequence[int]] | None,
                   horovod_available: Callable[[], bool],
                   horovod_cls: Callable[[Sequence[ProcessSet], bool], Any],
                   numpy_cls: Callable[[str, Sequence[ProcessSet]], Any]) -> Any:
    """Discover the backend (see hvdllm.core.backend) and initialise the adapter's class for it."""
    sets = normalize_process_sets(process_sets)
    name = core_backend.choose_backend(horovod_available, lambda: core_backend.module_available("mpi4py"))
    if name == "horovod":
        runtime = horovod_cls(sets, process_sets is not None)   # init(process_sets=...) marks a grid job
    else:
        runtime = numpy_cls(name, sets)
    if name != "local":      # a backend that joined fewer ranks than were launched: independent jobs
        launch.check_world(launch.detect(), runtime.world.size, name)
    return runtime
