"""The timeline of the mpi and local backends: one Chrome trace-event per collective, as Horovod's.

Horovod's own timeline (``HOROVOD_TIMELINE=file`` or ``hvd.start_timeline(file)``) is a JSON array of
Chrome trace events, written by rank 0 with every rank's activity, that chrome://tracing and Perfetto
open. On the Horovod backend hvdllm delegates to it. The mpi and local backends have no background
thread to record negotiation phases, so they record what they know at the collectives edge: each
collective as one complete ("X") event with its name (``allreduce.<name>``, unnamed ones
``allreduce.noname.<n>`` as in Horovod), op kind, bytes, dtype, shape and duration, in the process of
its rank (``pid`` = rank, named ``rank N``). Each rank records its own events; ``stop`` gathers them
on rank 0, which writes the file atomically (a temporary file, then a rename).

Framework-free: tensors are measured by duck typing (``nbytes``/``numel``/``shape``/``dtype``).
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

ENV = "HOROVOD_TIMELINE"
ENV_MARK_CYCLES = "HOROVOD_TIMELINE_MARK_CYCLES"
DYNAMIC = "DYNAMIC"        # Horovod's value for "no file at init, start_timeline() later"


def env_path(env: dict[str, str] | None = None) -> str | None:
    """The timeline file ``HOROVOD_TIMELINE`` names, or None (unset, empty or ``DYNAMIC``)."""
    value = (os.environ if env is None else env).get(ENV, "").strip()
    return value if value and value != DYNAMIC else None


def env_mark_cycles(env: dict[str, str] | None = None) -> bool:
    return (os.environ if env is None else env).get(ENV_MARK_CYCLES, "").strip().lower() in ("1", "true", "yes")


def nbytes(x: Any) -> int:
    """Bytes of a tensor of any framework (or a list of them)."""
    if x is None:
        return 0
    if isinstance(x, (list, tuple)):
        return sum(nbytes(v) for v in x)
    n = getattr(x, "nbytes", None)
    if isinstance(n, (int, np.integer)):
        return int(n)
    if hasattr(x, "numel") and hasattr(x, "element_size"):
        return int(x.numel() * x.element_size())
    try:
        a = np.asarray(x)
    except Exception:      # an object that does not convert (broadcast_object of anything)
        return 0
    return 0 if a.dtype == object else int(a.nbytes)


def _describe(x: Any) -> tuple[Any, str | None]:
    """(shape as a tuple, or the number of tensors of a list; dtype name) of a tensor of any framework."""
    if isinstance(x, (list, tuple)):
        return len(x), None
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    return (None if shape is None else tuple(int(d) for d in shape),
            None if dtype is None else str(getattr(dtype, "name", dtype)).replace("torch.", ""))


class Timeline:
    """One rank's recorder: ``start(path)``, ``record(...)`` per collective, ``events()`` for ``stop``."""

    def __init__(self, rank: int) -> None:
        self.rank, self.path, self.mark_cycles = rank, None, False
        self._events: list[dict] = []
        self._t0 = 0.0
        self._start_epoch_us = 0
        self._unnamed: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.path is not None

    def start(self, file_path: str, mark_cycles: bool = False) -> None:
        """Begin recording for ``file_path`` (any earlier, unwritten recording is dropped)."""
        if not isinstance(file_path, (str, os.PathLike)) or not str(file_path):
            raise ValueError(f"start_timeline: file_path must be a non-empty path, got {file_path!r}")
        with self._lock:
            self.path, self.mark_cycles = os.fspath(file_path), bool(mark_cycles)
            self._events, self._unnamed = [], {}
            self._t0, self._start_epoch_us = time.perf_counter(), time.time_ns() // 1000

    def now_us(self) -> float:
        return (time.perf_counter() - self._t0) * 1e6

    def label(self, kind: str, name: str | None) -> str:
        """Horovod's op label: ``<kind>.<name>``, unnamed ops numbered per kind and process."""
        if name:
            return f"{kind}.{name}"
        with self._lock:
            n = self._unnamed[kind] = self._unnamed.get(kind, 0) + 1
        return f"{kind}.noname.{n}"

    def record(self, kind: str, name: str | None, tensor: Any, start_us: float, dur_us: float,
               process_set: Any = None, reduce_op: Any = None) -> None:
        """Keep one collective's facts as a flat tuple of atoms: the garbage collector stops tracking
        such tuples, so a long recording does not slow every later allocation (dicts would)."""
        shape, dtype = _describe(tensor)
        ranks = getattr(process_set, "ranks", None)
        fact = (kind, self.label(kind, name), start_us, dur_us, nbytes(tensor), shape, dtype,
                tuple(int(r) for r in ranks) if ranks else None,
                None if reduce_op is None else str(getattr(reduce_op, "name", reduce_op)).lower())
        with self._lock:
            if self.active:
                self._events.append(fact)

    def mark_cycle(self) -> None:
        """An instant event (``mark_cycles=True``): here one per collective, the numpy backends' cycle."""
        if self.mark_cycles:
            with self._lock:
                self._events.append(("CYCLE_START", self.now_us()))

    def take(self) -> dict[str, Any]:
        """Stop recording; this rank's part of the trace (metadata and Chrome events), to gather on rank 0."""
        with self._lock:
            facts, self.path, self._events = self._events, None, []
        return {"rank": self.rank, "start_epoch_us": self._start_epoch_us,
                "events": [self._event(f) for f in facts]}

    def _event(self, fact: tuple) -> dict[str, Any]:
        if fact[0] == "CYCLE_START":
            return {"ph": "i", "name": "CYCLE_START", "ts": round(fact[1], 3), "pid": self.rank, "tid": 0, "s": "p"}
        kind, label, start, dur, size, shape, dtype, ranks, reduce_op = fact
        args: dict[str, Any] = {"op": kind.upper(), "bytes": size}
        if isinstance(shape, int):
            args["tensors"] = shape
        elif shape is not None:
            args["shape"] = list(shape)
        if dtype is not None:
            args["dtype"] = dtype
        if reduce_op is not None:
            args["reduce_op"] = reduce_op
        if ranks:
            args["process_set"] = list(ranks)
        return {"ph": "X", "name": label, "cat": kind, "ts": round(start, 3), "dur": round(max(dur, 0.0), 3),
                "pid": self.rank, "tid": 0, "args": args}


