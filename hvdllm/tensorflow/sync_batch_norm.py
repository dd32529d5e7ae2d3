"""Synchronous batch normalisation for Keras 3 (Horovod's ``SyncBatchNormalization``), on every backend.

During training the batch statistics are those of the *combined* batch over all ranks: each rank sums
its values and counts, one allreduce adds them, then the centred squares are summed the same way (two
passes: no E[x^2] - E[x]^2 cancellation). Unlike Horovod's layer, which averages the ranks' means, the
counts weight the sums, so uneven per-rank batches give exactly the one-process statistics. The sums
are differentiable (the gradient of a sum over ranks is the sum of the ranks' gradients), so gradients
match one-process BatchNormalization on the combined batch too.
"""
from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from hvdllm.core.ops import Sum
from hvdllm.core.process_sets import WORLD
from hvdllm.tensorflow.basics import collectives
from hvdllm.tensorflow.reduction import _op_name


def global_sum(x: tf.Tensor) -> tf.Tensor:
    """``x`` summed over all ranks, differentiably (eager and inside ``tf.function``)."""
    rt = collectives()

    @tf.custom_gradient
    def summed(t: tf.Tensor) -> Any:
        def grad(dy: tf.Tensor) -> tf.Tensor:
            return rt.allreduce(dy, Sum, WORLD, name=_op_name("syncbn_grad"))

        return rt.allreduce(t, Sum, WORLD, name=_op_name("syncbn")), grad

    return summed(x)


class SyncBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalisation whose training statistics span every rank's batch (see the module docstring).

    Horovod's signature: ``fused`` must be False (there is no fused kernel across ranks); every other
    argument is Keras's BatchNormalization's. Inference uses the moving statistics, as usual, and with
    one rank the layer is plain BatchNormalization.
    """

    def __init__(self, fused: Any = False, **kwargs: Any) -> None:
        if fused in (True, None):
            raise ValueError(f"fused={fused!r}: SyncBatchNormalization does not support fused=True; allowed: False")
        if not kwargs.get("name"):
            kwargs["name"] = "sync_batch_normalization"
        super().__init__(**kwargs)

    def _moments(self, inputs: tf.Tensor, mask: Any) -> tuple[tf.Tensor, tf.Tensor]:
        if collectives().world.size == 1:
            return super()._moments(inputs, mask)
        axes = list(self._reduction_axes)
        if mask is None:
            weights = None
            count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(inputs), axes)), inputs.dtype)
            local_sum = tf.reduce_sum(inputs, axes, keepdims=True)
        else:
            weights = tf.cast(tf.broadcast_to(tf.expand_dims(mask, -1), tf.shape(inputs)), inputs.dtype)
            count = tf.reduce_sum(weights, axes, keepdims=True)
            local_sum = tf.reduce_sum(inputs * weights, axes, keepdims=True)
        shape = tf.shape(local_sum)
        totals = global_sum(tf.concat([tf.reshape(local_sum, [-1]), tf.reshape(count, [-1])], 0))
        n = tf.size(local_sum)
        total_count = tf.reshape(totals[n:], shape) if mask is not None else totals[n]
        mean = tf.reshape(totals[:n], shape) / total_count
        centred = tf.square(inputs - mean) if weights is None else tf.square(inputs - mean) * weights
        variance = global_sum(tf.reduce_sum(centred, axes, keepdims=True)) / total_count
        return tf.squeeze(mean, axes), tf.squeeze(variance, axes)
