"""The examples' data: a small deterministic 'digits' set (no download), the same in every process."""
from __future__ import annotations

import numpy as np


def digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples of 64 features in [0, 1) and their class in 0..9 (a fixed linear rule)."""
    rng = np.random.RandomState(seed)
    x = rng.rand(n, 64).astype("float32")
    w = np.random.RandomState(99).randn(64, 10).astype("float32")
    return x, (x @ w).argmax(axis=1).astype("int64")
