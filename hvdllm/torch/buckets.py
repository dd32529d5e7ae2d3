"""Gradient buckets and other flat buffers: tensors of one dtype packed back to back in one 1-d tensor.

The one packing helper of hvdllm.torch: gradient buckets (:mod:`hvdllm.torch.distributed`), the fused
optimizers' parameter, gradient and state buffers (:mod:`hvdllm.torch.optim`) and fused broadcasts
(:mod:`hvdllm.torch.sync`). Which tensors share a buffer and at which offsets is the core's plan
(:func:`hvdllm.core.buckets.plan_buckets`); this module only allocates, views and copies.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import torch

from hvdllm.core.buckets import Bucket, TensorSpec, plan_buckets


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def plan(tensors: Sequence[torch.Tensor], cap_bytes: int = 0, groups: Sequence[Hashable] | None = None,
         names: Sequence[str] | None = None) -> list[Bucket]:
    """The core's bucket plan for ``tensors`` (one dtype and group key per bucket, up to ``cap_bytes``)."""
    names = names if names is not None else [str(i) for i in range(len(tensors))]
    return plan_buckets([TensorSpec(n, tuple(t.shape), dtype_name(t.dtype)) for n, t in zip(names, tensors)],
                        cap_bytes, groups)


def views(flat: torch.Tensor, bucket: Bucket, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like the bucket's tensors (``tensors[i]`` for i in ``bucket.indices``)."""
    return [flat[o:o + tensors[i].numel()].view(tensors[i].shape) for i, o in zip(bucket.indices, bucket.offsets)]


def pack(bucket: Bucket, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A new flat buffer holding the bucket's tensors."""
    return torch.cat([tensors[i].detach().reshape(-1) for i in bucket.indices])


def unpack_(flat: torch.Tensor, bucket: Bucket, tensors: Sequence[torch.Tensor]) -> None:
    """Copy ``flat`` back into the bucket's tensors, in place."""
    with torch.no_grad():
        for t, v in zip((tensors[i] for i in bucket.indices), views(flat, bucket, tensors)):
            t.copy_(v)


def contiguous_runs(tensors: Sequence[torch.Tensor]) -> list[tuple[int, int, torch.Tensor]] | None:
    """Split ``tensors`` (in order) into maximal runs that lie back to back in one storage: ``(start,
    stop, flat alias of tensors[start:stop])``. None if some tensor is not contiguous."""
    runs: list[tuple[int, int, torch.Tensor]] = []
    start, end = 0, -1
    for i, t in enumerate(tensors):
        if not t.is_contiguous():
            return None
        if i and (t.untyped_storage().data_ptr() != tensors[start].untyped_storage().data_ptr()
                  or t.dtype != tensors[start].dtype or t.storage_offset() != end):
            runs.append(_run(tensors, start, i))
            start = i
        end = t.storage_offset() + t.numel()
    if tensors:
        runs.append(_run(tensors, start, len(tensors)))
    return runs


def _run(tensors: Sequence[torch.Tensor], start: int, stop: int) -> tuple[int, int, torch.Tensor]:
    first = tensors[start]
    n = sum(t.numel() for t in tensors[start:stop])
    return start, stop, first.as_strided((n,), (1,), first.storage_offset())
