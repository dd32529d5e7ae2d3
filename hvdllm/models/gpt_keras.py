"""GPT in Keras 3: the same layout, parameter names and initialisation scheme as hvdllm.models.gpt.

Layers mirror the PyTorch module (``wte``, ``wpe``, ``h.{i}.ln_1``, ``h.{i}.attn.c_attn`` with q, k, v
stacked, ``h.{i}.attn.c_proj``, ``h.{i}.ln_2``, ``h.{i}.mlp.c_fc``, ``h.{i}.mlp.c_proj``, ``ln_f``, and
the LM head tied to ``wte``), so weights move between the two frameworks by name:
:func:`load_torch_state_dict` copies a PyTorch ``state_dict`` (tensors or numpy arrays) into a Keras
GPT and :func:`torch_state_dict` returns the Keras weights in PyTorch's names and layouts (Dense
kernels are stored transposed, (in, out), in Keras). Checkpoints written from Keras in these names
load into the PyTorch model and back.

Initialisation (as the PyTorch model): Dense/Embedding weights N(0, init_std), the residual output
projections N(0, init_std / sqrt(2 * n_layer)), biases zero, LayerNorm gamma one and beta zero
(epsilon 1e-5, as torch.nn.LayerNorm). Written with ``keras.ops`` only, so any Keras backend runs it.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Mapping

import keras
import numpy as np
from keras import ops

from hvdllm.models.config import GPTConfig

__all__ = ["GPT", "GPTConfig", "Block", "CausalSelfAttention", "MLP", "cross_entropy",
           "load_torch_state_dict", "torch_state_dict", "torch_names"]

LN_EPS = 1e-5   # torch.nn.LayerNorm's default (Keras defaults to 1e-3)


def _normal(std: float, seed: int) -> keras.initializers.Initializer:
    return keras.initializers.RandomNormal(mean=0.0, stddev=std, seed=seed)


class _Seeds:
    """Distinct, deterministic initializer seeds derived from one model seed."""

    def __init__(self, seed: int) -> None:
        self.seed, self.n = int(seed), 0

    def __call__(self) -> int:
        self.n += 1
        return (self.seed * 1_000_003 + self.n) % (2**31 - 1)


def _dense(units: int, cfg: GPTConfig, std: float, seeds: _Seeds, name: str) -> keras.layers.Dense:
    return keras.layers.Dense(units, use_bias=cfg.bias, kernel_initializer=_normal(std, seeds()),
                              bias_initializer="zeros", name=name)


def _layer_norm(cfg: GPTConfig, name: str) -> keras.layers.LayerNormalization:
    return keras.layers.LayerNormalization(epsilon=LN_EPS, center=cfg.bias, name=name)


def _mask_value(dtype: Any) -> float:
    """A large negative logit that the dtype can hold (masked positions get ~0 probability)."""
    return -1e30 if keras.backend.standardize_dtype(dtype) in ("float32", "float64") else -3e4


class CausalSelfAttention(keras.layers.Layer):
    """Multi-head causal self-attention with a fused q, k, v projection (``c_attn``)."""

    def __init__(self, cfg: GPTConfig, seeds: _Seeds, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.c_attn = _dense(3 * cfg.n_embd, cfg, cfg.init_std, seeds, "c_attn")
        self.c_proj = _dense(cfg.n_embd, cfg, cfg.residual_init_std, seeds, "c_proj")
        self.attn_drop = keras.layers.Dropout(cfg.dropout, seed=seeds())
        self.resid_drop = keras.layers.Dropout(cfg.dropout, seed=seeds())

    def call(self, x: Any, training: bool = False) -> Any:
        B, T, C = ops.shape(x)[0], ops.shape(x)[1], x.shape[-1]
        q, k, v = ops.split(self.c_attn(x), 3, axis=-1)

        def heads(t: Any) -> Any:     # (B, T, C) -> (B, H, T, D)
            return ops.transpose(ops.reshape(t, (B, T, self.n_head, self.head_dim)), (0, 2, 1, 3))

        q, k, v = heads(q), heads(k), heads(v)
        att = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * (1.0 / math.sqrt(self.head_dim))
        causal = ops.tril(ops.ones((T, T), dtype="bool"))
        att = ops.where(causal, att, ops.cast(_mask_value(att.dtype), att.dtype))
        att = self.attn_drop(ops.softmax(att, axis=-1), training=training)
        y = ops.reshape(ops.transpose(ops.matmul(att, v), (0, 2, 1, 3)), (B, T, C))
        return self.resid_drop(self.c_proj(y), training=training)


class MLP(keras.layers.Layer):
    """Dense 4C -> GELU (tanh approximation, as GPT-2) -> Dense C."""

    def __init__(self, cfg: GPTConfig, seeds: _Seeds, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.c_fc = _dense(4 * cfg.n_embd, cfg, cfg.init_std, seeds, "c_fc")
        self.c_proj = _dense(cfg.n_embd, cfg, cfg.residual_init_std, seeds, "c_proj")
        self.drop = keras.layers.Dropout(cfg.dropout, seed=seeds())

    def call(self, x: Any, training: bool = False) -> Any:
        h = keras.activations.gelu(self.c_fc(x), approximate=True)
        return self.drop(self.c_proj(h), training=training)


class Block(keras.layers.Layer):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, cfg: GPTConfig, seeds: _Seeds, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ln_1 = _layer_norm(cfg, "ln_1")
        self.attn = CausalSelfAttention(cfg, seeds, name="attn")
        self.ln_2 = _layer_norm(cfg, "ln_2")
        self.mlp = MLP(cfg, seeds, name="mlp")

    def call(self, x: Any, training: bool = False) -> Any:
        x = x + self.attn(self.ln_1(x), training=training)
        return x + self.mlp(self.ln_2(x), training=training)


def cross_entropy(logits: Any, targets: Any) -> Any:
    """Mean next-token cross-entropy over all positions, computed in float32 (as the torch model)."""
    logits = ops.cast(logits, "float32")
    per_token = keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)
    return ops.mean(per_token)


class GPT(keras.Model):
    """Token + position embeddings, ``n_layer`` blocks, final LayerNorm, LM head (tied to ``wte``).

    ``GPT(cfg, seed)`` builds its weights at once (deterministically from ``seed``).
    ``model(idx, training=False)`` maps int token ids (B, T) to logits (B, T, vocab_size).
    """

    def __init__(self, cfg: GPTConfig, seed: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("name", "gpt")
        super().__init__(**kwargs)
        if not isinstance(cfg, GPTConfig):
            raise ValueError(f"cfg={cfg!r} must be a hvdllm.models.GPTConfig")
        self.config = cfg
        seeds = _Seeds(seed)
        self.wte = keras.layers.Embedding(cfg.vocab_size, cfg.n_embd, name="wte",
                                          embeddings_initializer=_normal(cfg.init_std, seeds()))
        self.wpe = keras.layers.Embedding(cfg.block_size, cfg.n_embd, name="wpe",
                                          embeddings_initializer=_normal(cfg.init_std, seeds()))
        self.drop = keras.layers.Dropout(cfg.dropout, seed=seeds())
        self.h = [Block(cfg, seeds, name=f"h_{i}") for i in range(cfg.n_layer)]
        self.ln_f = _layer_norm(cfg, "ln_f")
        self.lm_head = None
        if not cfg.tie_embeddings:
            self.lm_head = keras.layers.Dense(cfg.vocab_size, use_bias=False, name="lm_head",
                                              kernel_initializer=_normal(cfg.init_std, seeds()))
        self(np.zeros((1, min(2, cfg.block_size)), dtype="int32"))    # create the weights now, in a fixed order

    def embed(self, idx: Any, training: bool = False) -> Any:
        T = idx.shape[1]
        if T is not None and T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds the model's context {self.config.block_size}")
        pos = ops.arange(ops.shape(idx)[1])
        return self.drop(self.wte(idx) + self.wpe(pos)[None], training=training)

    def head(self, x: Any) -> Any:
        x = self.ln_f(x)
        if self.lm_head is None:
            return ops.matmul(x, ops.transpose(ops.cast(self.wte.embeddings, x.dtype)))
        return self.lm_head(x)

    def call(self, idx: Any, training: bool = False) -> Any:
        x = self.embed(idx, training=training)
        for block in self.h:
            x = block(x, training=training)
        return self.head(x)

    def loss_on(self, idx: Any, targets: Any, training: bool = False) -> tuple[Any, Any]:
        """Logits and the mean cross-entropy against ``targets`` (B, T)."""
        logits = self(idx, training=training)
        return logits, cross_entropy(logits, targets)

    def generate(self, idx: Any, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int | np.random.Generator | None = None) -> np.ndarray:
        """Sample ``max_new_tokens`` continuations of int ids ``idx`` (B, T); returns (B, T + new) int64.

        The context is cropped to ``block_size``. Every step runs the model on a window padded to
        ``block_size`` (causal: padding after the last position cannot change its logits), so one
        compiled shape serves the whole loop. Sampling uses numpy's generator (``seed``).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1 or None")
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        out = np.asarray(idx, dtype=np.int64)
        if out.ndim != 2 or out.shape[1] < 1:
            raise ValueError(f"idx of shape {out.shape} must be (batch, >=1 tokens)")
        T = self.config.block_size
        for _ in range(max_new_tokens):
            ctx = out[:, -T:]
            n = ctx.shape[1]
            window = np.zeros((ctx.shape[0], T), dtype=np.int32)
            window[:, :n] = ctx
            logits = np.asarray(ops.convert_to_numpy(self._forward_eval(window)), dtype=np.float64)[:, n - 1]
            logits = logits / max(temperature, 1e-6)
            if top_k is not None:
                kth = np.sort(logits, axis=-1)[:, -min(top_k, logits.shape[-1])][:, None]
                logits = np.where(logits < kth, -np.inf, logits)
            p = np.exp(logits - logits.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            nxt = np.array([[rng.choice(p.shape[-1], p=row)] for row in p], dtype=np.int64)
            out = np.concatenate([out, nxt], axis=1)
        return out

    def _forward_eval(self, window: np.ndarray) -> Any:
        fn = getattr(self, "_eval_fn", None)
        if fn is None:
            if keras.backend.backend() == "tensorflow":
                import tensorflow as tf

                fn = tf.function(lambda x: self(x, training=False), reduce_retracing=True)
            else:
                fn = lambda x: self(x, training=False)  # noqa: E731
            self._eval_fn = fn
        return fn(window)


def torch_names(model: GPT) -> Iterator[tuple[str, Any, bool]]:
    """(PyTorch parameter name, Keras variable, transposed?) for every weight of ``model``."""
    cfg = model.config
    yield "wte.weight", model.wte.embeddings, False
    yield "wpe.weight", model.wpe.embeddings, False
    for i, block in enumerate(model.h):
        p = f"h.{i}."
        for ln, layer in (("ln_1", block.ln_1), ("ln_2", block.ln_2)):
            yield p + ln + ".weight", layer.gamma, False
            if cfg.bias:
                yield p + ln + ".bias", layer.beta, False
        for name, dense in (("attn.c_attn", block.attn.c_attn), ("attn.c_proj", block.attn.c_proj),
                            ("mlp.c_fc", block.mlp.c_fc), ("mlp.c_proj", block.mlp.c_proj)):
            yield p + name + ".weight", dense.kernel, True
            if cfg.bias:
                yield p + name + ".bias", dense.bias, False
    yield "ln_f.weight", model.ln_f.gamma, False
    if cfg.bias:
        yield "ln_f.bias", model.ln_f.beta, False
    if model.lm_head is not None:
        yield "lm_head.weight", model.lm_head.kernel, True


def torch_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """The Keras weights as numpy arrays in PyTorch's names and layouts (no tied ``lm_head`` entry)."""
    out = {}
    for name, var, transposed in torch_names(model):
        a = np.asarray(ops.convert_to_numpy(var))
        out[name] = np.ascontiguousarray(a.T if transposed else a)
    return out


def load_torch_state_dict(model: GPT, state: Mapping[str, Any], strict: bool = True) -> GPT:
    """Copy a PyTorch GPT ``state_dict`` (torch tensors or numpy arrays) into the Keras ``model``.

    A tied ``lm_head.weight`` entry is ignored when the model ties its head. With ``strict``, a
    missing or unexpected name or a shape mismatch raises ValueError naming it.
    """
    expected = set()
    for name, var, transposed in torch_names(model):
        expected.add(name)
        if name not in state:
            if strict:
                raise ValueError(f"state dict lacks {name!r} (needed by the Keras GPT)")
            continue
        value = state[name]
        if hasattr(value, "detach"):       # torch tensor, without importing torch here
            value = value.detach().cpu().float().numpy()
        a = np.asarray(value, dtype=np.float32)
        a = a.T if transposed else a
        if tuple(a.shape) != tuple(var.shape):
            raise ValueError(f"{name!r} has shape {tuple(a.shape)}; the Keras GPT needs {tuple(var.shape)}")
        var.assign(a.astype(var.dtype))
    unexpected = set(state) - expected - ({"lm_head.weight"} if model.lm_head is None else set())
    if strict and unexpected:
        raise ValueError(f"state dict has unexpected names {sorted(unexpected)}; allowed: the GPT's parameters")
    return model
