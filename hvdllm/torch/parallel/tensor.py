"""Tensor-parallel layers (Megatron-LM style) on hvdllm.torch collectives and process sets.

Notation: a linear layer computes Y = X A^T + b with A of shape (out, in) (torch's layout). With a
tensor-parallel group of n ranks, rank i holds one shard:

- :class:`ColumnParallelLinear` splits the *output* features: A = [A_1; ...; A_n] (row blocks of the
  torch weight, i.e. the columns of the math-layout matrix), Y_i = X A_i^T + b_i. Every rank needs the
  whole X, so the backward sums dL/dX = sum_i dL/dY_i A_i over the group (operator ``f``:
  identity forward, all-reduce backward).
- :class:`RowParallelLinear` splits the *input* features: A = [A_1, ..., A_n], X = [X_1, ..., X_n],
  Y = sum_i X_i A_i^T + b. The forward sums the partial products over the group (operator ``g``:
  all-reduce forward, identity backward); b is added once, after the sum.
- Column then row (attention heads, MLP) needs one all-reduce forward and one backward per pair.
- :class:`VocabParallelEmbedding` splits the vocabulary rows E = [E_1; ...; E_n]; rank i looks up
  the tokens in its range (zero elsewhere) and the lookups are summed over the group.
- :func:`vocab_parallel_cross_entropy` computes softmax cross-entropy over logits split by vocabulary
  without gathering them: with z the logits, t the target, m = max_j z_j (all-gathered maxima),
  loss = log(sum_j exp(z_j - m)) - (z_t - m), where both sums run over all shards (one all-reduce of
  [sum exp, z_t - m]); the gradient dL/dz_j = softmax_j - [j == t] is local to each shard.

Every collective sits in an ``autograd.Function`` together with its backward, so plain
``loss.backward()`` is correct. A group of one rank skips communication: the layers then equal
``nn.Linear``/``nn.Embedding``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.nn import functional as F

from hvdllm.core.grid import Group
from hvdllm.core.ops import Sum
from hvdllm.torch.basics import allgather, allreduce

__all__ = [
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "vocab_parallel_cross_entropy",
    "copy_to_group", "reduce_from_group", "gather_from_group", "scatter_to_group", "shard_tensor",
    "gather_shards", "Group",
]



def _allreduce_sum(x: torch.Tensor, group: Group) -> torch.Tensor:
    """The group's sum. 16-bit activations (bf16/fp16 autocast) are summed in fp32 and rounded once, as
    the unsplit layer's matmul accumulates (and Horovod's CPU ops cannot reduce bf16)."""
    if group.size == 1:
        return x
    return allreduce(x.float().contiguous(), Sum, group.process_set).to(x.dtype)


def _allgather_stack(x: torch.Tensor, group: Group) -> torch.Tensor:
    """(size, *x.shape): every rank's equally shaped tensor, in group order (16-bit ones travel as fp32:
    exact, and every backend gathers fp32)."""
    if group.size == 1:
        return x.unsqueeze(0)
    out = allgather(x.float().contiguous().unsqueeze(0), group.process_set).to(x.dtype)
    return out.view(group.size, *x.shape)


def _split_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    if x.shape[-1] % group.size:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by the group size {group.size}")
    return x.chunk(group.size, dim=-1)[group.index].contiguous()


def _gather_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    return torch.cat(_allgather_stack(x, group).unbind(0), dim=-1)


def _conjugate(name: str, doc: str, forward: Any, backward: Any) -> type:
    """An autograd Function computing ``forward(x, group)`` with gradient ``backward(dL/dy, group)``."""

    def fwd(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return forward(x, group)

    def bwd(ctx: Any, g: torch.Tensor) -> tuple:
        return backward(g, ctx.group), None

    return type(name, (torch.autograd.Function,),
                {"__doc__": doc, "forward": staticmethod(fwd), "backward": staticmethod(bwd)})


_CopyToGroup = _conjugate("_CopyToGroup", "f: y = x forward; dL/dx = sum over the group of dL/dy backward.",
                          lambda x, group: x.view_as(x), _allreduce_sum)
_ReduceFromGroup = _conjugate("_ReduceFromGroup", "g: y = sum over the group of x forward; dL/dx = dL/dy backward.",
                              _allreduce_sum, lambda g, group: g)
_GatherFromGroup = _conjugate("_GatherFromGroup", "y = [x_1, ..., x_n] along the last dimension; backward keeps "
                              "this rank's slice of dL/dy.", _gather_last, _split_last)
_ScatterToGroup = _conjugate("_ScatterToGroup", "y = this rank's slice of x along the last dimension; backward "
                             "gathers the slices' gradients.", _split_last, _gather_last)


def copy_to_group(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group.size == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group.size == 1 else _ReduceFromGroup.apply(x, group)


def gather_from_group(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group.size == 1 else _GatherFromGroup.apply(x, group)


def scatter_to_group(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group.size == 1 else _ScatterToGroup.apply(x, group)


# -- sharding of existing weights ------------------------------------------------------------------
def shard_tensor(t: torch.Tensor, dim: int, index: int, size: int, segments: int = 1) -> torch.Tensor:
    """Shard ``index`` of ``size`` along ``dim``; with ``segments`` > 1 the dimension is a concatenation
    of equal segments (e.g. fused [q; k; v]) and each segment is split, the pieces concatenated."""
    n = t.shape[dim]
    if n % (segments * size):
        raise ValueError(f"dimension {dim} of size {n} does not split into {segments} segment(s) x {size} shards")
    pieces = [seg.chunk(size, dim=dim)[index] for seg in t.chunk(segments, dim=dim)]
    return torch.cat(pieces, dim=dim).clone()


def gather_shards(t: torch.Tensor, group: Group, dim: int, segments: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_tensor` over the group: the full tensor on every rank (no autograd)."""
    with torch.no_grad():
        shards = _allgather_stack(t.detach(), group).unbind(0)
    segs = [s.chunk(segments, dim=dim) for s in shards]
    return torch.cat([torch.cat([segs[r][k] for r in range(group.size)], dim=dim) for k in range(segments)], dim=dim)


