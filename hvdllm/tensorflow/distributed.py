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

from typing import Any, Callable, Iterable, Sequence

import tensorflow as tf

from hvdllm.core.gradients import (ReductionConfig, clip_coefficient_of, group_indices,
                                   is_reduction_pass, validate_groups)
from hvdllm.core.ops import Average, ReduceOp
from hvdllm.core.process_sets import WORLD, ProcessSet
from hvdllm.core.zero import parse_stage
from hvdllm.tensorflow.basics import collectives
from hvdllm.tensorflow.buckets import packed
from hvdllm.tensorflow.reduction import _dense, _in_xla_context, _op_name, _set_size, reduce_flat
from hvdllm.tensorflow.zero import ZeroMixin, check_zero_optimizer
from hvdllm.tensorflow.util import device_scope, ref_index
from hvdllm.tensorflow.util import ref as _ref


def reduce_gradients(grads: Sequence[Any], variables: Sequence[Any], config: ReductionConfig,
                     norm_out: Any = None, groups: list[list[int]] | None = None,
                     local: frozenset[int] | set[int] = frozenset(), scale_local: bool = True,
                     device: str = "") -> list[Any]:
    """Reduce the gradients of ``variables`` over the ranks (the core's prescale -> sum -> postscale), then clip.

    A None gradient travels as zeros, so every rank reduces the same buckets (a variable one rank's loss
    does not touch still gets the other ranks' gradients, as in torch); on one rank nothing travels and
    None stays None. With clipping, ``norm_out`` (a float32 ``tf.Variable``, optional) receives the global
    norm before clipping. Buckets follow the core's plan (dtype, size cap, reverse order), or Horovod's
    explicit ``groups`` (index lists, :func:`hvdllm.core.gradients.group_indices`: one fused reduction per
    group and dtype); each is one flat buffer summed in the compression's wire dtype. The gradients at
    the indices in ``local`` (Horovod's local variables) are not reduced; with ``scale_local`` they are
    divided by the number of ranks, as Horovod does. ``device`` (Horovod's ``device_dense``) places the
    reductions. Works eagerly and inside ``tf.function``.
    """
    rt = collectives()
    size = _set_size(rt, config.process_set)
    if size > 1:
        if _in_xla_context():
            raise ValueError("hvdllm gradient reduction cannot run in an XLA-compiled function (jit_compile=True); "
                             "allowed: jit_compile=False, e.g. model.compile(..., jit_compile=False)")
        grads = [tf.zeros(v.shape, tf.as_dtype(v.dtype)) if g is None and i not in local else g
                 for i, (g, v) in enumerate(zip(grads, variables))]
    idx = [i for i, g in enumerate(grads) if g is not None and i not in local]

    def reduce(flat: tf.Tensor) -> tf.Tensor:
        return reduce_flat(flat, config, rt, size)

    out: list[Any] = list(grads)
    if idx and (size > 1 or config.scales(1) != (1.0, 1.0)):
        chosen = set(idx)
        buckets = [idx] if groups is None else [[i for i in g if i in chosen] for g in groups]
        cap = config.bucket_cap_bytes if groups is None else 0
        with device_scope(device):
            for bucket in (b for b in buckets if b):
                for i, g in zip(bucket, packed([_dense(grads[i]) for i in bucket], reduce, cap)):
                    out[i] = g
    if scale_local and size > 1:
        for i in local:
            if out[i] is not None:
                out[i] = _dense(out[i]) / tf.cast(size, tf.as_dtype(out[i].dtype))
    if any(g is not None for g in out) and config.max_grad_norm is not None:
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


class _LocalVariables:
    """Horovod's worker-local variables: their gradients are not reduced (and are divided by the number
    of ranks when ``scale_local_gradients``); shared by the tape and the Keras optimizer."""

    def __init__(self, scale_local_gradients: bool = True) -> None:
        self.refs: set[Any] = set()
        self.scale = bool(scale_local_gradients)

    def add(self, var: Any) -> None:
        self.refs.add(_ref(var))

    def indices(self, variables: Sequence[Any]) -> frozenset[int]:
        if not self.refs:
            return frozenset()
        return frozenset(i for r, i in ref_index(variables).items() if r in self.refs)


