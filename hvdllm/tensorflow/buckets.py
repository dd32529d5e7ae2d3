"""Gradient buckets as flat TF buffers: the core's plan (:mod:`hvdllm.core.buckets`) applied to tensors."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import tensorflow as tf

from hvdllm.core.buckets import TensorSpec, plan_buckets


def packed(xs: Sequence[Any], collective: Callable[[tf.Tensor], tf.Tensor], cap_bytes: int = 0) -> list[tf.Tensor]:
    """Run ``collective`` (flat tensor -> flat tensor of the same length) once per bucket of the core's plan
    (:func:`plan_buckets`: one dtype each, up to ``cap_bytes``; 0: one bucket per dtype) on the bucket's
    tensors packed into one flat buffer, and return each tensor's part in its shape. Static shapes only."""
    xs = [tf.convert_to_tensor(x) for x in xs]
    specs = [TensorSpec(str(i), tuple(int(d) for d in x.shape), x.dtype.name) for i, x in enumerate(xs)]
    out: list[Any] = [None] * len(xs)
    for bucket in plan_buckets(specs, cap_bytes):
        flat = collective(tf.concat([tf.reshape(xs[i], [-1]) for i in bucket.indices], axis=0))
        for i, start in zip(bucket.indices, bucket.offsets):
            out[i] = tf.reshape(flat[start:start + specs[i].numel], specs[i].shape)
    return out
