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


def available_cores() -> int:
    """Cores this process may run on (affinity-aware where the OS tells)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
