"""Tensor parallelism applied to an existing, unsplit :class:`hvdllm.models.gpt.GPT` (torchtitan style).

The model class stays plain; :func:`parallelize_gpt` builds a :class:`TensorParallelGPT` that holds
this rank's shards of the given model's weights:

- attention: ``c_attn`` (fused [q; k; v]) column-parallel by heads (rank i keeps heads
  i*h/n .. (i+1)*h/n of each of q, k, v), ``c_proj`` row-parallel; attention runs on local heads;
- MLP: ``c_fc`` column-parallel, ``c_proj`` row-parallel (GELU is elementwise, so it needs no
  communication);
- token embedding: vocabulary-parallel; the tied LM head reuses the same shard and the loss is the
  vocabulary-parallel cross-entropy (the full logits are never built unless asked for);
- LayerNorms and the position embedding are replicated. Their inputs are identical on every rank of
  the group, so their gradients are too: no extra reduction.

Parameter names equal the unsplit model's (``h.0.attn.c_attn.weight`` ...), and :attr:`shard_specs`
says how each one is split, so :meth:`TensorParallelGPT.full_state_dict` rebuilds the unsplit weights
(checkpoints stay interchangeable with the plain model). Dropout uses the rank's RNG: seed all ranks
of a tensor-parallel group alike so the replicated activations stay identical.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn import functional as F

from hvdllm.core.grid import Group
from hvdllm.models.gpt import GPT, MLP, Block, CausalSelfAttention
from hvdllm.torch.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                          copy_to_group, gather_from_group, gather_shards,
                                          vocab_parallel_cross_entropy)

__all__ = ["TensorParallelGPT", "parallelize_gpt", "TPAttention", "TPMLP", "TPBlock"]


class TPAttention(nn.Module):
    def __init__(self, attn: CausalSelfAttention, group: Group) -> None:
        super().__init__()
        if attn.n_head % group.size:
            raise ValueError(f"model.n_head={attn.n_head} is not divisible by tp={group.size}; "
                             f"allowed: tp dividing {attn.n_head}")
        self.local_heads, self.dropout = attn.n_head // group.size, attn.dropout
        self.c_attn = ColumnParallelLinear.from_linear(attn.c_attn, group, segments=3)
        self.c_proj = RowParallelLinear.from_linear(attn.c_proj, group)
        self.resid_drop = attn.resid_drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.c_attn(x)
        width = qkv.shape[-1] // 3
        q, k, v = (t.view(B, T, self.local_heads, width // self.local_heads).transpose(1, 2)
                   for t in qkv.split(width, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, width)))


class TPMLP(nn.Module):
    def __init__(self, mlp: MLP, group: Group) -> None:
        super().__init__()
        self.c_fc = ColumnParallelLinear.from_linear(mlp.c_fc, group)
        self.c_proj = RowParallelLinear.from_linear(mlp.c_proj, group)
        self.drop = mlp.drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class TPBlock(nn.Module):
    def __init__(self, block: Block, group: Group) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = block.ln_1, block.ln_2
        self.attn, self.mlp = TPAttention(block.attn, group), TPMLP(block.mlp, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VocabParallelHead(nn.Module):
    """Local logits z_i = x E_i^T for this rank's vocabulary rows (dL/dx summed over the group)."""

    def __init__(self, weight: nn.Parameter, group: Group) -> None:
        super().__init__()
        self.weight, self.group = weight, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_group(x, self.group), self.weight)


class TensorParallelGPT(nn.Module):
    """This rank's tensor-parallel shard of a GPT; same interface as GPT (embed, h, head, forward)."""

    def __init__(self, model: GPT, group: Group) -> None:
        super().__init__()
        cfg = model.config
        self.config, self.group = cfg, group
        # registration order = GPT's (wte, wpe, drop, h, ln_f, lm_head), so parameter order matches too
        self.wte = VocabParallelEmbedding.from_embedding(model.wte, group)
        self.wpe, self.drop = model.wpe, model.drop
        self.h = nn.ModuleList(TPBlock(b, group) for b in model.h)
        self.ln_f = model.ln_f
        if cfg.tie_embeddings:
            head_weight = self.wte.weight
        else:
            shard = VocabParallelEmbedding.from_embedding(
                nn.Embedding.from_pretrained(model.lm_head.weight.detach(), freeze=False), group)
            head_weight = shard.weight
        self.lm_head = VocabParallelHead(head_weight, group)
        self.vocab_start = self.wte.vocab_start
        # name -> (split dimension, segments); absent names are replicated
        self.shard_specs: dict[str, tuple[int, int]] = {"wte.weight": (0, 1), "lm_head.weight": (0, 1)}
        for i in range(cfg.n_layer):
            p = f"h.{i}."
            self.shard_specs.update({
                p + "attn.c_attn.weight": (0, 3), p + "attn.c_proj.weight": (1, 1),
                p + "mlp.c_fc.weight": (0, 1), p + "mlp.c_proj.weight": (1, 1)})
            if cfg.bias:
                self.shard_specs.update({p + "attn.c_attn.bias": (0, 3), p + "mlp.c_fc.bias": (0, 1)})

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds the model's context {self.config.block_size}")
        return self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the logits (vocabulary rows ``vocab_start`` onward)."""
        return self.lm_head(self.ln_f(x))

    def loss(self, local_logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy from vocabulary-split logits: the mean over all positions, or per position
        (``reduction="none"``, shaped like ``targets``)."""
        return vocab_parallel_cross_entropy(local_logits, targets, self.group, self.vocab_start, reduction)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, gather_logits: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As GPT.forward. ``gather_logits=False`` returns this rank's vocabulary slice of the logits."""
        x = self.embed(idx)
        for block in self.h:
            x = block(x)
        local = self.head(x)
        loss = self.loss(local, targets) if targets is not None else None
        return (gather_from_group(local, self.group) if gather_logits else local), loss

    def full_tensor(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The unsplit value of parameter ``name`` (or of its gradient ``t``), gathered over the group."""
        if name not in self.shard_specs or self.group.size == 1:
            return t.detach().clone()
        dim, segments = self.shard_specs[name]
        return gather_shards(t, self.group, dim, segments)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsplit model's state dict (same keys as GPT's), on every rank of the group."""
        out = {}
        for name, t in self.state_dict().items():
            if name == "lm_head.weight" and self.config.tie_embeddings:
                continue
            out[name] = self.full_tensor(name, t)
        if self.config.tie_embeddings:
            out["lm_head.weight"] = out["wte.weight"]
        return out


def parallelize_gpt(model: GPT, group: Group) -> TensorParallelGPT:
    """This rank's tensor-parallel GPT, sharding ``model``'s current weights over ``group``.

    Every rank of the group must pass an identical ``model`` (same seed or broadcast weights).
    The replicated modules (LayerNorms, position embedding) are shared with ``model``, not copied.
    """
    return TensorParallelGPT(model, group)
