"""Named collectives inside a timeline: `<launcher> python timeline_worker.py api|env FILE [torch|tensorflow]`.

``api``: hvd.start_timeline(FILE) ... hvd.stop_timeline(); ``env``: the harness sets HOROVOD_TIMELINE=FILE
and the script never mentions the timeline (the file is written at shutdown / exit, as Horovod does).
The test (tests/test_timeline.py) parses FILE after the job ended.
"""
from __future__ import annotations

import sys

from common import report, start

mode, path = sys.argv[1], sys.argv[2]
TORCH = sys.argv[3:] != ["tensorflow"]
if TORCH:
    import torch as fw

    import hvdllm.torch as hvd
else:
    import tensorflow as fw

    import hvdllm.tensorflow as hvd

ones = fw.ones

NAMES = ["tl_allreduce", "tl_allgather", "tl_broadcast", "tl_reducescatter", "tl_grouped"]

r, n = start(hvd)
if mode == "api":
    hvd.start_timeline(path)
hvd.allreduce(ones((1000,)), name="tl_allreduce", op=hvd.Sum)
hvd.allgather(ones((r + 1, 3)), name="tl_allgather")
hvd.broadcast(ones((5,)), 0, name="tl_broadcast")
hvd.reducescatter(ones((2 * n, 2)), name="tl_reducescatter")
hvd.grouped_allreduce([ones((2,)), ones((3,))], name="tl_grouped")
if mode == "api":
    hvd.stop_timeline()
hvd.barrier()
report(r, {"rank": r, "size": n, "backend": hvd.backend(), "names": NAMES})
if mode == "env":
    hvd.shutdown()
