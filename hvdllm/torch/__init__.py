"""hvdllm for PyTorch: Horovod's API names, backed by Horovod, mpi4py or a single process.

    import hvdllm.torch as hvd
    hvd.init()
    torch.set_num_threads(hvd.threads_per_rank())
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
"""
from __future__ import annotations

from typing import Any

import torch

from hvdllm.core.compression import Compression
from hvdllm.core.frontend import Frontend
from hvdllm.core.ops import Average, ReduceOp, Sum, parse_op
from hvdllm.core.process_sets import WORLD, ProcessSet
from hvdllm.torch import runtime as _runtime

_front = Frontend("torch", _runtime.create)
globals().update(_front.exports())


def allreduce_async_(tensor: torch.Tensor, op: ReduceOp = Average, process_set: ProcessSet = WORLD) -> Any:
    """Start an in-place reduction of ``tensor``; the returned handle's ``wait()`` completes it."""
    return _front.runtime().allreduce_async_(tensor, parse_op(op), process_set)


def broadcast_(tensor: torch.Tensor, root_rank: int, process_set: ProcessSet = WORLD) -> torch.Tensor:
    """In-place broadcast, as horovod.torch.broadcast_."""
    with torch.no_grad():
        tensor.copy_(_front.broadcast(tensor, root_rank, process_set))
    return tensor


__all__ = sorted(_front.exports()) + [
    "allreduce_async_", "broadcast_", "Average", "Sum", "ReduceOp", "Compression", "ProcessSet",
]

from hvdllm.torch.sync import broadcast_optimizer_state, broadcast_parameters  # noqa: E402
from hvdllm.torch.distributed import DistributedOptimizer  # noqa: E402

__all__ += ["DistributedOptimizer", "broadcast_parameters", "broadcast_optimizer_state"]

from hvdllm.torch import optim  # noqa: E402  (hvd.optim.SGD/Adam/AdamW/LAMB, lr_scheduler)

__all__ += ["optim"]
