"""`hvdllm train --framework tensorflow ...` on every rank (the user's command), then each rank reports
its exit status; rank 0 adds the run's metrics.csv rows. Run as `<launcher> python train_keras_worker.py ARGS`."""
from __future__ import annotations

import os
import sys

from common import report

from hvdllm.cli import main

argv = sys.argv[1:]
status = main(["train", "--framework", "tensorflow", *argv])

import hvdllm.tensorflow as hvd  # noqa: E402

rank = hvd.rank() if hvd.is_initialized() else 0
out: dict = {"status": status, "size": hvd.size() if hvd.is_initialized() else 1}
if rank == 0 and status == 0:
    from hvdllm.train.metrics import read_metrics

    out["rows"] = read_metrics(os.path.join(argv[argv.index("--out") + 1], "metrics.csv"))
report(rank, out)
