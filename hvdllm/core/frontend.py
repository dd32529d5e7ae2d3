"""The Horovod-style module API (init, rank, size, ...), written once for both adapters.

Each adapter creates one :class:`Frontend` around its backend factory and exports its bound
methods as module functions, so ``hvdllm.torch.rank`` and ``hvdllm.tensorflow.rank`` share code.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from hvdllm.core.ops import Average, ReduceOp, parse_op
from hvdllm.core.process_sets import WORLD, ProcessSet


class Frontend:
    def __init__(self, framework: str, create: Callable[[Any], Any]) -> None:
        self._framework, self._create, self._rt = framework, create, None

    def init(self, process_sets: Sequence[ProcessSet | Sequence[int]] | None = None) -> None:
        """Start the backend (idempotent). ``process_sets`` lists rank subsets for later collectives."""
        if self._rt is None:
            self._rt = self._create(process_sets)

    def is_initialized(self) -> bool:
        return self._rt is not None

    def runtime(self) -> Any:
        """The backend object (implements hvdllm.core.Collectives), for code that passes it explicitly."""
        if self._rt is None:
            raise ValueError(f"hvdllm.{self._framework} has not been initialized; call hvd.init() first")
        return self._rt

    def shutdown(self) -> None:
        if self._rt is not None:
            self._rt.shutdown()
            self._rt = None

    def rank(self) -> int:
        return self.runtime().world.rank

    def size(self) -> int:
        return self.runtime().world.size

    def local_rank(self) -> int:
        return self.runtime().world.local_rank

    def local_size(self) -> int:
        return self.runtime().world.local_size

    def backend(self) -> str:
        """"horovod", "mpi" or "local"."""
        return self.runtime().name

    def threads_per_rank(self) -> int:
        """CPU threads each rank should use so that the ranks on a host share its cores."""
        return self.runtime().world.threads_per_rank()

    def allreduce(self, tensor: Any, op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                  name: str | None = None) -> Any:
        """Reduce ``tensor`` over the ranks (Average by default); returns a new tensor."""
        return self.runtime().allreduce(tensor, parse_op(op), process_set)

    def broadcast(self, tensor: Any, root_rank: int, process_set: ProcessSet = WORLD, name: str | None = None) -> Any:
        """Return root_rank's value of ``tensor`` on every rank."""
        return self.runtime().broadcast(tensor, root_rank, process_set)

    def allgather(self, tensor: Any, process_set: ProcessSet = WORLD, name: str | None = None) -> Any:
        """Concatenate the ranks' tensors along the first dimension (sizes there may differ)."""
        return self.runtime().allgather(tensor, process_set)

    def barrier(self, process_set: ProcessSet = WORLD) -> None:
        self.runtime().barrier(process_set)

    def broadcast_object(self, obj: Any, root_rank: int = 0, process_set: ProcessSet = WORLD,
                         name: str | None = None) -> Any:
        """Return root_rank's picklable ``obj`` on every rank."""
        return self.runtime().broadcast_object(obj, root_rank, process_set)

    def add_process_set(self, process_set: ProcessSet | Sequence[int]) -> ProcessSet:
        """Register a process set after init (a collective call on every rank)."""
        ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
        self.runtime().add_process_set(ps)
        return ps

    def exports(self) -> dict[str, Callable[..., Any]]:
        """The module-level functions an adapter re-exports."""
        names = ("init", "is_initialized", "shutdown", "rank", "size", "local_rank", "local_size", "backend",
                 "threads_per_rank", "allreduce", "broadcast", "allgather", "barrier", "broadcast_object",
                 "add_process_set")
        out = {n: getattr(self, n) for n in names}
        out["collectives"] = self.runtime
        return out
