"""horovod.tensorflow's remaining module functions on hvdllm's backends: in-place and graph-era variable
broadcasts, the object-broadcast factory, the run-time query ops and the variable-reference helpers.

The query ops (``rank_op``, ``size_op``, ...) read the answer when the op *runs* (inside a
``tf.function`` too), as Horovod's do, so a graph traced before an elastic reset stays right.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import tensorflow as tf

from hvdllm.core.process_sets import WORLD, ProcessSet
from hvdllm.tensorflow import basics
from hvdllm.tensorflow.distributed import broadcast_variables


def broadcast_(variables: Iterable[Any], root_rank: int, name: str | None = None,
               process_set: ProcessSet = WORLD) -> list:
    """Assign ``root_rank``'s values to ``variables`` in place and return them (Horovod's in-place
    broadcast; ``name`` is accepted for parity, ops are matched by order)."""
    variables = list(variables)
    broadcast_variables(variables, root_rank, process_set)
    return variables


def broadcast_global_variables(root_rank: int) -> Any:
    """Broadcast all TF1 global variables from ``root_rank`` (graph mode only, as in Horovod; in eager
    code use ``broadcast_variables(model.variables)``)."""
    if tf.executing_eagerly():
        raise RuntimeError("hvd.broadcast_global_variables() does not support eager execution. "
                           "Please use `hvd.broadcast_variables(<model/optimizer variables>)` instead.")
    return broadcast_variables(tf.compat.v1.global_variables(), root_rank)


def broadcast_object_fn(root_rank: int = 0, session: Any = None, name: str | None = None,
                        process_set: ProcessSet = WORLD) -> Callable[[Any], Any]:
    """A function ``obj -> root_rank's obj`` (Horovod builds its graph once; here each call is one
    object broadcast). ``session`` is TF1's and unused."""
    def broadcast(obj: Any) -> Any:
        return basics.broadcast_object(obj, root_rank, process_set, name=name)

    return broadcast


def _resolve_set(process_set_id: Any) -> ProcessSet:
    if isinstance(process_set_id, ProcessSet):
        return process_set_id
    if isinstance(process_set_id, bool) or not isinstance(process_set_id, (int, np.integer)):
        raise ValueError(f"process_set_id={process_set_id!r} must be an integer id or a ProcessSet")
    return basics.collectives().process_set_of(int(process_set_id))


def _run_time(answer: Callable[[], int], name: str | None) -> tf.Tensor:
    """An int32 scalar op whose value is ``answer()`` when it runs."""
    if tf.executing_eagerly():
        return tf.constant(answer(), tf.int32, name=name)
    out = tf.numpy_function(lambda: np.int32(answer()), [], tf.int32, stateful=True, name=name)
    out.set_shape([])
    return out


def rank_op(name: str | None = None) -> tf.Tensor:
    """This process's rank, as an op evaluated when it runs."""
    return _run_time(basics.rank, name)


def local_rank_op(name: str | None = None) -> tf.Tensor:
    return _run_time(basics.local_rank, name)


def local_size_op(name: str | None = None) -> tf.Tensor:
    return _run_time(basics.local_size, name)


def size_op(process_set_id: Any = 0, name: str | None = None) -> tf.Tensor:
    """The number of ranks in the process set ``process_set_id`` (0: all), evaluated when it runs."""
    def answer() -> int:
        return _resolve_set(process_set_id).size(basics.size())

    return _run_time(answer, name)


def process_set_included_op(process_set_id: Any = 0, name: str | None = None) -> tf.Tensor:
    """1 when this rank belongs to the process set ``process_set_id``, else 0 (evaluated when it runs)."""
    def answer() -> int:
        return int(_resolve_set(process_set_id).included(basics.rank(), basics.size()))

    return _run_time(answer, name)
