"""A user's script with hvdllm.torch collectives, run across simulated hosts: each rank reports the
hosts every rank runs on (an allgather of their names), a sum, an allgather and a broadcast."""
from __future__ import annotations

import socket

from common import report, start

import torch

import hvdllm.torch as hvd

r, _ = start(hvd)
name = list(socket.gethostname().encode()[:32].ljust(32, b"\0"))
names = hvd.allgather(torch.tensor([name], dtype=torch.int32)).tolist()
out = {
    "backend": hvd.backend(),
    "size": hvd.size(),
    "local_rank": hvd.local_rank(),
    "local_size": hvd.local_size(),
    "hosts": [bytes(row).rstrip(b"\0").decode() for row in names],
    "sum": hvd.allreduce(torch.arange(3, dtype=torch.float32) + 10 * r, op=hvd.Sum).tolist(),
    "gather": hvd.allgather(torch.full((r + 1,), float(r))).tolist(),
    "bcast": hvd.broadcast(torch.tensor([float(r + 5)]), root_rank=1).tolist(),
}
hvd.barrier()
report(r, out)
