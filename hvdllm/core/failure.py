"""A rank that fails ends the whole job instead of hanging it.

Why jobs hang: when one rank raises while its peers wait in a collective, the failing process's
normal exit runs the communication library's shutdown (mpi4py's ``MPI_Finalize``, which in Open MPI
waits for every rank; Horovod's shutdown), while its peers wait for the collective it will never
issue. The rule here: a failing rank of a multi-rank job prints one line naming itself and the step
(:func:`failure_line`), then ends its process without a clean shutdown — ``MPI_Abort`` where MPI is
initialised in the process (mpirun with the mpi4py backend, ``horovodrun --mpi``), ``os._exit``
otherwise — and the launcher, seeing a rank die, ends the others. Ranks that no launcher ends stop at
their bounded waits (hvdllm.core.waiting) or at Horovod's stall shutdown.

The step travels with the exception (:func:`mark_step`), so nothing global tracks it.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import sys
import time
import traceback
from types import TracebackType
from typing import Any, Callable

from hvdllm.core.waiting import CollectiveTimeout, wait_until

EXIT_FAILED = 1
_STEP_ATTR = "hvdllm_step"

ExceptHook = Callable[[type, BaseException, "TracebackType | None"], Any]


def mark_step(exc: BaseException, step: int) -> BaseException:
    """Record on ``exc`` the training step it interrupted (the innermost mark wins); returns ``exc``."""
    if getattr(exc, _STEP_ATTR, None) is None:
        try:
            setattr(exc, _STEP_ATTR, step)
        except AttributeError:     # an exception type with __slots__: the line then names no step
            pass
    return exc


def step_of(exc: BaseException) -> int | None:
    return getattr(exc, _STEP_ATTR, None)


# What a surviving rank's collective raises when a peer died or raised: Horovod's shutdown (torch's
# HorovodInternalError; TF wraps it in an op error whose text carries Horovod's) and hvdllm's bounded wait.
_PEER_FAILURE_TYPES = ("HorovodInternalError", "CollectiveTimeout")
_HOROVOD_SHUTDOWN = "Horovod has been shut down"
PEER_FAILED = "collective failed (a peer rank died or raised; the launcher's output names it)"
# A survivor waits this long before ending its process, so that the launcher sees the rank that died
# first and names it (horovodrun --gloo reports whichever non-zero exit it notices first).
PEER_GRACE_S = 2.0


def peer_failed(exc: BaseException) -> bool:
    """True when ``exc`` is a collective that failed because of another rank (this rank is a survivor)."""
    return type(exc).__name__ in _PEER_FAILURE_TYPES or _HOROVOD_SHUTDOWN in str(exc)


def failure_line(rank: int, exc: BaseException) -> str:
    """``hvdllm: rank R failed at step S: Type: message`` (without the step when none was marked); a
    survivor of another rank's failure says ``collective failed (...)`` before the type, and Horovod's
    long shutdown text shrinks to its first sentence."""
    step = step_of(exc)
    where = f" at step {step}" if step is not None else ""
    text = " ".join(str(exc).split())
    peer = peer_failed(exc)
    if peer and _HOROVOD_SHUTDOWN in text:
        text = _HOROVOD_SHUTDOWN          # (TF prefixes it with the op's {{function_node ...}})
    cause = f"{type(exc).__name__}{': ' + text if text else ''}"
    return f"hvdllm: rank {rank} failed{where}: {PEER_FAILED + ': ' if peer else ''}{cause}"


def abort_process(code: int) -> None:
    """End this process now, skipping the clean shutdown that would wait for peers.

    ``MPI_Abort`` when MPI is initialised here (it ends every rank of the communicator, whatever the
    launcher does), else ``os._exit``: mpirun and horovodrun end the job when a rank exits non-zero.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None and _horovod_uses_mpi():
        try:
            from mpi4py import MPI as mpi   # Horovod initialised MPI itself; mpi4py attaches to it
        except Exception:  # noqa: BLE001 - no mpi4py: os._exit below still ends the job under mpirun
            mpi = None
    if mpi is not None:
        try:
            if mpi.Is_initialized() and not mpi.Is_finalized():
                mpi.COMM_WORLD.Abort(code)
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


def _horovod_uses_mpi() -> bool:
    """Horovod is loaded in a job launched by MPI (its MPI controller initialised MPI in this process)."""
    launched_by_mpi = any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))
    return launched_by_mpi and "horovod.common.basics" in sys.modules


@dataclasses.dataclass(frozen=True)
class AbortOnFailure:
    """A ``sys.excepthook``: the usual traceback, the failure line, then (several ranks) the job ends."""

    rank: int
    size: int
    previous: ExceptHook = sys.__excepthook__
    abort: Callable[[int], None] = abort_process
    grace_s: float = PEER_GRACE_S

    def __call__(self, etype: type, exc: BaseException, tb: TracebackType | None) -> None:
        self.previous(etype, exc, tb)
        if isinstance(exc, KeyboardInterrupt) and self.size == 1:
            return
        print(failure_line(self.rank, exc), file=sys.stderr, flush=True)
        if self.size > 1:
            if peer_failed(exc):
                time.sleep(self.grace_s)
            self.abort(EXIT_FAILED)


