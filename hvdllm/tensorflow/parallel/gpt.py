"""Tensor parallelism applied to an existing, unsplit Keras :class:`hvdllm.models.gpt_keras.GPT`
(the Keras twin of :mod:`hvdllm.torch.parallel.gpt`).

:func:`parallelize_gpt` builds a :class:`TensorParallelGPT` holding this rank's shards of the model's
weights: attention ``c_attn`` (fused [q | k | v]) column-parallel by heads and ``c_proj`` row-parallel;
MLP ``c_fc`` column-parallel and ``c_proj`` row-parallel; the token embedding (and the LM head tied to
it) vocabulary-parallel, with the vocabulary-parallel cross-entropy; LayerNorms and the position
embedding replicated (shared with the given model). Attribute names equal the GPT's, so
:func:`hvdllm.models.gpt_keras.torch_names` names its weights as the unsplit model's, and
:attr:`TensorParallelGPT.shard_specs` says how each one is split (PyTorch layout: split dimension,
segments), which :class:`hvdllm.tensorflow.parallel.shards.ShardLayout` uses to gather and cut them.
"""
from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from hvdllm.core.grid import Group
from hvdllm.core.shards import shard_array
from hvdllm.models.gpt_keras import GPT, MLP, Block, CausalSelfAttention, _mask_value
from hvdllm.tensorflow.parallel.tensor import (ColumnParallelDense, RowParallelDense, VocabParallelEmbedding,
                                               copy_to_group, vocab_parallel_cross_entropy)

__all__ = ["TensorParallelGPT", "parallelize_gpt", "TPAttention", "TPMLP", "TPBlock"]


def _fused_column(dense: keras.layers.Dense, group: Group, segments: int) -> ColumnParallelDense:
    """ColumnParallelDense holding this rank's columns of each of ``segments`` fused parts of ``dense``."""
    layer = ColumnParallelDense(dense.units, group, use_bias=dense.use_bias, name=dense.name)
    kernel = np.asarray(dense.kernel)
    layer.build(kernel.shape[:1])
    weights = [shard_array(kernel, 1, group.index, group.size, segments)]
    if dense.use_bias:
        weights.append(shard_array(np.asarray(dense.bias), 0, group.index, group.size, segments))
    layer.set_weights(weights)
    return layer


class TPAttention(keras.layers.Layer):
    """Causal self-attention on this rank's heads (the unsplit layer's math, heads split over the group)."""

    def __init__(self, attn: CausalSelfAttention, group: Group, **kwargs: Any) -> None:
        super().__init__(name=attn.name, **kwargs)
        if attn.n_head % group.size:
            raise ValueError(f"model.n_head={attn.n_head} is not divisible by tp={group.size}; "
                             f"allowed: tp dividing {attn.n_head}")
        self.local_heads, self.head_dim = attn.n_head // group.size, attn.head_dim
        self.c_attn = _fused_column(attn.c_attn, group, 3)
        self.c_proj = RowParallelDense.from_dense(attn.c_proj, group)
        self.attn_drop, self.resid_drop = attn.attn_drop, attn.resid_drop

    def call(self, x: Any, training: bool = False) -> Any:
        B, T = tf.shape(x)[0], tf.shape(x)[1]
        q, k, v = tf.split(self.c_attn(x), 3, axis=-1)

        def heads(t: Any) -> Any:
            return tf.transpose(tf.reshape(t, (B, T, self.local_heads, self.head_dim)), (0, 2, 1, 3))

        q, k, v = heads(q), heads(k), heads(v)
        att = tf.matmul(q, tf.transpose(k, (0, 1, 3, 2))) * (1.0 / math.sqrt(self.head_dim))
        causal = tf.cast(tf.linalg.band_part(tf.ones((T, T)), -1, 0), tf.bool)
        att = tf.where(causal, att, tf.cast(_mask_value(att.dtype), att.dtype))
        att = self.attn_drop(tf.nn.softmax(att, axis=-1), training=training)
        y = tf.reshape(tf.transpose(tf.matmul(att, v), (0, 2, 1, 3)), (B, T, self.local_heads * self.head_dim))
        return self.resid_drop(self.c_proj(y), training=training)


