"""Horovod's ``LocalGradientAggregationHelper``: sum gradients locally for ``backward_passes_per_step``
passes, reduce them over the ranks on the last one, and apply only then (eager or inside ``tf.function``).

hvdllm's own DistributedOptimizer accumulates by itself (:mod:`hvdllm.tensorflow.distributed`); this class
keeps Horovod's helper for code that drives aggregation by hand with its own ``allreduce_func``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import tensorflow as tf

from hvdllm.core.gradients import is_reduction_pass
from hvdllm.core.process_sets import WORLD, ProcessSet
from hvdllm.tensorflow.basics import size
from hvdllm.tensorflow.util import ref


class LocalGradientAggregationHelper:
    """Aggregate gradients locally; ``allreduce_func(grads, vars) -> grads`` runs once every
    ``backward_passes_per_step`` calls of :meth:`compute_gradients`.

    Between reductions :meth:`compute_gradients` returns the running local sums (unreduced) and
    :meth:`apply_gradients` skips the update (a Keras optimizer's ``iterations`` still advances, as in
    Horovod). ``average_aggregated_gradients`` divides the sums by k. Registered local variables are
    not reduced (divided by the number of ranks with ``scale_local_gradients``).
    """

    _OPTIMIZER_TYPE_KERAS = "optimizer_type_keras"
    _OPTIMIZER_TYPE_LEGACY = "optimizer_type_legacy"

    def __init__(self, backward_passes_per_step: int, allreduce_func: Callable[[list, list], list],
                 sparse_as_dense: bool, average_aggregated_gradients: bool, rank: int, optimizer_type: str,
                 process_set: ProcessSet = WORLD, scale_local_gradients: bool = True, name: str = "") -> None:
        k = backward_passes_per_step
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"backward_passes_per_step={k!r} must be an integer > 0")
        if optimizer_type not in (self._OPTIMIZER_TYPE_KERAS, self._OPTIMIZER_TYPE_LEGACY):
            raise ValueError(f"optimizer_type={optimizer_type!r}; allowed: {self._OPTIMIZER_TYPE_KERAS!r}, "
                             f"{self._OPTIMIZER_TYPE_LEGACY!r}")
        self._allreduce_grads = allreduce_func
        self.backward_passes_per_step = k
        self.average_aggregated_gradients = bool(average_aggregated_gradients)
        self.sparse_as_dense, self.rank, self.optimizer_type = sparse_as_dense, rank, optimizer_type
        self.process_set, self.scale_local_gradients, self.name = process_set, scale_local_gradients, name
        self.locally_aggregated_grads: list[tf.Variable | None] = []
        self.counter: tf.Variable | None = None
        self._local_vars: set[Any] = set()

    def register_local_var(self, var: Any) -> None:
        """Keep ``var``'s gradient out of the reduction."""
        self._local_vars.add(ref(var))

    def _init_aggregation_vars(self, grads: Sequence[Any]) -> None:
        with tf.init_scope():
            self.counter = tf.Variable(0, dtype=tf.int32, trainable=False, name=f"{self.name}aggregation_counter")
            self.locally_aggregated_grads = [
                None if g is None else tf.Variable(tf.zeros_like(tf.convert_to_tensor(g)), trainable=False,
                                                   name=f"{self.name}aggregated_grad") for g in grads]

    def _reduced(self, vars: Sequence[Any]) -> list[Any]:
        values = [None if a is None else a.read_value() for a in self.locally_aggregated_grads]
        if self.average_aggregated_gradients:
            values = [None if v is None else v / self.backward_passes_per_step for v in values]
        shared = [i for i, v in enumerate(vars) if ref(v) not in self._local_vars]
        reduced = self._allreduce_grads([values[i] for i in shared], [vars[i] for i in shared])
        out = list(values)
        for i, g in zip(shared, reduced):
            out[i] = g
        n = self.process_set.size(size())
        if self.scale_local_gradients and n > 1:
            out = [g / n if g is not None and ref(v) in self._local_vars else g for g, v in zip(out, vars)]
        return out

    def compute_gradients(self, grads: Sequence[Any], vars: Sequence[Any]) -> list[Any]:
        """Add ``grads`` to the local sums; on every k-th call return them reduced, else unreduced."""
        grads, vars = list(grads), list(vars)
        if self.counter is None:
            self._init_aggregation_vars(grads)
        for acc, g in zip(self.locally_aggregated_grads, grads):
            if acc is not None and g is not None:
                acc.assign_add(tf.convert_to_tensor(g))
        count = self.counter.assign_add(1)
        local = [None if a is None else a.read_value() for a in self.locally_aggregated_grads]
        if tf.executing_eagerly():
            return self._reduced(vars) if is_reduction_pass(int(count), self.backward_passes_per_step) else local
        keep = [i for i, a in enumerate(self.locally_aggregated_grads) if a is not None]
        chosen = tf.cond(tf.equal(count, self.backward_passes_per_step),
                         lambda: [self._reduced(vars)[i] for i in keep], lambda: [local[i] for i in keep])
        out: list[Any] = [None] * len(grads)
        for i, g in zip(keep, chosen):
            out[i] = g
        return out

    def apply_gradients(self, apply_grads_closure: Callable[[], Any], optimizer: Any, *args: Any,
                        **kwargs: Any) -> Any:
        """Run ``apply_grads_closure`` on the reduction pass (then clear the sums), else skip the update."""
        def apply() -> tf.Tensor:
            apply_grads_closure()
            for acc in self.locally_aggregated_grads:
                if acc is not None:
                    acc.assign(tf.zeros_like(acc))
            self.counter.assign(0)
            return tf.constant(True)

        def skip() -> tf.Tensor:
            if self.optimizer_type == self._OPTIMIZER_TYPE_KERAS and hasattr(optimizer, "iterations"):
                optimizer.iterations.assign_add(1)
            return tf.constant(False)

        if tf.executing_eagerly():
            return apply() if int(self.counter.numpy()) == self.backward_passes_per_step else skip()
        return tf.cond(tf.equal(self.counter, self.backward_passes_per_step), apply, skip)
