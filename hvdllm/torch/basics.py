"""hvdllm.torch's module-level Horovod API: the one Frontend (core.frontend) over this adapter's backends.

The package ``__init__`` re-exports these names, and submodules import them from here (never the
package itself, which imports them: no cycle).
"""
from __future__ import annotations

import torch

from hvdllm.core.backends import BUILD_QUERIES, build_query
from hvdllm.core.frontend import Frontend
from hvdllm.core.process_sets import WORLD
from hvdllm.torch import backends

_front = Frontend("torch", backends.create, is_tensor=torch.is_tensor)

init, is_initialized, shutdown, collectives = _front.init, _front.is_initialized, _front.shutdown, _front.collectives
rank, size, local_rank, local_size = _front.rank, _front.size, _front.local_rank, _front.local_size
cross_rank, cross_size, is_homogeneous = _front.cross_rank, _front.cross_size, _front.is_homogeneous
backend, threads_per_rank, bind_to_cores = _front.backend, _front.threads_per_rank, _front.bind_to_cores
add_process_set, remove_process_set = _front.add_process_set, _front.remove_process_set
global_process_set = WORLD
allreduce, allreduce_async_, grouped_allreduce = _front.allreduce, _front.allreduce_async_, _front.grouped_allreduce
allreduce_, allreduce_async = _front.allreduce_, _front.allreduce_async
grouped_allreduce_, grouped_allreduce_async = _front.grouped_allreduce_, _front.grouped_allreduce_async
grouped_allreduce_async_ = _front.grouped_allreduce_async_
allgather, allgather_async = _front.allgather, _front.allgather_async
grouped_allgather, grouped_allgather_async = _front.grouped_allgather, _front.grouped_allgather_async
broadcast, broadcast_async, broadcast_async_ = _front.broadcast, _front.broadcast_async, _front.broadcast_async_
alltoall, alltoall_async = _front.alltoall, _front.alltoall_async
reducescatter, reducescatter_async = _front.reducescatter, _front.reducescatter_async
grouped_reducescatter, grouped_reducescatter_async = _front.grouped_reducescatter, _front.grouped_reducescatter_async
poll, synchronize, join, barrier = _front.poll, _front.synchronize, _front.join, _front.barrier
broadcast_object, allgather_object = _front.broadcast_object, _front.allgather_object
reinit = _front.reinit
mpi_enabled, gloo_enabled, mpi_threads_supported = _front.mpi_enabled, _front.gloo_enabled, _front.mpi_threads_supported
start_timeline, stop_timeline = _front.start_timeline, _front.stop_timeline

mpi_built, gloo_built, nccl_built, ddl_built, ccl_built, cuda_built, rocm_built = (
    build_query(q, backends.horovod_module) for q in BUILD_QUERIES)
