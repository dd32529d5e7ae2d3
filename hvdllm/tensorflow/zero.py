"""ZeRO stages 1 and 2 for Keras 3 optimizers: ``hvd.DistributedOptimizer(opt, ..., zero_stage=1|2)``.

The gradient buckets are the replicated path's (:func:`hvdllm.core.buckets.plan_buckets` over the
trainable variables, ``bucket_cap_mb`` each, as :func:`hvdllm.tensorflow.buckets.packed` packs them);
each bucket's flat space is partitioned over the data-parallel ranks by the core
(:mod:`hvdllm.core.zero`), and every rank owns one flat *shard variable* per bucket (the bucket's
dtype, ``shard_numel`` elements). A second optimizer of the user's class and config
(``from_config(get_config())``) is built over the shard variables only, so its slots (Adam's moments)
are 1/N-sized; the wrapped optimizer itself builds no slots. An update (after accumulation, which
stays the replicated wrapper's):

1. each bucket's gradients, packed flat (zeros for None): stage 1 allreduces it and keeps this rank's
   slice; stage 2 reduce-scatters it (zero-padded), so only the shard arrives;
2. with ``max_grad_norm``: clip by the global norm, one allreduce of the shards' squared norms (float64);
   with ``grad_norm_fn`` (tensor/pipeline parallelism: the unsplit model's norm) the squares are kept per
   variable (the shards' pieces say which elements are whose), allreduced as one vector, and the hook
   combines them over its own groups;
3. copy the model variables' current values into the shards (weights changed outside are respected),
   apply the shard optimizer, allgather the updated shards and assign them back into the variables.

``optimizer.iterations`` counts updates (the shard optimizer's count is kept equal to it) and a
learning-rate *variable* changed on the wrapper (callbacks) is copied to the shard optimizer each update.
Weight-decay exclusions (``exclude_from_weight_decay``) keep excluded variables in buckets of their own,
whose shard variables the shard optimizer excludes in turn. Elementwise update rules only: per-tensor
rules (Lamb, Adafactor, Muon), per-variable or global Keras clipping (``clipnorm``, ``global_clipnorm``:
use ``max_grad_norm``) and EMA would see shards instead of variables and are refused. Works eagerly and
in ``tf.function``.

State (checkpoints, ``model.save``): ``save_own_variables`` writes what a replicated optimizer of the
same class over the same variables would write (Keras's index keys, full-size slots; the shards are
gathered: a collective, every rank calls it), and ``load_own_variables`` takes that format from any
world size or stage, each rank keeping its shards (no communication). ``optimizer.variables`` holds the
replicated part only (step count, learning rate): the shards differ per rank, so broadcasting them
would be wrong; they are ``optimizer.shard_optimizer.variables``. ``unsplit_slots`` /
``load_unsplit_slots`` give and take the full-size slots by (variable, slot name), for checkpoints keyed
otherwise (the Keras model-parallel runner's, by parameter name).
"""
from __future__ import annotations

from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf

from hvdllm.core.buckets import TensorSpec, plan_buckets
from hvdllm.core.gradients import clip_coefficient_of
from hvdllm.core.ops import Sum
from hvdllm.core.zero import Piece, ShardPlan, pieces
from hvdllm.tensorflow.basics import collectives
from hvdllm.tensorflow.reduction import _dense, _in_xla_context, _op_name, _set_size, reduce_flat

__all__ = ["ZeroMixin", "check_zero_optimizer", "slot_bytes"]

_PER_TENSOR_RULES = ("Lamb", "LAMB", "Adafactor", "Muon", "LossScaleOptimizer")


