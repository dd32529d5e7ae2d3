"""horovod.tensorflow's collective functions with its exact signatures (argument names, order, defaults),
over the one Frontend in :mod:`hvdllm.tensorflow.basics`.

What Horovod's TF signatures add to the shared Frontend: ``device_dense`` places the op
(``tf.device``), ``compression`` casts floating tensors to the wire dtype the backend can reduce (the
core's rule, :func:`hvdllm.core.gradients.backend_wire_dtype`), ``tf.IndexedSlices`` are allreduced
as Horovod does (values and indices allgathered; Average divides the values), ``ignore_name_scope``,
``device_sparse`` and TF1's ``session`` are accepted for parity.
"""
from __future__ import annotations

from typing import Any, Sequence

import tensorflow as tf

from hvdllm.core.compression import parse_compression
from hvdllm.core.gradients import backend_wire_dtype
from hvdllm.core.ops import Average, ReduceOp, resolve_op
from hvdllm.core.process_sets import WORLD, ProcessSet
from hvdllm.tensorflow import basics
from hvdllm.tensorflow import distributed
from hvdllm.tensorflow.util import device_scope


def _compressed(tensors: Sequence[Any], compression: Any) -> tuple[list[tf.Tensor], list[tf.DType]]:
    """Tensors cast to the wire dtype the compression and the backend allow; and their own dtypes."""
    spec = parse_compression(compression)
    xs = [tf.convert_to_tensor(t) for t in tensors]
    backend = basics.backend()
    wires = [tf.as_dtype(backend_wire_dtype(x.dtype.name, spec, backend)[0]) if x.dtype.is_floating else x.dtype
             for x in xs]
    return [tf.cast(x, w) if w != x.dtype else x for x, w in zip(xs, wires)], [x.dtype for x in xs]


def _sparse_allreduce(tensor: tf.IndexedSlices, op: ReduceOp, name: str | None,
                      process_set: ProcessSet) -> tf.IndexedSlices:
    if op not in (Average, ReduceOp.SUM):
        raise ValueError(f"op={op!r} on tf.IndexedSlices; allowed: hvd.Average, hvd.Sum (or densify the gradient)")
    values = basics.allgather(tensor.values, process_set, name=None if name is None else f"{name}.values")
    indices = basics.allgather(tensor.indices, process_set, name=None if name is None else f"{name}.indices")
    if op is Average:
        values = values / tf.cast(process_set.size(basics.size()), values.dtype)
    return tf.IndexedSlices(values, indices, dense_shape=tensor.dense_shape)


def allreduce(tensor: Any, average: Any = None, device_dense: str = "", device_sparse: str = "",
              compression: Any = None, op: Any = None, prescale_factor: float = 1.0,
              postscale_factor: float = 1.0, name: str | None = None, process_set: ProcessSet = WORLD,
              ignore_name_scope: bool = False) -> Any:
    """Reduce ``tensor`` over the ranks (Average unless ``op``/``average`` say otherwise)."""
    op = resolve_op(op, average)
    if isinstance(tensor, tf.IndexedSlices):
        with device_scope(device_sparse):
            return _sparse_allreduce(tensor, op, name, process_set)
    with device_scope(device_dense):
        (wire,), (dtype,) = _compressed([tensor], compression)
        out = basics.allreduce(wire, op, process_set, name, prescale_factor=prescale_factor,
                               postscale_factor=postscale_factor)
        return tf.cast(out, dtype) if out.dtype != dtype else out


def grouped_allreduce(tensors: Sequence[Any], average: Any = None, device_dense: str = "", device_sparse: str = "",
                      compression: Any = None, op: Any = None, prescale_factor: float = 1.0,
                      postscale_factor: float = 1.0, process_set: ProcessSet = WORLD,
                      ignore_name_scope: bool = False, name: str | None = None) -> list:
    """Reduce several tensors as one operation; returns them reduced, in order."""
    if not tensors:
        return list(tensors)
    op = resolve_op(op, average)
    with device_scope(device_dense):
        wires, dtypes = _compressed(tensors, compression)
        out = basics.grouped_allreduce(wires, op, process_set, name, prescale_factor=prescale_factor,
                                       postscale_factor=postscale_factor)
        return [tf.cast(o, d) if o.dtype != d else o for o, d in zip(out, dtypes)]


