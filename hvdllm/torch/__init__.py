"""hvdllm for PyTorch: Horovod's API names, backed by Horovod, mpi4py or a single process.

    import hvdllm.torch as hvd
    hvd.init()
    torch.set_num_threads(hvd.threads_per_rank())
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
"""
from __future__ import annotations

import torch

from hvdllm.core.compression import Compression
from hvdllm.core.ops import Average, ReduceOp, Sum
from hvdllm.core.process_sets import WORLD, ProcessSet
from hvdllm.torch import elastic, optim  # hvd.elastic.run/TorchState/ElasticSampler; hvd.optim.SGD/Adam/AdamW/LAMB, lr_scheduler
from hvdllm.torch.basics import (add_process_set, allgather, allreduce, allreduce_async_, backend, barrier, broadcast,
                                 broadcast_object, collectives, grouped_allreduce, init, is_initialized, local_rank,
                                 local_size, rank, shutdown, size, threads_per_rank)
from hvdllm.torch.distributed import DistributedOptimizer
from hvdllm.torch.sync import broadcast_optimizer_state, broadcast_parameters


def broadcast_(tensor: torch.Tensor, root_rank: int, process_set: ProcessSet = WORLD,
               name: str | None = None) -> torch.Tensor:
    """In-place broadcast, as horovod.torch.broadcast_."""
    with torch.no_grad():
        tensor.copy_(broadcast(tensor, root_rank, process_set, name=name))
    return tensor


__all__ = [
    "init", "is_initialized", "shutdown", "rank", "size", "local_rank", "local_size", "backend", "threads_per_rank",
    "add_process_set", "collectives", "allreduce", "allreduce_async_", "grouped_allreduce", "broadcast", "broadcast_",
    "allgather", "barrier", "broadcast_object", "Average", "Sum", "ReduceOp", "Compression", "ProcessSet", "WORLD",
    "DistributedOptimizer", "broadcast_parameters", "broadcast_optimizer_state", "optim", "elastic",
]