def _horovod_options(device_sparse: str, sparse_as_dense: bool, num_groups: int, groups: Any) -> Any:
    """Validate Horovod's tape/optimizer options that change no numbers here: sparse gradients are always
    reduced dense (the same average as Horovod's allgather of IndexedSlices), ``device_sparse`` is
    accepted for parity. Returns the effective ``groups``."""
    if not isinstance(device_sparse, str):
        raise ValueError(f"device_sparse={device_sparse!r} must be a device string ('' for the default)")
    if not isinstance(sparse_as_dense, bool):
        raise ValueError(f"sparse_as_dense={sparse_as_dense!r} must be True or False")
    return validate_groups(groups, num_groups)


def _grouping(groups: Any, variables: Sequence[Any]) -> list[list[int]] | None:
    index = ref_index(variables)
    return group_indices(len(variables), groups, lambda v: index.get(_ref(v)))


class DistributedGradientTape:
    """Wraps a ``tf.GradientTape``: ``gradient()`` returns gradients reduced over the ranks.

        with tf.GradientTape() as tape:
            loss = ...
        tape = hvd.DistributedGradientTape(tape)
        grads = tape.gradient(loss, model.trainable_variables)   # averaged over ranks

    Also usable as ``with hvd.DistributedGradientTape(tf.GradientTape()) as tape:``. Every other method
    (``watch``, ``stop_recording``, ``jacobian``, ...) is the wrapped tape's. Horovod's arguments, with its
    meaning: ``gradient_predivide_factor`` f (Average only) divides by f before the sum and multiplies by
    f/N after it; ``groups`` (an integer or lists of variables; ``num_groups`` deprecated) fuses the
    reductions in those groups instead of ``bucket_cap_mb`` buckets; ``device_dense`` places them;
    ``register_local_source(var)`` keeps a variable's gradient local (divided by N with
    ``scale_local_gradients``). Sparse gradients are reduced dense (``sparse_as_dense`` is accepted).
    """

    def __init__(self, gradtape: tf.GradientTape, device_dense: str = "", device_sparse: str = "",
                 compression: object = None, sparse_as_dense: bool = False, op: ReduceOp = Average,
                 gradient_predivide_factor: float = 1.0, num_groups: int = 0, groups: Any = None,
                 process_set: ProcessSet = WORLD, scale_local_gradients: bool = True, *,
                 bucket_cap_mb: float = 25.0) -> None:
        if not isinstance(gradtape, tf.GradientTape):
            raise ValueError(f"DistributedGradientTape needs a tf.GradientTape, got {type(gradtape).__name__}")
        self._tape = gradtape
        self._groups = _horovod_options(device_sparse, sparse_as_dense, num_groups, groups)
        self._device = device_dense
        self._config = ReductionConfig.create(op=op, compression=compression, bucket_cap_mb=bucket_cap_mb,
                                              process_set=process_set,
                                              gradient_predivide_factor=gradient_predivide_factor)
        self._local = _LocalVariables(scale_local_gradients)

    def __enter__(self) -> "DistributedGradientTape":
        self._tape.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._tape.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        if name == "_tape":
            raise AttributeError(name)
        return getattr(self._tape, name)

    def register_local_source(self, source: Any) -> None:
        """Keep ``source``'s gradient local: it is not reduced over the ranks (Horovod's local variables)."""
        self._local.add(source)

    def gradient(self, target: Any, sources: Any, output_gradients: Any = None,
                 unconnected_gradients: Any = tf.UnconnectedGradients.NONE) -> Any:
        """The tape's gradients, reduced with ``op`` over the ranks (same nesting as ``sources``)."""
        grads = self._tape.gradient(target, sources, output_gradients=output_gradients,
                                    unconnected_gradients=unconnected_gradients)
        flat = tf.nest.flatten(sources)
        reduced = reduce_gradients(tf.nest.flatten(grads), flat, self._config,
                                   groups=_grouping(self._groups, flat), local=self._local.indices(flat),
                                   scale_local=self._local.scale, device=self._device)
        return tf.nest.pack_sequence_as(grads, reduced)

    def get_local_and_global_gradients(self, target: Any, sources: Sequence[Any],
                                       output_gradients: Any = None) -> tuple[list, list]:
        """``([(local source, gradient)], [(reduced source, gradient)])``, each in the order of ``sources``."""
        grads = self.gradient(target, sources, output_gradients)
        local = self._local.indices(list(sources))
        pairs = list(zip(sources, grads))
        return ([p for i, p in enumerate(pairs) if i in local], [p for i, p in enumerate(pairs) if i not in local])


