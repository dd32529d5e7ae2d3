"""Reduction operations, defined once for every backend and framework."""
from __future__ import annotations

import enum
from typing import Any


class ReduceOp(enum.Enum):
    """How an allreduce/reducescatter combines the ranks' values (Horovod's hvd.Average, Sum, Min, Max,
    Product, Adasum).

    AVERAGE is SUM followed by a division by the number of contributing ranks; backends that have no
    native average (mpi, and compressed buffers) reduce with SUM and then call :meth:`postscale`.
    ADASUM is Horovod's adaptive summation: only the horovod backend implements it.
    """

    AVERAGE = "average"
    SUM = "sum"
    MIN = "min"
    MAX = "max"
    PRODUCT = "product"
    ADASUM = "adasum"

    def postscale(self, size: int) -> float:
        """Factor applied to a SUM-reduced value to realise this op over ``size`` ranks."""
        return 1.0 / size if self is ReduceOp.AVERAGE else 1.0

    def __repr__(self) -> str:  # prints as hvd.Average / hvd.Sum / ...
        return self.name.capitalize()


Average, Sum, Min, Max = ReduceOp.AVERAGE, ReduceOp.SUM, ReduceOp.MIN, ReduceOp.MAX
Product, Adasum = ReduceOp.PRODUCT, ReduceOp.ADASUM

_ALIASES = {"avg": Average, "mean": Average, "prod": Product, "minimum": Min, "maximum": Max}


def parse_op(op: object) -> ReduceOp:
    """Accept a ReduceOp, its name (any case) or Horovod's op constants' names."""
    if isinstance(op, ReduceOp):
        return op
    name = getattr(op, "name", op)
    if isinstance(name, str):
        key = name.lower()
        if key in _ALIASES:
            return _ALIASES[key]
        for member in ReduceOp:
            if member.value == key:
                return member
    raise ValueError(f"unsupported reduce op {op!r}; allowed: hvd.Average, hvd.Sum, hvd.Min, hvd.Max, "
                     "hvd.Product, hvd.Adasum")


def resolve_op(op: Any = None, average: Any = None, default: ReduceOp = Average) -> ReduceOp:
    """Horovod's ``op``/deprecated ``average=`` pair: ``average=True`` is Average, ``False`` Sum.

    A bool in ``op``'s place is read as ``average`` (Horovod's second positional argument)."""
    if isinstance(op, bool):
        op, average = None, op if average is None else average
    if op is not None and average is not None:
        raise ValueError(f"pass either op={op!r} or the deprecated average={average!r}, not both")
    if average is not None:
        return Average if average else Sum
    return default if op is None else parse_op(op)


def require_native(op: ReduceOp, backend: str) -> ReduceOp:
    """Fail clearly where a backend cannot realise ``op`` (Adasum needs Horovod's own reduction)."""
    if op is Adasum and backend != "horovod":
        raise ValueError(f"hvd.Adasum is not available on the {backend} backend: it needs the horovod "
                         "backend (horovodrun with Horovod installed)")
    return op


def require_scatterable(op: ReduceOp) -> ReduceOp:
    """Horovod's reducescatter reduces with Average or Sum only; every backend keeps that contract."""
    if op not in (Average, Sum):
        raise ValueError(f"reducescatter supports op=hvd.Average or hvd.Sum, got {op!r}")
    return op


def gradient_op(op: object) -> ReduceOp:
    """The op of a gradient reduction (DistributedOptimizer/GradientTape): Average or Sum, as in Horovod
    (its Adasum optimizer is a different algorithm, not an op of these reductions)."""
    parsed = parse_op(op)
    if parsed not in (Average, Sum):
        raise ValueError(f"unsupported reduce op {op!r} for gradients; allowed: hvd.Average, hvd.Sum")
    return parsed
