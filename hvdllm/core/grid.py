"""A dp x tp x pp grid of ranks: coordinates and the process sets of every parallel group.

Rank layout (Megatron's order): the tensor-parallel index varies fastest, then data-parallel, then
pipeline stage::

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

so the ranks of one tensor-parallel group are adjacent (one host, the chattiest traffic) and the
pipeline stages are the outermost blocks. Nothing here is global: a grid is a value that callers
pass explicitly, and :meth:`ProcessGrid.process_sets` lists every set to hand to
``hvd.init(process_sets=...)`` (all ranks must register the same sets in the same order, as Horovod
requires).

A group that spans the whole world is the world set (``ProcessSet(None)``, never registered twice);
a group of one rank is a one-rank set that is not registered: callers skip collectives on it.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

from hvdllm.core.process_sets import WORLD, ProcessSet


@dataclasses.dataclass(frozen=True)
class GridCoord:
    """Where one rank sits: its data-parallel replica, tensor-parallel shard and pipeline stage."""

    dp: int
    tp: int
    pp: int


@dataclasses.dataclass(frozen=True)
class Group:
    """One rank's view of a group: its process set, the members (global ranks) and its index among them.

    Tensor-parallel layers take a Group so they know their shard (``index`` of ``size``) and where to
    reduce (``process_set``); a one-rank group means "no communication".
    """

    process_set: ProcessSet
    members: tuple[int, ...]
    index: int

    @property
    def size(self) -> int:
        return len(self.members)

    @classmethod
    def single(cls) -> "Group":
        """The trivial group of one rank (no parallelism)."""
        return cls(WORLD, (0,), 0)

    @classmethod
    def of(cls, members: tuple[int, ...] | list[int], rank: int, world_size: int) -> "Group":
        """The group with these global ranks, seen from ``rank`` (which must be one of them)."""
        members = tuple(sorted(int(m) for m in members))
        if rank not in members:
            raise ValueError(f"rank {rank} is not a member of group {list(members)}")
        ps = WORLD if len(members) == world_size else ProcessSet(members)
        return cls(ps, members, members.index(rank))


@dataclasses.dataclass(frozen=True)
class ProcessGrid:
    """``dp * tp * pp`` ranks; validated against ``world_size`` when it is given."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    world_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.world_size is not None and self.dp * self.tp * self.pp != self.world_size:
            raise ValueError(
                f"grid dp={self.dp} x tp={self.tp} x pp={self.pp} = {self.dp * self.tp * self.pp} ranks "
                f"does not match the world size {self.world_size}; the product must equal it")

    @classmethod
    def infer(cls, world_size: int, tp: int = 1, pp: int = 1) -> "ProcessGrid":
        """The grid with the given tp and pp whose data-parallel size fills the world."""
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be >= 1")
        for name, value in (("tp", tp), ("pp", pp)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if world_size % (tp * pp):
            raise ValueError(f"tp={tp} x pp={pp} = {tp * pp} does not divide the world size {world_size}; "
                             f"allowed: tp*pp dividing {world_size}")
        return cls(world_size // (tp * pp), tp, pp, world_size)

    @property
    def size(self) -> int:
        return self.dp * self.tp * self.pp

    # -- rank <-> coordinates -------------------------------------------------------------------
    def coords(self, rank: int) -> GridCoord:
        """The (dp, tp, pp) coordinates of a global rank."""
        if not 0 <= rank < self.size:
            raise ValueError(f"rank {rank} is outside the grid of {self.size} ranks (0..{self.size - 1})")
        tp_rank = rank % self.tp
        dp_rank = (rank // self.tp) % self.dp
        return GridCoord(dp_rank, tp_rank, rank // (self.tp * self.dp))

    def rank_of(self, dp: int = 0, tp: int = 0, pp: int = 0) -> int:
        """The global rank at coordinates (dp, tp, pp)."""
        for name, value, limit in (("dp", dp, self.dp), ("tp", tp, self.tp), ("pp", pp, self.pp)):
            if not 0 <= value < limit:
                raise ValueError(f"{name} coordinate {value} is outside 0..{limit - 1}")
        return (pp * self.dp + dp) * self.tp + tp

    # -- groups as member lists ------------------------------------------------------------------
    def dp_members(self, rank: int) -> tuple[int, ...]:
        """Ranks holding the same model shard (same tp, pp): gradients are averaged among them."""
        c = self.coords(rank)
        return tuple(self.rank_of(d, c.tp, c.pp) for d in range(self.dp))

    def tp_members(self, rank: int) -> tuple[int, ...]:
        """Ranks splitting the same layers (same dp, pp): activations are reduced among them."""
        c = self.coords(rank)
        return tuple(self.rank_of(c.dp, t, c.pp) for t in range(self.tp))

    def pp_members(self, rank: int) -> tuple[int, ...]:
        """The stages of one pipeline (same dp, tp), ordered by stage."""
        c = self.coords(rank)
        return tuple(self.rank_of(c.dp, c.tp, s) for s in range(self.pp))

    def all_members(self, kind: str) -> list[tuple[int, ...]]:
        """Every group of one kind ("dp", "tp", "pp", "link" or "embedding"), each listed once."""
        fns = {"dp": self.dp_members, "tp": self.tp_members, "pp": self.pp_members}
        if kind in fns:
            seen: list[tuple[int, ...]] = []
            for r in range(self.size):
                m = fns[kind](r)
                if m not in seen:
                    seen.append(m)
            return seen
        if kind == "link":
            return [(self.rank_of(d, t, s), self.rank_of(d, t, s + 1))
                    for s in range(self.pp - 1) for d in range(self.dp) for t in range(self.tp)]
        if kind == "embedding":
            if self.pp == 1:
                return []
            return [(self.rank_of(d, t, 0), self.rank_of(d, t, self.pp - 1))
                    for d in range(self.dp) for t in range(self.tp)]
        raise ValueError(f"unknown group kind {kind!r}; allowed: dp, tp, pp, link, embedding")

    # -- groups as process sets ------------------------------------------------------------------
    def _set(self, members: tuple[int, ...]) -> ProcessSet:
        return WORLD if len(members) == self.size else ProcessSet(members)

    def dp_group(self, rank: int) -> ProcessSet:
        return self._set(self.dp_members(rank))

    def tp_group(self, rank: int) -> ProcessSet:
        return self._set(self.tp_members(rank))

    def pp_group(self, rank: int) -> ProcessSet:
        return self._set(self.pp_members(rank))

    def link_group(self, rank: int, peer_stage: int) -> ProcessSet:
        """The two-rank set joining ``rank`` with the same (dp, tp) position on an adjacent stage."""
        c = self.coords(rank)
        if abs(peer_stage - c.pp) != 1 or not 0 <= peer_stage < self.pp:
            raise ValueError(f"stage {peer_stage} is not adjacent to stage {c.pp} (pp={self.pp})")
        return self._set(tuple(sorted((rank, self.rank_of(c.dp, c.tp, peer_stage)))))

    def embedding_group(self, rank: int) -> ProcessSet:
        """First and last stage of this rank's pipeline: they share the tied token embedding."""
        m = self.pp_members(rank)
        return self._set((m[0], m[-1]) if self.pp > 1 else (rank,))

    def group(self, kind: str, rank: int) -> Group:
        """This rank's "dp", "tp" or "pp" group as a :class:`Group` (members, process set, index)."""
        fns = {"dp": self.dp_members, "tp": self.tp_members, "pp": self.pp_members}
        if kind not in fns:
            raise ValueError(f"unknown group kind {kind!r}; allowed: dp, tp, pp")
        members = fns[kind](rank)
        return Group(self._set(members), members, members.index(rank))

    def process_sets(self) -> list[ProcessSet]:
        """Every multi-rank group short of the whole world, deduplicated, in a fixed order."""
        out: list[ProcessSet] = []
        for kind in ("tp", "dp", "pp", "link", "embedding"):
            for members in self.all_members(kind):
                if 1 < len(members) < self.size:
                    ps = ProcessSet(members)
                    if ps not in out:
                        out.append(ps)
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.size))

    def describe(self, rank: int) -> str:
        c = self.coords(rank)
        return f"rank {rank}: dp {c.dp}/{self.dp}, tp {c.tp}/{self.tp}, pp {c.pp}/{self.pp}"
