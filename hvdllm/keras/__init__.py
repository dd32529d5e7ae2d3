"""horovod.keras's API for Keras 3 (``import hvdllm.keras as hvd``): hvdllm.tensorflow.keras's names, with
horovod.keras's differences kept: ``allreduce`` averages through ``average=True``, ``DistributedOptimizer``'s
argument order, ``callbacks.BestModelCheckpoint`` without ``save_weights_only``."""
from __future__ import annotations

from typing import Any

import tensorflow as tf

from hvdllm.core.compression import Compression
from hvdllm.core.ops import Average
from hvdllm.keras import callbacks as _callbacks
from hvdllm.keras import elastic as _elastic
from hvdllm.tensorflow import distributed
from hvdllm.tensorflow import keras as _tf_keras
from hvdllm.tensorflow.keras import *  # noqa: F401,F403 - horovod.tensorflow.keras's names (its __all__)
from hvdllm.tensorflow.keras import allreduce as _allreduce

callbacks, elastic = _callbacks, _elastic   # horovod.keras's own submodules, not tensorflow.keras's


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


# horovod.tensorflow.keras's names (anything added there, e.g. the timeline, comes along) with horovod.keras's
# own allreduce, DistributedOptimizer and submodules.
__all__ = [n for n in _tf_keras.__all__ if n != "is_version_greater_equal_than"]
