"""Shared by worker scripts: report results to the harness, one JSON file per rank."""
from __future__ import annotations

import json
import os
from typing import Any


def report(rank: int, data: dict[str, Any]) -> None:
    out = os.environ.get("HVDLLM_TEST_OUT")
    if not out:
        print(json.dumps(data))
        return
    tmp = os.path.join(out, f".rank{rank}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, os.path.join(out, f"rank{rank}.json"))


def leave_together(hvd: Any, rank: int, data: dict[str, Any]) -> None:
    """Barrier, then report. Horovod's shutdown is global: a rank that exits while another still has an
    op pending in a process set it is not part of ends that op ('Horovod has been shut down')."""
    hvd.barrier()
    report(rank, data)


def elastic_checkpoint(sizes: list[list[int]], step: int, size: int, rank: int, kill_at: list[str] | None) -> None:
    """For the elastic workers: note ``[step, size]`` when the number of workers changed; and with
    ``kill_at = [STEP, MARKER]``, SIGKILL this process if it is rank 1 at STEP and MARKER does not exist
    yet (it is created first, so only the first attempt dies)."""
    import signal

    if not sizes or sizes[-1][1] != size:
        sizes.append([step, size])
    if kill_at and step == int(kill_at[0]) and rank == 1 and not os.path.exists(kill_at[1]):
        open(kill_at[1], "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
