"""Make every rank start from the root's model and optimizer state (Horovod's broadcast_* helpers).

Tensors travel fused: one flat broadcast (:mod:`hvdllm.torch.buckets`) per dtype and device kind, not one
per tensor. The optimizer state goes as its structure (a picklable skeleton holding each tensor's shape,
dtype and device kind, broadcast_object) plus its tensors (fused broadcasts): every other rank allocates
its receiving tensors from the root's metadata, not from its own state, so root and receivers plan the
same broadcasts even when the state spans dtypes and devices (torch.optim.Adam keeps ``step`` on the
CPU, the moments on the parameter's device). Every other rank loads the result with ``load_state_dict``. So it also works before the first step, when
e.g. Adam's state is still empty: the other ranks' states become empty too, and no dummy step runs
(Horovod's dummy step changes AdamW's parameters and advances Adam's step count).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import torch

from hvdllm.core.process_sets import WORLD, ProcessSet
from hvdllm.torch import buckets
from hvdllm.torch.basics import collectives

__all__ = ["broadcast_parameters", "broadcast_optimizer_state"]


_runtime = collectives  # the backend (hvdllm.core.collectives.Collectives)


def _check_root(rt: Any, root_rank: int, process_set: ProcessSet) -> None:
    members = process_set.members(rt.world.size)
    if isinstance(root_rank, bool) or not isinstance(root_rank, int) or root_rank not in members:
        raise ValueError(f"root_rank={root_rank!r} is not a rank of the process set; allowed: {list(members)}")


def _broadcast_tensors_(rt: Any, tensors: list[torch.Tensor], root_rank: int, process_set: ProcessSet,
                        dedupe: bool, name: str) -> None:
    """Overwrite ``tensors`` in place with the root's values: one fused broadcast per (device kind, dtype).

    Each broadcast is named (``name``, its bucket and dtype): Horovod numbers unnamed ops per process, so
    a worker that joins an elastic job late would never match the survivors' numbers."""
    if dedupe:  # tied weights (the same storage under two names) travel once
        unique = {(t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device): t for t in tensors}
        tensors = list(unique.values())
    with torch.no_grad():
        for i, bucket in enumerate(buckets.plan(tensors, 0, [t.device.type for t in tensors])):
            buffer = buckets.pack(bucket, tensors)
            wire = buffer.to(torch.uint8) if buffer.dtype == torch.bool else buffer
            out = rt.broadcast(wire, root_rank, process_set, name=f"{name}.{i}.{buffer.dtype}")
            buckets.unpack_(out.to(buffer.dtype), bucket, tensors)


def broadcast_parameters(params: Mapping[str, torch.Tensor] | Iterable[Any], root_rank: int = 0,
                         process_set: ProcessSet = WORLD) -> None:
    """Copy the root's values into ``params`` on every rank, in place.

    ``params`` is ``model.state_dict()`` (parameters and buffers), ``model.named_parameters()``, or
    a list of tensors; every rank must pass the same structure.
    """
    rt = _runtime()
    _check_root(rt, root_rank, process_set)
    items = list(params.items()) if isinstance(params, Mapping) else list(params)
    tensors = []
    for item in items:
        name, t = item if isinstance(item, tuple) and len(item) == 2 else ("", item)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"broadcast_parameters: {name or 'item'!s} is a {type(t).__name__}, not a tensor; "
                             "pass model.state_dict() or model.named_parameters()")
        tensors.append(t)
    _broadcast_tensors_(rt, tensors, root_rank, process_set, dedupe=True, name="hvdllm.broadcast_parameters")


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where a tensor sat in the state dict, and what it looks like (for the receiving ranks)."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    on_cpu: bool  # else on the parameters' device


def _strip(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """The state dict with each tensor replaced by a _Slot (appending the tensor to ``tensors``)."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Slot(len(tensors) - 1, tuple(obj.shape), obj.dtype, obj.device.type == "cpu")
    if isinstance(obj, dict):
        return {k: _strip(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strip(v, tensors) for v in obj)
    return obj


def _slots(obj: Any, out: list[_Slot]) -> list[_Slot]:
    if isinstance(obj, _Slot):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _slots(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _slots(v, out)
    return out


def _fill(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, _Slot):
        return tensors[obj.index]
    if isinstance(obj, dict):
        return {k: _fill(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(v, tensors) for v in obj)
    return obj


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int = 0,
                              process_set: ProcessSet = WORLD) -> None:
    """Give every rank the root's optimizer state and hyperparameters (param_groups), in place.

    Works for any optimizer with state_dict/load_state_dict (a DistributedOptimizer included), also
    before the first step. Parameters are not touched: broadcast them with broadcast_parameters.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    rt = _runtime()
    _check_root(rt, root_rank, process_set)
    is_root = rt.world.rank == root_rank
    tensors: list[torch.Tensor] = []
    # A ZeRO optimizer (zero_stage > 0) gathers its shards in state_dict(): a collective on every rank.
    sharded = optimizer.state_dict() if getattr(optimizer, "zero_stage", 0) else None
    skeleton = _strip(sharded or optimizer.state_dict(), tensors) if is_root else None
    skeleton = rt.broadcast_object(skeleton, root_rank, process_set)
    if not is_root:
        device = next((p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))
        slots = sorted(_slots(skeleton, []), key=lambda s: s.index)
        tensors = [torch.empty(s.shape, dtype=s.dtype, device="cpu" if s.on_cpu else device) for s in slots]
    _broadcast_tensors_(rt, tensors, root_rank, process_set, dedupe=False,
                        name="hvdllm.broadcast_optimizer_state")
    if not is_root:
        optimizer.load_state_dict(_fill(skeleton, tensors))
