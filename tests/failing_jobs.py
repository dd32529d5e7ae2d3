"""A launched job the failure tests can watch, signal and time: output in a file, ranks found by pid.

Unlike tests/multirank.py (which wants every rank to succeed), this keeps the job running while the
test waits for a step, sends a real signal to one rank's process, and times how long the job takes
to end.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from tests.multirank import ROOT, base_env, command

RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK")


class Job:
    """``argv`` (python's arguments) on ``np`` ranks under ``launcher``, started now."""

    def __init__(self, launcher: str, argv: list[str], out: Path, np: int = 2,
                 env: dict[str, str] | None = None, cmd: list[str] | None = None) -> None:
        """``cmd``: a whole launch command instead of ``launcher`` (e.g. multirank.elastic_command)."""
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.log = out, out / "launcher.log"
        cmd, extra = (cmd, {}) if cmd is not None else command(launcher, np, argv)
        full_env = base_env({**extra, **(env or {}), "HVDLLM_TEST_OUT": str(out)})
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=str(ROOT))
        self.started = time.monotonic()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, ready: Callable[[], bool], timeout: float = 180) -> None:
        """Until ``ready()``; fails when the job ends first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"the job ended (exit {self.proc.returncode}) before it was ready:\n"
                                     f"{self.output()[-6000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"not ready after {timeout} s:\n{self.output()[-6000:]}")
            time.sleep(0.2)

    def ranks(self) -> dict[int, int]:
        """{rank: pid} of this job's live rank processes (Python processes whose environment names this
        job's output folder and a rank)."""
        tag = f"HVDLLM_TEST_OUT={self.out}".encode()
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
                argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0]
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if tag not in env or not os.path.basename(argv0).startswith(b"python") or state == "Z":
                continue
            values = dict(e.split(b"=", 1) for e in env if b"=" in e)
            rank = next((values[v.encode()] for v in RANK_VARS if v.encode() in values), None)
            if rank is not None:
                found[int(rank)] = int(entry.name)
        return found

    def rank_pid(self, rank: int) -> int:
        pid = self.ranks().get(rank)
        if pid is None:
            raise AssertionError(f"no process of rank {rank} found:\n{self.output()[-3000:]}")
        return pid

    def signal_rank(self, rank: int, sig: int) -> float:
        """Send ``sig`` to rank ``rank``; returns the time it was sent (time.monotonic)."""
        os.kill(self.rank_pid(rank), sig)
        return time.monotonic()

    def wait(self, timeout: float) -> int | None:
        """The launcher's exit status, or None (and the job killed) when it runs past ``timeout`` s."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
