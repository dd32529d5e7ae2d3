"""Cutting an unsplit array into tensor-parallel shards and joining them back (numpy, framework-free).

Also :func:`merge_stages`, which gives every pipeline stage the entries that each stage holds.

A dimension split over ``size`` ranks may be a concatenation of ``segments`` equal parts (a fused
[q; k; v] projection): each segment is split and rank ``index`` keeps the concatenation of its pieces,
so the shard holds whole attention heads of each of q, k and v.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from hvdllm.core.collectives import Collectives
from hvdllm.core.grid import ProcessGrid

__all__ = ["shard_array", "join_shards", "merge_stages"]


def shard_array(a: np.ndarray, dim: int, index: int, size: int, segments: int = 1) -> np.ndarray:
    """Shard ``index`` of ``size`` of ``a`` along ``dim`` (each of ``segments`` parts split alike)."""
    n = a.shape[dim]
    if n % (segments * size):
        raise ValueError(f"dimension {dim} of size {n} does not split into {segments} segment(s) x {size} shards")
    pieces = [np.split(seg, size, axis=dim)[index] for seg in np.split(a, segments, axis=dim)]
    return np.ascontiguousarray(np.concatenate(pieces, axis=dim))


def join_shards(shards: Sequence[np.ndarray], dim: int, segments: int = 1) -> np.ndarray:
    """The unsplit array of the ranks' ``shards`` (in rank order): the inverse of :func:`shard_array`."""
    parts = [np.split(s, segments, axis=dim) for s in shards]
    return np.concatenate([p[k] for k in range(segments) for p in parts], axis=dim)


def merge_stages(mine: dict[str, Any], grid: ProcessGrid, rank: int, collectives: Collectives) -> dict[str, Any]:
    """Every stage's entries merged, on every stage of this rank's pipeline (one ``broadcast_object`` per
    stage in the pp group, rooted at the stage's rank with this rank's (dp, tp) coordinates)."""
    if grid.pp == 1:
        return dict(mine)
    c, pp_set = grid.coords(rank), grid.pp_group(rank)
    out: dict[str, Any] = {}
    for p in range(grid.pp):
        root = grid.rank_of(c.dp, c.tp, p)
        out.update(collectives.broadcast_object(mine if root == rank else None, root, pp_set))
    return out