def _local_layer_variables(local_layers: Any) -> list[Any]:
    """Horovod's ``local_layers``: None, one Keras layer or a collection of them -> their trainable weights."""
    import keras

    if local_layers is None:
        return []
    if isinstance(local_layers, keras.layers.Layer):
        local_layers = [local_layers]
    local_layers = list(local_layers)
    bad = [type(x).__name__ for x in local_layers if not isinstance(x, keras.layers.Layer)]
    if bad:
        raise ValueError(f"local_layers must be Keras layers, got {', '.join(bad)}")
    return [v for layer in local_layers for v in layer.trainable_weights]


def PartialDistributedGradientTape(gradtape: tf.GradientTape, device_dense: str = "", device_sparse: str = "",
                                   compression: object = None, sparse_as_dense: bool = False,
                                   op: ReduceOp = Average, gradient_predivide_factor: float = 1.0,
                                   num_groups: int = 0, groups: Any = None, process_set: ProcessSet = WORLD,
                                   local_layers: Any = None, scale_local_gradients: bool = True
                                   ) -> DistributedGradientTape:
    """A :class:`DistributedGradientTape` that leaves the gradients of ``local_layers``' trainable
    variables local (not reduced; divided by the number of ranks with ``scale_local_gradients``)."""
    tape = DistributedGradientTape(gradtape, device_dense, device_sparse, compression, sparse_as_dense, op,
                                   gradient_predivide_factor, num_groups, groups, process_set,
                                   scale_local_gradients)
    for var in _local_layer_variables(local_layers):
        tape.register_local_source(var)
    return tape


class _State:
    """Per-optimizer data-parallel state, kept out of Keras's and TF's variable tracking on purpose:
    saved optimizers stay loadable without hvdllm and ``optimizer.variables`` stays the inner one's."""

    def __init__(self, config: ReductionConfig, groups: Any = None, device: str = "",
                 local: _LocalVariables | None = None) -> None:
        self.config, self.groups, self.device = config, groups, device
        self.local = local or _LocalVariables()
        self.accumulators: list[tf.Variable] = []
        self.passes: tf.Variable | None = None
        self.grad_norm: tf.Variable | None = None
        self.zero_stage = 0
        self.grad_norm_fn: Callable[..., Any] | None = None   # ZeRO: the global norm from per-variable squares
        self.shards: list[Any] = []           # ZeRO (hvdllm.tensorflow.zero): this rank's shards
        self.shard_optimizer: Any = None      # ... and the optimizer that steps them
        self.shard_slots: list[dict[str, Any]] = []   # per shard: slot name -> the shard optimizer's slot variable
        self.unsplit: list[Any] | None = None         # the replicated optimizer's variable order (zero.ZeroMixin)


class _DistributedMixin:
    """Overrides ``apply`` (which ``apply_gradients`` and ``model.fit`` call): accumulate, reduce, clip,
    then the wrapped optimizer's own ``apply``."""

    _hvdllm: _State

    def register_local_var(self, var: Any) -> None:
        """Keep ``var``'s gradient local: it is not reduced over the ranks (Horovod's local variables)."""
        self._hvdllm.local.add(var)

    def _hvdllm_reduce(self, grads: Sequence[Any], variables: Sequence[Any]) -> list[Any]:
        state = self._hvdllm
        variables = list(variables)
        return reduce_gradients(grads, variables, state.config, state.grad_norm,
                                groups=_grouping(state.groups, variables), local=state.local.indices(variables),
                                scale_local=state.local.scale, device=state.device)

    @property
    def zero_stage(self) -> int:
        """0: the optimizer state is replicated; 1/2: sharded over the ranks (:mod:`hvdllm.tensorflow.zero`)."""
        return self._hvdllm.zero_stage

    @property
    def backward_passes_per_step(self) -> int:
        return self._hvdllm.config.backward_passes_per_step

    @property
    def local_passes(self) -> tf.Variable | None:
        """Backward passes counted so far (None without accumulation)."""
        return self._hvdllm.passes

    @property
    def grad_norm(self) -> tf.Variable | None:
        """With ``max_grad_norm`` (or ``grad_norm_fn``): the global gradient norm of the last update (after
        the reduction, before clipping), as the torch DistributedOptimizer's ``grad_norm``; else None."""
        return self._hvdllm.grad_norm

    def build(self, variables: Sequence[Any]) -> None:
        super().build(variables)
        self._hvdllm_accumulators(list(variables))

    def _hvdllm_accumulators(self, variables: list[Any]) -> None:
        state = self._hvdllm
        wants_norm = state.config.max_grad_norm is not None or state.grad_norm_fn is not None
        if wants_norm and state.grad_norm is None:
            with tf.init_scope():
                state.grad_norm = tf.Variable(tf.constant(0.0, tf.float32), trainable=False, name="hvdllm_grad_norm")
        if state.config.backward_passes_per_step == 1 or state.accumulators:
            return
        with tf.init_scope():
            state.accumulators = [tf.Variable(tf.zeros(tuple(v.shape), dtype=tf.as_dtype(v.dtype)),
                                              trainable=False, name="hvdllm_accumulator") for v in variables]
            state.passes = tf.Variable(tf.constant(0, tf.int64), trainable=False, name="hvdllm_passes")

    def _hvdllm_update(self, grads: Sequence[Any], variables: list[Any]) -> Any:
        """One update from local gradients: reduce them, then the wrapped optimizer's own ``apply``
        (:mod:`hvdllm.tensorflow.zero` replaces this with the sharded update)."""
        return super(_DistributedMixin, self).apply(self._hvdllm_reduce(grads, variables), variables)

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
        self._hvdllm_accumulators(list(self._trainable_variables))
        if state.config.backward_passes_per_step == 1:
            return self._hvdllm_update(grads, trainable_variables)
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
            done = self._hvdllm_update([a.read_value() for a in accs], variables)
            with tf.control_dependencies([done] if isinstance(done, tf.Tensor) else []):
                for acc in accs:
                    acc.assign(tf.zeros_like(acc))
                return tf.constant(True)

        if tf.executing_eagerly():
            if is_reduction_pass(int(passes.numpy()), k):
                step()
            return None
        tf.cond(tf.equal(passes % k, 0), step, lambda: tf.constant(False))
        return None


