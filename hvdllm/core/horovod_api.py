"""Horovod's collective API beyond the basics (async handles, grouped, alltoall, reducescatter, join,
queries), with horovod.torch 0.28.1's argument names and order; mixed into core.frontend.Frontend.

Every call forwards to the backend (core.collectives.Collectives); ``average=`` and ``op=`` resolve as
in Horovod (core.ops.resolve_op), and async forms return handles for ``poll``/``synchronize``.
"""
from __future__ import annotations

from typing import Any, Sequence

from hvdllm.core.collectives import Collectives, Handle
from hvdllm.core.ops import Average, ReduceOp, require_scatterable, resolve_op
from hvdllm.core.process_sets import WORLD, ProcessSet


def _ps(process_set: Any) -> ProcessSet:
    """Horovod accepts process-set objects; hvdllm's are ProcessSet (anything with ``ranks`` converts)."""
    if isinstance(process_set, ProcessSet):
        return process_set
    return ProcessSet(getattr(process_set, "ranks", process_set))


class HorovodApi:
    """The methods below need ``collectives()`` from the class they are mixed into."""

    def collectives(self) -> Collectives:
        raise NotImplementedError

    def _reduce(self, kind: str, tensors: Any, average: Any, name: str | None, op: Any, prescale_factor: float,
                postscale_factor: float, process_set: Any, default: ReduceOp = Average) -> Any:
        op = resolve_op(op, average, default)
        if "reducescatter" in kind:
            require_scatterable(op)
        return self.collectives().start(kind, tensors, op, _ps(process_set), name, prescale_factor, postscale_factor)

    def allreduce_async(self, tensor: Any, average: Any = None, name: str | None = None, op: Any = None,
                        prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                        process_set: Any = WORLD) -> Handle:
        """Start a reduction returning a new tensor; ``synchronize(handle)`` returns it."""
        return self._reduce("allreduce", tensor, average, name, op, prescale_factor, postscale_factor, process_set)

    def allreduce_(self, tensor: Any, average: Any = None, name: str | None = None, op: Any = None,
                   prescale_factor: float = 1.0, postscale_factor: float = 1.0, process_set: Any = WORLD) -> Any:
        """Reduce ``tensor`` in place and return it."""
        return self._reduce("allreduce_", tensor, average, name, op, prescale_factor, postscale_factor,
                            process_set).wait()

    def grouped_allreduce_async(self, tensors: Sequence[Any], average: Any = None, name: str | None = None,
                                op: Any = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                                process_set: Any = WORLD) -> Handle:
        return self._reduce("grouped_allreduce", list(tensors), average, name, op, prescale_factor,
                            postscale_factor, process_set)

    def grouped_allreduce_async_(self, tensors: Sequence[Any], average: Any = None, name: str | None = None,
                                 op: Any = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                                 process_set: Any = WORLD) -> Handle:
        return self._reduce("grouped_allreduce_", list(tensors), average, name, op, prescale_factor,
                            postscale_factor, process_set)

    def grouped_allreduce_(self, tensors: Sequence[Any], average: Any = None, name: str | None = None,
                           op: Any = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                           process_set: Any = WORLD) -> list:
        return self.grouped_allreduce_async_(tensors, average, name, op, prescale_factor, postscale_factor,
                                             process_set).wait()

    def allgather_async(self, tensor: Any, name: str | None = None, process_set: Any = WORLD) -> Handle:
        return self.collectives().start("allgather", tensor, _ps(process_set), name)

    def grouped_allgather_async(self, tensors: Sequence[Any], name: str | None = None,
                                process_set: Any = WORLD) -> Handle:
        return self.collectives().start("grouped_allgather", list(tensors), _ps(process_set), name)

    def grouped_allgather(self, tensors: Sequence[Any], name: str | None = None, process_set: Any = WORLD) -> list:
        """Allgather each tensor (first dimensions may differ per rank) as one operation."""
        return self.collectives().grouped_allgather(list(tensors), _ps(process_set), name)

    def broadcast_async(self, tensor: Any, root_rank: int, name: str | None = None,
                        process_set: Any = WORLD) -> Handle:
        return self.collectives().start("broadcast", tensor, root_rank, _ps(process_set), name)

    def broadcast_async_(self, tensor: Any, root_rank: int, name: str | None = None,
                         process_set: Any = WORLD) -> Handle:
        return self.collectives().start("broadcast_", tensor, root_rank, _ps(process_set), name)

    def alltoall_async(self, tensor: Any, splits: Any = None, name: str | None = None,
                       process_set: Any = WORLD) -> Handle:
        """``synchronize`` returns (received tensor, received splits)."""
        return self.collectives().start("alltoall", tensor, splits, _ps(process_set), name)

    def alltoall(self, tensor: Any, splits: Any = None, name: str | None = None, process_set: Any = WORLD) -> Any:
        """Send ``splits[i]`` first-dimension rows to rank i (equal parts without ``splits``); returns the
        received rows in rank order, and with ``splits`` also how many came from each rank (Horovod)."""
        out, received = self.collectives().alltoall(tensor, splits, _ps(process_set), name)
        return out if splits is None else (out, received)

    def reducescatter_async(self, tensor: Any, name: str | None = None, op: Any = Average,
                            process_set: Any = WORLD, prescale_factor: float = 1.0,
                            postscale_factor: float = 1.0) -> Handle:
        return self._reduce("reducescatter", tensor, None, name, op, prescale_factor, postscale_factor, process_set)

    def reducescatter(self, tensor: Any, name: str | None = None, compression: Any = None, op: Any = Average,
                      process_set: Any = WORLD, prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> Any:
        """Reduce over the ranks and return this rank's share of the first dimension (earlier ranks get
        the extra rows of an uneven split, as in Horovod). ``compression`` must be none."""
        _no_compression(compression)
        return self.reducescatter_async(tensor, name, op, process_set, prescale_factor, postscale_factor).wait()

    def grouped_reducescatter_async(self, tensors: Sequence[Any], name: str | None = None, op: Any = Average,
                                    process_set: Any = WORLD, prescale_factor: float = 1.0,
                                    postscale_factor: float = 1.0) -> Handle:
        return self._reduce("grouped_reducescatter", list(tensors), None, name, op, prescale_factor,
                            postscale_factor, process_set)

    def grouped_reducescatter(self, tensors: Sequence[Any], name: str | None = None, compression: Any = None,
                              op: Any = Average, process_set: Any = WORLD, prescale_factor: float = 1.0,
                              postscale_factor: float = 1.0) -> list:
        _no_compression(compression)
        return self.grouped_reducescatter_async(tensors, name, op, process_set, prescale_factor,
                                                postscale_factor).wait()

    @staticmethod
    def poll(handle: Handle) -> bool:
        """True once the asynchronous op behind ``handle`` has completed."""
        return bool(handle.poll())

    @staticmethod
    def synchronize(handle: Handle) -> Any:
        """Wait for the asynchronous op behind ``handle`` and return its result."""
        return handle.wait()

    def join(self, device: int = -1) -> int:
        """Mark this rank done with its data; blocks until every rank joined and returns the last one."""
        return self.collectives().join(device)

    def allgather_object(self, obj: Any, name: str | None = None, process_set: Any = WORLD) -> list:
        """Every rank's picklable ``obj``, in rank order."""
        return self.collectives().allgather_object(obj, _ps(process_set), name=name)

    def remove_process_set(self, process_set: Any) -> bool:
        """Unregister a process set (a collective call on every rank); False if it was not registered."""
        return self.collectives().remove_process_set(_ps(process_set))

    def cross_rank(self) -> int:
        return self.collectives().world.cross_rank

    def cross_size(self) -> int:
        return self.collectives().world.cross_size

    def is_homogeneous(self) -> bool:
        return self.collectives().world.homogeneous

    def start_timeline(self, file_path: str, mark_cycles: bool = False) -> None:
        """Record this job's collectives into a Chrome-trace JSON at ``file_path`` (call on every rank).
        Horovod backend: Horovod's timeline; mpi/local: one event per collective (hvdllm.core.timeline)."""
        self.collectives().start_timeline(file_path, mark_cycles)

    def stop_timeline(self) -> None:
        """Stop recording and write the file (rank 0 writes every rank's events; call on every rank)."""
        self.collectives().stop_timeline()

    def mpi_enabled(self) -> bool:
        return self.collectives().controller_enabled("mpi")

    def gloo_enabled(self) -> bool:
        return self.collectives().controller_enabled("gloo")

    def mpi_threads_supported(self) -> bool:
        return self.collectives().mpi_threads_supported()


def _no_compression(compression: Any) -> None:
    if compression is not None and getattr(compression, "name", compression) not in ("none", None):
        raise ValueError(f"compression={compression!r} is not supported on reducescatter; allowed: "
                         "Compression.none")
