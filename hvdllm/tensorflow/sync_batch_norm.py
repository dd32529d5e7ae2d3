"""Synchronous batch normalisation for Keras 3 (Horovod's ``SyncBatchNormalization``), on every backend.

During training the batch statistics are those of the *combined* batch over all ranks, combined by
:mod:`hvdllm.core.batch_norm` (the math torch's ``SyncBatchNorm`` uses): each rank gathers its packet
(count, per-channel mean, per-channel sum of squared deviations) from every rank in one collective, and
Chan's parallel formula gives the combined mean and variance (no E[x^2] - E[x]^2 cancellation). Unlike
Horovod's layer, which averages the ranks' means, the counts weight them, so uneven per-rank batches give
exactly the one-process statistics. The gather is differentiable (a rank's packet fed every rank's loss:
its gradient is the sum over ranks), so TF's autodiff gives the gradients of one-process
BatchNormalization on the combined batch too.
"""
from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from hvdllm.core import batch_norm as bn
from hvdllm.core.ops import Sum
from hvdllm.core.process_sets import WORLD
from hvdllm.tensorflow.basics import collectives
from hvdllm.tensorflow.reduction import _op_name


def gathered_rows(row: tf.Tensor) -> tf.Tensor:
    """Every rank's ``row`` (shape (1, P)) stacked in rank order, (ranks, P), differentiably (eager and
    inside ``tf.function``): the gradient of this rank's row is the sum over ranks of their gradients
    for it."""
    rt = collectives()
    me = rt.world.rank

    @tf.custom_gradient
    def gathered(t: tf.Tensor) -> Any:
        def grad(dy: tf.Tensor) -> tf.Tensor:
            return rt.allreduce(dy, Sum, WORLD, name=_op_name("syncbn_grad"))[me:me + 1]

        return rt.allgather(t, WORLD, name=_op_name("syncbn")), grad

    return gathered(row)


def _rank_sum(a: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(a, 0)


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
            count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(inputs), axes)), inputs.dtype)   # one for all
            local_sum = tf.reduce_sum(inputs, axes, keepdims=True)
        else:
            weights = tf.cast(tf.broadcast_to(tf.expand_dims(mask, -1), tf.shape(inputs)), inputs.dtype)
            count = tf.reduce_sum(weights, axes, keepdims=True)                                 # per channel
            local_sum = tf.reduce_sum(inputs * weights, axes, keepdims=True)
        local_mean = tf.math.divide_no_nan(local_sum, count)  # a rank with no values adds count 0, M2 0
        centred = tf.square(inputs - local_mean)
        m2 = tf.reduce_sum(centred if weights is None else centred * weights, axes, keepdims=True)
        packet = [tf.reshape(t, [-1]) for t in (count, local_mean, m2)]
        every = gathered_rows(tf.concat(packet, 0)[None])
        _, mean, var = bn.combine_packets(every, int(packet[1].shape[0]), _rank_sum)
        shape = tf.shape(local_sum)
        return tf.squeeze(tf.reshape(mean, shape), axes), tf.squeeze(tf.reshape(var, shape), axes)
