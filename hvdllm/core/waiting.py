"""Waiting for an in-flight collective without spinning, and never forever.

Horovod's ``synchronize`` spins (yielding) until the background thread completes the op. When ranks
share cores — the usual CPU case, and any job with more ranks than cores — the waiting rank's spin
takes the cycles the slower rank needs to finish its backward pass, so everyone waits longer. Polling
with short, growing sleeps costs at most ``max_sleep`` of latency per op and almost no CPU (figures:
bench/pipeline_bubble.py).

A peer that died or hangs would keep a poll going forever when no launcher ends the job, so every
wait has a deadline: ``HVDLLM_WAIT_TIMEOUT_S`` seconds (default :data:`DEFAULT_WAIT_TIMEOUT_S`;
0 waits forever). Polling also lets Python run signal handlers while a rank waits.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Mapping

WAIT_TIMEOUT_VAR = "HVDLLM_WAIT_TIMEOUT_S"
# Longer than any legitimate wait for a peer (a large checkpoint written by rank 0, a tokenizer trained
# on rank 0 while the others wait in its broadcast).
DEFAULT_WAIT_TIMEOUT_S = 600.0


def wait_timeout(env: Mapping[str, str] | None = None) -> float | None:
    """The deadline of one collective wait in seconds (None: no deadline), from ``HVDLLM_WAIT_TIMEOUT_S``."""
    env = os.environ if env is None else env
    raw = env.get(WAIT_TIMEOUT_VAR, "").strip()
    if not raw:
        return DEFAULT_WAIT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value >= 0 and value != float("inf")):
        raise ValueError(f"{WAIT_TIMEOUT_VAR}={raw!r} is not a number of seconds; allowed: >= 0 (0: no deadline)")
    return value or None


class CollectiveTimeout(TimeoutError):
    """A collective did not complete within its deadline: a peer rank died or stopped issuing it."""


def wait_until(done: Callable[[], bool], first_sleep: float = 5e-5, max_sleep: float = 2.5e-4,
               timeout: float | None = None, what: str = "a collective") -> None:
    """Return once ``done()`` is true, sleeping between polls (doubling from ``first_sleep`` to ``max_sleep``).

    Raises :class:`CollectiveTimeout` after ``timeout`` seconds (None: never)."""
    delay = first_sleep
    deadline = None if timeout is None else time.monotonic() + timeout
    while not done():
        if deadline is not None and time.monotonic() > deadline:
            raise CollectiveTimeout(f"{what} waited more than {timeout:g} s for the other ranks "
                                    f"({WAIT_TIMEOUT_VAR}); a peer rank died or stopped")
        time.sleep(delay)
        delay = min(delay * 2, max_sleep)