_CLASSES: dict[tuple[type, bool], type] = {}


def _register_like(sub: type, cls: type) -> None:
    """Serialize ``sub`` under ``cls``'s registered name (e.g. "hvdllm>AdamW"), so a saved model reloads
    the plain registered class; without it Keras records the bare class name, which it cannot find."""
    import keras

    registered = keras.saving.get_registered_name(cls)
    if registered == cls.__name__:
        return
    try:
        from keras.src.saving import object_registration
    except ImportError:  # private module moved: saving records the bare name, as before
        return
    object_registration.GLOBAL_CUSTOM_NAMES[sub] = registered


def _distributed_class(cls: type, sharded: bool = False) -> type:
    """A subclass of the optimizer's class that carries its name and module, so a model saved with
    a distributed optimizer records (and reloads) the plain one, as with Horovod; ``sharded``: ZeRO's."""
    if (cls, sharded) not in _CLASSES:
        bases = (ZeroMixin, _DistributedMixin, cls) if sharded else (_DistributedMixin, cls)
        sub = type(cls.__name__, bases, {"__module__": cls.__module__})
        sub.__qualname__ = cls.__qualname__
        _register_like(sub, cls)
        _CLASSES[(cls, sharded)] = sub
    return _CLASSES[(cls, sharded)]


def is_distributed(optimizer: Any) -> bool:
    """True for an optimizer returned by :func:`DistributedOptimizer`."""
    return isinstance(optimizer, _DistributedMixin)


