"""Pipeline-parallel schedules (GPipe, 1F1B) as plain per-stage action lists, and stage partitioning.

A schedule is, for each stage, the ordered list of what that stage does: compute actions
(``forward``/``backward`` of one micro-batch) and the communications with its neighbours
(``send_act``/``recv_act`` towards the next stage, ``send_grad``/``recv_grad`` towards the previous).

The transports available on Horovod (a broadcast inside a two-rank process set) are *blocking
rendezvous*: a send completes only when the peer posts the matching receive. The order of the
communications on each link must therefore be the same on both ends and must not form a cycle. The
compute order of GPipe/1F1B alone does not fix that order (1F1B's steady state would have both ends
sending at once), so :func:`build_schedule` derives it from an event simulation with rendezvous
semantics: a stage posts a buffered send when the neighbour is waiting for it, at its next action
boundary, before starting more compute. The simulation is a witness that the programs cannot
deadlock, and its timeline gives the expected bubble of that transport.

Ideal bubble (idle fraction of each stage) for both GPipe and 1F1B with p stages, m micro-batches:
(p - 1) / (m + p - 1). 1F1B does not shrink the bubble; it caps the activations a stage keeps alive
at min(p - stage, m) micro-batches instead of GPipe's m.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from hvdllm.core.grid import ProcessGrid

SCHEDULES = ("gpipe", "1f1b")
COMPUTE = ("forward", "backward")
OPS = ("forward", "backward", "send_act", "recv_act", "send_grad", "recv_grad")


@dataclasses.dataclass(frozen=True)
class Action:
    """One step of a stage's program: ``op`` (see OPS) on micro-batch ``mb``."""

    op: str
    mb: int

    def __repr__(self) -> str:
        short = {"forward": "F", "backward": "B", "send_act": "sA", "recv_act": "rA",
                 "send_grad": "sG", "recv_grad": "rG"}[self.op]
        return f"{short}{self.mb}"


@dataclasses.dataclass(frozen=True)
class PipelineSchedule:
    """Per-stage programs plus the simulated timeline (start, end, op, mb) of each compute action."""

    kind: str
    num_stages: int
    num_microbatches: int
    actions: tuple[tuple[Action, ...], ...]
    timeline: tuple[tuple[tuple[float, float, str, int], ...], ...]

    @property
    def bubble_fraction(self) -> float:
        """The ideal bubble (p - 1) / (m + p - 1), the same for GPipe and 1F1B."""
        return ideal_bubble(self.num_stages, self.num_microbatches)

    def simulated_bubble(self) -> float:
        """Mean idle fraction of the stages over the simulated makespan (rendezvous transport)."""
        makespan = max(t[-1][1] for t in self.timeline if t)
        busy = [sum(e - s for s, e, _, _ in t) for t in self.timeline]
        return 1.0 - sum(busy) / (makespan * self.num_stages)

    def peak_in_flight(self, stage: int) -> int:
        """Most micro-batches whose activations ``stage`` holds at once (forwarded, not yet backwarded)."""
        live = peak = 0
        for a in self.actions[stage]:
            if a.op == "forward":
                live += 1
                peak = max(peak, live)
            elif a.op == "backward":
                live -= 1
        return peak

    def compute_order(self, stage: int) -> list[Action]:
        return [a for a in self.actions[stage] if a.op in COMPUTE]


def ideal_bubble(num_stages: int, num_microbatches: int) -> float:
    """(p - 1) / (m + p - 1): the idle fraction of a synchronous pipeline flush schedule."""
    _check_counts(num_stages, num_microbatches)
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


def _check_counts(num_stages: int, num_microbatches: int) -> None:
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages={num_stages!r} must be an integer >= 1")
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"num_microbatches={num_microbatches!r} must be an integer >= 1")