def trace(parts: Sequence[dict[str, Any]]) -> list[dict]:
    """Every rank's part as one Chrome trace: a named process per rank (``pid`` = rank), timestamps in
    microseconds since the first rank started recording (the ranks' wall clocks align them)."""
    parts = sorted(parts, key=lambda p: p["rank"])
    base = min((p["start_epoch_us"] for p in parts), default=0)
    events: list[dict] = []
    for part in parts:
        rank, shift = part["rank"], part["start_epoch_us"] - base
        events.append({"name": "process_name", "ph": "M", "pid": rank,
                       "args": {"name": f"rank {rank}", "start_time_since_epoch_in_micros": base}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}})
        events += [{**e, "ts": round(e["ts"] + shift, 3)} for e in part["events"]]
    return events


def write_atomically(path: str, events: list[dict]) -> None:
    """The trace as a JSON array (one event a line), via a temporary file and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write("[\n" + ",\n".join(json.dumps(e) for e in events) + "\n]\n")
    os.replace(tmp, path)


_depth = threading.local()


def traced(kind: str, tensor_arg: str = "x") -> Callable[[Callable], Callable]:
    """Decorate a backend's collective method: while ``self.timeline`` is active, record one event.

    Nested traced calls (a grouped op made of single ones) record only the outermost. A returned
    handle (anything with ``wait``) records when it completes, so async ops get their whole duration.
    """
    def wrap(fn: Callable) -> Callable:
        argument = _argument_getter(fn)

        @functools.wraps(fn)
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            timeline: Timeline | None = getattr(self, "timeline", None)
            if timeline is None or not timeline.active or getattr(_depth, "n", 0):
                return fn(self, *args, **kwargs)
            tensor, name, ps, op = (argument(k, args, kwargs) for k in (tensor_arg, "name", "process_set", "op"))
            timeline.mark_cycle()
            start = timeline.now_us()
            _depth.n = 1
            try:
                result = fn(self, *args, **kwargs)
            finally:
                _depth.n = 0
            if hasattr(result, "wait") and not isinstance(result, (list, tuple)):
                return _TimedHandle(result, lambda: timeline.record(kind, name, tensor, start,
                                                                    timeline.now_us() - start, ps, op))
            timeline.record(kind, name, tensor, start, timeline.now_us() - start, ps, op)
            return result

        method.traced = True   # type: ignore[attr-defined]
        return method

    return wrap


def _argument_getter(fn: Callable) -> Callable[[str, tuple, dict], Any]:
    """``get(name, args, kwargs)``: the value a call of method ``fn`` passes for parameter ``name`` (its
    default when not passed; None for a name ``fn`` does not have). Cheaper than Signature.bind."""
    params = list(inspect.signature(fn).parameters.values())[1:]          # without self
    position = {p.name: i for i, p in enumerate(params)
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)}
    default = {p.name: (None if p.default is p.empty else p.default) for p in params}

    def get(name: str, args: tuple, kwargs: dict) -> Any:
        if name in kwargs:
            return kwargs[name]
        i = position.get(name)
        return args[i] if i is not None and i < len(args) else default.get(name)

    return get


class _TimedHandle:
    """A handle that records its collective's event once ``wait`` returns."""

    def __init__(self, inner: Any, done: Callable[[], None]) -> None:
        self._inner, self._done = inner, done

    def wait(self) -> Any:
        result = self._inner.wait()
        if self._done is not None:
            self._done, done = None, self._done
            done()
        return result

    def poll(self) -> bool:
        return bool(self._inner.poll())
