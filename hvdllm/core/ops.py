"""Reduction operations, defined once for every backend and framework."""
from __future__ import annotations

import enum


class ReduceOp(enum.Enum):
    """How an allreduce combines the ranks' values.

    AVERAGE is SUM followed by a division by the number of contributing ranks; backends that have no
    native average (mpi, and compressed buffers) reduce with SUM and then call :meth:`postscale`.
    """

    AVERAGE = "average"
    SUM = "sum"

    def postscale(self, size: int) -> float:
        """Factor applied to a SUM-reduced value to realise this op over ``size`` ranks."""
        return 1.0 / size if self is ReduceOp.AVERAGE else 1.0

    def __repr__(self) -> str:  # prints as hvd.Average / hvd.Sum
        return "Average" if self is ReduceOp.AVERAGE else "Sum"


Average = ReduceOp.AVERAGE
Sum = ReduceOp.SUM


def parse_op(op: object) -> ReduceOp:
    """Accept a ReduceOp, its name ("average"/"sum", any case) or Horovod's op constants' names."""
    if isinstance(op, ReduceOp):
        return op
    name = getattr(op, "name", op)
    if isinstance(name, str) and name.lower() in ("average", "avg", "mean"):
        return Average
    if isinstance(name, str) and name.lower() == "sum":
        return Sum
    raise ValueError(f"unsupported reduce op {op!r}; allowed: hvd.Average, hvd.Sum")
