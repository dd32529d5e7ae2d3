"""Reduce ops, Horovod's op/average resolution and the reducescatter split, as pure functions."""
from __future__ import annotations

import numpy as np
import pytest

from hvdllm.core.collectives import NumpyCollectives, local_world, split_rows
from hvdllm.core.ops import (Adasum, Average, Max, Min, Product, Sum, parse_op, require_native, require_scatterable,
                             resolve_op)
from hvdllm.core.process_sets import ProcessSet


def test_parse_op_names_and_aliases() -> None:
    assert [parse_op(s) for s in ("average", "SUM", "min", "Max", "product", "adasum", "mean", "prod")] == [
        Average, Sum, Min, Max, Product, Adasum, Average, Product]
    assert repr(Product) == "Product"
    with pytest.raises(ValueError, match="unsupported reduce op 'median'"):
        parse_op("median")


def test_resolve_op_average_back_compat() -> None:
    assert resolve_op() is Average and resolve_op(default=Sum) is Sum
    assert resolve_op(average=True) is Average and resolve_op(average=False) is Sum
    assert resolve_op(False) is Sum            # Horovod's positional `average`
    assert resolve_op(Max) is Max
    with pytest.raises(ValueError, match="either op"):
        resolve_op(Sum, average=True)


def test_backend_limits_are_clear() -> None:
    with pytest.raises(ValueError, match="mpi backend.*horovod backend"):
        require_native(Adasum, "mpi")
    assert require_native(Adasum, "horovod") is Adasum
    with pytest.raises(ValueError, match="hvd.Average or hvd.Sum, got Min"):
        require_scatterable(Min)


def test_split_rows_gives_earlier_ranks_the_extra_rows() -> None:
    assert split_rows(7, 3) == [3, 2, 2]
    assert split_rows(2, 3) == [1, 1, 0]
    assert split_rows(6, 3) == [2, 2, 2]


def test_local_engine_scales_and_removes_process_sets() -> None:
    comm, world = local_world()
    impl = NumpyCollectives(comm, world, [ProcessSet([0])])
    x = np.arange(3.0)
    np.testing.assert_array_equal(impl.allreduce(x, Sum, prescale_factor=2.0, postscale_factor=0.5), x)
    np.testing.assert_array_equal(impl.allreduce(np.array([3, 5], dtype=np.int32), Average), [3, 5])
    assert impl.remove_process_set(ProcessSet([0])) is True
    assert impl.remove_process_set(ProcessSet([0])) is False
    with pytest.raises(ValueError, match="was not registered"):
        impl.allreduce(x, Sum, ProcessSet([0]))
    with pytest.raises(ValueError, match="splits .* must be 1 non-negative counts"):
        impl.alltoall(x, [1, 2])
