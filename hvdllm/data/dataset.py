"""Token windows, the train/validation split, and a batch order that depends only on the step.

A token stream (one or more arrays, e.g. uint16 memmaps of ``.bin`` files) is cut into windows of
``seq_len + 1`` tokens at stride ``seq_len`` (inputs and shifted targets); windows never cross
files. Every ``period``-th window (``period = round(1 / val_fraction)``) is held out for validation,
so both splits cover the whole corpus.

The sequences of optimizer step ``s`` are global samples ``s*G .. s*G+G-1`` of an epoch-wise
permutation of the training windows (seeded by ``(seed, epoch)``). Data-parallel rank ``r`` of
``n`` takes the contiguous slice ``[r*G/n, (r+1)*G/n)`` and cuts it into micro-batches. The batch
of a step therefore depends only on ``(seed, step, G)``: np=1 and np=2 runs see the same global
batch, and the data position to resume from is the step itself.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np


class TokenWindows:
    """Fixed windows over a token stream, split into train and validation sets."""

    def __init__(self, arrays: Sequence[np.ndarray], seq_len: int, val_fraction: float = 0.1,
                 seed: int = 1337, name: str = "data") -> None:
        if seq_len < 1:
            raise ValueError(f"data.seq_len={seq_len} must be >= 1")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction} must be in (0, 1)")
        self.arrays = [np.asarray(a) if not isinstance(a, np.memmap) else a for a in arrays]
        self.seq_len, self.seed = seq_len, seed
        self.n_tokens = int(sum(len(a) for a in self.arrays))
        per_file = np.array([max(0, (len(a) - 1) // seq_len) for a in self.arrays], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(per_file)])
        n = int(self._starts[-1])
        period = max(2, int(round(1.0 / val_fraction)))
        ids = np.arange(n, dtype=np.int64)
        is_val = ids % period == period - 1
        self.train_ids, self.val_ids = ids[~is_val], ids[is_val]
        if len(self.train_ids) < 1 or len(self.val_ids) < 1:
            raise ValueError(
                f"{name}: {self.n_tokens} tokens make {n} windows of {seq_len + 1} tokens; need at least "
                f"{period} (train + validation): give more text or a shorter data.seq_len")
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    # -- windows -------------------------------------------------------------------------------
    def window(self, wid: int) -> np.ndarray:
        f = int(np.searchsorted(self._starts, wid, side="right")) - 1
        off = (int(wid) - int(self._starts[f])) * self.seq_len
        return np.asarray(self.arrays[f][off: off + self.seq_len + 1], dtype=np.int64)

    def batch(self, wids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets, int64 arrays of shape (len(wids), seq_len)."""
        w = np.stack([self.window(int(i)) for i in wids]) if len(wids) else np.zeros((0, self.seq_len + 1), np.int64)
        return w[:, :-1], w[:, 1:]

    # -- the order of training samples -------------------------------------------------------------
    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.train_ids))
            self._perm_epoch = epoch
        return self._perm

    def step_windows(self, step: int, global_batch: int) -> np.ndarray:
        """Window ids of the ``global_batch`` sequences of optimizer step ``step``."""
        n = len(self.train_ids)
        out = np.empty(global_batch, dtype=np.int64)
        for j, i in enumerate(range(step * global_batch, (step + 1) * global_batch)):
            epoch, pos = divmod(i, n)
            out[j] = self.train_ids[self._permutation(epoch)[pos]]
        return out

    def micro_batches(self, step: int, global_batch: int, dp_rank: int, dp_size: int,
                      micro_batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """This data-parallel rank's micro-batches of step ``step`` (its slice of the global batch)."""
        per_rank = global_batch // dp_size
        mine = self.step_windows(step, global_batch)[dp_rank * per_rank: (dp_rank + 1) * per_rank]
        return [self.batch(mine[k: k + micro_batch]) for k in range(0, per_rank, micro_batch)]

    def epoch_of(self, step: int, global_batch: int) -> float:
        return step * global_batch / len(self.train_ids)

    def fingerprint(self) -> dict[str, object]:
        """What identifies the token stream: per-file token counts and a sha256 over all tokens (as
        little-endian uint16, read in chunks), so a resume can tell whether it trains on the same data."""
        h = hashlib.sha256()
        for a in self.arrays:
            for k in range(0, len(a), 1 << 24):
                h.update(np.asarray(a[k: k + (1 << 24)]).astype("<u2", copy=False).tobytes())
        return {"tokens": self.n_tokens, "files": len(self.arrays), "sha256": h.hexdigest()}

    # -- validation ---------------------------------------------------------------------------------
    def val_windows(self, count: int) -> np.ndarray:
        """``count`` validation windows spread evenly over the held-out set (all of it if fewer)."""
        n = len(self.val_ids)
        if count >= n:
            return self.val_ids.copy()
        return self.val_ids[np.linspace(0, n - 1, count).round().astype(np.int64)]


def read_token_files(files: Sequence[Path]) -> list[np.ndarray]:
    """Memory-map uint16 ``.bin`` files (read-only; nothing is loaded until used)."""
    return [np.memmap(f, dtype=np.uint16, mode="r") for f in files]


def write_token_file(path: str | Path, tokens: np.ndarray) -> None:
    """Write tokens as a uint16 ``.bin`` file (the format ``--data`` reads)."""
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise ValueError(f"tokens must fit in uint16 to be written to {path}")
    arr.astype(np.uint16).tofile(path)
