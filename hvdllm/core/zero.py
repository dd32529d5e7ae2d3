"""ZeRO partitioning: which part of each gradient bucket's flat space a data-parallel rank owns.

ZeRO (stages 1 and 2) shards the optimizer over the N ranks of a data-parallel group. The unit is a
gradient bucket (:func:`hvdllm.core.buckets.plan_buckets`): its flat space (the bucket's tensors back
to back, ``numel`` elements) is padded to ``N * shard_numel`` elements, ``shard_numel = ceil(numel /
N)``, and rank r owns the contiguous range ``[r * shard_numel, (r + 1) * shard_numel)``. Padding only
ever falls at the end of the last ranks' shards; it holds zeros and is never copied back. The equal
shard length is what reducescatter (stage 2: each rank receives its shard of the summed gradient)
and allgather (both stages: the updated shards back into every replica) need.

A shard crosses tensor boundaries: :func:`pieces` maps it to ``(tensor, offset in the tensor,
offset in the shard, length)`` pieces, which the adapters use to copy parameters into the shard,
to cut unsplit (per-name) optimizer state into shards at load, and to attribute a shard's gradient
to its tensors (per-tensor squared norms for tensor/pipeline-parallel clipping); a piece's
:attr:`Piece.in_tensor` and :attr:`Piece.in_shard` slices are that copy arithmetic, written once for
every adapter. Buckets never mix param groups, so a shard's pieces share one group's hyperparameters.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from hvdllm.core.buckets import Bucket

STAGES = (0, 1, 2)


def parse_stage(value: object) -> int:
    """A validated ZeRO stage: 0 (replicated), 1 (optimizer state sharded) or 2 (gradients too)."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in STAGES:
        raise ValueError(f"zero_stage={value!r} is not supported; allowed: 0 (replicated), 1 (optimizer state "
                         "sharded), 2 (optimizer state and gradients sharded)")
    return value


@dataclasses.dataclass(frozen=True)
class Piece:
    """Part of one tensor inside a shard: ``length`` elements of the flattened tensor ``index`` from
    ``start``, at ``shard_offset`` in the shard."""

    index: int
    start: int
    shard_offset: int
    length: int

    @property
    def in_tensor(self) -> slice:
        """Where the piece lies in its flattened tensor."""
        return slice(self.start, self.start + self.length)

    @property
    def in_shard(self) -> slice:
        """Where the piece lies in the flat shard."""
        return slice(self.shard_offset, self.shard_offset + self.length)


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """One bucket's partition over ``ranks`` ranks (see the module docstring)."""

    numel: int
    ranks: int

    def __post_init__(self) -> None:
        if self.ranks < 1:
            raise ValueError(f"ranks={self.ranks} must be >= 1")
        if self.numel < 0:
            raise ValueError(f"numel={self.numel} must be >= 0")

    @property
    def shard_numel(self) -> int:
        """Elements per shard (padding included): ceil(numel / ranks), at least 1."""
        return max(1, -(-self.numel // self.ranks))

    @property
    def padded_numel(self) -> int:
        return self.shard_numel * self.ranks

    def range(self, rank: int) -> tuple[int, int]:
        """The real (unpadded) bucket elements ``[start, stop)`` rank ``rank`` owns; empty past the end."""
        if not 0 <= rank < self.ranks:
            raise ValueError(f"rank={rank} must be in [0, {self.ranks})")
        start = min(rank * self.shard_numel, self.numel)
        return start, min(start + self.shard_numel, self.numel)


def pieces(bucket: Bucket, sizes: Sequence[int], plan: ShardPlan, rank: int) -> tuple[Piece, ...]:
    """The tensor pieces of ``rank``'s shard of ``bucket`` (``sizes[i]``: element count of tensor i),
    in shard order."""
    lo, hi = plan.range(rank)
    out = []
    for i, off in zip(bucket.indices, bucket.offsets):
        a, b = max(lo, off), min(hi, off + sizes[i])
        if a < b:
            out.append(Piece(i, a - off, a - lo, b - a))
    return tuple(out)