def compute_order(kind: str, num_stages: int, num_microbatches: int, stage: int) -> list[Action]:
    """The forward/backward order of one stage.

    GPipe: all forwards, then all backwards (in micro-batch order).
    1F1B (PipeDream-flush): ``min(p - stage - 1, m)`` warm-up forwards, then alternate one forward and
    one backward, then the remaining backwards.
    """
    kind = kind.lower()
    if kind not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {kind!r}; allowed: {', '.join(SCHEDULES)}")
    _check_counts(num_stages, num_microbatches)
    p, m = num_stages, num_microbatches
    if not 0 <= stage < p:
        raise ValueError(f"stage {stage} is outside 0..{p - 1}")
    F = [Action("forward", i) for i in range(m)]
    B = [Action("backward", i) for i in range(m)]
    if kind == "gpipe":
        return F + B
    warm = min(p - stage - 1, m)
    out = F[:warm]
    for i in range(m - warm):
        out += [F[warm + i], B[i]]
    return out + B[m - warm:]


def build_schedule(kind: str, num_stages: int, num_microbatches: int,
                   forward_time: float = 1.0, backward_time: float = 2.0, comm_time: float = 0.0) -> PipelineSchedule:
    """Per-stage programs with communications placed for a blocking rendezvous transport.

    Event simulation: every stage runs its compute order; an input it lacks makes it wait; a stage at an
    action boundary (finished, or waiting) first hands buffered outputs to neighbours that wait for them.
    A rendezvous occupies both ends for ``comm_time`` (0: instantaneous), which prices the transport's
    latency into :meth:`PipelineSchedule.simulated_bubble`. Raises RuntimeError if the programs would deadlock
    (never for GPipe/1F1B).
    """
    if comm_time < 0 or forward_time <= 0 or backward_time <= 0:
        raise ValueError(f"times must be positive (comm_time >= 0), got forward_time={forward_time}, "
                         f"backward_time={backward_time}, comm_time={comm_time}")
    p, m = num_stages, num_microbatches
    orders = [compute_order(kind, p, m, s) for s in range(p)]
    programs: list[list[Action]] = [[] for _ in range(p)]
    timeline: list[list[tuple[float, float, str, int]]] = [[] for _ in range(p)]
    pc = [0] * p
    busy_until = [0.0] * p
    running: list[Action | None] = [None] * p
    have = [set() for _ in range(p)]        # inputs received: ("act"|"grad", mb)
    outbox = [set() for _ in range(p)]      # outputs computed, not yet sent: ("act"|"grad", mb)
    now = 0.0

    def needs(s: int) -> tuple[str, int] | None:
        """The input stage s waits for before its next compute action, or None."""
        if pc[s] >= len(orders[s]):
            return None
        a = orders[s][pc[s]]
        if a.op == "forward" and s > 0 and ("act", a.mb) not in have[s]:
            return ("act", a.mb)
        if a.op == "backward" and s < p - 1 and ("grad", a.mb) not in have[s]:
            return ("grad", a.mb)
        return None

    while True:
        # Finish compute that ends now: its output goes to the outbox.
        for s in range(p):
            a = running[s]
            if a is not None and busy_until[s] <= now:
                running[s] = None
                if a.op == "forward" and s < p - 1:
                    outbox[s].add(("act", a.mb))
                if a.op == "backward" and s > 0:
                    outbox[s].add(("grad", a.mb))
        changed = True
        while changed:
            changed = False
            for s in range(p):
                if running[s] is not None:
                    continue
                # Serve waiting neighbours first.
                for peer, kind_ in ((s + 1, "act"), (s - 1, "grad")):
                    if 0 <= peer < p and running[peer] is None:
                        want = needs(peer)
                        if want is not None and want[0] == kind_ and want in outbox[s]:
                            outbox[s].discard(want)
                            have[peer].add(want)
                            programs[s].append(Action("send_" + kind_, want[1]))
                            programs[peer].append(Action("recv_" + kind_, want[1]))
                            changed = True
                            if comm_time > 0:
                                running[s] = Action("send_" + kind_, want[1])
                                running[peer] = Action("recv_" + kind_, want[1])
                                busy_until[s] = busy_until[peer] = now + comm_time
                                break
                if running[s] is not None:
                    continue
                if pc[s] < len(orders[s]) and needs(s) is None:
                    a = orders[s][pc[s]]
                    pc[s] += 1
                    programs[s].append(a)
                    dur = forward_time if a.op == "forward" else backward_time
                    running[s], busy_until[s] = a, now + dur
                    timeline[s].append((now, now + dur, a.op, a.mb))
                    changed = True
        pending = [busy_until[s] for s in range(p) if running[s] is not None]
        if not pending:
            break
        now = min(pending)
    if any(pc[s] < len(orders[s]) for s in range(p)) or any(outbox):
        raise RuntimeError(f"{kind} schedule with p={p}, m={m} deadlocks under rendezvous transport")
    return PipelineSchedule(kind.lower(), p, m, tuple(tuple(x) for x in programs), tuple(tuple(t) for t in timeline))