class TPMLP(keras.layers.Layer):
    def __init__(self, mlp: MLP, group: Group, **kwargs: Any) -> None:
        super().__init__(name=mlp.name, **kwargs)
        self.c_fc = ColumnParallelDense.from_dense(mlp.c_fc, group)
        self.c_proj = RowParallelDense.from_dense(mlp.c_proj, group)
        self.drop = mlp.drop

    def call(self, x: Any, training: bool = False) -> Any:
        h = keras.activations.gelu(self.c_fc(x), approximate=True)
        return self.drop(self.c_proj(h), training=training)


class TPBlock(keras.layers.Layer):
    def __init__(self, block: Block, group: Group, **kwargs: Any) -> None:
        super().__init__(name=block.name, **kwargs)
        self.ln_1, self.ln_2 = block.ln_1, block.ln_2
        self.attn, self.mlp = TPAttention(block.attn, group), TPMLP(block.mlp, group)

    def call(self, x: Any, training: bool = False) -> Any:
        x = x + self.attn(self.ln_1(x), training=training)
        return x + self.mlp(self.ln_2(x), training=training)


class TensorParallelGPT(keras.Model):
    """This rank's tensor-parallel shard of a Keras GPT; same interface (embed, h, head) plus ``vocab_loss``.

    ``model(idx)`` returns this rank's vocabulary slice of the logits (columns ``vocab_start`` on).
    """

    def __init__(self, model: GPT, group: Group, **kwargs: Any) -> None:
        kwargs.setdefault("name", "gpt_tp")
        super().__init__(**kwargs)
        cfg = model.config
        self.config, self.group = cfg, group
        self.wte = VocabParallelEmbedding.from_embedding(model.wte, group)
        self.wpe, self.drop = model.wpe, model.drop
        self.h = [TPBlock(b, group) for b in model.h]
        self.ln_f = model.ln_f
        self.lm_head = None if model.lm_head is None else ColumnParallelDense.from_dense(model.lm_head, group)
        self.vocab_start = self.wte.vocab_start
        # PyTorch name -> (split dimension, segments) in PyTorch's layout; absent names are replicated
        self.shard_specs: dict[str, tuple[int, int]] = {"wte.weight": (0, 1), "lm_head.weight": (0, 1)}
        for i in range(cfg.n_layer):
            p = f"h.{i}."
            self.shard_specs.update({p + "attn.c_attn.weight": (0, 3), p + "attn.c_proj.weight": (1, 1),
                                     p + "mlp.c_fc.weight": (0, 1), p + "mlp.c_proj.weight": (1, 1)})
            if cfg.bias:
                self.shard_specs.update({p + "attn.c_attn.bias": (0, 3), p + "mlp.c_fc.bias": (0, 1)})

    def embed(self, idx: Any, training: bool = False) -> Any:
        pos = tf.range(tf.shape(idx)[1])
        return self.drop(self.wte(idx) + self.wpe(pos)[None], training=training)

    def head_with(self, x: Any, weight: Any) -> Any:
        """Local logits of the final hidden states ``x`` against this rank's embedding rows ``weight``."""
        return tf.matmul(copy_to_group(self.ln_f(x), self.group), tf.cast(weight, x.dtype), transpose_b=True)

    def head(self, x: Any) -> Any:
        if self.lm_head is None:
            return self.head_with(x, self.wte.embeddings)
        return self.lm_head(self.ln_f(x))

    def call(self, idx: Any, training: bool = False) -> Any:
        x = self.embed(idx, training=training)
        for block in self.h:
            x = block(x, training=training)
        return self.head(x)

    def vocab_loss(self, local_logits: Any, targets: Any) -> Any:
        """Per-position cross-entropy (shaped like ``targets``) from vocabulary-split logits."""
        return vocab_parallel_cross_entropy(local_logits, targets, self.group, self.vocab_start)


def parallelize_gpt(model: GPT, group: Group) -> TensorParallelGPT:
    """This rank's tensor-parallel GPT, sharding ``model``'s current weights over ``group``.

    Every rank of the group must pass an identical ``model`` (same seed or broadcast weights); the
    replicated layers (LayerNorms, position embedding, dropout) are shared with ``model``.
    """
    return TensorParallelGPT(model, group)
