"""Framework-agnostic core of hvdllm: stdlib + numpy only (never torch, tensorflow, keras or horovod).

Adapters (``hvdllm.torch``, ``hvdllm.tensorflow``) bind these ideas to tensors; the core owns the
semantics so both frameworks behave identically.
"""
from hvdllm.core.ops import Average, ReduceOp, Sum, parse_op
from hvdllm.core.world import World
from hvdllm.core.process_sets import ProcessSet
from hvdllm.core.backend import BACKENDS, choose_backend, launched_by
from hvdllm.core.collectives import Collectives, Handle
from hvdllm.core.grid import GridCoord, Group, ProcessGrid

__all__ = [
    "Average", "Sum", "ReduceOp", "parse_op", "World", "ProcessSet",
    "BACKENDS", "choose_backend", "launched_by", "Collectives", "Handle",
    "ProcessGrid", "GridCoord", "Group",
]
