"""Launch real ranks for a test and collect what each rank reports.

A worker script calls ``report`` (tests/workers/common.py) once; the harness reads one JSON file per
rank. On any failure (non-zero exit, timeout, a missing report) the assertion message carries the
launcher's whole output, where horovodrun/mpirun tag each line with its rank.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCHERS = ("gloo", "horovod-mpi", "mpirun")


class RankFailure(AssertionError):
    """A launch that failed; ``reports`` holds the reports the ranks wrote before it ended."""

    def __init__(self, message: str, reports: dict[int, dict] | None = None) -> None:
        super().__init__(message)
        self.reports = reports or {}


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
        "OMP_NUM_THREADS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "TF_ENABLE_ONEDNN_OPTS": "0",
        "PYTHONUNBUFFERED": "1",
        "PYTHONHASHSEED": "0",
    })
    env.pop("HVDLLM_BACKEND", None)
    env.update(extra or {})
    return env


def command(launcher: str, np: int, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The launch command and the extra environment for ``launcher``."""
    py = [sys.executable, *argv]
    if launcher == "gloo":
        return [str(BIN / "horovodrun"), "-np", str(np), "--gloo", *py], {}
    if launcher == "horovod-mpi":
        return [str(BIN / "horovodrun"), "-np", str(np), "--mpi", "--mpi-args=--oversubscribe", *py], {}
    if launcher == "mpirun":
        return ["mpirun", "-np", str(np), "--oversubscribe", "--bind-to", "none", *py], {"HVDLLM_BACKEND": "mpi"}
    if launcher == "python":
        if np != 1:
            raise ValueError("plain python runs one rank")
        return py, {}
    raise ValueError(f"unknown launcher {launcher!r}; allowed: {LAUNCHERS + ('python',)}")


def _launch(cmd: list[str], env: dict[str, str], timeout: float, what: str) -> tuple[int, str]:
    """Run ``cmd`` in its own session; (exit status, whole output). On timeout the session is killed."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, cwd=str(ROOT))
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise RankFailure(f"{what} timed out after {timeout}s; output:\n{output}")
    return proc.returncode, output


def _reports(out: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank*.json")}


def run_ranks(worker: str, np: int = 2, launcher: str = "gloo", args: list[str] | None = None,
              timeout: float = 240, env: dict[str, str] | None = None) -> list[dict]:
    """Run ``tests/workers/<worker>`` on ``np`` ranks; return each rank's report, ordered by rank."""
    with tempfile.TemporaryDirectory(prefix="hvdllm-ranks-") as out:
        script = str(ROOT / "tests" / "workers" / worker)
        cmd, extra = command(launcher, np, [script, *(args or [])])
        full_env = base_env({**extra, **(env or {}), "HVDLLM_TEST_OUT": out})
        returncode, output = _launch(cmd, full_env, timeout, f"{launcher} np={np} {worker}")
        reports = _reports(Path(out))
        if returncode != 0 or sorted(reports) != list(range(np)):
            raise RankFailure(
                f"{launcher} np={np} {worker} {' '.join(args or [])}: exit {returncode}, "
                f"reports from ranks {sorted(reports)} of {np}; output:\n{output}", reports)
        return [reports[r] for r in range(np)]


def elastic_command(tmp: Path, argv: list[str], grow_when: Path | None, max_np: int = 2) -> list[str]:
    """``horovodrun -np 2 --min-np 1 --max-np MAX_NP --gloo`` running python ``argv``, with a discovery
    script (written in ``tmp``) listing two names of this machine, and a third (``hostname``) once the
    file ``grow_when`` exists."""
    script = tmp / "discover.sh"
    script.write_text("#!/bin/sh\necho localhost:1\necho 127.0.0.1:1\n"
                      + (f"[ -e {grow_when} ] && echo $(hostname):1\n" if grow_when else "") + "exit 0\n")
    script.chmod(0o755)
    return [str(BIN / "horovodrun"), "-np", "2", "--min-np", "1", "--max-np", str(max_np), "--gloo",
            "--host-discovery-script", str(script), str(BIN / "python"), *argv]


def run_elastic(worker: str, tmp: Path, extra: list[str], grow: bool, timeout: float = 300) -> tuple[list[dict], str]:
    """Run ``tests/workers/<worker>`` under :func:`elastic_command` (the worker writes the file it gets
    as ``--grow`` when it wants a worker back); every final worker's report by rank, and the output."""
    alone = tmp / "alone"
    out = tmp / "reports"
    out.mkdir()
    args = [*extra, *(["--grow", str(alone)] if grow else [])]
    cmd = elastic_command(tmp, [str(ROOT / "tests" / "workers" / worker), *args], alone if grow else None)
    returncode, output = _launch(cmd, base_env({"HVDLLM_TEST_OUT": str(out)}), timeout, f"elastic {worker}")
    reports = _reports(out)
    if returncode != 0 or not reports:
        raise RankFailure(f"elastic {worker}: exit {returncode}, reports from {sorted(reports)}; output:\n{output}")
    return [reports[r] for r in sorted(reports)], output