def partition_layers(costs: Sequence[float], num_stages: int, first_extra: float = 0.0,
                     last_extra: float = 0.0) -> list[tuple[int, int]]:
    """Split ``len(costs)`` consecutive layers into ``num_stages`` non-empty [start, end) ranges.

    Minimises the largest stage cost (e.g. parameter count); ``first_extra``/``last_extra`` are costs
    that always sit on the first/last stage (token embedding, final norm and head). Ties prefer
    earlier boundaries, so the result is deterministic.
    """
    n = len(costs)
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages={num_stages!r} must be an integer >= 1")
    if num_stages > n:
        raise ValueError(f"cannot split {n} layers into {num_stages} pipeline stages; "
                         f"allowed: at most {n} stages (one layer per stage)")
    if any(c < 0 for c in costs):
        raise ValueError(f"layer costs must be >= 0, got {list(costs)}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))

    def cost(i: int, j: int, stage: int) -> float:
        extra = (first_extra if stage == 0 else 0.0) + (last_extra if stage == num_stages - 1 else 0.0)
        return prefix[j] - prefix[i] + extra

    INF = float("inf")
    # best[k][j]: minimal max-cost of placing the first j layers on stages 0..k-1.
    best = [[INF] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for j in range(k, n - (num_stages - k) + 1):
            for i in range(k - 1, j):
                v = max(best[k - 1][i], cost(i, j, k - 1))
                if v < best[k][j] - 1e-12:
                    best[k][j], cut[k][j] = v, i
    bounds, j = [], n
    for k in range(num_stages, 0, -1):
        i = cut[k][j]
        bounds.append((i, j))
        j = i
    return bounds[::-1]


class StageProgram:
    """The framework-free part of a pipeline executor (torch's and Keras's subclass it): this rank's stage,
    its neighbours and their two-rank process sets, the pipeline's process set, the schedule per
    micro-batch count, and deterministic collective names (Horovod matches ops by name, and stages
    issue different numbers of collectives)."""

    def __init__(self, grid: ProcessGrid, rank: int, schedule: str) -> None:
        if schedule.lower() not in SCHEDULES:
            raise ValueError(f"unknown pipeline schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
        c = grid.coords(rank)
        self.grid, self.rank = grid, rank
        self.kind, self.stage, self.num_stages = schedule.lower(), c.pp, grid.pp
        self.prev_rank = grid.rank_of(c.dp, c.tp, c.pp - 1) if c.pp > 0 else None
        self.next_rank = grid.rank_of(c.dp, c.tp, c.pp + 1) if c.pp < grid.pp - 1 else None
        self.prev_set = grid.link_group(rank, c.pp - 1) if self.prev_rank is not None else None
        self.next_set = grid.link_group(rank, c.pp + 1) if self.next_rank is not None else None
        # Exchange names carry the link: a middle stage receives on one link and sends on the other.
        self.link_prev, self.link_next = f"{self.prev_rank}-{rank}", f"{rank}-{self.next_rank}"
        self.pp_set = grid.pp_group(rank)
        self.first_rank, self.last_rank = grid.rank_of(c.dp, c.tp, 0), grid.rank_of(c.dp, c.tp, grid.pp - 1)
        self._seq: dict[str, int] = {}
        self._schedules: dict[int, PipelineSchedule] = {}

    def schedule(self, num_microbatches: int) -> PipelineSchedule:
        if num_microbatches not in self._schedules:
            self._schedules[num_microbatches] = build_schedule(self.kind, self.num_stages, num_microbatches)
        return self._schedules[num_microbatches]

    def _name(self, tag: str) -> str:
        n = self._seq.get(tag, 0)
        self._seq[tag] = n + 1
        return f"hvdllm.pp.{tag}.{n}"