def _check_divisible(what: str, n: int, group: Group) -> None:
    if n % group.size:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {group.size}; "
                         f"allowed: multiples of {group.size}")


class ColumnParallelLinear(nn.Module):
    """Y_i = X A_i^T + b_i with this rank's block of output features (see the module docstring).

    ``gather_output`` concatenates the shards so every rank holds the whole Y; otherwise Y stays split
    (the input of a :class:`RowParallelLinear`). ``segments``: the output is a concatenation of that many
    equal blocks (fused QKV: 3), each split across ranks, so a rank holds whole heads of q, k and v.
    """

    def __init__(self, in_features: int, out_features: int, group: Group, bias: bool = True,
                 gather_output: bool = False, segments: int = 1) -> None:
        super().__init__()
        if segments < 1 or out_features % (segments * group.size):
            raise ValueError(f"out_features={out_features} does not split into segments={segments} x "
                             f"tensor-parallel size {group.size}; allowed: multiples of {segments * group.size}")
        if gather_output and segments > 1:
            raise ValueError("gather_output=True needs segments=1 (gathered fused segments would interleave)")
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.gather_output, self.segments = gather_output, segments
        local = out_features // group.size
        self.weight = nn.Parameter(torch.empty(local, in_features))
        self.bias = nn.Parameter(torch.zeros(local)) if bias else None
        nn.init.normal_(self.weight, 0.0, 0.02)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Group, gather_output: bool = False,
                    segments: int = 1) -> "ColumnParallelLinear":
        """This rank's shard of an existing ``nn.Linear`` (weights copied)."""
        layer = cls(linear.in_features, linear.out_features, group, linear.bias is not None, gather_output, segments)
        with torch.no_grad():
            layer.weight.copy_(shard_tensor(linear.weight, 0, group.index, group.size, segments))
            if linear.bias is not None:
                layer.bias.copy_(shard_tensor(linear.bias, 0, group.index, group.size, segments))
        return layer.to(linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_group(x, self.group), self.weight, self.bias)
        return gather_from_group(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} (local {self.weight.shape[0]}), "
                f"tp={self.group.size}, segments={self.segments}")


