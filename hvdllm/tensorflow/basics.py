"""hvdllm.tensorflow's module-level Horovod API: the one Frontend (core.frontend) over this adapter's backends.

The package ``__init__`` re-exports these names, and submodules import them from here (never the
package itself, which imports them: no cycle).
"""
from __future__ import annotations

from hvdllm.core.backends import BUILD_QUERIES, build_query
from hvdllm.core.frontend import Frontend
from hvdllm.core.process_sets import WORLD
from hvdllm.tensorflow import backends

_front = Frontend("tensorflow", backends.create)

init, is_initialized, shutdown, collectives = _front.init, _front.is_initialized, _front.shutdown, _front.collectives
rank, size, local_rank, local_size = _front.rank, _front.size, _front.local_rank, _front.local_size
backend, threads_per_rank, add_process_set = _front.backend, _front.threads_per_rank, _front.add_process_set
bind_to_cores = _front.bind_to_cores
allreduce, allreduce_async_, grouped_allreduce = _front.allreduce, _front.allreduce_async_, _front.grouped_allreduce
broadcast, allgather, broadcast_object = _front.broadcast, _front.allgather, _front.broadcast_object
barrier, reinit = _front.barrier, _front.reinit
cross_rank, cross_size, is_homogeneous = _front.cross_rank, _front.cross_size, _front.is_homogeneous
remove_process_set, global_process_set = _front.remove_process_set, WORLD
grouped_allgather, alltoall, reducescatter = _front.grouped_allgather, _front.alltoall, _front.reducescatter
grouped_reducescatter, join, allgather_object = _front.grouped_reducescatter, _front.join, _front.allgather_object
mpi_enabled, gloo_enabled, mpi_threads_supported = _front.mpi_enabled, _front.gloo_enabled, _front.mpi_threads_supported
start_timeline, stop_timeline = _front.start_timeline, _front.stop_timeline
mpi_built, gloo_built, nccl_built, ddl_built, ccl_built, cuda_built, rocm_built = (
    build_query(q, backends.horovod_module) for q in BUILD_QUERIES)
