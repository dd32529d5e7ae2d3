"""Synchronized batch normalization's math, written once for the adapters (array-namespace free: only
arithmetic, ``sum0`` and ``sqrt`` are needed, so torch, TF and numpy arrays all work).

Training statistics are those of the combined batch of every rank, whatever each rank's batch size:
each rank shares (count, mean, M2) per channel, where M2 is the sum of squared deviations from its
own mean, and they are combined with Chan et al.'s parallel formula (stable where the sum of squares
minus the squared sum is not). Both adapters gather one packet per rank, ``[count, mean, M2]``, and
read it with :func:`combine_packets`. Running statistics follow torch's BatchNorm on the combined batch
(unbiased variance, momentum or a cumulative average; Keras's layer keeps Keras's moving averages). The
gradient of the normalized input needs two per-channel sums over the combined batch, ``sum(dy)`` and
``sum(dy * xhat)``, which torch's backward pass sums over the ranks (Keras differentiates through the
gather instead).
"""
from __future__ import annotations

from typing import Any, Callable


def _sum0(a: Any) -> Any:
    return a.sum(0)


def combine_moments(counts: Any, means: Any, m2s: Any, sum0: Callable[[Any], Any] = _sum0) -> tuple[Any, Any, Any]:
    """Every rank's (count, per-channel mean, per-channel M2), stacked on axis 0, combined into the
    combined batch's (total count, mean, biased variance). Counts are floats of shape (ranks, 1)."""
    total = sum0(counts)
    mean = sum0(counts * means) / total
    m2 = sum0(m2s + counts * (means - mean) ** 2)
    return total, mean, m2 / total


def combine_packets(every: Any, channels: int, sum0: Callable[[Any], Any] = _sum0) -> tuple[Any, Any, Any]:
    """:func:`combine_moments` on every rank's packet ``[count(s), mean (C), M2 (C)]`` gathered as rows
    (ranks, k + 2C), where the count is one value (k = 1) or one per channel (k = C, masked inputs).
    The adapters build the packet, gather it in one collective and read the moments back here."""
    k = int(every.shape[1]) - 2 * channels
    return combine_moments(every[:, :k], every[:, k:k + channels], every[:, k + channels:], sum0)


def running_update(running: Any, batch: Any, factor: float) -> Any:
    """torch's running-statistic update: ``(1 - factor) * running + factor * batch``."""
    return running * (1.0 - factor) + batch * factor


def unbiased(var: Any, count: float) -> Any:
    """The unbiased variance torch's BatchNorm keeps in ``running_var`` (count / (count - 1))."""
    if count <= 1:
        raise ValueError(f"SyncBatchNorm needs more than 1 value per channel over all ranks in training, "
                         f"got {count}")
    return var * (count / (count - 1.0))


def average_factor(momentum: float | None, batches_tracked: int) -> float:
    """torch's exponential_average_factor: ``momentum``, or 1/batches for a cumulative average (None)."""
    if momentum is None:
        return 1.0 / max(int(batches_tracked), 1)
    return float(momentum)


def input_grad(dy: Any, xhat: Any, invstd: Any, weight: Any, sum_dy: Any, sum_dy_xhat: Any, count: float) -> Any:
    """d loss / d x of ``y = weight * xhat + bias`` with xhat normalized by the combined batch's
    statistics: ``weight * invstd * (dy - sum(dy)/N - xhat * sum(dy*xhat)/N)`` (sums over all ranks)."""
    scale = invstd if weight is None else weight * invstd
    return scale * (dy - sum_dy / count - xhat * (sum_dy_xhat / count))
