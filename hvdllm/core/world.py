"""Facts about the job every adapter reports: rank, size, local rank and local size."""
from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in the job. ``local_*`` count the ranks on this host, ``cross_*`` the hosts."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str = "local"
    cross_rank: int = 0       # this host's index among the hosts (Horovod's cross_rank)
    cross_size: int = 1       # hosts with a rank of this local rank (Horovod's cross_size)
    homogeneous: bool = True  # every host runs the same number of ranks

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"invalid world: rank {self.rank} of size {self.size}")
        if self.local_size < 1 or not 0 <= self.local_rank < self.local_size:
            raise ValueError(f"invalid world: local rank {self.local_rank} of {self.local_size}")

    def threads_per_rank(self, cores: int | None = None) -> int:
        """CPU threads a rank should use so that the ranks on one host share its cores."""
        return max(1, (cores or available_cores()) // self.local_size)

    def core_share(self, allowed: list[int]) -> list[int]:
        """The cores of ``allowed`` (the host's, sorted) this rank is bound to: ``threads_per_rank`` of
        them, local rank r taking the r-th run; with more local ranks than cores they are dealt round
        robin (r % cores), as ``mpirun --bind-to core --map-by core`` would, so each core's ranks are known
        rather than left to the scheduler's migrations."""
        cores = sorted(allowed)
        t = self.threads_per_rank(len(cores))
        start = (self.local_rank * t) % len(cores)
        return [cores[(start + i) % len(cores)] for i in range(t)]


def bind_to_cores(cores: list[int]) -> None:
    """Pin every thread of this process (Horovod's, Gloo's, the framework's pools) and those it starts
    later to ``cores``; Linux only (elsewhere nothing changes)."""
    if not hasattr(os, "sched_setaffinity"):
        return
    tids = [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
    for tid in tids:                                        # the calling thread is one of them
        try:
            os.sched_setaffinity(tid, cores)
        except (ProcessLookupError, PermissionError):     # a thread that just ended
            continue


def allowed_cores() -> list[int]:
    """The cores this process may run on, sorted (its affinity where the OS tells, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def available_cores() -> int:
    """How many cores this process may run on (affinity-aware where the OS tells)."""
    return len(allowed_cores())
