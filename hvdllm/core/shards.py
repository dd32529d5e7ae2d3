"""Cutting an unsplit array into tensor-parallel shards and joining them back (numpy, framework-free).

A dimension split over ``size`` ranks may be a concatenation of ``segments`` equal parts (a fused
[q; k; v] projection): each segment is split and rank ``index`` keeps the concatenation of its pieces,
so the shard holds whole attention heads of each of q, k and v.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["shard_array", "join_shards"]


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
