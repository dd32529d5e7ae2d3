"""hvd.start_timeline/stop_timeline and HOROVOD_TIMELINE on every backend: a Chrome-trace JSON file that
names every collective the script ran (Horovod's own on the Horovod backend; hvdllm.core.timeline's
one event per collective on mpi and local)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hvdllm.core import timeline as tl
from tests.multirank import run_ranks

LAUNCHES = [("python", 1, "local"), ("gloo", 2, "horovod"), ("horovod-mpi", 2, "horovod"), ("mpirun", 2, "mpi")]


def labels(events: list[dict]) -> set[str]:
    """Op labels in a trace: Horovod names a process per tensor (``process_name``), hvdllm names events."""
    found = {e["args"]["name"] for e in events if e.get("name") == "process_name" and "name" in e.get("args", {})}
    return found | {e["name"] for e in events if e.get("ph") == "X"}


def check_trace(path: Path, backend: str, size: int, names: list[str]) -> None:
    events = json.loads(path.read_text())          # strict JSON: what chrome://tracing / Perfetto load
    assert isinstance(events, list) and events
    found = labels(events)
    for name in names:
        assert any("." + name in label for label in found), (name, sorted(found))
    if backend != "horovod":
        ops = [e for e in events if e.get("ph") == "X" and ".tl_" in e["name"]]   # (the env run's barrier too)
        assert {e["pid"] for e in ops} == set(range(size))            # every rank's events, in its process
        assert len(ops) == len(names) * size                          # one event per collective and rank
        ar = next(e for e in ops if e["name"] == "allreduce.tl_allreduce")
        assert ar["args"]["bytes"] == 4000 and ar["args"]["op"] == "ALLREDUCE" and ar["dur"] >= 0
        assert ar["args"]["reduce_op"] == "sum"
        assert not list(path.parent.glob(".*.tmp"))                  # written atomically


CASES = [(mode, *launch) for mode in ("api", "env") for launch in LAUNCHES
         if mode == "api" or launch[0] != "horovod-mpi"]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("mode,launcher,np,backend", CASES, ids=[f"{m}-{l}-np{n}" for m, l, n, _ in CASES])
def test_timeline(tmp_path: Path, mode: str, launcher: str, np: int, backend: str) -> None:
    path = tmp_path / "trace" / "timeline.json"
    path.parent.mkdir()
    env = {tl.ENV: str(path)} if mode == "env" else {}
    reports = run_ranks("timeline_worker.py", np=np, launcher=launcher, timeout=180, env=env,
                        args=[mode, str(path), "torch"])
    assert [rep["backend"] for rep in reports] == [backend] * np
    check_trace(path, backend, np, reports[0]["names"])


def test_timeline_tensorflow_local(tmp_path: Path) -> None:
    path = tmp_path / "tf.json"
    reports = run_ranks("timeline_worker.py", np=1, launcher="python", timeout=180,
                        args=["api", str(path), "tensorflow"])
    check_trace(path, "local", 1, reports[0]["names"])


def test_trace_merges_ranks_on_one_clock() -> None:
    parts = [{"rank": 1, "start_epoch_us": 1_000_500, "events": [{"ph": "X", "name": "a", "ts": 10.0, "dur": 1.0,
                                                                   "pid": 1, "tid": 0, "args": {}}]},
             {"rank": 0, "start_epoch_us": 1_000_000, "events": []}]
    events = tl.trace(parts)
    assert [e["pid"] for e in events if e["name"] == "process_name"] == [0, 1]
    assert next(e for e in events if e["name"] == "a")["ts"] == 510.0


def test_bad_path() -> None:
    with pytest.raises(ValueError, match="file_path"):
        tl.Timeline(0).start("")
