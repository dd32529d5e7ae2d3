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

Stage 2 with accumulation reduce-scatters each bucket once per backward pass (:class:`PassTracker`)
into a shard accumulator, so no full-size gradient buffer outlives its pass; :func:`parse_inflight_mb`
validates the bound on the full-size buffers in flight at once.
"""
from __future__ import annotations

import dataclasses
import math
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



# ZeRO-2's in-flight bound waits inside backward for the oldest reduce-scatter. When ranks send their
# buckets in different orders (a model whose branches depend on the rank's data), two ranks can each
# wait for a reduce-scatter that the other has not started yet: after this many seconds the wait is
# given up and the bound switched off for the run (a warning says so), so such a model loses the bound,
# never the run. Far above a reduce-scatter's latency or the ranks' skew within one backward pass.
INFLIGHT_WAIT_S = 10.0


def parse_inflight_mb(value: object, stage: int) -> float | None:
    """A validated ``zero_inflight_mb``: megabytes (MiB, as ``bucket_cap_mb``) of full-size gradient buffers
    ZeRO-2 lets exist at once (buckets accumulating and reduce-scatters in flight), ``math.inf`` for no
    bound, None for the default (twice the largest bucket). Only stage 2 has such buffers to bound."""
    if value is None:
        return None
    if stage != 2:
        raise ValueError(f"zero_inflight_mb={value!r} applies to zero_stage=2 only; allowed with "
                         f"zero_stage={stage}: None")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ValueError(f"zero_inflight_mb={value!r} must be a number >= 0 (MiB of full-size gradient buffers "
                         "at once; math.inf: no bound; None: twice the largest bucket)")
    return float(value)


class PassTracker:
    """ZeRO-2 with accumulation: when each bucket's reduce-scatter of one backward pass may start.

    With ``passes`` backward passes per step, each bucket is reduce-scattered ``passes`` times per step
    (the sum of the shards is the shard of the sum), so its full-size buffer lives for one pass, not
    ``passes``. Launch ``(b, m)`` (bucket b's reduction for pass m) is *ready* once every tensor of the
    bucket has been accumulated ``m + 1`` times; a tensor that gets no gradient in a pass holds the
    bucket back, which then carries the gradients of several passes in one launch (still summed once).
    ``ordered=True`` (backends that match collectives by call order) launches strictly in (pass, bucket)
    order; ``ordered=False`` (Horovod matches by name) launches each as soon as it is ready.
    :meth:`remaining` hands out the launches not made yet, in (pass, bucket) order: every rank makes
    each of the ``buckets x passes`` launches exactly once per step, whatever its gradients were.
    """

    def __init__(self, buckets: Sequence[Sequence[int]], num_tensors: int, passes: int, ordered: bool) -> None:
        if passes < 1:
            raise ValueError(f"backward_passes_per_step={passes} must be >= 1")
        self.members = [tuple(b) for b in buckets]
        self.passes, self.ordered = passes, ordered
        self.bucket_of = [-1] * num_tensors
        for b, members in enumerate(self.members):
            for i in members:
                self.bucket_of[i] = b
        self.reset()

    def reset(self) -> None:
        """Start a new step: nothing counted, nothing launched."""
        self.counts = [0] * len(self.bucket_of)
        # per bucket and pass m: how many of its tensors have m + 1 accumulations or more
        self.reached = [[0] * self.passes for _ in self.members]
        self.sent = [0] * len(self.members)   # per bucket: passes launched
        self.next = 0                          # ordered: the next launch, as pass * buckets + bucket

    def _ready(self, b: int, m: int) -> bool:
        return self.reached[b][m] == len(self.members[b])

    def mark(self, i: int) -> list[tuple[int, int]]:
        """Count one accumulation of tensor ``i``; the (bucket, pass) launches that may start now."""
        self.counts[i] += 1
        if self.counts[i] <= self.passes:
            self.reached[self.bucket_of[i]][self.counts[i] - 1] += 1
        out: list[tuple[int, int]] = []
        if self.ordered:
            total = len(self.members) * self.passes
            while self.next < total:
                m, b = divmod(self.next, len(self.members))
                if not self._ready(b, m):
                    break
                out.append((b, m))
                self.sent[b], self.next = m + 1, self.next + 1
            return out
        b = self.bucket_of[i]
        while self.sent[b] < self.passes and self._ready(b, self.sent[b]):
            out.append((b, self.sent[b]))
            self.sent[b] += 1
        return out

    def remaining(self) -> list[tuple[int, int]]:
        """The launches not made yet, in (pass, bucket) order; they count as made from now on."""
        out = [(b, m) for m in range(self.passes) for b in range(len(self.members)) if m >= self.sent[b]]
        self.sent = [self.passes] * len(self.members)
        self.next = len(self.members) * self.passes
        return out
