"""Horovod's elastic-training state machine (``hvd.elastic``), written once for both adapters.

Semantics are Horovod 0.28's (horovod/common/elastic.py): a :class:`State` holds what a worker must
keep across membership changes; ``commit()`` saves it in host memory and checks for host updates;
:func:`run_fn` re-runs the training function after a reset, restoring the last commit when a peer
failed (``HorovodInternalError``) and keeping the current state when hosts were added or removed
(``HostsUpdatedInterrupt``). Horovod's own exception types and worker notification service are used
when Horovod is installed, so horovodrun's elastic driver talks to these states unchanged. On the
mpi and local backends there is no elastic launch: one process simply runs the function.
"""
from __future__ import annotations

import enum
import functools
import os
import queue
from typing import Any, Callable


class _HostsUpdatedInterrupt(RuntimeError):
    """Stand-in for Horovod's exception when Horovod is not installed."""

    def __init__(self, skip_sync: bool) -> None:
        super().__init__(f"hosts updated (skip_sync={skip_sync})")
        self.skip_sync = skip_sync


class _InternalError(RuntimeError):
    """Stand-in for HorovodInternalError (never raised without Horovod)."""


class _HostUpdateResult(enum.IntFlag):
    no_update = 0
    removed = 1
    added = 2
    mixed = removed | added


def horovod_parts() -> tuple[type, type, Any, Any]:
    """(HorovodInternalError, HostsUpdatedInterrupt, HostUpdateResult, notification manager or None)."""
    try:
        from horovod.common.elastic import notification_manager
        from horovod.common.exceptions import HorovodInternalError, HostsUpdatedInterrupt
        from horovod.runner.elastic.worker import HostUpdateResult
    except ImportError:
        return _InternalError, _HostsUpdatedInterrupt, _HostUpdateResult, None
    return HorovodInternalError, HostsUpdatedInterrupt, HostUpdateResult, notification_manager


def elastic_launch() -> bool:
    """True under ``horovodrun --min-np/--max-np/--host-discovery-script`` (Horovod sets HOROVOD_ELASTIC)."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"


def launch_id() -> str | None:
    """The identity of this elastic launch: horovodrun's rendezvous server (address:port), the same for
    every worker it starts, later ones included, and new for every horovodrun; None outside one."""
    addr, port = os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR"), os.environ.get("HOROVOD_GLOO_RENDEZVOUS_PORT")
    return f"{addr}:{port}" if elastic_launch() and addr and port else None


class State:
    """What a worker keeps across resets; subclasses implement save/restore/sync (and reset)."""

    def __init__(self, bcast_object: Callable[[Any], Any], get_rank: Callable[[], int]) -> None:
        self._bcast_object = bcast_object
        self._rank = get_rank
        self._host_messages: queue.Queue = queue.Queue()
        self._last_updated_timestamp = 0
        self._reset_callbacks: list[Callable[[], None]] = []

    def register_reset_callbacks(self, callbacks: list[Callable[[], None]]) -> None:
        """Call each of ``callbacks`` after every reset (a worker added or removed), e.g. to rescale the LR."""
        self._reset_callbacks.extend(callbacks)

    def on_reset(self) -> None:
        self._host_messages = queue.Queue()
        self.reset()
        for callback in self._reset_callbacks:
            callback()

    def on_hosts_updated(self, timestamp: float, update_res: Any) -> None:
        """Called by Horovod's worker notification service when the driver sees a host change."""
        self._host_messages.put((timestamp, update_res))

    def commit(self) -> None:
        """Save the state in host memory, then raise HostsUpdatedInterrupt if hosts changed meanwhile."""
        self.save()
        self.check_host_updates()

    def check_host_updates(self) -> None:
        """Raise HostsUpdatedInterrupt (on every rank together) if a host change was announced."""
        _, interrupt, result, _ = horovod_parts()
        prev = last = self._last_updated_timestamp
        update = result.no_update
        while not self._host_messages.empty():
            timestamp, res = self._host_messages.get()
            if timestamp > last:
                last, update = timestamp, update | res
        # rank 0's view decides, so that every rank raises at the same commit
        prev, self._last_updated_timestamp, update = self._bcast_object((prev, last, update))
        if self._last_updated_timestamp > prev:
            raise interrupt(update == result.removed)

    def save(self) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        """Undo every change since the last commit."""
        raise NotImplementedError

    def sync(self) -> None:
        """Give every rank rank 0's state."""
        raise NotImplementedError

    def reset(self) -> None:
        """Adjust to the new set of workers (before the next sync)."""


class ObjectState(State):
    """Picklable Python objects given as keyword arguments, exposed as attributes."""

    def __init__(self, bcast_object: Callable[[Any], Any], get_rank: Callable[[], int], **kwargs: Any) -> None:
        self._saved_state = kwargs
        self._set_attrs()
        super().__init__(bcast_object, get_rank)

    def save(self) -> None:
        self._saved_state = {attr: getattr(self, attr) for attr in self._saved_state}

    def restore(self) -> None:
        self._set_attrs()

    def sync(self) -> None:
        if self._saved_state:
            self._saved_state = self._bcast_object(self._saved_state)
            self._set_attrs()

    def _set_attrs(self) -> None:
        for attr, value in self._saved_state.items():
            setattr(self, attr, value)


def run_fn(func: Callable[..., Any], reset: Callable[[], None], backend: Callable[[], str],
           size: Callable[[], int]) -> Callable[..., Any]:
    """Horovod's ``elastic.run`` around ``func(state, ...)``; ``reset`` re-initialises the adapter.

    Outside an elastic launch the function runs once after a sync; on the mpi backend with several
    ranks that is refused (MPI cannot lose or add a rank), naming the backend that can.
    """
    @functools.wraps(func)
    def wrapper(state: State, *args: Any, **kwargs: Any) -> Any:
        name = backend()
        if name != "horovod" and (elastic_launch() or size() > 1):
            raise ValueError(f"elastic training needs the horovod backend (horovodrun --min-np/--max-np "
                             f"--host-discovery-script, Gloo); this job runs on the {name!r} backend with "
                             f"{size()} ranks")
        internal_error, interrupt, _, manager = horovod_parts()
        if not elastic_launch():
            state.sync()
            return func(state, *args, **kwargs)
        manager.init()
        manager.register_listener(state)
        skip_sync = False
        try:
            while True:
                try:
                    if not skip_sync:
                        state.sync()
                    return func(state, *args, **kwargs)
                except internal_error:
                    state.restore()
                    skip_sync = False
                except interrupt as e:
                    skip_sync = e.skip_sync
                reset()
                state.on_reset()
        finally:
            manager.remove_listener(state)
    return wrapper
