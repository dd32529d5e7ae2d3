"""Gradient bucket planning: which gradients travel together in one fused allreduce.

Buckets hold gradients of one dtype, up to ``cap_bytes`` each, in *reverse registration order*:
backward produces the last layers' gradients first, so the first bucket fills (and its reduction
starts) while earlier layers are still computing. A single gradient larger than the cap gets a
bucket of its own. The plan is a pure function of (names, shapes, dtypes, cap): identical on every
rank, which is what keeps the ranks' collectives matched.
"""
from __future__ import annotations

import dataclasses
from typing import Hashable, Sequence

import numpy as np

_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int64": 8, "uint64": 8, "int32": 4, "uint32": 4,
             "int16": 2, "uint16": 2, "int8": 1, "uint8": 1, "bool": 1}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """What the planner needs to know about one gradient."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy-style name: "float32", "bfloat16", ...

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Indices into the registered tensors, and each one's offset inside the flat buffer."""

    dtype: str
    indices: tuple[int, ...]
    offsets: tuple[int, ...]
    numel: int


def itemsize(dtype: str) -> int:
    try:
        return _ITEMSIZE[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; allowed: {sorted(_ITEMSIZE)}") from None


def plan_buckets(specs: Sequence[TensorSpec], cap_bytes: int, groups: Sequence[Hashable] | None = None
                 ) -> list[Bucket]:
    """Group tensors into buckets (see module docstring). ``cap_bytes <= 0`` means one bucket per dtype.

    ``groups`` (one key per tensor: a param group, a device) keeps tensors of different keys in
    different buckets; inside a key the order is the same, so a capped plan's buckets are consecutive
    slices of the uncapped plan's buffer.
    """
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate parameter names {dup}: every parameter needs a unique name")
    open_: dict[tuple[Hashable, str], list[int]] = {}
    sizes: dict[tuple[Hashable, str], int] = {}
    done: list[list[int]] = []
    for i in reversed(range(len(specs))):
        s = specs[i]
        key = (groups[i] if groups is not None else None, s.dtype)
        cur = open_.setdefault(key, [])
        if cur and cap_bytes > 0 and sizes[key] + s.nbytes > cap_bytes:
            done.append(cur)
            cur = open_[key] = []
            sizes[key] = 0
        cur.append(i)
        sizes[key] = sizes.get(key, 0) + s.nbytes
    done.extend(b for b in open_.values() if b)
    buckets = []
    for idx in done:
        offsets, total = [], 0
        for i in idx:
            offsets.append(total)
            total += specs[i].numel
        buckets.append(Bucket(specs[idx[0]].dtype, tuple(idx), tuple(offsets), total))
    # Order by the position of each bucket's first-ready tensor, so launch order is the same everywhere.
    return sorted(buckets, key=lambda b: -b.indices[0])


class LaunchTracker:
    """When each bucket's reduction may start, as gradients become ready during backward.

    A tensor is *complete* once it has been accumulated ``passes`` times (backward_passes_per_step);
    a bucket is *ready* once all its tensors are complete. With ``ordered=True`` (backends that match
    collectives by call order, e.g. MPI) buckets launch strictly in plan order, so a ready bucket waits
    for its predecessors; with ``ordered=False`` (Horovod matches by name) it launches at once.
    :meth:`remaining` hands out, in plan order, the buckets still unlaunched at step time (tensors
    without gradients on this rank travel as zeros), so every rank launches every bucket exactly once
    per step, in an order that is identical where it must be: nothing can hang.
    """

    def __init__(self, buckets: Sequence[Bucket], num_tensors: int, passes: int = 1, ordered: bool = True) -> None:
        if passes < 1:
            raise ValueError(f"backward_passes_per_step={passes} must be >= 1")
        self.passes, self.ordered = passes, ordered
        self.bucket_of = [-1] * num_tensors
        for b, bucket in enumerate(buckets):
            for i in bucket.indices:
                self.bucket_of[i] = b
        self.sizes = [len(b.indices) for b in buckets]
        self.reset()

    def reset(self) -> None:
        """Start a new step: no tensor counted, no bucket launched."""
        self.counts = [0] * len(self.bucket_of)
        self.ready = [0] * len(self.sizes)
        self.launched = [False] * len(self.sizes)
        self.next = 0  # first bucket not launched (ordered mode)
        self.active = False

    def mark(self, i: int) -> tuple[bool, list[int]]:
        """Count one accumulation of tensor ``i``; return (tensor now complete, buckets to launch now)."""
        self.active = True
        c = self.counts[i] = self.counts[i] + 1
        if c > self.passes:
            raise RuntimeError(
                f"a gradient was accumulated {c} times before step(), but backward_passes_per_step={self.passes}; "
                "call step() (or synchronize()) after every backward_passes_per_step backward passes")
        if c < self.passes:
            return False, []
        b = self.bucket_of[i]
        self.ready[b] += 1
        if self.ready[b] < self.sizes[b]:
            return True, []
        if not self.ordered:
            self.launched[b] = True
            return True, [b]
        out = []
        while self.next < len(self.sizes) and self.ready[self.next] == self.sizes[self.next]:
            self.launched[self.next] = True
            out.append(self.next)
            self.next += 1
        return True, out

    def complete(self, i: int) -> bool:
        return self.counts[i] >= self.passes

    def remaining(self) -> list[int]:
        """Buckets not launched yet, in plan order; they count as launched from now on."""
        out = [b for b in range(len(self.sizes)) if not self.launched[b]]
        for b in out:
            self.launched[b] = True
        self.next = len(self.sizes)
        return out

    @property
    def pending(self) -> bool:
        """Some gradient was counted (or a bucket launched) since the last reset."""
        return self.active or any(self.launched)


def split_list(items: Sequence, parts: int) -> list[list]:
    """Horovod's split of a list into ``parts`` consecutive, near-equal chunks (earlier ones larger)."""
    d, r = divmod(len(items), parts)
    return [list(items[i * d + min(i, r):(i + 1) * d + min(i + 1, r)]) for i in range(parts)]


def explicit_groups(count: int, groups: int | Sequence[Sequence[int]]) -> list[int]:
    """Horovod's ``groups`` of DistributedOptimizer as one group number per tensor (0..count-1, in the
    planner's order): an int k splits the tensors into k consecutive groups (:func:`split_list`); lists
    of tensor indices form one group each, and a tensor in no list is a group of its own. Each group is
    fused into its own bucket(s) (one per dtype and param group), whatever the size cap."""
    if isinstance(groups, bool) or not isinstance(groups, (int, list, tuple)):
        raise ValueError(f"groups={groups!r} must be a positive int or a list of lists of parameters")
    if isinstance(groups, int):
        if groups < 1:
            raise ValueError(f"groups={groups} must be a positive int or a list of lists of parameters")
        key = [0] * count
        for g, chunk in enumerate(split_list(range(count), groups)):
            for i in chunk:
                key[i] = g
        return key
    key = [-1] * count
    for g, members in enumerate(groups):
        for i in members:
            if key[i] != -1:
                raise ValueError(f"a parameter can only appear once in groups (index {i} is in groups "
                                 f"{key[i]} and {g})")
            key[i] = g
    extra = len(groups)
    for i in range(count):
        if key[i] == -1:
            key[i], extra = extra, extra + 1
    return key
