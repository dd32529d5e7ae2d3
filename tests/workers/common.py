"""Shared by worker scripts: this checkout on ``sys.path``, starting hvdllm on a rank, reporting results to
the harness (one JSON file per rank).

A worker imports it first, as ``from common import ...`` (a script's own folder leads ``sys.path``, so this
works under every launcher and when a worker is run by hand). Importing it puts the repository root in
front, so the worker's ``import hvdllm`` is this checkout's, not an installed one, and ``tests`` imports.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)


def launched_size() -> int:
    """The number of ranks the launcher started, before ``init`` (horovodrun's or mpirun's variable; 1
    without a launcher): for process sets that depend on it."""
    return int(os.environ.get("HOROVOD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or 1)


def start(hvd: Any, process_sets: Any = None, threads: int | None = 1, inter_op: int | None = None) -> tuple[int, int]:
    """Initialise ``hvd`` (hvdllm.torch or hvdllm.tensorflow) on this rank, with ``process_sets``, and give
    its framework ``threads`` intra-op threads (None: ``hvd.threads_per_rank()``, the cores shared among
    the local ranks) and, TensorFlow, ``inter_op`` inter-op threads where given. Returns (rank, size).

    Tiny tensors on cores that the ranks share: one thread per rank is fastest and deterministic."""
    hvd.init(process_sets=process_sets)
    threads = threads or hvd.threads_per_rank()
    if hvd.__name__ == "hvdllm.torch":
        import torch

        torch.set_num_threads(threads)
    else:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        if inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    return hvd.rank(), hvd.size()


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
