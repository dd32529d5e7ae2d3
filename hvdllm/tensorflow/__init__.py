"""hvdllm for TensorFlow 2 / Keras 3: Horovod's API names, backed by Horovod, mpi4py or one process.

    import hvdllm.tensorflow as hvd
    hvd.init()
    model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.Adam(1e-3)), loss=...)
    model.fit(x, y, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])
"""
from __future__ import annotations

from typing import Any, Sequence

from hvdllm.core.compression import Compression
from hvdllm.core.frontend import Frontend
from hvdllm.core.ops import Average, ReduceOp, Sum, parse_op
from hvdllm.core.process_sets import WORLD, ProcessSet
from hvdllm.tensorflow import runtime as _runtime

_front = Frontend("tensorflow", _runtime.create)
globals().update(_front.exports())


def grouped_allreduce(tensors: Sequence[Any], op: ReduceOp = Average, process_set: ProcessSet = WORLD) -> list:
    """Reduce several tensors in one operation (fused into one buffer per dtype)."""
    return _front.runtime().grouped_allreduce(list(tensors), parse_op(op), process_set)


from hvdllm.tensorflow import callbacks  # noqa: E402
from hvdllm.tensorflow.distributed import DistributedGradientTape, DistributedOptimizer, broadcast_variables  # noqa: E402

__all__ = sorted(_front.exports()) + [
    "grouped_allreduce", "Average", "Sum", "ReduceOp", "Compression", "ProcessSet",
    "DistributedGradientTape", "DistributedOptimizer", "broadcast_variables", "callbacks",
]

from hvdllm.tensorflow import optim  # noqa: E402  (hvd.optim.SGD/Adam/AdamW/LAMB, Schedule)

__all__ += ["optim"]
