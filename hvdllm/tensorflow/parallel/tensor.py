"""Tensor-parallel Dense layers for Keras 3 (TensorFlow backend) on hvdllm.tensorflow collectives.

The math is Megatron's, as in ``hvdllm.torch.parallel.tensor`` (Keras kernels are (in, out), so
Y = X K + b):

- :class:`ColumnParallelDense`: K = [K_1, ..., K_n] split by output columns; rank i computes
  Y_i = X K_i + b_i. X is needed whole on every rank, so dL/dX = sum_i dL/dY_i K_i^T is summed over
  the group in the backward (``copy_to_group``: identity forward, all-reduce backward).
  ``gather_output=True`` concatenates the Y_i (backward: keep this rank's slice).
- :class:`RowParallelDense`: K = [K_1; ...; K_n] split by input rows; Y = sum_i X_i K_i + b with the
  sum an all-reduce in the forward (``reduce_from_group``: identity backward); b is added once.

- :class:`VocabParallelEmbedding`: the vocabulary rows E = [E_1; ...; E_n]; rank i looks up the tokens
  of its range (zero elsewhere) and the lookups are summed over the group.
- :func:`vocab_parallel_cross_entropy`: softmax cross-entropy over logits split by vocabulary without
  gathering them: m = max_j z_j (all-gathered maxima), loss = log(sum_j exp(z_j - m)) - (z_t - m) with
  both sums over all shards (one all-reduce); dL/dz_j = softmax_j - [j == t] is local to each shard.

A column layer followed by a row layer (an MLP, attention heads) costs one all-reduce forward and
one backward. Each collective and its backward form one ``tf.custom_gradient``, so GradientTape,
``model.fit`` and ``tf.function`` all see correct gradients. All ranks of the group must call the
layers in the same order (as with any collective), and layer names must not depend on the rank:
inside ``tf.function`` Horovod matches the ranks' operations by their graph names.
"""
from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from hvdllm.core.grid import Group
from hvdllm.core.ops import Sum
from hvdllm.tensorflow.basics import allgather, allreduce

__all__ = ["ColumnParallelDense", "RowParallelDense", "VocabParallelEmbedding", "vocab_parallel_cross_entropy",
           "copy_to_group", "reduce_from_group",
           "gather_from_group", "scatter_to_group", "Group"]


def _wide(x: tf.Tensor) -> tf.Tensor:
    """16-bit floats (mixed-precision activations) as float32 for a collective; others unchanged."""
    return tf.cast(x, tf.float32) if x.dtype in (tf.bfloat16, tf.float16) else x


def _allreduce_sum(x: tf.Tensor, group: Group) -> tf.Tensor:
    """The group's sum; 16-bit activations are summed in float32 and rounded once (as the unsplit layer's
    matmul accumulates; Horovod's CPU ops cannot reduce bfloat16)."""
    return tf.cast(allreduce(_wide(x), Sum, group.process_set), x.dtype)


def _gather_last(x: tf.Tensor, group: Group) -> tf.Tensor:
    stacked = tf.cast(allgather(tf.expand_dims(_wide(x), 0), group.process_set), x.dtype)
    parts = [stacked[i] for i in range(group.size)]
    return tf.concat(parts, axis=-1)


def _slice_last(x: tf.Tensor, group: Group) -> tf.Tensor:
    return tf.split(x, group.size, axis=-1)[group.index]


def _conjugate(x: tf.Tensor, group: Group, forward: Any, backward: Any) -> tf.Tensor:
    """``forward(x, group)`` with gradient ``backward(dy, group)``; the identity on a group of one."""
    if group.size == 1:
        return x

    @tf.custom_gradient
    def f(t: tf.Tensor) -> Any:
        return forward(t, group), lambda dy: backward(dy, group)

    return f(x)


def _identity(t: tf.Tensor, group: Group) -> tf.Tensor:
    return tf.identity(t)


def copy_to_group(x: tf.Tensor, group: Group) -> tf.Tensor:
    """Identity forward; the gradient is summed over the group."""
    return _conjugate(x, group, _identity, _allreduce_sum)


