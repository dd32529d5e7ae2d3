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
