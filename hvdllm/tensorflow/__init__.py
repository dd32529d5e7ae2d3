"""hvdllm for TensorFlow 2 / Keras 3: Horovod's API names, backed by Horovod, mpi4py or one process.

    import hvdllm.tensorflow as hvd
    hvd.init()
    model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.Adam(1e-3)), loss=...)
    model.fit(x, y, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])

Tensor and pipeline parallelism (Keras layers, GPT stages, GPipe/1F1B on process sets):
:mod:`hvdllm.tensorflow.parallel`.
"""
from __future__ import annotations

from hvdllm.core.compression import Compression
from hvdllm.core.errors import lazy_module_dir, lazy_module_getattr
from hvdllm.core.ops import Adasum, Average, Max, Min, Product, ReduceOp, Sum
from hvdllm.core.process_sets import WORLD, ProcessSet
from hvdllm.tensorflow import callbacks, elastic, optim  # hvd.elastic.*; hvd.callbacks.*; hvd.optim.SGD/Adam/AdamW/LAMB, LearningRateSchedule
from hvdllm.tensorflow.basics import (
    add_process_set, allgather, allgather_object, allreduce, alltoall, backend, barrier,
    broadcast, broadcast_object, ccl_built, collectives, cross_rank, cross_size, cuda_built, ddl_built, gloo_built,
    gloo_enabled, global_process_set, grouped_allgather, grouped_allreduce, grouped_reducescatter, init,
    is_homogeneous, is_initialized, join, local_rank, local_size, mpi_built, mpi_enabled, mpi_threads_supported,
    nccl_built, rank, reducescatter, remove_process_set, rocm_built, shutdown, size, start_timeline, stop_timeline,
    threads_per_rank)
from hvdllm.tensorflow.distributed import DistributedGradientTape, DistributedOptimizer, broadcast_variables

__getattr__ = lazy_module_getattr(__name__)
__dir__ = lazy_module_dir(globals())


__all__ = [
    "init", "is_initialized", "shutdown", "rank", "size", "local_rank", "local_size", "cross_rank", "cross_size",
    "is_homogeneous", "backend", "threads_per_rank", "add_process_set", "remove_process_set", "global_process_set",
    "collectives", "allreduce", "grouped_allreduce", "broadcast", "allgather", "grouped_allgather", "alltoall",
    "reducescatter", "grouped_reducescatter", "join", "barrier", "broadcast_object", "allgather_object",
    "mpi_built", "gloo_built", "nccl_built", "ddl_built", "ccl_built", "cuda_built", "rocm_built", "mpi_enabled",
    "gloo_enabled", "mpi_threads_supported", "HorovodInternalError", "Average", "Sum", "Min", "Max", "Product",
    "Adasum", "ReduceOp", "Compression", "ProcessSet", "WORLD", "DistributedGradientTape", "DistributedOptimizer",
    "broadcast_variables", "callbacks", "optim", "elastic", "start_timeline", "stop_timeline",
]