def reduce_from_group(x: tf.Tensor, group: Group) -> tf.Tensor:
    """Sum over the group forward; identity backward."""
    return _conjugate(x, group, _allreduce_sum, _identity)


def gather_from_group(x: tf.Tensor, group: Group) -> tf.Tensor:
    """Concatenate the ranks' tensors along the last axis; backward keeps this rank's slice."""
    return _conjugate(x, group, _gather_last, _slice_last)


def scatter_to_group(x: tf.Tensor, group: Group) -> tf.Tensor:
    """This rank's slice of the last axis; backward gathers the slices' gradients."""
    return _conjugate(x, group, _slice_last, _gather_last)


def _check(what: str, n: int, group: Group) -> None:
    if n % group.size:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {group.size}; "
                         f"allowed: multiples of {group.size}")


class ColumnParallelDense(keras.layers.Layer):
    """Dense with the output units split over ``group`` (this rank holds units/size of them)."""

    def __init__(self, units: int, group: Group, activation: Any = None, use_bias: bool = True,
                 gather_output: bool = False, kernel_initializer: Any = "glorot_uniform",
                 bias_initializer: Any = "zeros", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check("units", units, group)
        self.units, self.group, self.use_bias, self.gather_output = units, group, use_bias, gather_output
        self.local_units = units // group.size
        self.activation = keras.activations.get(activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape: Any) -> None:
        self.kernel = self.add_weight(name="kernel", shape=(int(input_shape[-1]), self.local_units),
                                      initializer=self.kernel_initializer)
        self.bias = self.add_weight(name="bias", shape=(self.local_units,), initializer=self.bias_initializer) \
            if self.use_bias else None

    def call(self, x: Any) -> Any:
        y = tf.matmul(copy_to_group(tf.convert_to_tensor(x), self.group), self.kernel)
        if self.bias is not None:
            y = y + self.bias
        y = self.activation(y)
        return gather_from_group(y, self.group) if self.gather_output else y

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return (*input_shape[:-1], self.units if self.gather_output else self.local_units)

    @classmethod
    def from_dense(cls, dense: keras.layers.Dense, group: Group, gather_output: bool = False) -> "ColumnParallelDense":
        """This rank's shard of a built ``keras.layers.Dense`` (its activation is kept: elementwise)."""
        if not dense.built:
            raise ValueError(f"Dense layer {dense.name!r} is not built; call it on an input first")
        kernel = np.asarray(dense.kernel)
        layer = cls(dense.units, group, activation=dense.activation, use_bias=dense.use_bias,
                    gather_output=gather_output, name=f"{dense.name}_col")
        layer.build(kernel.shape[:1])
        weights = [np.split(kernel, group.size, axis=1)[group.index]]
        if dense.use_bias:
            weights.append(np.split(np.asarray(dense.bias), group.size)[group.index])
        layer.set_weights(weights)
        return layer


class RowParallelDense(keras.layers.Layer):
    """Dense with the input features split over ``group``; the partial products are summed."""

    def __init__(self, units: int, group: Group, activation: Any = None, use_bias: bool = True,
                 input_is_parallel: bool = True, kernel_initializer: Any = "glorot_uniform",
                 bias_initializer: Any = "zeros", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units, self.group, self.use_bias, self.input_is_parallel = units, group, use_bias, input_is_parallel
        self.activation = keras.activations.get(activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape: Any) -> None:
        n_in = int(input_shape[-1])
        if not self.input_is_parallel:
            _check("input features", n_in, self.group)
            n_in //= self.group.size
        self.kernel = self.add_weight(name="kernel", shape=(n_in, self.units), initializer=self.kernel_initializer)
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer=self.bias_initializer) \
            if self.use_bias else None

    def call(self, x: Any) -> Any:
        x = tf.convert_to_tensor(x)
        if not self.input_is_parallel:
            x = scatter_to_group(x, self.group)
        y = reduce_from_group(tf.matmul(x, self.kernel), self.group)
        if self.bias is not None:
            y = y + self.bias
        return self.activation(y)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return (*input_shape[:-1], self.units)

    @classmethod
    def from_dense(cls, dense: keras.layers.Dense, group: Group, input_is_parallel: bool = True) -> "RowParallelDense":
        """This rank's shard of a built ``keras.layers.Dense`` (kernel rows split, bias whole)."""
        if not dense.built:
            raise ValueError(f"Dense layer {dense.name!r} is not built; call it on an input first")
        kernel = np.asarray(dense.kernel)
        _check("input features", kernel.shape[0], group)
        layer = cls(dense.units, group, activation=dense.activation, use_bias=dense.use_bias,
                    input_is_parallel=input_is_parallel, name=f"{dense.name}_row")
        layer.build((kernel.shape[0] if not input_is_parallel else kernel.shape[0] // group.size,))
        weights = [np.split(kernel, group.size, axis=0)[group.index]]
        if dense.use_bias:
            weights.append(np.asarray(dense.bias))
        layer.set_weights(weights)
        return layer


class VocabParallelEmbedding(keras.layers.Layer):
    """Embedding with the vocabulary rows split over ``group``: rank i holds rows
    ``vocab_start .. vocab_start + vocab_size/size`` (``embeddings``, as ``keras.layers.Embedding``)."""

    def __init__(self, vocab_size: int, units: int, group: Group, embeddings_initializer: Any = "uniform",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check("vocab_size", vocab_size, group)
        self.vocab_size, self.units, self.group = vocab_size, units, group
        self.local_size = vocab_size // group.size
        self.vocab_start = group.index * self.local_size
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)

    def build(self, input_shape: Any = None) -> None:
        self.embeddings = self.add_weight(name="embeddings", shape=(self.local_size, self.units),
                                          initializer=self.embeddings_initializer)

    def call(self, idx: Any) -> Any:
        local = tf.cast(idx, tf.int32) - self.vocab_start
        inside = (local >= 0) & (local < self.local_size)
        rows = tf.gather(self.embeddings, tf.where(inside, local, 0))
        rows = rows * tf.cast(inside, rows.dtype)[..., None]
        return reduce_from_group(rows, self.group)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return (*input_shape, self.units)

    @classmethod
    def from_embedding(cls, embedding: keras.layers.Embedding, group: Group) -> "VocabParallelEmbedding":
        """This rank's rows of a built ``keras.layers.Embedding``."""
        table = np.asarray(embedding.embeddings)
        layer = cls(table.shape[0], table.shape[1], group, name=embedding.name)
        layer.build()
        layer.embeddings.assign(np.split(table, group.size)[group.index])
        return layer


def vocab_parallel_cross_entropy(local_logits: Any, targets: Any, group: Group, vocab_start: int) -> tf.Tensor:
    """Per-position cross-entropy (shaped like ``targets``, float32) from logits split by vocabulary:
    ``local_logits`` holds the columns ``vocab_start ..`` of this rank (see the module docstring)."""
    targets = tf.cast(targets, tf.int32)
    z = tf.cast(local_logits, tf.float32)
    if group.size == 1:
        return tf.nn.sparse_softmax_cross_entropy_with_logits(targets, z)
    width = z.shape[-1]

    @tf.custom_gradient
    def f(z: tf.Tensor) -> Any:
        m = tf.reduce_max(allgather(tf.reduce_max(z, axis=-1)[None], group.process_set), axis=0)
        shifted = z - m[..., None]
        e = tf.exp(shifted)
        local_t = targets - vocab_start
        inside = (local_t >= 0) & (local_t < width)
        safe = tf.where(inside, local_t, 0)
        z_t = tf.where(inside, tf.gather(shifted, safe[..., None], batch_dims=2)[..., 0], 0.0)
        sums = _allreduce_sum(tf.stack([tf.reduce_sum(e, axis=-1), z_t]), group)
        loss = tf.math.log(sums[0]) - sums[1]

        def grad(dy: tf.Tensor) -> tf.Tensor:
            onehot = tf.one_hot(safe, width, dtype=e.dtype) * tf.cast(inside, e.dtype)[..., None]
            return dy[..., None] * (e / sums[0][..., None] - onehot)

        return loss, grad

    return f(z)
