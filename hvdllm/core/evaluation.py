"""How the validation windows of one evaluation are split over the data-parallel ranks.

Rank ``r`` of ``n`` evaluates every ``n``-th window from the ``r``-th, in micro-batches. When the windows
do not split evenly, a rank with fewer batches then runs *padding* batches (one window, its loss
discarded) until it has run as many batches as the busiest rank: inside a model-parallel group every
forward issues collectives, and Horovod pairs ops by name, naming unnamed ones by a per-process count,
so every rank must issue the same number of them. The mean stays exact: sum and count skip padding.
"""
from __future__ import annotations

from typing import Sequence, TypeVar

__all__ = ["eval_batches"]

S = TypeVar("S", bound=Sequence)


def eval_batches(windows: S, dp_rank: int, dp_size: int, micro_batch: int) -> list[tuple[S, bool]]:
    """This rank's (window ids, counted) micro-batches of ``windows``: its own batches (counted), then
    padding batches (``windows[:1]``, not counted), as many batches in all on every rank."""
    if not 0 <= dp_rank < dp_size or micro_batch < 1:
        raise ValueError(f"dp_rank={dp_rank}, dp_size={dp_size}, micro_batch={micro_batch}: need "
                         "0 <= dp_rank < dp_size and micro_batch >= 1")
    mine = windows[dp_rank::dp_size]
    batches = [(mine[k: k + micro_batch], True) for k in range(0, len(mine), micro_batch)]
    most = -(-len(windows[0::dp_size]) // micro_batch)       # rank 0 holds the most windows
    return batches + [(windows[:1], False)] * (most - len(batches))
