"""Data parallelism for TensorFlow 2 / Keras 3: a gradient tape, an optimizer wrapper, variable broadcast.

Horovod 0.28's own TF/Keras glue is broken on Keras 3 (its tape and callback crash on Keras variables,
its Keras optimizer silently skips the averaging); these use only its low-level collectives (or mpi4py,
or nothing on one process) through :mod:`hvdllm.tensorflow.backends`. The semantics (accumulation,
compression, clipping after the reduction) are the core's: :mod:`hvdllm.core.gradients`.

Graph mode: everything here works eagerly and inside ``tf.function`` (``model.fit``'s train step), but not
under XLA (``jit_compile=True``): Horovod's ops and ``tf.numpy_function`` have no XLA kernels. On CPU
Keras's ``jit_compile="auto"`` resolves to False; on GPUs pass ``jit_compile=False`` to ``model.compile``
(``BroadcastGlobalVariablesCallback`` turns it off for you when the model's optimizer is distributed).
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable, Sequence

import tensorflow as tf

from hvdllm.core.gradients import ReductionConfig, backend_wire_dtype, clip_coefficient_of, is_reduction_pass
from hvdllm.core.ops import Average, ReduceOp, Sum
from hvdllm.core.process_sets import WORLD, ProcessSet
from hvdllm.core.zero import parse_stage
from hvdllm.tensorflow.basics import collectives
from hvdllm.tensorflow.buckets import packed


def _in_xla_context() -> bool:
    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # private module moved: assume no XLA rather than fail
        return False
    if tf.executing_eagerly():
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


_GRAPH_OPS = [0]


def restart_op_names() -> None:
    """Number graph collectives from 1 again: after an elastic reset every worker, old or new, traces
    its functions afresh and must give the same collectives the same names."""
    _GRAPH_OPS[0] = 0


def _op_name(kind: str) -> str | None:
    """A rank-independent key for a collective built in a graph (None when eager, where order keys it).

    Horovod keys graph ops by name; its default (the tensors' names) includes Keras's auto-numbered
    model/optimizer scopes, which differ across ranks as soon as one rank builds an extra model. Ranks
    build the same collectives in the same order, so a per-process counter names them identically.
    """
    if tf.executing_eagerly():
        return None
    _GRAPH_OPS[0] += 1
    return f"hvdllm_{kind}_{_GRAPH_OPS[0]}"


def _dense(g: Any) -> tf.Tensor:
    """IndexedSlices (embedding gradients) become dense tensors: one fused reduction for all gradients."""
    return tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g


_WARNED: set[tuple[str, str]] = set()


def _wire(dtype: str, config: ReductionConfig, backend: str) -> str:
    """The core's wire dtype for this backend; warns once per (backend, dtype) when compression falls back."""
    wire, warning = backend_wire_dtype(dtype, config.compression, backend)
    if warning and (backend, wire) not in _WARNED:
        _WARNED.add((backend, wire))
        warnings.warn(warning, stacklevel=3)
    return wire


def _set_size(rt: Any, process_set: ProcessSet) -> int:
    return len(process_set.members(rt.world.size))


def reduce_gradients(grads: Sequence[Any], variables: Sequence[Any], config: ReductionConfig,
                     norm_out: Any = None) -> list[Any]:
    """Reduce the gradients of ``variables`` over the ranks (the core's prescale -> sum -> postscale), then clip.

    A None gradient travels as zeros, so every rank reduces the same buckets (a variable one rank's loss
    does not touch still gets the other ranks' gradients, as in torch); on one rank nothing travels and
    None stays None. With clipping, ``norm_out`` (a float32 ``tf.Variable``, optional) receives the global
    norm before clipping. Buckets follow the core's plan (dtype, size cap, reverse order); each is one
    flat buffer summed in the compression's wire dtype. Works eagerly and inside ``tf.function``.
    """
    rt = collectives()
    size = _set_size(rt, config.process_set)
    if size > 1:
        if _in_xla_context():
            raise ValueError("hvdllm gradient reduction cannot run in an XLA-compiled function "
                             "(jit_compile=True); allowed: jit_compile=False, e.g. model.compile(..., jit_compile=False)")
        grads = [tf.zeros(v.shape, tf.as_dtype(v.dtype)) if g is None else g for g, v in zip(grads, variables)]
    idx = [i for i, g in enumerate(grads) if g is not None]

    def reduce(flat: tf.Tensor) -> tf.Tensor:
        wire = _wire(flat.dtype.name, config, rt.name) if size > 1 else flat.dtype.name
        prescale, postscale = config.scales(size, wire)
        if prescale != 1.0:  # in the gradient's dtype, before a 16-bit wire can overflow
            flat = flat * tf.cast(prescale, flat.dtype)
        if size > 1:
            summed = rt.allreduce(tf.cast(flat, tf.as_dtype(wire)), Sum, config.process_set, name=_op_name("grads"))
            if postscale != 1.0:  # on the wire buffer: a widened (fp32) sum of 16-bit gradients fits after it
                summed = summed * tf.cast(postscale, summed.dtype)
            return tf.cast(summed, flat.dtype)
        return flat * tf.cast(postscale, flat.dtype) if postscale != 1.0 else flat

    out: list[Any] = list(grads)
    if idx and (size > 1 or config.scales(1) != (1.0, 1.0)):
        for i, g in zip(idx, packed([_dense(grads[i]) for i in idx], reduce, config.bucket_cap_bytes)):
            out[i] = g
    if idx and config.max_grad_norm is not None:
        out = clip_by_global_norm_after_reduction(out, config.max_grad_norm, norm_out)
    return out


def clip_by_global_norm_after_reduction(grads: Sequence[Any], max_norm: float, norm_out: Any = None) -> list[Any]:
    """Scale gradients by the core's clip coefficient of their global L2 norm (computed in float32);
    ``norm_out`` (a float32 ``tf.Variable``, optional) receives that norm."""
    present = [_dense(g) for g in grads if g is not None]
    total = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(tf.cast(g, tf.float32))) for g in present]))
    if norm_out is not None:
        norm_out.assign(total)
    coef = clip_coefficient_of(total, max_norm, tf.maximum)
    return [None if g is None else _dense(g) * tf.cast(coef, g.dtype) for g in grads]


