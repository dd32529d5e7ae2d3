"""Waiting for an in-flight collective without spinning.

Horovod's ``synchronize`` spins (yielding) until the background thread completes the op. When ranks
share cores — the usual CPU case, and any job with more ranks than cores — the waiting rank's spin
takes the cycles the slower rank needs to finish its backward pass, so everyone waits longer. Polling
with short, growing sleeps costs at most ``max_sleep`` of latency per op and almost no CPU (figures:
bench/pipeline_bubble.py).
"""
from __future__ import annotations

import time
from typing import Callable


def wait_until(done: Callable[[], bool], first_sleep: float = 5e-5, max_sleep: float = 2.5e-4) -> None:
    """Return once ``done()`` is true, sleeping between polls (doubling from ``first_sleep`` to ``max_sleep``)."""
    delay = first_sleep
    while not done():
        time.sleep(delay)
        delay = min(delay * 2, max_sleep)
