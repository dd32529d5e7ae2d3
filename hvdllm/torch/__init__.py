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
from hvdllm.core.errors import lazy_module_dir, lazy_module_getattr
from hvdllm.core.extensions import check_extension
from hvdllm.core.ops import Adasum, Average, Max, Min, Product, ReduceOp, Sum
from hvdllm.core.process_sets import WORLD, ProcessSet
from hvdllm.torch import elastic, optim  # hvd.elastic.run/TorchState/ElasticSampler; hvd.optim.SGD/Adam/AdamW/LAMB, lr_scheduler
from hvdllm.torch.basics import (
    add_process_set, allgather, allgather_async, allgather_object, allreduce, allreduce_,
    allreduce_async, allreduce_async_, alltoall, alltoall_async, backend, barrier, broadcast, broadcast_async,
    broadcast_async_, broadcast_object, ccl_built, collectives, cross_rank, cross_size, cuda_built, ddl_built,
    gloo_built, gloo_enabled, global_process_set, grouped_allgather, grouped_allgather_async, grouped_allreduce,
    grouped_allreduce_, grouped_allreduce_async, grouped_allreduce_async_, grouped_reducescatter,
    grouped_reducescatter_async, init, is_homogeneous, is_initialized, join, local_rank, local_size, mpi_built,
    mpi_enabled, mpi_threads_supported, nccl_built, poll, rank, reducescatter, reducescatter_async,
    remove_process_set, rocm_built, shutdown, size, start_timeline, stop_timeline, synchronize, threads_per_rank,
    bind_to_cores)
from hvdllm.torch.distributed import DistributedOptimizer
from hvdllm.torch.sparse import sparse_allreduce_async
from hvdllm.torch.sync_batch_norm import SyncBatchNorm
from hvdllm.torch.sync import broadcast_optimizer_state, broadcast_parameters


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
               process_set: ProcessSet = WORLD) -> torch.Tensor:
    """In-place broadcast, as horovod.torch.broadcast_ (same argument order)."""
    return broadcast_async_(tensor, root_rank, name, process_set).wait()

__getattr__ = lazy_module_getattr(__name__)
__dir__ = lazy_module_dir(globals())


__all__ = [
    "init", "is_initialized", "shutdown", "rank", "size", "local_rank", "local_size", "cross_rank", "cross_size",
    "is_homogeneous", "backend", "threads_per_rank", "bind_to_cores", "add_process_set", "remove_process_set", "global_process_set",
    "collectives", "allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "grouped_allreduce",
    "grouped_allreduce_", "grouped_allreduce_async", "grouped_allreduce_async_", "allgather", "allgather_async",
    "grouped_allgather", "grouped_allgather_async", "broadcast", "broadcast_", "broadcast_async", "broadcast_async_",
    "alltoall", "alltoall_async", "reducescatter", "reducescatter_async", "grouped_reducescatter",
    "grouped_reducescatter_async", "poll", "synchronize", "join", "barrier", "broadcast_object", "allgather_object",
    "mpi_built", "gloo_built", "nccl_built", "ddl_built", "ccl_built", "cuda_built", "rocm_built", "mpi_enabled",
    "gloo_enabled", "mpi_threads_supported", "HorovodInternalError", "Average", "Sum", "Min", "Max", "Product",
    "Adasum", "ReduceOp", "Compression", "ProcessSet", "WORLD", "DistributedOptimizer", "broadcast_parameters",
    "broadcast_optimizer_state", "optim", "elastic", "start_timeline", "stop_timeline",
    "SyncBatchNorm", "sparse_allreduce_async", "check_extension",
]
