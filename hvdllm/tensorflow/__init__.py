"""hvdllm for TensorFlow 2 / Keras 3: Horovod's API names, backed by Horovod, mpi4py or one process.

    import hvdllm.tensorflow as hvd
    hvd.init()
    model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.Adam(1e-3)), loss=...)
    model.fit(x, y, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])

Every public name of horovod.tensorflow 0.28.1 is here with its signature (the collectives' in
:mod:`hvdllm.tensorflow.mpi_ops`); ``import hvdllm.tensorflow.keras as hvd`` is horovod.tensorflow.keras's.
Tensor and pipeline parallelism (Keras layers, GPT stages, GPipe/1F1B on process sets):
:mod:`hvdllm.tensorflow.parallel`.
"""
from __future__ import annotations

from hvdllm.core.compression import Compression
from hvdllm.core.errors import lazy_module_dir, lazy_module_getattr
from hvdllm.core.horovod_util import (check_extension, check_num_rank_power_of_2, gpu_available,
                                      handle_average_backwards_compatibility, split_list)
from hvdllm.core.ops import Adasum, Average, Max, Min, Product, ReduceOp, Sum
from hvdllm.core.process_sets import WORLD, ProcessSet
from hvdllm.tensorflow import callbacks, elastic, optim  # hvd.elastic.*; hvd.callbacks.*; hvd.optim.SGD/Adam/AdamW/LAMB, LearningRateSchedule
from hvdllm.tensorflow.basics import (
    add_process_set, backend, barrier, ccl_built, collectives, cross_rank, cross_size, cuda_built, ddl_built,
    gloo_built, gloo_enabled, global_process_set, init, is_homogeneous, is_initialized, join, local_rank, local_size,
    mpi_built, mpi_enabled, mpi_threads_supported, nccl_built, rank, remove_process_set, rocm_built, shutdown, size,
    start_timeline, stop_timeline, threads_per_rank, bind_to_cores)
from hvdllm.tensorflow.distributed import DistributedGradientTape, PartialDistributedGradientTape
from hvdllm.tensorflow.functions import (broadcast_, broadcast_global_variables, broadcast_object_fn, local_rank_op,
                                         local_size_op, process_set_included_op, rank_op, size_op)
from hvdllm.tensorflow.gradient_aggregation import LocalGradientAggregationHelper
from hvdllm.tensorflow.mpi_ops import (DistributedOptimizer, allgather, allgather_object, allreduce, alltoall,
                                       broadcast, broadcast_object, broadcast_variables, grouped_allgather,
                                       grouped_allreduce, grouped_reducescatter, reducescatter)
from hvdllm.tensorflow.sync_batch_norm import SyncBatchNormalization
from hvdllm.tensorflow.util import refs_to_vars, vars_to_refs

__getattr__ = lazy_module_getattr(__name__)
__dir__ = lazy_module_dir(globals())


__all__ = [
    "init", "is_initialized", "shutdown", "rank", "size", "local_rank", "local_size", "cross_rank", "cross_size",
    "is_homogeneous", "backend", "threads_per_rank", "bind_to_cores", "add_process_set", "remove_process_set", "global_process_set",
    "collectives", "allreduce", "grouped_allreduce", "broadcast", "broadcast_", "allgather", "grouped_allgather",
    "alltoall", "reducescatter", "grouped_reducescatter", "join", "barrier", "broadcast_object", "allgather_object",
    "broadcast_object_fn", "broadcast_variables", "broadcast_global_variables",
    "mpi_built", "gloo_built", "nccl_built", "ddl_built", "ccl_built", "cuda_built", "rocm_built", "mpi_enabled",
    "gloo_enabled", "mpi_threads_supported", "gpu_available", "check_extension", "check_num_rank_power_of_2",
    "handle_average_backwards_compatibility", "split_list", "rank_op", "local_rank_op", "size_op", "local_size_op",
    "process_set_included_op", "vars_to_refs", "refs_to_vars", "HorovodInternalError", "Average", "Sum", "Min",
    "Max", "Product", "Adasum", "ReduceOp", "Compression", "ProcessSet", "WORLD", "DistributedGradientTape",
    "PartialDistributedGradientTape", "DistributedOptimizer", "LocalGradientAggregationHelper",
    "SyncBatchNormalization", "callbacks", "optim", "elastic", "start_timeline", "stop_timeline",
]