def DistributedOptimizer(optimizer: Any, name: str | None = None, device_dense: str = "", device_sparse: str = "",
                         compression: object = None, sparse_as_dense: bool = False,
                         gradient_predivide_factor: float = 1.0, op: ReduceOp = Average,
                         backward_passes_per_step: int = 1, average_aggregated_gradients: bool = False,
                         num_groups: int = 0, groups: Any = None, process_set: ProcessSet = WORLD,
                         scale_local_gradients: bool = True, *, max_grad_norm: float | None = None,
                         bucket_cap_mb: float = 25.0, zero_stage: int = 0,
                         grad_norm_fn: Callable[..., Any] | None = None) -> Any:
    """Make a Keras 3 optimizer data-parallel; use it in ``model.compile`` / ``model.fit`` or ``apply_gradients``.

    Horovod's signature and meaning (horovod.tensorflow.keras.DistributedOptimizer). Gradients are reduced
    with ``op`` (Average or Sum) over ``process_set`` before the optimizer's own update.
    ``backward_passes_per_step=k`` sums k local gradient sets and reduces + applies once every k calls
    (``optimizer.iterations`` counts updates, not passes); ``average_aggregated_gradients=True`` divides the
    sum by k (the mean, as one k-times-larger batch). ``gradient_predivide_factor``, ``groups``/``num_groups``,
    ``device_dense`` and local variables (``register_local_var``, ``scale_local_gradients``): see
    :class:`DistributedGradientTape`. hvdllm's extras: ``max_grad_norm`` clips by the global norm after the
    reduction; ``bucket_cap_mb`` sizes the fused buffers. A variable without a gradient on some rank gets
    the other ranks' (it contributes zeros). The optimizer is converted in place (its class becomes a
    subclass of its own class, its state is kept) and returned; ``get_config`` and saving record the plain
    optimizer. Not usable under XLA: compile with ``jit_compile=False`` (the default on CPU).
    ``zero_stage``: 0 (the optimizer state replicated on every rank), 1 (sharded over the ranks) or 2
    (gradients reduce-scattered too): see :mod:`hvdllm.tensorflow.zero` (elementwise rules only, the
    optimizer not yet built). ``grad_norm_fn`` (ZeRO stages only): the hook through which tensor/pipeline
    parallelism supplies the unsplit model's norm, as in the torch wrapper: called each update as
    ``grad_norm_fn(squares=...)`` with a float64 vector, per variable (the order of ``build``) its reduced
    gradient's squared L2 norm summed over ``process_set``, it returns the global norm (a float, or a
    scalar tensor inside a ``tf.function``), which ``max_grad_norm`` clips by and ``grad_norm`` reports.
    """
    import keras

    stage = parse_stage(zero_stage)
    if grad_norm_fn is not None and not callable(grad_norm_fn):
        raise ValueError(f"grad_norm_fn={grad_norm_fn!r} must be a callable returning the global gradient norm")
    if grad_norm_fn is not None and not stage:
        raise ValueError("grad_norm_fn= needs zero_stage=1 or 2 with Keras (zero_stage=0 clips on the data-parallel "
                         "norm); allowed with zero_stage=0: grad_norm_fn=None")
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise ValueError(f"DistributedOptimizer needs a keras.optimizers.Optimizer, got {type(optimizer).__name__}")
    if is_distributed(optimizer):
        raise ValueError(f"optimizer {optimizer.name!r} is already distributed; wrap it once")
    if getattr(optimizer, "gradient_accumulation_steps", None):
        raise ValueError(f"gradient_accumulation_steps={optimizer.gradient_accumulation_steps} on the inner "
                         "optimizer; allowed: None, use backward_passes_per_step= instead")
    groups = _horovod_options(device_sparse, sparse_as_dense, num_groups, groups)
    config = ReductionConfig.create(op=op, compression=compression, backward_passes_per_step=backward_passes_per_step,
                                    average_aggregated_gradients=average_aggregated_gradients,
                                    max_grad_norm=max_grad_norm, bucket_cap_mb=bucket_cap_mb, process_set=process_set,
                                    gradient_predivide_factor=gradient_predivide_factor)
    state = _State(config, groups, device_dense, _LocalVariables(scale_local_gradients))
    if stage:
        check_zero_optimizer(optimizer, stage, groups)
        state.zero_stage = stage
        state.grad_norm_fn = grad_norm_fn
        state.shard_optimizer = type(optimizer).from_config(optimizer.get_config())
    cls = _distributed_class(type(optimizer), stage > 0)
    object.__setattr__(optimizer, "_hvdllm", state)
    optimizer.__class__ = cls
    if name is not None:
        optimizer.name = name
    if optimizer.built:
        optimizer._hvdllm_accumulators(list(optimizer._trainable_variables))
    return optimizer


def PartialDistributedOptimizer(optimizer: Any, name: str | None = None, device_dense: str = "",
                                device_sparse: str = "", compression: object = None, sparse_as_dense: bool = False,
                                gradient_predivide_factor: float = 1.0, op: ReduceOp = Average, groups: Any = None,
                                process_set: ProcessSet = WORLD, local_layers: Any = None,
                                scale_local_gradients: bool = True) -> Any:
    """A :func:`DistributedOptimizer` that leaves the gradients of ``local_layers``' trainable variables
    local (horovod.keras.PartialDistributedOptimizer)."""
    opt = DistributedOptimizer(optimizer, name, device_dense, device_sparse, compression, sparse_as_dense,
                               gradient_predivide_factor, op, groups=groups, process_set=process_set,
                               scale_local_gradients=scale_local_gradients)
    for var in _local_layer_variables(local_layers):
        opt.register_local_var(var)
    return opt


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
