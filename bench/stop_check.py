"""Cost of the per-step stop agreement (hvdllm.core.preemption.agreed_stop) against a training step.

    .venv/bin/horovodrun -np 2 --gloo .venv/bin/python bench/stop_check.py [--steps 30] [--mb 4]

Each rank repeats: a gradient-sized allreduce (``--mb`` MB of fp32, the step's communication) then the
stop agreement (a ``size``-element float64 sum), and reports the median time of each. Run under the
launcher to measure (horovodrun --gloo / --mpi, or mpirun with HVDLLM_BACKEND=mpi). The agreement's
latency is what ``run.stop_check_interval`` divides; compare it with the step time of your model
(metrics.csv: tokens_per_s).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import hvdllm.torch as hvd  # noqa: E402
from hvdllm.core.preemption import agreed_stop  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--mb", type=float, default=4.0)
    args = p.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    rank, size = hvd.rank(), hvd.size()
    grads = torch.zeros(int(args.mb * 2**20 / 4))

    def sum_over_ranks(v: np.ndarray) -> np.ndarray:
        return hvd.allreduce(torch.from_numpy(v), op=hvd.Sum, name="stop").numpy()

    grad_ms, stop_ms = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        hvd.allreduce(grads, name="grads")
        t1 = time.perf_counter()
        assert agreed_stop(0, rank, size, sum_over_ranks) is None
        t2 = time.perf_counter()
        grad_ms.append((t1 - t0) * 1e3)
        stop_ms.append((t2 - t1) * 1e3)
    if rank == 0:
        print(f"{hvd.backend()} np={size}: gradient allreduce ({args.mb:g} MB) median {statistics.median(grad_ms):.2f} ms; "
              f"stop agreement median {statistics.median(stop_ms):.2f} ms, p90 "
              f"{sorted(stop_ms)[int(0.9 * len(stop_ms))]:.2f} ms")


if __name__ == "__main__":
    main()