def check_zero_optimizer(optimizer: Any, stage: int, groups: Any) -> None:
    """One-line ValueErrors for what ZeRO cannot shard (see the module docstring)."""
    name = type(optimizer).__name__
    if name in _PER_TENSOR_RULES:
        raise ValueError(f"zero_stage={stage} needs an elementwise optimizer; {name} uses per-tensor quantities "
                         "(allowed: e.g. SGD, Adam, AdamW; or zero_stage=0)")
    for attr in ("clipnorm", "global_clipnorm"):
        if getattr(optimizer, attr, None):
            raise ValueError(f"{attr}={getattr(optimizer, attr)} cannot be used with zero_stage={stage} (it would "
                             "see shards); allowed: None, with max_grad_norm= for global-norm clipping")
    if getattr(optimizer, "use_ema", False):
        raise ValueError(f"use_ema=True cannot be used with zero_stage={stage}; allowed: use_ema=False or zero_stage=0")
    if groups is not None:
        raise ValueError(f"groups={groups!r} cannot be used with zero_stage={stage}; allowed: None (buckets of "
                         "bucket_cap_mb)")
    if optimizer.built:
        raise ValueError(f"optimizer {optimizer.name!r} is already built; with zero_stage={stage} wrap it "
                         "before its first apply (or build)")


class _Shard:
    """This rank's shard of one bucket: the bucket's tensors, its plan and pieces, its flat variable."""

    def __init__(self, indices: tuple[int, ...], offsets: tuple[int, ...], plan: ShardPlan, rank: int,
                 own: tuple[Piece, ...], dtype: str, number: int) -> None:
        self.indices, self.offsets, self.plan, self.pieces = indices, offsets, plan, own
        self.lo, self.hi = plan.range(rank)
        self.variable = keras.Variable(np.zeros(plan.shard_numel, dtype=dtype), dtype=dtype, trainable=False,
                                       name=f"hvdllm_zero_shard_{number}")

    def padded(self, flat: tf.Tensor) -> tf.Tensor:
        """A tensor of this shard's real length padded with zeros to ``shard_numel``."""
        pad = self.plan.shard_numel - (self.hi - self.lo)
        return tf.concat([flat, tf.zeros([pad], flat.dtype)], 0) if pad else flat


def build_recording_slots(optimizer: Any, variables: Sequence[Any]) -> list[tuple[int, str] | None]:
    """Build ``optimizer`` over ``variables``; per optimizer variable afterwards, ``(i, name)`` when it is
    the slot ``name`` of ``variables[i]`` (made by ``add_variable_from_reference``, as every Keras
    elementwise optimizer makes its slots), else None (step count, learning rate)."""
    index = {id(v): i for i, v in enumerate(variables)}
    made: dict[int, tuple[int, str]] = {}
    original = optimizer.add_variable_from_reference

    def recording(reference_variable: Any, name: str | None = None, initializer: Any = "zeros") -> Any:
        slot = original(reference_variable, name=name, initializer=initializer)
        if id(reference_variable) in index:
            made[id(slot)] = (index[id(reference_variable)], name or "var")
        return slot

    object.__setattr__(optimizer, "add_variable_from_reference", recording)
    try:
        optimizer.build(list(variables))
    finally:
        object.__delattr__(optimizer, "add_variable_from_reference")
    return [made.get(id(v)) for v in optimizer.variables]


def _after(x: tf.Tensor, previous: tf.Tensor | None) -> tf.Tensor:
    """``x``, not computed before ``previous`` in a graph. Collectives are matched by order on the mpi
    backend, and inside a ``tf.cond`` branch (accumulation) independent ops may run in any order: the
    update's collectives are chained so that every rank runs them in program order."""
    if previous is None or tf.executing_eagerly():
        return x
    with tf.control_dependencies([previous]):
        return tf.identity(x)


def _as_one_op(fn: Any, inputs: list[tf.Tensor], outputs: list[tuple[int, Any]]) -> list[tf.Tensor]:
    """``fn(*inputs)`` run eagerly as one graph op (``tf.py_function``): its collectives in program order.
    ``outputs``: (length, dtype) of each 1-d result. Nothing inside may call a ``tf.function`` (with one
    inter-op thread the nested call waits for the thread this op holds)."""
    got = tf.py_function(fn, inputs, Tout=[tf.as_dtype(dt) for _, dt in outputs])
    for t, (n, _) in zip(got, outputs):
        t.set_shape([n])
    return list(got)