class DistributedGradientTape:
    """Wraps a ``tf.GradientTape``: ``gradient()`` returns gradients reduced over the ranks.

        with tf.GradientTape() as tape:
            loss = ...
        tape = hvd.DistributedGradientTape(tape)
        grads = tape.gradient(loss, model.trainable_variables)   # averaged over ranks

    Also usable as ``with hvd.DistributedGradientTape(tf.GradientTape()) as tape:``. Every other method
    (``watch``, ``stop_recording``, ``jacobian``, ...) is the wrapped tape's. ``gradient_predivide_factor``
    f is Horovod's (Average only): gradients are divided by f before the sum and multiplied by f/N after it.
    """

    def __init__(self, gradtape: tf.GradientTape, compression: object = None, op: ReduceOp = Average,
                 bucket_cap_mb: float = 25.0, process_set: ProcessSet = WORLD,
                 gradient_predivide_factor: float = 1.0) -> None:
        if not isinstance(gradtape, tf.GradientTape):
            raise ValueError(f"DistributedGradientTape needs a tf.GradientTape, got {type(gradtape).__name__}")
        self._tape = gradtape
        self._config = ReductionConfig.create(op=op, compression=compression, bucket_cap_mb=bucket_cap_mb,
                                              process_set=process_set,
                                              gradient_predivide_factor=gradient_predivide_factor)

    def __enter__(self) -> "DistributedGradientTape":
        self._tape.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._tape.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        if name == "_tape":
            raise AttributeError(name)
        return getattr(self._tape, name)

    def gradient(self, target: Any, sources: Any, output_gradients: Any = None,
                 unconnected_gradients: Any = tf.UnconnectedGradients.NONE) -> Any:
        """The tape's gradients, reduced with ``op`` over the ranks (same nesting as ``sources``)."""
        grads = self._tape.gradient(target, sources, output_gradients=output_gradients,
                                    unconnected_gradients=unconnected_gradients)
        reduced = reduce_gradients(tf.nest.flatten(grads), tf.nest.flatten(sources), self._config)
        return tf.nest.pack_sequence_as(grads, reduced)


