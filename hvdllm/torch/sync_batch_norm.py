"""``hvd.SyncBatchNorm``: horovod.torch's synchronized BatchNorm, on every backend and on CPU too.

In training (or without running statistics) each channel is normalized with the statistics of the
combined batch of all ranks (uneven batch sizes allowed), and the backward pass sums the two
per-channel gradient terms over the ranks, so outputs and input gradients equal one-process
``torch.nn.BatchNorm*d`` on the concatenated batch. Weight and bias gradients stay local, as in Horovod
(the DistributedOptimizer reduces them). In eval with running statistics it is plain BatchNorm. The
math is hvdllm.core.batch_norm's; Horovod's own version runs on GPUs only.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from hvdllm.core import batch_norm as bn
from hvdllm.core.ops import Sum
from hvdllm.torch.basics import allgather, allreduce, size

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(_BatchNorm):
    """Batch normalization over the combined batch of all ranks; input ``(N, C, ...)`` with ``C`` =
    ``num_features``. Arguments as horovod.torch.SyncBatchNorm (and torch.nn.BatchNorm*d)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True) -> None:
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise ValueError(f"SyncBatchNorm: num_features must be a positive int, got {num_features!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expected at least 2D input (N, C, ...), got {input.dim()}D")
        if input.size(1) != self.num_features:
            raise ValueError(f"SyncBatchNorm({self.num_features}) got {input.size(1)} channels (shape "
                             f"{tuple(input.shape)})")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        uses_batch_stats = self.training or not self.track_running_stats
        if not uses_batch_stats or size() == 1:
            return super().forward(input)
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = bn.average_factor(self.momentum, int(self.num_batches_tracked))
        running = (self.running_mean, self.running_var) if self.training and self.track_running_stats else None
        return _SyncBatchNorm.apply(input, self.weight, self.bias, running, factor, self.eps)


def _channel_view(t: torch.Tensor, dim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against an (N, C, ...) input."""
    return t.view(1, -1, *([1] * (dim - 2)))


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                running: tuple[torch.Tensor, torch.Tensor] | None, factor: float, eps: float) -> torch.Tensor:
        dims = [0] + list(range(2, x.dim()))
        stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        xs = x.to(stat_dtype)
        count = x.numel() // x.size(1)
        mean = xs.mean(dims) if count else xs.new_zeros(x.size(1))
        m2 = ((xs - _channel_view(mean, x.dim())) ** 2).sum(dims)
        packet = torch.cat([xs.new_tensor([float(count)]), mean, m2]).unsqueeze(0)
        every = allgather(packet, name="sync_batch_norm.stats")           # (ranks, 1 + 2C)
        total, mean, var = bn.combine_packets(every, x.size(1))
        total = float(total.item())
        if running is not None:
            with torch.no_grad():
                running_mean, running_var = running
                running_mean.copy_(bn.running_update(running_mean, mean.to(running_mean.dtype), factor))
                running_var.copy_(bn.running_update(running_var, bn.unbiased(var, total).to(running_var.dtype),
                                                    factor))
        invstd = torch.rsqrt(var + eps)
        xhat = (xs - _channel_view(mean, x.dim())) * _channel_view(invstd, x.dim())
        y = xhat
        if weight is not None:
            y = y * _channel_view(weight.to(stat_dtype), x.dim())
        if bias is not None:
            y = y + _channel_view(bias.to(stat_dtype), x.dim())
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.total, ctx.has_bias = total, bias is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        xhat, invstd, weight = ctx.saved_tensors
        dims = [0] + list(range(2, xhat.dim()))
        dys = dy.to(xhat.dtype)
        sum_dy, sum_dy_xhat = dys.sum(dims), (dys * xhat).sum(dims)
        grad_x = None
        if ctx.needs_input_grad[0]:
            c = sum_dy.numel()
            both = allreduce(torch.cat([sum_dy, sum_dy_xhat]), op=Sum, name="sync_batch_norm.grads")
            view = lambda t: _channel_view(t, xhat.dim())  # noqa: E731
            w = None if weight is None else view(weight.to(xhat.dtype))
            grad_x = bn.input_grad(dys, xhat, view(invstd), w, view(both[:c]), view(both[c:]), ctx.total)
            grad_x = grad_x.to(dy.dtype)
        grad_w = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = sum_dy.to(weight.dtype if weight is not None else dy.dtype)
        return grad_x, grad_w, grad_b, None, None, None
