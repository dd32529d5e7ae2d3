"""Preemption: a stop request that any one rank can raise and all ranks agree on.

Schedulers warn a job before they kill it: Slurm's ``--signal`` (SIGUSR1 by default, or any signal),
Kubernetes' SIGTERM on pod deletion, ``mpirun`` forwarding SIGUSR1. The signal may reach only some
ranks. :class:`StopRequest` notes it (the handler only sets a field: safe at any point of the step),
or notes that the wall-clock budget is spent; the training loop then combines every rank's
:meth:`StopRequest.code` with one small sum-allreduce (:func:`start_agreement`) so all ranks stop after the
same step, write one checkpoint and exit with :data:`EXIT_PREEMPTED`.
"""
from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Any, Callable, Sequence

import numpy as np

from hvdllm.core.failure import EXIT_PREEMPTED  # noqa: F401 - re-exported

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# EXIT_PREEMPTED (75, BSD's EX_TEMPFAIL: "a temporary failure; retry", defined in core.failure): the run
# stopped early with a checkpoint and continues with --resume (distinct from 0 = done, 1 = failed, 2 = bad input).
TIME_BUDGET = 1000        # a rank's code when its wall-clock budget is spent (signal codes are < 100)


class StopRequest:
    """This rank's reason to stop early: a signal it received, or ``max_seconds`` elapsed since creation."""

    def __init__(self, max_seconds: float | None = None, clock: Callable[[], float] = time.monotonic,
                 on_signal: Callable[[int], None] | None = None) -> None:
        self.signal: int | None = None
        self._clock = clock
        self._on_signal = on_signal   # called in the handler with the first signal (e.g. to print a line)
        self._deadline = None if max_seconds is None else clock() + max_seconds
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is None:
            self.signal = signum
            if self._on_signal is not None:
                self._on_signal(signum)

    def install(self, signals: Sequence[int] = STOP_SIGNALS) -> "StopRequest":
        """Catch ``signals`` until :meth:`uninstall`; returns self. Python runs signal handlers on the
        main thread only: elsewhere (a training loop in a thread) only the time budget applies."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def code(self) -> int:
        """0: carry on; a signal number; or :data:`TIME_BUDGET`."""
        if self.signal is not None:
            return int(self.signal)
        if self._deadline is not None and self._clock() >= self._deadline:
            return TIME_BUDGET
        return 0


def describe(code: int) -> str:
    return "run.max_minutes" if code == TIME_BUDGET else signal.Signals(code).name


def start_agreement(code: int, rank: int, size: int,
                    start_sum: Callable[[np.ndarray], Callable[[], np.ndarray]]) -> Callable[[], str | None]:
    """Start the agreement on every rank's stop code: one sum-allreduce of a ``size``-vector (rank r
    fills slot r), begun by ``start_sum`` (which returns the function that waits for the sum).

    Returns the function that finishes it: None when no rank wants to stop, else the same text on every
    rank naming which ranks asked and why (e.g. ``SIGTERM on rank 1``). Started before a step and
    finished after it, the agreement travels with the step's own collectives instead of waiting for a
    round of its own (on Horovod a whole cycle)."""
    mine = np.zeros(size, dtype=np.float64)
    mine[rank] = code
    finish = start_sum(mine) if size > 1 else (lambda: mine)

    def result() -> str | None:
        asked = [(r, int(c)) for r, c in enumerate(np.asarray(finish())) if c]
        return ", ".join(f"{describe(c)} on rank {r}" for r, c in asked) if asked else None

    return result


def agreed_stop(code: int, rank: int, size: int, sum_over_ranks: Callable[[np.ndarray], np.ndarray]) -> str | None:
    """:func:`start_agreement` finished at once, with a blocking ``sum_over_ranks``."""
    return start_agreement(code, rank, size, lambda v: (lambda: sum_over_ranks(v)))()
