"""Process sets: named subsets of ranks that run their own collectives (Horovod's concept)."""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence


@dataclasses.dataclass(frozen=True)
class ProcessSet:
    """An ordered, duplicate-free subset of global ranks. ``ranks=None`` means the whole world."""

    ranks: tuple[int, ...] | None = None

    def __init__(self, ranks: Iterable[int] | None = None) -> None:
        if ranks is not None:
            ranks = tuple(sorted(int(r) for r in ranks))
            if not ranks:
                raise ValueError("a process set needs at least one rank")
            if len(set(ranks)) != len(ranks) or ranks[0] < 0:
                raise ValueError(f"invalid process set ranks {list(ranks)}: need distinct ranks >= 0")
        object.__setattr__(self, "ranks", ranks)

    def members(self, world_size: int) -> tuple[int, ...]:
        """The global ranks in this set for a world of ``world_size`` ranks."""
        if self.ranks is None:
            return tuple(range(world_size))
        if self.ranks[-1] >= world_size:
            raise ValueError(f"process set {list(self.ranks)} names a rank >= world size {world_size}")
        return self.ranks

    def included(self, rank: int, world_size: int) -> bool:
        return rank in self.members(world_size)

    def rank_of(self, rank: int, world_size: int) -> int:
        """This global rank's position inside the set."""
        members = self.members(world_size)
        if rank not in members:
            raise ValueError(f"rank {rank} is not in process set {list(members)}")
        return members.index(rank)

    def size(self, world_size: int) -> int:
        return len(self.members(world_size))


WORLD = ProcessSet(None)


def normalize_process_sets(sets: Sequence[ProcessSet | Sequence[int]] | None) -> list[ProcessSet]:
    """Accept ProcessSet objects or plain rank lists, as ``init(process_sets=...)`` does."""
    out: list[ProcessSet] = []
    for s in sets or []:
        ps = s if isinstance(s, ProcessSet) else ProcessSet(getattr(s, "ranks", s))
        if ps not in out and ps.ranks is not None:
            out.append(ps)
    return out
