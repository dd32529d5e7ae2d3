"""hvdllm.tensorflow's backends: Horovod's TF ops, or the core's numpy collectives (mpi, local).

Horovod's TF ops work eagerly and inside ``tf.function``; the numpy backends enter graphs through
``tf.numpy_function`` (every rank must run the same collectives in the same order, as with Horovod).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from hvdllm.core.collectives import Done
from hvdllm.core.ops import Average, ReduceOp, parse_op
from hvdllm.core.process_sets import WORLD, ProcessSet
from hvdllm.core.backends import HorovodBase, NumpyBase, create_backend
from hvdllm.tensorflow.buckets import packed


def horovod_module() -> Any:
    """horovod.tensorflow when Horovod is installed *and* built with TensorFlow support, else None."""
    try:
        import horovod.tensorflow
    except Exception:
        return None
    return horovod.tensorflow


def horovod_available() -> bool:
    return horovod_module() is not None


class _Immediate:
    """Asynchronous forms for TF: its tensors are immutable and Horovod's TF API has no asynchronous
    ops, so each op runs now and the handle's ``wait()`` returns its result."""

    def start(self, kind: str, *args: Any, **kwargs: Any) -> Done:
        if kind.endswith("_"):
            raise ValueError(f"{kind} writes into its inputs; TensorFlow tensors are immutable: use {kind[:-1]}")
        return Done(getattr(self, kind)(*args, **kwargs))

    def allreduce_async_(self, x: tf.Tensor, op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                         name: str | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> Done:
        return Done(self.allreduce(x, op, process_set, name, prescale_factor,  # type: ignore[attr-defined]
                                   postscale_factor))


class HorovodTF(_Immediate, HorovodBase):
    """Collectives on horovod.tensorflow's low-level ops (which work on TF 2.21; its Keras glue does not)."""

    def __init__(self, process_sets: Sequence[ProcessSet], model_parallel: bool) -> None:
        import horovod.tensorflow as hvd

        super().__init__(hvd, process_sets, has_accelerator=bool(tf.config.list_physical_devices("GPU")),
                         model_parallel=model_parallel)

    def allreduce(self, x: tf.Tensor, op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                  name: str | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> tf.Tensor:
        return self.grouped_allreduce([x], op, process_set, name, prescale_factor, postscale_factor)[0]

    def grouped_allreduce(self, xs: Sequence[tf.Tensor], op: ReduceOp = Average,
                          process_set: ProcessSet = WORLD, name: str | None = None,
                          prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> list[tf.Tensor]:
        """Horovod's TF ops have no bf16: such tensors travel as fp32.

        ``name`` (graph mode) keys the op across ranks regardless of name scopes; without it Horovod
        derives the key from the tensors' names, which differ across ranks when, e.g., Keras numbered
        the models or optimizers differently on each rank.
        """
        xs = [tf.convert_to_tensor(x) for x in xs]
        wire = [tf.cast(x, tf.float32) if x.dtype == tf.bfloat16 else x for x in xs]
        named = {"name": name, "ignore_name_scope": True} if name else {}
        named.update(prescale_factor=prescale_factor, postscale_factor=postscale_factor)
        if len(wire) == 1:
            out = [self.hvd.allreduce(wire[0], op=self._op(op), process_set=self._ps(process_set), **named)]
        else:
            out = list(self.hvd.grouped_allreduce(wire, op=self._op(op), process_set=self._ps(process_set),
                                                  **named))
        return [tf.cast(o, x.dtype) if o.dtype != x.dtype else o for o, x in zip(out, xs)]

    def broadcast(self, x: tf.Tensor, root_rank: int, process_set: ProcessSet = WORLD,
                  name: str | None = None) -> tf.Tensor:
        named = {"name": name, "ignore_name_scope": True} if name else {}
        return self.hvd.broadcast(tf.convert_to_tensor(x), root_rank, process_set=self._ps(process_set), **named)

    def allgather(self, x: tf.Tensor, process_set: ProcessSet = WORLD, name: str | None = None) -> tf.Tensor:
        x = tf.convert_to_tensor(x)
        if x.shape.rank == 0:
            x = tf.reshape(x, [1])
        named = {"name": name, "ignore_name_scope": True} if name else {}
        return self.hvd.allgather(x, process_set=self._ps(process_set), **named)

    def grouped_allgather(self, xs: Sequence[tf.Tensor], process_set: ProcessSet = WORLD,
                          name: str | None = None) -> list[tf.Tensor]:
        named = {"name": name, "ignore_name_scope": True} if name else {}
        return list(self.hvd.grouped_allgather([tf.convert_to_tensor(x) for x in xs],
                                               process_set=self._ps(process_set), **named))

    def alltoall(self, x: tf.Tensor, splits: Any = None, process_set: ProcessSet = WORLD,
                 name: str | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        x = tf.convert_to_tensor(x)
        if splits is None:   # explicit splits make Horovod return the received ones too
            n = process_set.size(self.world.size)
            splits = [x.shape[0] // n] * n
        named = {"name": name, "ignore_name_scope": True} if name else {}
        out, received = self.hvd.alltoall(x, splits=tf.cast(splits, tf.int32), process_set=self._ps(process_set),
                                          **named)
        return out, received

    def reducescatter(self, x: tf.Tensor, op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                      name: str | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0
                      ) -> tf.Tensor:
        named = {"name": name, "ignore_name_scope": True} if name else {}
        return self.hvd.reducescatter(tf.convert_to_tensor(x), op=self._op(op), process_set=self._ps(process_set),
                                      prescale_factor=prescale_factor, postscale_factor=postscale_factor, **named)

    def grouped_reducescatter(self, xs: Sequence[tf.Tensor], op: ReduceOp = Average,
                              process_set: ProcessSet = WORLD, name: str | None = None,
                              prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> list[tf.Tensor]:
        return list(self.hvd.grouped_reducescatter([tf.convert_to_tensor(x) for x in xs], op=self._op(op),
                                                   process_set=self._ps(process_set),
                                                   prescale_factor=prescale_factor,
                                                   postscale_factor=postscale_factor))

    def join(self, device: int = -1) -> int:
        return int(self.hvd.join())

    def barrier(self, process_set: ProcessSet = WORLD) -> None:
        """horovod.tensorflow has no barrier op: a tiny blocking allreduce synchronises the same way."""
        self.hvd.allreduce(tf.zeros([1]), op=self.hvd.Sum, process_set=self._ps(process_set)).numpy()


def _np_dtype(dtype: tf.DType) -> Any:
    return np.float32 if dtype == tf.bfloat16 else dtype.as_numpy_dtype


class NumpyTF(_Immediate, NumpyBase):
    """Collectives for the mpi and local backends: TF tensors through the core's numpy code."""

    def _call(self, fn: Any, x: tf.Tensor, out_shape: Any = None) -> tf.Tensor:
        """Run ``fn`` (numpy -> numpy) eagerly, or as a numpy_function inside a graph."""
        x = tf.convert_to_tensor(x)
        dtype = x.dtype
        wire = tf.cast(x, tf.float32) if dtype == tf.bfloat16 else x
        if tf.executing_eagerly():
            out = tf.convert_to_tensor(fn(wire.numpy()))
        else:
            out = tf.numpy_function(lambda a: np.asarray(fn(a), dtype=a.dtype), [wire], wire.dtype, stateful=True)
            out.set_shape(x.shape if out_shape is None else out_shape)
        return tf.cast(out, dtype) if dtype == tf.bfloat16 else out

    def allreduce(self, x: tf.Tensor, op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                  name: str | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> tf.Tensor:
        """``name`` is accepted for API parity with Horovod; MPI matches collectives by order."""
        op = parse_op(op)
        return self._call(lambda a: self.impl.allreduce(a, op, process_set, prescale_factor, postscale_factor), x)

    def grouped_allreduce(self, xs: Sequence[tf.Tensor], op: ReduceOp = Average,
                          process_set: ProcessSet = WORLD, name: str | None = None,
                          prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> list[tf.Tensor]:
        """One reduction over the tensors packed into a flat buffer per dtype."""
        return packed(xs, lambda flat: self.allreduce(flat, op, process_set, None, prescale_factor,
                                                      postscale_factor))

    def broadcast(self, x: tf.Tensor, root_rank: int, process_set: ProcessSet = WORLD,
                  name: str | None = None) -> tf.Tensor:
        return self._call(lambda a: self.impl.broadcast(a, root_rank, process_set), x)

    def allgather(self, x: tf.Tensor, process_set: ProcessSet = WORLD, name: str | None = None) -> tf.Tensor:
        x = tf.convert_to_tensor(x)
        if x.shape.rank == 0:
            x = tf.reshape(x, [1])
        return self._call(lambda a: self.impl.allgather(a, process_set), x,
                          out_shape=tf.TensorShape([None]).concatenate(x.shape[1:]))

    def reducescatter(self, x: tf.Tensor, op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                      name: str | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0
                      ) -> tf.Tensor:
        x = tf.convert_to_tensor(x)
        return self._call(lambda a: self.impl.reducescatter(a, op, process_set, prescale_factor, postscale_factor),
                          x, out_shape=tf.TensorShape([None]).concatenate(x.shape[1:]))

    def alltoall(self, x: tf.Tensor, splits: Any = None, process_set: ProcessSet = WORLD,
                 name: str | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        x = tf.convert_to_tensor(x)
        if x.dtype == tf.bfloat16:
            out, received = _numpy_alltoall(self.impl, tf.cast(x, tf.float32), splits, process_set)
            return tf.cast(out, tf.bfloat16), received
        return _numpy_alltoall(self.impl, x, splits, process_set)


def _numpy_alltoall(impl: Any, x: tf.Tensor, splits: Any, process_set: ProcessSet) -> tuple[tf.Tensor, tf.Tensor]:
    """The core's alltoall, eagerly or as a numpy_function (two outputs: rows, received splits)."""
    counts = None if splits is None else [int(v) for v in np.asarray(splits).reshape(-1)]
    if tf.executing_eagerly():
        out, received = impl.alltoall(x.numpy(), counts, process_set)
        return tf.convert_to_tensor(out), tf.convert_to_tensor(received)
    out, received = tf.numpy_function(lambda a: impl.alltoall(a, counts, process_set), [x], [x.dtype, tf.int32],
                                      stateful=True)
    out.set_shape(tf.TensorShape([None]).concatenate(x.shape[1:]))
    return out, received


def create(process_sets: Sequence[ProcessSet | Sequence[int]] | None = None) -> HorovodTF | NumpyTF:
    """Discover the backend (see hvdllm.core.backend) and initialise it."""
    return create_backend(process_sets, horovod_available, HorovodTF, NumpyTF)