class ZeroMixin:
    """The sharded update (module docstring); :func:`hvdllm.tensorflow.DistributedOptimizer` mixes it in
    before the replicated wrapper's behaviour (accumulation, ``_hvdllm`` state), whose hooks it overrides."""

    _hvdllm: Any

    @property
    def shard_optimizer(self) -> Any:
        """The optimizer of the user's class that steps this rank's shard variables."""
        return self._hvdllm.shard_optimizer

    def build(self, variables: Sequence[Any]) -> None:
        """The base optimizer's bookkeeping only (no full-size slots), then the shards and their optimizer."""
        variables = list(variables)
        keras.optimizers.Optimizer.build(self, variables)
        self._hvdllm_accumulators(variables)
        state, rt = self._hvdllm, collectives()
        members = list(state.config.process_set.members(rt.world.size))
        size, me = len(members), members.index(rt.world.rank)
        specs = [TensorSpec(str(i), tuple(int(d) for d in v.shape), tf.as_dtype(v.dtype).name)
                 for i, v in enumerate(variables)]
        sizes = [s.numel for s in specs]
        decay = [bool(self.weight_decay) and self._use_weight_decay(v) for v in variables]
        with tf.init_scope():
            state.shards = []
            for b, bucket in enumerate(plan_buckets(specs, state.config.bucket_cap_bytes, groups=decay)):
                plan = ShardPlan(bucket.numel, size)
                state.shards.append(_Shard(bucket.indices, bucket.offsets, plan, me,
                                           pieces(bucket, sizes, plan, me), specs[bucket.indices[0]].dtype, b))
            self._hvdllm_fill(variables)
            inner = state.shard_optimizer
            excluded = [sh.variable for sh in state.shards if not decay[sh.indices[0]]]
            if excluded and self.weight_decay:       # (buckets never mix decayed and excluded variables)
                inner.exclude_from_weight_decay(var_list=excluded)
            slots = build_recording_slots(inner, [sh.variable for sh in state.shards])
        state.shard_slots = [{} for _ in state.shards]     # per shard: slot name -> its slot variable
        for v, slot in zip(inner.variables, slots):
            if slot is not None:
                state.shard_slots[slot[0]][slot[1]] = v
        state.unsplit = None

    def _hvdllm_fill(self, variables: Sequence[Any]) -> None:
        """Copy the variables' current values into the shard variables."""
        for shard in self._hvdllm.shards:
            parts = [tf.reshape(tf.convert_to_tensor(variables[pc.index]), [-1])[pc.in_tensor] for pc in shard.pieces]
            flat = tf.concat(parts, 0) if parts else tf.zeros([0], tf.as_dtype(shard.variable.dtype))
            shard.variable.assign(shard.padded(flat))

    def _hvdllm_update(self, grads: Sequence[Any], variables: list[Any]) -> Any:
        state, rt = self._hvdllm, collectives()
        if state.local.indices(variables):
            raise ValueError(f"local variables (register_local_var) cannot be used with zero_stage={self.zero_stage}; "
                             "allowed: zero_stage=0")
        size = _set_size(rt, state.config.process_set)
        if size > 1 and _in_xla_context():
            raise ValueError("hvdllm ZeRO cannot run in an XLA-compiled function (jit_compile=True); allowed: "
                             "jit_compile=False, e.g. model.compile(..., jit_compile=False)")
        # mpi4py matches collectives by call order and a graph may run independent ops in any order (a hang
        # was seen: one rank in an allgather, the other in a reduce-scatter): there each phase's collectives
        # run as one op, eagerly in program order (tf.py_function), the gathers' op fed by the reductions'
        one_op = size > 1 and rt.name == "mpi" and not tf.executing_eagerly()
        grads = [tf.zeros(v.shape, tf.as_dtype(v.dtype)) if g is None else _dense(g) for g, v in zip(grads, variables)]
        if one_op:
            shard_grads = _as_one_op(lambda *gs: self._hvdllm_reduce_shards(list(gs), rt, size),
                                     [tf.convert_to_tensor(g) for g in grads],
                                     [(s.plan.shard_numel, s.variable.dtype) for s in state.shards])
        else:
            shard_grads = self._hvdllm_reduce_shards(grads, rt, size)
        self._hvdllm_fill(variables)
        inner = state.shard_optimizer
        if isinstance(self._learning_rate, keras.Variable) and isinstance(inner._learning_rate, keras.Variable):
            inner._learning_rate.assign(self._learning_rate)
        inner.iterations.assign(self.iterations)
        inner.apply(shard_grads, [s.variable for s in state.shards])
        self.iterations.assign(inner.iterations)
        flats = [tf.convert_to_tensor(shard.variable) for shard in state.shards]
        if one_op:
            flats = _as_one_op(lambda *fs: self._hvdllm_gather(list(fs), rt, None),
                               [_after(f, shard_grads[-1]) for f in flats],
                               [(s.plan.padded_numel, s.variable.dtype) for s in state.shards])
        elif size > 1:
            flats = self._hvdllm_gather(flats, rt, shard_grads[-1])
        for shard, flat in zip(state.shards, flats):
            for i, off in zip(shard.indices, shard.offsets):
                v = variables[i]
                n = int(np.prod(v.shape, dtype=np.int64))
                v.assign(tf.reshape(flat[off:off + n], v.shape))
        return flats[-1] if one_op else None

    def _hvdllm_reduce_shards(self, grads: list[tf.Tensor], rt: Any, size: int) -> list[tf.Tensor]:
        """Every shard's reduced gradient (in bucket order, each collective after the previous), clipped."""
        shard_grads: list[tf.Tensor] = []
        for shard in self._hvdllm.shards:
            shard_grads.append(self._hvdllm_shard_gradient(shard, grads, rt, size,
                                                           shard_grads[-1] if shard_grads else None))
        state = self._hvdllm
        if state.config.max_grad_norm is not None or state.grad_norm_fn is not None:
            shard_grads = self._hvdllm_clip(shard_grads, rt, size)
        return shard_grads

    def _hvdllm_gather(self, flats: list[tf.Tensor], rt: Any, previous: tf.Tensor | None) -> list[tf.Tensor]:
        """Every rank's updated shards, concatenated per bucket (each gather after ``previous``, then after
        the one before: a shard's update needs only its own gradient, so gather after every reduction)."""
        out = []
        for flat in flats:
            previous = rt.allgather(_after(flat, previous), self._hvdllm.config.process_set,
                                    name=_op_name("zero_gather"))
            out.append(previous)
        return out

    def _hvdllm_shard_gradient(self, shard: _Shard, grads: list[tf.Tensor], rt: Any, size: int,
                               previous: tf.Tensor | None) -> tf.Tensor:
        """This rank's part of the bucket's reduced gradient, ``shard_numel`` long (its collective runs
        after ``previous``'s)."""
        flat = _after(tf.concat([tf.reshape(grads[i], [-1]) for i in shard.indices], 0), previous)
        config = self._hvdllm.config
        if self.zero_stage == 2 and size > 1:
            pad = shard.plan.padded_numel - shard.plan.numel
            if pad:
                flat = tf.concat([flat, tf.zeros([pad], flat.dtype)], 0)
            out = reduce_flat(flat, config, rt, size, scatter=True)
            out.set_shape([shard.plan.shard_numel])
            return out
        return shard.padded(reduce_flat(flat, config, rt, size)[shard.lo:shard.hi])

    def _hvdllm_clip(self, shard_grads: list[tf.Tensor], rt: Any, size: int) -> list[tf.Tensor]:
        """Scale the shard gradients by the core's clip coefficient of the global norm (one allreduce):
        the shards' squares summed (float32 coefficient), or with ``grad_norm_fn`` its norm of the
        per-variable squares (float64 coefficient, as a model-parallel runner's unsplit clipping)."""
        state = self._hvdllm
        if state.grad_norm_fn is not None:
            return self._hvdllm_clip_by_hook(shard_grads, rt, size)
        sq = _after(tf.add_n([tf.reduce_sum(tf.square(tf.cast(g, tf.float64))) for g in shard_grads]),
                    shard_grads[-1])
        if size > 1:
            sq = rt.allreduce(tf.reshape(sq, [1]), Sum, state.config.process_set, name=_op_name("zero_norm"))[0]
        total = tf.cast(tf.sqrt(sq), tf.float32)
        state.grad_norm.assign(total)
        coef = clip_coefficient_of(total, state.config.max_grad_norm, tf.maximum)
        return [g * tf.cast(coef, g.dtype) for g in shard_grads]

    def _hvdllm_squares(self, shard_grads: list[tf.Tensor]) -> tf.Tensor:
        """Per variable (build order), the squared L2 norm of this rank's part of its reduced gradient
        (float64): the shards' pieces attribute each element to its variable."""
        parts: list[list[tf.Tensor]] = [[] for _ in self._trainable_variables]
        for shard, g in zip(self._hvdllm.shards, shard_grads):
            g64 = tf.cast(g, tf.float64)
            for pc in shard.pieces:
                parts[pc.index].append(tf.reduce_sum(tf.square(g64[pc.in_shard])))
        zero = tf.constant(0.0, tf.float64)
        return tf.stack([tf.add_n(p) if p else zero for p in parts])

    def _hvdllm_clip_by_hook(self, shard_grads: list[tf.Tensor], rt: Any, size: int) -> list[tf.Tensor]:
        """``grad_norm_fn``'s global norm of the per-variable squares (summed over the data-parallel ranks);
        with ``max_grad_norm`` the shard gradients are scaled by its clip coefficient."""
        state = self._hvdllm
        sq = _after(self._hvdllm_squares(shard_grads), shard_grads[-1])
        if size > 1:
            sq = rt.allreduce(sq, Sum, state.config.process_set, name=_op_name("zero_norm"))
        norm = state.grad_norm_fn(squares=sq)       # (a Python float would become float32 by default)
        total = tf.cast(norm, tf.float64) if tf.is_tensor(norm) else tf.constant(float(norm), tf.float64)
        state.grad_norm.assign(tf.cast(total, tf.float32))
        if state.config.max_grad_norm is None:
            return shard_grads
        coef = clip_coefficient_of(total, state.config.max_grad_norm, tf.maximum)
        return [g * tf.cast(coef, g.dtype) for g in shard_grads]

    # --- state in the replicated optimizer's format ------------------------------------------------
    def _hvdllm_unsplit(self) -> list[tuple[int, str] | int]:
        """What a replicated optimizer of this class over the same variables holds, in its variable
        order: ``(i, name)`` for slot ``name`` of variable i, an int j for this optimizer's own j-th
        variable (step count, learning rate). Found once by building such an optimizer over scalar
        stand-ins (elementwise rules: a slot has its variable's shape)."""
        state = self._hvdllm
        if state.unsplit is None:
            inner = state.shard_optimizer
            template = type(inner).from_config(inner.get_config())
            with tf.init_scope():
                dtypes = [tf.as_dtype(v.dtype).name for v in self._trainable_variables]
                proxies = [keras.Variable(np.zeros((), dt), dtype=dt, trainable=False, name=f"hvdllm_unsplit_{i}")
                           for i, dt in enumerate(dtypes)]
                slots = build_recording_slots(template, proxies)
            own = iter(range(len(self.variables)))
            layout: list[tuple[int, str] | int] = []
            for slot in slots:
                j = next(own, None) if slot is None else None
                if slot is None and j is None:
                    raise ValueError(f"{type(inner).__name__} holds more non-slot variables than this optimizer "
                                     f"({len(self.variables)}); its state cannot be unsplit")
                layout.append(slot if slot is not None else j)
            state.unsplit = layout
        return state.unsplit

    def unsplit_slots(self) -> dict[tuple[int, str], np.ndarray]:
        """Every slot of every variable at full size, ``(variable index, slot name) -> array`` (build
        order; e.g. Adam's ``"momentum"``, ``"velocity"``): the shards' slots gathered over the
        data-parallel ranks, so every rank must call it."""
        state, rt = self._hvdllm, collectives()
        size = _set_size(rt, state.config.process_set)
        out: dict[tuple[int, str], np.ndarray] = {}
        for shard, slots in zip(state.shards, state.shard_slots):
            for name in sorted(slots):
                flat = tf.convert_to_tensor(slots[name])
                if size > 1:
                    flat = rt.allgather(flat, state.config.process_set, name=_op_name("zero_state"))
                flat = np.asarray(flat)
                for i, off in zip(shard.indices, shard.offsets):
                    shape = tuple(self._trainable_variables[i].shape)
                    out[(i, name)] = flat[off:off + int(np.prod(shape, dtype=np.int64))].reshape(shape)
        return out

    def load_unsplit_slots(self, arrays: Any) -> None:
        """:meth:`unsplit_slots`' format (full-size slots by ``(variable index, slot name)``, from any world
        size or stage): this rank keeps its shards' part (no communication). The caller checks shapes."""
        state = self._hvdllm
        for shard, slots in zip(state.shards, state.shard_slots):
            for name, var in slots.items():
                flat = np.zeros(shard.plan.shard_numel, tf.as_dtype(var.dtype).as_numpy_dtype)
                for pc in shard.pieces:
                    flat[pc.in_shard] = np.asarray(arrays[(pc.index, name)]).reshape(-1)[pc.in_tensor]
                var.assign(flat)

    def save_own_variables(self, store: Any) -> None:
        """Write the state a replicated optimizer would write (``store[str(k)]``, full-size slots): the
        shards' slots are gathered over the data-parallel ranks, so every rank must call it (e.g.
        ``model.save`` on every rank)."""
        slots = self.unsplit_slots()
        own = self.variables
        for k, entry in enumerate(self._hvdllm_unsplit()):
            store[str(k)] = np.asarray(tf.convert_to_tensor(own[entry])) if isinstance(entry, int) else slots[entry]

    def load_own_variables(self, store: Any) -> None:
        """Take the state a replicated optimizer of this class writes (any world size, any stage); this
        rank keeps its shards' part (no communication). ValueError when the count or a shape differs."""
        layout, state = self._hvdllm_unsplit(), self._hvdllm
        if len(store.keys()) != len(layout):
            raise ValueError(f"the optimizer state holds {len(store.keys())} variables; {type(self).__name__} "
                             f"over these {len(self._trainable_variables)} variables holds {len(layout)}")
        values = [np.asarray(store[str(k)]) for k in range(len(layout))]
        for k, (entry, value) in enumerate(zip(layout, values)):
            want = self.variables[entry] if isinstance(entry, int) else self._trainable_variables[entry[0]]
            if tuple(value.shape) != tuple(want.shape):
                raise ValueError(f"optimizer variable {k} has shape {list(value.shape)}, this optimizer needs "
                                 f"{list(want.shape)}")
        for entry, value in zip(layout, values):       # (all checked: nothing is half loaded)
            if isinstance(entry, int):
                self.variables[entry].assign(value)
        self.load_unsplit_slots({entry: value for entry, value in zip(layout, values) if not isinstance(entry, int)})
        inner = state.shard_optimizer
        inner.iterations.assign(self.iterations)
        if isinstance(self._learning_rate, keras.Variable) and isinstance(inner._learning_rate, keras.Variable):
            inner._learning_rate.assign(self._learning_rate)

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds: the shard optimizer's :func:`slot_bytes`."""
        return slot_bytes(self._hvdllm.shard_optimizer)


def slot_bytes(optimizer: Any) -> int:
    """Bytes of a (built) Keras optimizer's variables but its step count and learning rate: its state."""
    skip = {id(optimizer.iterations), id(optimizer._learning_rate)}
    return sum(int(np.prod(v.shape, dtype=np.int64)) * tf.as_dtype(v.dtype).size
               for v in optimizer.variables if id(v) not in skip)

