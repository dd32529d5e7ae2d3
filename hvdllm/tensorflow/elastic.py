"""Elastic training for TensorFlow 2 / Keras 3 with Horovod's names (``hvd.elastic``), on hvdllm.

``run``, ``TensorFlowKerasState(model, optimizer=None, **objects)`` and ``ObjectState`` behave as
horovod.tensorflow.elastic's (the state machine is hvdllm.core.elastic's): commit() keeps the model's
and optimizer's variables in memory, restore() puts them back, a sync gives every worker rank 0's.
After a reset the backend is re-initialised and Keras's compiled train/test/predict functions are
dropped, so they are traced again for the new number of workers.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import tensorflow as tf

from hvdllm.core import elastic as _core
from hvdllm.tensorflow import basics
from hvdllm.tensorflow.distributed import broadcast_variables
from hvdllm.tensorflow.reduction import restart_op_names


def _reset() -> None:
    basics.reinit()
    restart_op_names()


def run(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: run ``func(state, ...)`` elastically (see horovod.tensorflow.elastic.run)."""
    internal_error = _core.horovod_parts()[0]

    @functools.wraps(func)
    def wrapper(state: _core.State, *args: Any, **kwargs: Any) -> Any:
        try:
            return func(state, *args, **kwargs)
        except tf.errors.UnknownError as e:  # how a failed Horovod op surfaces in TensorFlow
            if any(op in e.message for op in ("HorovodAllreduce", "HorovodAllgather", "HorovodBroadcast")):
                raise internal_error(e) from e
            raise
    return _core.run_fn(wrapper, _reset, basics.backend, basics.size)


class ObjectState(_core.ObjectState):
    """Picklable objects given as keyword arguments, kept as attributes and synced from rank 0."""

    def __init__(self, bcast_object: Callable[[Any], Any] | None = None, get_rank: Callable[[], int] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(bcast_object or basics.broadcast_object, get_rank or basics.rank, **kwargs)


def _variables(optimizer: Any) -> list[Any]:
    if optimizer is None:
        return []
    v = optimizer.variables
    return list(v() if callable(v) else v)


class _VariablesState(ObjectState):
    """Variables kept in memory by ``commit()``, put back by ``restore()``, rank 0's after a sync."""

    def _all(self) -> list[Any]:
        raise NotImplementedError

    def _save_model(self) -> None:
        self._saved_variables = [tf.identity(v) for v in self._all()]

    def save(self) -> None:
        self._save_model()
        super().save()

    def restore(self) -> None:
        for v, saved in zip(self._all(), self._saved_variables):
            v.assign(saved)
        super().restore()

    def sync(self) -> None:
        broadcast_variables(self._all(), root_rank=0)
        self._save_model()
        super().sync()


class TensorFlowKerasState(_VariablesState):
    """A built Keras model, its optimizer (given, or the compiled one) and picklable objects."""

    def __init__(self, model: Any, optimizer: Any = None, backend: Any = None, **kwargs: Any) -> None:
        if not getattr(model, "built", True):
            raise ValueError("TensorFlowKerasState: the model must be built first; call model.build(input_shape)")
        self.model = model
        self.optimizer = optimizer or getattr(model, "optimizer", None)
        if self.optimizer is not None and not getattr(self.optimizer, "built", True):
            # a worker that joins late must hold the same optimizer variables as the survivors
            self.optimizer.build(model.trainable_variables)
        self.backend = backend  # Horovod's TF1 session argument; unused with TF 2
        self._save_model()
        super().__init__(**kwargs)

    def _all(self) -> list[Any]:
        return list(self.model.variables) + _variables(self.optimizer)

    def reset(self) -> None:
        for attr in ("train_function", "test_function", "predict_function"):
            if hasattr(self.model, attr):
                setattr(self.model, attr, None)


class TensorFlowState(_VariablesState):
    """A list of ``tf.Variable``s (Horovod's default, TF1's global variables, exists in graph mode only:
    pass them) and picklable objects. ``session`` is TF1's and unused."""

    def __init__(self, variables: Any = None, session: Any = None, **kwargs: Any) -> None:
        if variables is None:
            variables = tf.compat.v1.global_variables()
        self.variables = list(variables)
        self.session = session
        self._save_model()
        super().__init__(**kwargs)

    def _all(self) -> list[Any]:
        return self.variables


__all__ = ["run", "TensorFlowKerasState", "TensorFlowState", "ObjectState"]