class _State:
    """Per-optimizer data-parallel state, kept out of Keras's and TF's variable tracking on purpose:
    saved optimizers stay loadable without hvdllm and ``optimizer.variables`` stays the inner one's."""

    def __init__(self, config: ReductionConfig) -> None:
        self.config = config
        self.accumulators: list[tf.Variable] = []
        self.passes: tf.Variable | None = None
        self.grad_norm: tf.Variable | None = None


class _DistributedMixin:
    """Overrides ``apply`` (which ``apply_gradients`` and ``model.fit`` call): accumulate, reduce, clip,
    then the wrapped optimizer's own ``apply``."""

    _hvdllm: _State

    @property
    def backward_passes_per_step(self) -> int:
        return self._hvdllm.config.backward_passes_per_step

    @property
    def local_passes(self) -> tf.Variable | None:
        """Backward passes counted so far (None without accumulation)."""
        return self._hvdllm.passes

    @property
    def grad_norm(self) -> tf.Variable | None:
        """With ``max_grad_norm``: the global gradient norm of the last update (after the reduction,
        before clipping), as the torch DistributedOptimizer's ``grad_norm``; else None."""
        return self._hvdllm.grad_norm

    def build(self, variables: Sequence[Any]) -> None:
        super().build(variables)
        self._hvdllm_accumulators(list(variables))

    def _hvdllm_accumulators(self, variables: list[Any]) -> None:
        state = self._hvdllm
        if state.config.max_grad_norm is not None and state.grad_norm is None:
            with tf.init_scope():
                state.grad_norm = tf.Variable(tf.constant(0.0, tf.float32), trainable=False, name="hvdllm_grad_norm")
        if state.config.backward_passes_per_step == 1 or state.accumulators:
            return
        with tf.init_scope():
            state.accumulators = [tf.Variable(tf.zeros(tuple(v.shape), dtype=tf.as_dtype(v.dtype)),
                                              trainable=False, name="hvdllm_accumulator") for v in variables]
            state.passes = tf.Variable(tf.constant(0, tf.int64), trainable=False, name="hvdllm_passes")

    def apply(self, grads: Sequence[Any], trainable_variables: Iterable[Any] | None = None) -> Any:
        grads = list(grads)
        if not grads:
            return None
        if trainable_variables is None:
            if not self.built:
                raise ValueError("pass trainable_variables on the first apply(), or build the optimizer first")
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        if not self.built:
            self.build(trainable_variables)
            self.built = True
        state = self._hvdllm
        inner = super(_DistributedMixin, self).apply
        self._hvdllm_accumulators(list(self._trainable_variables))
        if state.config.backward_passes_per_step == 1:
            return inner(reduce_gradients(grads, trainable_variables, state.config, state.grad_norm),
                         trainable_variables)
        for g, v in zip(grads, trainable_variables):
            if g is not None:
                acc = state.accumulators[self._get_variable_index(v)]
                acc.assign_add(tf.cast(_dense(g), acc.dtype))
        passes = state.passes.assign_add(1)
        k = state.config.backward_passes_per_step

        def step() -> tf.Tensor:
            """Every accumulator (a variable without gradients in this window sends zeros): the same buckets
            on every rank, and none left unapplied or unreset."""
            variables, accs = list(self._trainable_variables), state.accumulators
            inner(reduce_gradients([a.read_value() for a in accs], variables, state.config, state.grad_norm), variables)
            for acc in accs:
                acc.assign(tf.zeros_like(acc))
            return tf.constant(True)

        if tf.executing_eagerly():
            if is_reduction_pass(int(passes.numpy()), k):
                step()
            return None
        tf.cond(tf.equal(passes % k, 0), step, lambda: tf.constant(False))
        return None


_CLASSES: dict[type, type] = {}


def _distributed_class(cls: type) -> type:
    """A subclass of the optimizer's class that carries its name and module, so a model saved with
    a distributed optimizer records (and reloads) the plain one, as with Horovod."""
    if cls not in _CLASSES:
        sub = type(cls.__name__, (_DistributedMixin, cls), {"__module__": cls.__module__})
        sub.__qualname__ = cls.__qualname__
        _CLASSES[cls] = sub
    return _CLASSES[cls]