def install_abort_on_failure(rank: int, size: int) -> AbortOnFailure:
    """Make an uncaught exception of this rank end the whole job (see the module docstring)."""
    current = sys.excepthook
    previous = current.previous if isinstance(current, AbortOnFailure) else current
    hook = AbortOnFailure(rank, size, previous)
    sys.excepthook = hook
    return hook


def uninstall_abort_on_failure() -> None:
    if isinstance(sys.excepthook, AbortOnFailure):
        sys.excepthook = sys.excepthook.previous


def exit_code(status: object) -> int:
    """The process status ``sys.exit(status)`` gives: None -> 0, an int as is, anything else (a message) -> 1."""
    if status is None:
        return 0
    return int(status) if isinstance(status, int) else 1


EXIT_AGREE_S = 10.0    # how long a rank calling sys.exit(n != 0) waits to see every rank exit too
EXIT_PREEMPTED = 75    # hvdllm.core.preemption's status of a stop every rank agreed on (EX_TEMPFAIL)


class ExitGuard:
    """The end of one rank of a multi-rank mpi4py job, so that it never hangs the others.

    Why: a rank's exit runs mpi4py's ``MPI_Finalize``, which in Open MPI waits for every rank, while
    peers still inside the job wait in their next collective for this rank: a hang mpirun never sees
    (no process ended). So the exiting rank first waits for every rank to arrive at its exit too, with a
    non-blocking barrier (``ibarrier()``: on a communicator of its own, since peers may be stuck in a
    collective on the world's): ``sys.exit(n)`` with n != 0 waits :data:`EXIT_AGREE_S` (all ranks
    leaving with the same verdict, e.g. bad input, exit normally), any other exit (an ``atexit``
    function that runs before mpi4py's) waits ``timeout`` (HVDLLM_WAIT_TIMEOUT_S; None: forever).
    A rank left alone prints one line naming itself and calls MPI_Abort (``abort``)."""

    def __init__(self, rank: int, size: int, ibarrier: Callable[[], Any], timeout: float | None,
                 agree_s: float = EXIT_AGREE_S, previous: Callable[[object], Any] = sys.exit,
                 abort: Callable[[int], None] = abort_process) -> None:
        self.rank, self.size, self.timeout, self.agree_s = rank, size, timeout, agree_s
        self.previous, self._ibarrier, self._abort = previous, ibarrier, abort
        self._request: Any = None
        self._all_left = False

    def _everyone_leaving(self, timeout: float | None) -> bool:
        if self._all_left:
            return True
        if self._request is None:
            self._request = self._ibarrier()
        try:
            wait_until(self._request.Test, max_sleep=0.05, timeout=timeout, what="this rank's exit")
        except CollectiveTimeout:
            return False
        self._all_left = True
        return True

    def sys_exit(self, status: object = None) -> None:
        """``sys.exit`` while installed (:func:`install_exit_guard`)."""
        code = exit_code(status)
        # a stop (preemption, run.max_minutes) is agreed by every rank, but rank 0 may still be writing the
        # checkpoint: wait as long as a collective may, not the short bad-input agreement
        agree = self.timeout if code == EXIT_PREEMPTED else self.agree_s
        if code != 0 and self.size > 1 and not self._everyone_leaving(agree):
            if status is not None and not isinstance(status, int):
                print(status, file=sys.stderr)
            print(f"hvdllm: rank {self.rank} failed: sys.exit({code}) on one rank of {self.size} while the others "
                  f"run on; ending the job (MPI_Abort)", file=sys.stderr, flush=True)
            self._abort(code)
        self.previous(status)

    def at_exit(self) -> None:
        """Before ``MPI_Finalize``: the bounded wait for the other ranks (then MPI_Abort)."""
        if self.timeout is None or self.size == 1 or self._everyone_leaving(self.timeout):
            return
        print(f"hvdllm: rank {self.rank} failed: it ended, but the other ranks did not within {self.timeout:g} s "
              f"(HVDLLM_WAIT_TIMEOUT_S; they wait in a collective for it); ending the job (MPI_Abort)",
              file=sys.stderr, flush=True)
        self._abort(EXIT_FAILED)


def install_exit_guard(guard: ExitGuard) -> None:
    """Route ``sys.exit`` through ``guard`` and register its ``at_exit`` (call after importing mpi4py, so
    it runs before mpi4py's MPI_Finalize)."""
    guard.previous = _plain_exit()
    sys.exit = guard.sys_exit  # type: ignore[assignment]
    atexit.register(guard.at_exit)


def _plain_exit() -> Callable[[object], Any]:
    current = sys.exit
    owner = getattr(current, "__self__", None)
    return owner.previous if isinstance(owner, ExitGuard) else current


def report_failure(exc: BaseException) -> None:
    """What an uncaught ``exc`` does (the installed excepthook), for code that caught it: a CLI that
    maps failures to exit statuses must still end a multi-rank job rather than exit into a hang."""
    hook = sys.excepthook
    if isinstance(hook, AbortOnFailure):
        hook(type(exc), exc, exc.__traceback__)
    else:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
