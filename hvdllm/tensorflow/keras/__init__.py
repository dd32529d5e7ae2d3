"""horovod.tensorflow.keras's API for Keras 3 (``import hvdllm.tensorflow.keras as hvd``), on every backend.

Horovod's own module imports on TF 2.21 but its optimizer silently skips the averaging and its callbacks
crash on Keras 3 variables; these are hvdllm's (:mod:`hvdllm.tensorflow.distributed`,
:mod:`hvdllm.tensorflow.callbacks`). The value collectives (``allreduce``, ``allgather``, ``broadcast``,
``reducescatter``) take anything ``tf.constant`` accepts and return eager tensors (numpy-ready), as
Horovod's do under TF 2.
"""
from __future__ import annotations

from typing import Any

import tensorflow as tf

from hvdllm.core.compression import Compression
from hvdllm.core.horovod_util import is_version_greater_equal_than
from hvdllm.core.ops import Adasum, Average, Sum
from hvdllm.core.process_sets import ProcessSet
from hvdllm.tensorflow import mpi_ops
from hvdllm.tensorflow import start_timeline, stop_timeline
from hvdllm.tensorflow.basics import (
    add_process_set, ccl_built, cross_rank, cross_size, cuda_built, ddl_built, global_process_set, gloo_built,
    gloo_enabled, init, is_initialized, local_rank, local_size, mpi_built, mpi_enabled, mpi_threads_supported,
    nccl_built, rank, remove_process_set, rocm_built, shutdown, size)
from hvdllm.tensorflow.distributed import DistributedOptimizer, PartialDistributedOptimizer, is_distributed
from hvdllm.tensorflow.keras import callbacks, elastic


def allreduce(value: Any, name: str | None = None, average: Any = None, prescale_factor: float = 1.0,
              postscale_factor: float = 1.0, op: Any = None, compression: Any = Compression.none) -> tf.Tensor:
    """Reduce a tensor-compatible value over the ranks (Average unless ``op``/``average`` say otherwise)."""
    return mpi_ops.allreduce(tf.constant(value), average, compression=compression, op=op,
                             prescale_factor=prescale_factor, postscale_factor=postscale_factor, name=name)


def allgather(value: Any, name: str | None = None) -> tf.Tensor:
    """Concatenate the ranks' values along the first dimension (sizes there may differ)."""
    return mpi_ops.allgather(tf.constant(value), name=name)


def broadcast(value: Any, root_rank: int, name: str | None = None) -> tf.Tensor:
    """``root_rank``'s value on every rank."""
    return mpi_ops.broadcast(tf.constant(value), root_rank, name=name)


def reducescatter(value: Any, name: str | None = None, op: Any = Average) -> tf.Tensor:
    """Reduce over the ranks and return this rank's share of the first dimension."""
    return mpi_ops.reducescatter(tf.constant(value), op=op, name=name)


def broadcast_global_variables(root_rank: int) -> None:
    """Horovod's TF1 broadcast of the session's global variables: Keras 3 has neither, so this says what
    to use instead."""
    raise RuntimeError(f"broadcast_global_variables({root_rank!r}) needs TF1 sessions, which Keras 3 does not "
                       "have; use hvd.callbacks.BroadcastGlobalVariablesCallback(root_rank) in model.fit, or "
                       "hvdllm.tensorflow.broadcast_variables(model.variables + optimizer.variables, root_rank)")


def load_model(filepath: Any, custom_optimizers: Any = None, custom_objects: Any = None,
               compression: Any = Compression.none, legacy_opts: bool = False) -> Any:
    """Load a Keras model and make its optimizer a :func:`DistributedOptimizer` (its state is kept).

    ``custom_optimizers`` (optimizer classes) and ``custom_objects`` are passed to Keras's loader;
    ``compression`` is the wrapped optimizer's. ``legacy_opts`` (TF 2.11's legacy optimizers) does not
    exist in Keras 3: True is an error.
    """
    import keras

    if legacy_opts:
        raise ValueError("legacy_opts=True: Keras 3 has no legacy optimizers; allowed: False")
    objects = {cls.__name__: cls for cls in (custom_optimizers or [])}
    objects.update(custom_objects or {})
    model = keras.models.load_model(filepath, custom_objects=objects or None)
    if getattr(model, "optimizer", None) is not None and not is_distributed(model.optimizer):
        DistributedOptimizer(model.optimizer, compression=compression)
    return model


# Horovod's names (hvdllm.keras re-exports this list).
__all__ = [
    "init", "shutdown", "is_initialized", "size", "local_size", "cross_size", "rank", "local_rank", "cross_rank",
    "mpi_threads_supported", "mpi_enabled", "mpi_built", "gloo_enabled", "gloo_built", "nccl_built", "ddl_built",
    "ccl_built", "cuda_built", "rocm_built", "ProcessSet", "global_process_set", "add_process_set",
    "remove_process_set", "Average", "Sum", "Adasum", "Compression", "DistributedOptimizer",
    "PartialDistributedOptimizer", "broadcast_global_variables", "allreduce", "allgather", "broadcast",
    "reducescatter", "load_model", "is_version_greater_equal_than", "callbacks", "elastic", "start_timeline",
    "stop_timeline",
]