def allgather(tensor: Any, name: str | None = None, ignore_name_scope: bool = False,
              process_set: ProcessSet = WORLD) -> tf.Tensor:
    """Concatenate the ranks' tensors along the first dimension (sizes there may differ)."""
    return basics.allgather(tensor, process_set, name=name)


def grouped_allgather(tensors: Sequence[Any], name: str | None = None, ignore_name_scope: bool = False,
                      process_set: ProcessSet = WORLD) -> list:
    return basics.grouped_allgather(tensors, name, process_set)


def broadcast(tensor: Any, root_rank: int, name: str | None = None, ignore_name_scope: bool = False,
              process_set: ProcessSet = WORLD) -> tf.Tensor:
    """``root_rank``'s value of ``tensor`` on every rank."""
    return basics.broadcast(tensor, root_rank, process_set, name=name)


def alltoall(tensor: Any, splits: Any = None, name: str | None = None, ignore_name_scope: bool = False,
             process_set: ProcessSet = WORLD) -> Any:
    """Send ``splits[i]`` rows to rank i (equal parts without ``splits``); returns the received rows and,
    with ``splits``, how many came from each rank."""
    return basics.alltoall(tensor, splits, name, process_set)


def reducescatter(tensor: Any, device_dense: str = "", compression: Any = None, op: Any = Average,
                  name: str | None = None, process_set: ProcessSet = WORLD, ignore_name_scope: bool = False,
                  prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> tf.Tensor:
    """Reduce over the ranks and return this rank's share of the first dimension."""
    with device_scope(device_dense):
        return basics.reducescatter(tensor, name, compression, op, process_set, prescale_factor, postscale_factor)


def grouped_reducescatter(tensors: Sequence[Any], device_dense: str = "", compression: Any = None,
                          op: Any = Average, process_set: ProcessSet = WORLD, prescale_factor: float = 1.0,
                          postscale_factor: float = 1.0) -> list:
    with device_scope(device_dense):
        return basics.grouped_reducescatter(tensors, None, compression, op, process_set, prescale_factor,
                                            postscale_factor)


def broadcast_object(obj: Any, root_rank: int = 0, session: Any = None, name: str | None = None,
                     process_set: ProcessSet = WORLD) -> Any:
    """``root_rank``'s picklable ``obj`` on every rank (``session`` is TF1's and unused)."""
    return basics.broadcast_object(obj, root_rank, process_set, name=name)


def allgather_object(obj: Any, session: Any = None, name: str | None = None, process_set: ProcessSet = WORLD) -> list:
    """Every rank's picklable ``obj``, in rank order."""
    return basics.allgather_object(obj, name, process_set)


def DistributedOptimizer(optimizer: Any, name: str | None = None, use_locking: bool = False, device_dense: str = "",
                         device_sparse: str = "", compression: Any = None, sparse_as_dense: bool = False,
                         backward_passes_per_step: int = 1, op: Any = Average, gradient_predivide_factor: float = 1.0,
                         average_aggregated_gradients: bool = False, num_groups: int = 0, groups: Any = None,
                         process_set: ProcessSet = WORLD, scale_local_gradients: bool = True, **hvdllm_options: Any
                         ) -> Any:
    """horovod.tensorflow.DistributedOptimizer's argument order over the Keras one
    (:func:`hvdllm.tensorflow.distributed.DistributedOptimizer`; Keras 3 has no TF1 optimizers, so
    ``use_locking`` is accepted for parity). hvdllm's keywords (``max_grad_norm``, ``bucket_cap_mb``) pass
    through."""
    return distributed.DistributedOptimizer(
        optimizer, name, device_dense, device_sparse, compression, sparse_as_dense, gradient_predivide_factor, op,
        backward_passes_per_step, average_aggregated_gradients, num_groups, groups, process_set,
        scale_local_gradients, **hvdllm_options)


def broadcast_variables(variables: Any, root_rank: int, process_set: ProcessSet = WORLD, inplace: bool = False) -> None:
    """Assign ``root_rank``'s values to ``variables`` (always in place here; ``inplace`` is Horovod's
    memory hint)."""
    return distributed.broadcast_variables(variables, root_rank, process_set)