class RowParallelLinear(nn.Module):
    """Y = sum_i X_i A_i^T + b with this rank's block of input features (see the module docstring).

    ``input_is_parallel``: X arrives already split (output of a ColumnParallelLinear); otherwise
    this rank takes its slice of the full X.
    """

    def __init__(self, in_features: int, out_features: int, group: Group, bias: bool = True,
                 input_is_parallel: bool = True) -> None:
        super().__init__()
        _check_divisible("in_features", in_features, group)
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.input_is_parallel = input_is_parallel
        self.weight = nn.Parameter(torch.empty(out_features, in_features // group.size))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.normal_(self.weight, 0.0, 0.02)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Group, input_is_parallel: bool = True) -> "RowParallelLinear":
        layer = cls(linear.in_features, linear.out_features, group, linear.bias is not None, input_is_parallel)
        with torch.no_grad():
            layer.weight.copy_(shard_tensor(linear.weight, 1, group.index, group.size))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer.to(linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_group(x, self.group)
        y = reduce_from_group(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in={self.in_features} (local {self.weight.shape[1]}), out={self.out_features}, "
                f"tp={self.group.size}")


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary rows split: rank i holds rows [i*V/n, (i+1)*V/n).

    out = sum_i onehot_i(idx) E_i, where onehot_i is zero for tokens outside rank i's range.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group: Group) -> None:
        super().__init__()
        _check_divisible("vocab_size", num_embeddings, group)
        self.num_embeddings, self.embedding_dim, self.group = num_embeddings, embedding_dim, group
        per = num_embeddings // group.size
        self.vocab_start, self.vocab_end = group.index * per, (group.index + 1) * per
        self.weight = nn.Parameter(torch.empty(per, embedding_dim))
        nn.init.normal_(self.weight, 0.0, 0.02)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group: Group) -> "VocabParallelEmbedding":
        layer = cls(emb.num_embeddings, emb.embedding_dim, group)
        with torch.no_grad():
            layer.weight.copy_(shard_tensor(emb.weight, 0, group.index, group.size))
        return layer.to(emb.weight.dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return F.embedding(idx, self.weight)
        outside = (idx < self.vocab_start) | (idx >= self.vocab_end)
        local = (idx - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_group(out, self.group)

    def extra_repr(self) -> str:
        return f"vocab={self.num_embeddings} rows [{self.vocab_start}, {self.vocab_end}), dim={self.embedding_dim}"


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, group: Group,
                vocab_start: int) -> torch.Tensor:
        local_max = logits.max(dim=-1).values
        gmax = _allgather_stack(local_max, group).max(dim=0).values
        shifted = logits - gmax.unsqueeze(-1)
        exp = shifted.exp()
        n_local = logits.shape[-1]
        inside = (targets >= vocab_start) & (targets < vocab_start + n_local)
        local_t = (targets - vocab_start).masked_fill(~inside, 0)
        picked = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~inside, 0.0)
        both = _allreduce_sum(torch.stack([exp.sum(dim=-1), picked]), group)
        sum_exp, target_logit = both[0], both[1]
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_t, inside)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        softmax, local_t, inside = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -inside.to(grad.dtype).unsqueeze(-1))
        return grad * g.unsqueeze(-1), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, group: Group,
                                 vocab_start: int | None = None, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits split by vocabulary (rank i holds columns [vocab_start, vocab_start + V/n)).

    ``logits``: (..., V/n), ``targets``: (...) global token ids. Equals
    ``F.cross_entropy(full_logits.view(-1, V), targets.view(-1), reduction=reduction)``.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r}; allowed: mean, sum, none")
    if vocab_start is None:
        vocab_start = group.index * logits.shape[-1]
    flat = logits.reshape(-1, logits.shape[-1]).float()
    losses = _VocabParallelCrossEntropy.apply(flat, targets.reshape(-1), group, vocab_start)
    if reduction == "none":
        return losses.view(targets.shape)
    return losses.sum() if reduction == "sum" else losses.mean()
