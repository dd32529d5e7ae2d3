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
from hvdllm.core.ops import Average, ReduceOp, Sum
from hvdllm.core.process_sets import WORLD, ProcessSet
from hvdllm.tensorflow import callbacks, elastic, optim  # hvd.elastic.*; hvd.callbacks.*; hvd.optim.SGD/Adam/AdamW/LAMB, LearningRateSchedule
from hvdllm.tensorflow.basics import (add_process_set, allgather, allreduce, backend, barrier, broadcast,
                                      broadcast_object, collectives, grouped_allreduce, init, is_initialized,
                                      local_rank, local_size, rank, shutdown, size, threads_per_rank)
from hvdllm.tensorflow.distributed import DistributedGradientTape, DistributedOptimizer, broadcast_variables

__all__ = [
    "init", "is_initialized", "shutdown", "rank", "size", "local_rank", "local_size", "backend", "threads_per_rank",
    "add_process_set", "collectives", "allreduce", "grouped_allreduce", "broadcast", "allgather", "barrier",
    "broadcast_object", "Average", "Sum", "ReduceOp", "Compression", "ProcessSet", "WORLD",
    "DistributedGradientTape", "DistributedOptimizer", "broadcast_variables", "callbacks", "optim", "elastic",
]