def is_distributed(optimizer: Any) -> bool:
    """True for an optimizer returned by :func:`DistributedOptimizer`."""
    return isinstance(optimizer, _DistributedMixin)


def DistributedOptimizer(optimizer: Any, name: str | None = None, compression: object = None,
                         backward_passes_per_step: int = 1, op: ReduceOp = Average,
                         max_grad_norm: float | None = None, bucket_cap_mb: float = 25.0,
                         average_aggregated_gradients: bool = False, process_set: ProcessSet = WORLD,
                         gradient_predivide_factor: float = 1.0, zero_stage: int = 0) -> Any:
    """Make a Keras 3 optimizer data-parallel; use it in ``model.compile`` / ``model.fit`` or ``apply_gradients``.

    Gradients are reduced with ``op`` (Average by default) over the ranks before the optimizer's own
    update. ``backward_passes_per_step=k`` sums k local gradient sets and reduces + applies once every k
    calls (``optimizer.iterations`` counts updates, not passes); ``average_aggregated_gradients=True``
    divides the sum by k (the mean, as one k-times-larger batch). ``max_grad_norm`` clips by the global norm
    after the reduction. ``gradient_predivide_factor`` is Horovod's (see :class:`DistributedGradientTape`).
    A variable without a gradient on some rank gets the other ranks' (it contributes zeros). The optimizer
    is converted in place (its class becomes a subclass of its own class, its state is kept) and returned;
    ``get_config`` and saving record the plain optimizer.
    Not usable under XLA: compile with ``jit_compile=False`` (the default on CPU).
    ``zero_stage``: 0 (the optimizer state replicated on every rank) only; sharding it (1, 2) is
    hvdllm.torch's (:mod:`hvdllm.torch.zero`) for now.
    """
    import keras

    if parse_stage(zero_stage):
        raise ValueError(f"zero_stage={zero_stage} is not available for Keras optimizers yet; allowed: 0 "
                         "(ZeRO stages 1 and 2: hvdllm.torch.DistributedOptimizer)")

    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise ValueError(f"DistributedOptimizer needs a keras.optimizers.Optimizer, got {type(optimizer).__name__}")
    if is_distributed(optimizer):
        raise ValueError(f"optimizer {optimizer.name!r} is already distributed; wrap it once")
    if getattr(optimizer, "gradient_accumulation_steps", None):
        raise ValueError(f"gradient_accumulation_steps={optimizer.gradient_accumulation_steps} on the inner "
                         "optimizer; allowed: None, use backward_passes_per_step= instead")
    config = ReductionConfig.create(op=op, compression=compression, backward_passes_per_step=backward_passes_per_step,
                                    average_aggregated_gradients=average_aggregated_gradients,
                                    max_grad_norm=max_grad_norm, bucket_cap_mb=bucket_cap_mb, process_set=process_set,
                                    gradient_predivide_factor=gradient_predivide_factor)
    cls = _distributed_class(type(optimizer))
    object.__setattr__(optimizer, "_hvdllm", _State(config))
    optimizer.__class__ = cls
    if name is not None:
        optimizer.name = name
    if optimizer.built:
        optimizer._hvdllm_accumulators(list(optimizer._trainable_variables))
    return optimizer


def broadcast_variables(variables: Iterable[Any], root_rank: int = 0, process_set: ProcessSet = WORLD) -> None:
    """Assign ``root_rank``'s values to ``variables`` (tf or Keras variables) on every rank.

    Variables of one dtype travel packed in one flat buffer (one collective per dtype), in the given
    order, which must be the same on every rank. Works eagerly and inside ``tf.function``.
    """
    rt = collectives()
    variables = list(variables)
    if _set_size(rt, process_set) == 1 or not variables:
        return None
    got = packed(variables, lambda flat: rt.broadcast(flat, root_rank, process_set, name=_op_name("bcast")))
    for v, value in zip(variables, got):
        v.assign(value)
    return None
