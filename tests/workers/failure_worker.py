"""A user script on hvdllm.torch or hvdllm.tensorflow collectives for the failure tests.

argv: framework (torch|tensorflow), steps, and optionally ``raise R S`` (rank R raises at step S),
``stall R S`` (rank R stops issuing collectives at step S: sleeps for an hour), ``exit R S`` (rank R
calls ``sys.exit(3)`` at step S) or ``exit0 R S`` (``sys.exit(0)``: a rank that leaves early).
Each rank writes its pid to $HVDLLM_TEST_OUT/pid<rank> and prints ``worker rank R step S`` per step
(one allreduce each, with a short pause so a kill lands mid-run).
"""
from __future__ import annotations

import os
import sys
import time

framework, steps = sys.argv[1], int(sys.argv[2])
mode = sys.argv[3] if len(sys.argv) > 3 else None
fail_rank, fail_step = (int(sys.argv[4]), int(sys.argv[5])) if mode else (-1, -1)

if framework == "torch":
    import torch

    import hvdllm.torch as hvd

    torch.set_num_threads(1)

    def reduce_once(step: int) -> float:
        return float(hvd.allreduce(torch.full((256,), float(step)), op=hvd.Sum)[0])
else:
    import tensorflow as tf

    import hvdllm.tensorflow as hvd

    def reduce_once(step: int) -> float:
        return float(hvd.allreduce(tf.fill([256], float(step)), op=hvd.Sum)[0])

hvd.init()
rank = hvd.rank()
out = os.environ["HVDLLM_TEST_OUT"]
with open(os.path.join(out, f".pid{rank}"), "w") as f:
    f.write(str(os.getpid()))
os.replace(os.path.join(out, f".pid{rank}"), os.path.join(out, f"pid{rank}"))
for step in range(steps):
    if rank == fail_rank and step == fail_step:
        if mode == "stall":
            time.sleep(3600)
        if mode in ("exit", "exit0"):
            print(f"worker rank {rank} exits at step {step}", flush=True)
            sys.exit(3 if mode == "exit" else 0)
        raise RuntimeError(f"injected failure at step {step}")
    total = reduce_once(step)
    assert total == step * hvd.size(), total
    print(f"worker rank {rank} step {step}", flush=True)
    time.sleep(0.05)
hvd.barrier()
