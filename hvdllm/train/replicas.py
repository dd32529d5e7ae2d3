"""Replica divergence detector: do all data-parallel replicas still hold the same model and optimizer?

Data parallelism keeps every replica's parameters and optimizer state bit-identical; a rank that drifts
(a silent hardware error, a non-deterministic kernel, a bug in a custom step) would otherwise train on
unnoticed. Each rank reduces its state to one int64 per tensor -- the sum of the tensor's bits read as
integers, exact and independent of summation order and thread count -- hashes that vector to a 32-byte
digest, and the ranks allgather the digests. Ranks of a data-parallel group (same tp and pp
coordinates) must agree; :func:`check` names the step and the ranks that differ from their group's
majority. The trainers provide the per-tensor sums (torch / Keras) and the allgather; this module is
framework-free. Every ``run.check_replicas_every`` steps and at every checkpoint (see :func:`due`).
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Sequence

import numpy as np

from hvdllm.train.config import TrainConfig

DIGEST_WORDS = 4          # a sha256 as four int64 words, the row each rank contributes to the allgather


class ReplicaMismatch(RuntimeError):
    """Data-parallel replicas hold different parameters or optimizer state."""


def due(step: int, cfg: TrainConfig, checkpoint: bool) -> bool:
    """Whether to compare the replicas after ``step``: every run.check_replicas_every steps and at every
    checkpoint (never when run.check_replicas_every = 0)."""
    every = cfg.run.check_replicas_every
    return every > 0 and (checkpoint or step % every == 0)


def digest(checksums: np.ndarray) -> np.ndarray:
    """The sha256 of a rank's per-tensor checksums, as ``DIGEST_WORDS`` int64 words."""
    raw = hashlib.sha256(np.ascontiguousarray(checksums, dtype="<i8").tobytes()).digest()
    return np.frombuffer(raw, dtype="<i8").astype(np.int64)


def differing(rows: np.ndarray, groups: Sequence[Sequence[int]]) -> list[tuple[list[int], list[int]]]:
    """For each group whose ranks' rows disagree: (the ranks that hold the group's majority row, the ranks
    that differ from it). A tie goes to the row of the group's first rank."""
    out = []
    for members in groups:
        keys = [rows[r].tobytes() for r in members]
        if len(set(keys)) == 1:
            continue
        counts = Counter(keys)
        best = max(counts.values())
        majority = next(k for k in keys if counts[k] == best)
        out.append(([r for r, k in zip(members, keys) if k == majority],
                    [r for r, k in zip(members, keys) if k != majority]))
    return out


def check(step: int, rows: np.ndarray, groups: Sequence[Sequence[int]]) -> None:
    """Raise :class:`ReplicaMismatch` naming ``step`` and the ranks when the replicas of a group differ.

    ``rows[r]`` is rank ``r``'s :func:`digest`; ``groups`` are the data-parallel groups (ranks that must
    hold the same state). Every rank calls this on the same rows, so every rank stops alike.
    """
    bad = differing(np.asarray(rows), groups)
    if bad:
        parts = [f"ranks {', '.join(map(str, odd))} differ from ranks {', '.join(map(str, ok))}" for ok, odd in bad]
        raise ReplicaMismatch(f"data-parallel replicas diverged at step {step}: {'; '.join(parts)} (parameters or "
                              "optimizer state are not bit-identical; run.check_replicas_every sets how often this "
                              "is checked)")
