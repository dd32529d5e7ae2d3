"""``hvd.sparse_allreduce_async``: horovod.torch's reduction of a sparse COO tensor, on every backend.

As in Horovod, the ranks' indices and values are allgathered (two collectives, named ``<name>.indices``
and ``<name>.values``) and form one uncoalesced sparse tensor (duplicate indices add up when it is
coalesced or applied); Average divides the values by the number of ranks in the process set.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from hvdllm.core.horovod_api import _ps
from hvdllm.core.ops import Average, parse_op, resolve_op
from hvdllm.core.process_sets import WORLD, ProcessSet
from hvdllm.torch.basics import allgather_async, size

__all__ = ["sparse_allreduce_async", "SparseHandle"]


class SparseHandle:
    """The handle of a sparse allreduce: callable (as Horovod's, which its optimizer calls) and usable
    with ``hvd.synchronize``/``hvd.poll``; returns the reduced sparse tensor."""

    def __init__(self, finish: Callable[[], torch.Tensor], handles: tuple[Any, ...]) -> None:
        self._finish, self._handles, self._result = finish, handles, None

    def wait(self) -> torch.Tensor:
        if self._result is None:
            self._result = self._finish()
        return self._result

    __call__ = wait

    def poll(self) -> bool:
        return self._result is not None or all(h.poll() for h in self._handles)


def sparse_allreduce_async(tensor: torch.Tensor, name: str | None = None, op: Any = Average,
                           process_set: ProcessSet = WORLD) -> SparseHandle:
    """Start reducing a sparse COO ``tensor`` (Sum or Average) over the ranks; returns a handle."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_sparse:
        raise ValueError(f"sparse_allreduce_async needs a sparse COO torch tensor, got "
                         f"{getattr(tensor, 'layout', type(tensor).__name__)}")
    op = parse_op(resolve_op(op, None))
    if op.name not in ("AVERAGE", "SUM"):
        raise ValueError(f"sparse_allreduce_async supports op=hvd.Sum or hvd.Average, got {op!r}")
    name, process_set = name or "sparse_allreduce", _ps(process_set)
    t = tensor
    indices = allgather_async(t._indices().transpose(0, 1).contiguous(), name=f"{name}.indices",
                              process_set=process_set)
    values = allgather_async(t._values().contiguous(), name=f"{name}.values", process_set=process_set)

    def finish() -> torch.Tensor:
        vals, idx = values.wait(), indices.wait()
        if op is Average:
            vals = vals / process_set.size(size())
        return torch.sparse_coo_tensor(idx.transpose(0, 1), vals, t.size())

    return SparseHandle(finish, (indices, values))
