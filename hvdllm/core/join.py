"""``hvd.join()`` on the mpi backend: ranks that ran out of data keep serving the others' collectives.

Horovod's coordinator knows every rank's pending ops, so a joined rank feeds zeros into the others'
allreduces until every rank joined. MPI has no coordinator and matches collectives by call order, so
the mpi backend adds a side channel (a duplicate of the world communicator):

- Every collective on the world communicator has a sequence number, the same on every rank (MPI
  already requires the ranks to issue them in one order).
- ``join()`` tells every other rank "I joined before op ``s``", then serves ops ``s, s+1, ...`` as they
  are described to it, until every rank joined; it returns the last rank to join (the one that joined
  after the most ops; the highest rank among equals).
- An active rank, before each world collective and while it waits for one, looks (without blocking)
  for join notices and sends each joined rank the op's description: kind, shape, dtype, reduce op,
  root. Several active ranks may describe one op; the joined rank dedups by sequence number. An
  active rank cannot finish an op without the joined rank, so a notice that arrives late still
  reaches it while it waits.

Joined ranks take part with zeros in allreduce (every variant, so the DistributedOptimizer's
gradient buckets), broadcast and barrier: Horovod documents join for allreduce. Other world
collectives while a rank has joined raise an error naming the ops that work.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

JOIN_TAG, DESC_TAG = 7901, 7902
SERVED = ("allreduce", "broadcast", "barrier")


class JoinChannel:
    """The side channel of one world communicator (mpi4py), shared by joined and active ranks."""

    def __init__(self, comm: Any) -> None:
        from mpi4py import MPI

        self.MPI = MPI
        self.ctrl = comm.Dup()
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.seq = 0                          # world collectives issued (or served) so far
        self.joined: dict[int, int] = {}      # rank -> sequence number at which it joined
        self._sends: list[Any] = []

    # --- active ranks ------------------------------------------------------------------------
    def _poll_joins(self) -> list[int]:
        status, new = self.MPI.Status(), []
        while self.ctrl.Iprobe(source=self.MPI.ANY_SOURCE, tag=JOIN_TAG, status=status):
            source = status.Get_source()
            self.joined[source] = int(self.ctrl.recv(source=source, tag=JOIN_TAG))
            new.append(source)
        return new

    def _send(self, obj: Any, dest: int, tag: int) -> None:
        self._sends = [r for r in self._sends if not r.Test()]
        self._sends.append(self.ctrl.isend(obj, dest=dest, tag=tag))

    def begin(self, kind: str, describe: Callable[[], dict] | None) -> Callable[[], None]:
        """Before world collective ``kind``: describe it to the joined ranks; returns the hook its wait
        polls (it describes the op to ranks that join meanwhile). ``describe`` None: not servable."""
        self._poll_joins()
        others = [q for q in self.joined if q != self.rank]
        if others and (describe is None or kind not in SERVED):
            raise RuntimeError(f"{kind} was called while rank(s) {sorted(others)} have joined: on the mpi backend "
                               f"joined ranks take part in {', '.join(SERVED)} only (Horovod's join covers "
                               "allreduce); use the horovod backend for other collectives after join()")
        desc = None if describe is None else {**describe(), "kind": kind, "seq": self.seq}
        told = set(others)
        for q in others:
            self._send(desc, q, DESC_TAG)
        self.seq += 1

        def during_wait() -> None:
            """Ranks that joined since (the notice may have been read by a later op's ``begin``)."""
            self._poll_joins()
            for q in self.joined:
                if q != self.rank and q not in told:
                    if desc is None:
                        raise RuntimeError(f"rank {q} joined during a {kind}, which joined ranks cannot serve on "
                                           f"the mpi backend (they serve {', '.join(SERVED)})")
                    told.add(q)
                    self._send(desc, q, DESC_TAG)

        return during_wait

    # --- the joined rank ---------------------------------------------------------------------
    def join(self, serve: Callable[[dict], None]) -> int:
        """Announce the join, serve described ops in sequence order until every rank joined; the last
        rank to join."""
        self._poll_joins()
        self.joined[self.rank] = self.seq
        for q in range(self.size):
            if q != self.rank:
                self._send(self.seq, q, JOIN_TAG)
        pending: dict[int, dict] = {}
        status, delay = self.MPI.Status(), 5e-5
        while True:
            self._poll_joins()
            while self.ctrl.Iprobe(source=self.MPI.ANY_SOURCE, tag=DESC_TAG, status=status):
                desc = self.ctrl.recv(source=status.Get_source(), tag=DESC_TAG)
                if desc["seq"] >= self.seq:
                    pending.setdefault(desc["seq"], desc)
            if self.seq in pending:
                serve(pending.pop(self.seq))
                self.seq += 1
                delay = 5e-5
                continue
            if len(self.joined) == self.size:
                break
            time.sleep(delay)
            delay = min(delay * 2, 1e-3)
        last = max(self.joined, key=lambda q: (self.joined[q], q))
        self.ctrl.Barrier()        # every rank left its join loop: the next round starts clean
        self.joined = {}
        return last


def zeros_like_desc(desc: dict) -> np.ndarray:
    return np.zeros(desc["shape"], dtype=np.dtype(desc["dtype"]))
