"""horovod.keras's API for Keras 3 (``import hvdllm.keras as hvd``): hvdllm.tensorflow.keras's names, with
horovod.keras's one difference kept: ``allreduce`` averages by default through ``average=True``."""
from __future__ import annotations

from typing import Any

import tensorflow as tf

from hvdllm.core.compression import Compression
from hvdllm.core.ops import Adasum, Average, Sum
from hvdllm.keras import callbacks, elastic
from hvdllm.tensorflow import distributed
from hvdllm.tensorflow.keras import (
    PartialDistributedOptimizer, ProcessSet, add_process_set, allgather, broadcast,
    broadcast_global_variables, ccl_built, cross_rank, cross_size, cuda_built, ddl_built, global_process_set,
    gloo_built, gloo_enabled, init, is_initialized, load_model, local_rank, local_size, mpi_built, mpi_enabled,
    mpi_threads_supported, nccl_built, rank, reducescatter, remove_process_set, rocm_built, shutdown, size)
from hvdllm.tensorflow.keras import allreduce as _allreduce


def DistributedOptimizer(optimizer: Any, name: str | None = None, device_dense: str = "", device_sparse: str = "",
                         compression: Any = Compression.none, sparse_as_dense: bool = False,
                         gradient_predivide_factor: float = 1.0, op: Any = Average, num_groups: int = 0,
                         groups: Any = None, **options: Any) -> Any:
    """horovod.keras.DistributedOptimizer's argument order; the tensorflow.keras one's other arguments
    (``backward_passes_per_step``, ``process_set``, ...) and hvdllm's are keywords here."""
    return distributed.DistributedOptimizer(optimizer, name, device_dense, device_sparse, compression,
                                            sparse_as_dense, gradient_predivide_factor, op, num_groups=num_groups,
                                            groups=groups, **options)


def allreduce(value: Any, name: str | None = None, average: Any = True, prescale_factor: float = 1.0,
              postscale_factor: float = 1.0, op: Any = None, compression: Any = Compression.none) -> tf.Tensor:
    """Reduce a tensor-compatible value over the ranks: the mean (``average=True``), the sum
    (``average=False``), or ``op`` (which then takes precedence over the default ``average``)."""
    return _allreduce(value, name, None if op is not None and average is True else average, prescale_factor,
                      postscale_factor, op, compression)


# Horovod's names here; the lead adds start_timeline/stop_timeline (hvdllm.tensorflow's) in one line.
__all__ = [
    "init", "shutdown", "is_initialized", "size", "local_size", "cross_size", "rank", "local_rank", "cross_rank",
    "mpi_threads_supported", "mpi_enabled", "mpi_built", "gloo_enabled", "gloo_built", "nccl_built", "ddl_built",
    "ccl_built", "cuda_built", "rocm_built", "ProcessSet", "global_process_set", "add_process_set",
    "remove_process_set", "Average", "Sum", "Adasum", "Compression", "DistributedOptimizer",
    "PartialDistributedOptimizer", "broadcast_global_variables", "allreduce", "allgather", "broadcast",
    "reducescatter", "load_model", "callbacks", "elastic",
]
