"""Data-parallel training for PyTorch: ``hvd.DistributedOptimizer``, a drop-in for horovod.torch's.

How a step runs (the semantics are the core's, :mod:`hvdllm.core.gradients`):

- At construction the optimizer's parameters are planned into buckets (:func:`plan_buckets`: one
  param group and dtype each, up to ``bucket_cap_mb``, in reverse registration order). Each bucket
  owns one flat buffer (:mod:`hvdllm.torch.buckets`) and a parameter's ``.grad`` *is* a view into it:
  after ``zero_grad(set_to_none=True)`` a hook re-attaches the (zeroed) view just before autograd
  accumulates, so backward accumulates straight into the bucket (no copies in or out), and a fused
  :mod:`hvdllm.torch.optim` optimizer steps on the bucket itself.
- A post-accumulate-grad hook counts each parameter's backward passes; once every parameter of a
  bucket has its ``backward_passes_per_step`` passes, the bucket is multiplied by the prescale and its
  summed reduction starts asynchronously, while backward keeps computing the earlier layers
  (overlap). On the mpi backend buckets start strictly in plan order (MPI matches collectives by
  order); Horovod matches them by name, so there a bucket starts as soon as it is ready.
- ``step()`` starts every bucket not started yet (gradients missing on this rank travel as zeros, so
  no rank can hang), waits, multiplies by the postscale, clips by the global norm (the norm is taken
  after the reduction, so it is identical everywhere; tensor/pipeline parallelism passes
  ``grad_norm_fn`` for the unsplit model's norm) and steps the wrapped optimizer. Each bucket carries
  one presence flag per parameter: a parameter that got no gradient on *any* rank keeps
  ``grad=None`` (the optimizer skips it, as it would in one process).
- A parameter whose ``requires_grad`` changed since the plan (frozen, then unfrozen) re-plans the
  buckets at the start of the next step, on every rank alike, so its gradient is averaged too.

Compression: ``Compression.fp16`` casts each bucket to fp16 for the wire (see
:func:`backend_wire_dtype` for what each backend can sum). The local backend (one process) sends
nothing and casts nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import warnings
import weakref
from typing import Any, Callable, Iterable, Iterator

import torch

from hvdllm.core.buckets import Bucket, LaunchTracker, explicit_groups
from hvdllm.core.compression import Compression
from hvdllm.core.gradients import ReductionConfig, backend_wire_dtype, clip_coefficient_of
from hvdllm.core.ops import Average, Sum
from hvdllm.core.process_sets import WORLD, ProcessSet
from hvdllm.core.zero import parse_inflight_mb, parse_stage
from hvdllm.torch import buckets
from hvdllm.torch.basics import collectives
from hvdllm.torch.sparse import sparse_allreduce_async
from hvdllm.torch.zero import ZeroOptimizer

__all__ = ["DistributedOptimizer"]

_instances = itertools.count()
_warned: set[tuple[str, str]] = set()


_runtime = collectives  # the backend (hvdllm.core.collectives.Collectives)


class _Bucket:
    """One planned bucket: its parameters, their views into the flat buffer, the wire buffer, the scales."""

    def __init__(self, plan: Bucket, params: list[torch.nn.Parameter], wire: torch.dtype | None,
                 scales: tuple[float, float], length: int = 0) -> None:
        self.plan = plan
        self.params, self.positions, self.numel = [params[i] for i in plan.indices], list(plan.indices), plan.numel
        first = self.params[0]
        # The gradients, then one presence flag per parameter (summed over ranks like the gradients);
        # at least ``length`` elements (ZeRO-2 reduce-scatters a padded length).
        size = max(self.numel + len(self.params), length)
        self.buffer = torch.zeros(size, dtype=first.dtype, device=first.device)
        self.views = buckets.views(self.buffer, plan, params)
        self.grads = self.buffer[:self.numel]
        self.flags = [0.0] * len(self.params)
        self.wire = None if wire is None else torch.empty(self.buffer.numel(), dtype=wire, device=first.device)
        self.prescale, self.postscale = scales
        self.handle: Any = None


class _DistributedOptimizer(torch.optim.Optimizer):
    """The wrapper's behaviour; :func:`DistributedOptimizer` mixes it into the wrapped optimizer's class."""

    zero_stage = 0  # the optimizer state is replicated (hvdllm.torch.zero shards it)

    def __init__(self, optimizer: torch.optim.Optimizer, named_parameters: Iterable[Any] | None,
                 config: ReductionConfig, grad_norm_fn: Callable[[], float] | None = None,
                 groups: int | list[list[int]] | None = None, sparse_as_dense: bool = False) -> None:
        # torch.optim.Optimizer.__init__ is deliberately not called: param_groups, state and defaults
        # are the wrapped optimizer's (see the properties below).
        self._inner = optimizer
        self._config = config
        self._grad_norm_fn = grad_norm_fn
        self._groups, self._sparse_as_dense = groups, sparse_as_dense   # (groups: ints, or lists of id(param))
        self._sparse: dict[int, torch.Tensor] = {}     # param index -> this step's local sparse gradient
        self._densified: set[int] = set()               # sparse gradients reduced dense (sparse_as_dense)
        self._rt = _runtime()
        self._id = next(_instances)
        self._hooks: list[Any] = []
        self._retired: list[Any] = []
        self._plan_no = -1
        self._should_sync = True
        self._synchronized = False
        self.grad_norm: float | None = None
        self._peak_gradient_bytes = 0
        members = config.process_set.members(self._rt.world.size)
        if self._rt.world.rank not in members:
            raise ValueError(f"rank {self._rt.world.rank} is not in process_set {list(members)}")
        self._group_size = len(members)
        self._names = self._name_map(named_parameters)
        self._build()

    # --- what the wrapped optimizer owns -------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self._inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._inner.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self._inner.state

    @state.setter
    def state(self, value: Any) -> None:
        self._inner.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self._inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._inner.defaults = value

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not found normally: fall through to the wrapped optimizer.
        if name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)

    def state_dict(self) -> dict[str, Any]:
        return self._inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._inner.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer and re-plan the buckets (call it on every rank)."""
        self._check_idle("add_param_group()")
        self._inner.add_param_group(param_group)
        if hasattr(self, "_tracker"):
            self._build()

    def __repr__(self) -> str:
        return f"DistributedOptimizer({self._inner!r})"

    # --- planning ------------------------------------------------------------------------------
    def _name_map(self, named_parameters: Iterable[Any] | None) -> dict[int, tuple[int, str]] | None:
        """id(param) -> (registration position, name), from ``named_parameters``; None when not given."""
        if named_parameters is None:
            return None
        out: dict[int, tuple[int, str]] = {}
        seen: set[str] = set()
        for item in named_parameters:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], torch.Tensor)):
                raise ValueError(f"named_parameters must yield (name, tensor) pairs, got {type(item).__name__} "
                                 f"{item!r:.60}")
            name, p = item
            if name in seen:
                raise ValueError(f"duplicate parameter name {name!r} in named_parameters: names must be unique")
            seen.add(name)
            out.setdefault(id(p), (len(out), name))  # a tied parameter keeps its first name
        return out

    def _trainable(self) -> list[torch.nn.Parameter]:
        """The optimizer's parameters that require a gradient, each once, in param-group order."""
        seen: set[int] = set()
        return [p for group in self._inner.param_groups for p in group["params"]
                if p.requires_grad and not (id(p) in seen or seen.add(id(p)))]

    def _group_of(self) -> dict[int, int]:
        """id(param) -> index of its param group (buckets never mix groups)."""
        return {id(p): g for g, group in enumerate(self._inner.param_groups) for p in group["params"]}

    def _build(self) -> None:
        # Old hooks ignore calls once the plan number moves on; they are removed outside backward
        # (removing hooks from inside a running hook would mutate the dict autograd is iterating).
        self._retired, self._hooks = self._retired + self._hooks, []
        params = self._trainable()
        self._planned = [id(p) for p in params]
        group_of = self._group_of()
        if self._names is not None:
            missing = [p for p in params if id(p) not in self._names]
            if missing:
                shapes = [tuple(p.shape) for p in missing[:5]]
                raise ValueError(f"{len(missing)} optimizer parameter(s) (shapes {shapes}) are missing from "
                                 "named_parameters; pass model.named_parameters() of the optimized model")
            params.sort(key=lambda p: self._names[id(p)][0])  # registration order, not param-group order
            names = [self._names[id(p)][1] for p in params]
        else:
            names = [f"param.{i}" for i in range(len(params))]
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"parameters on several devices {sorted(map(str, devices))}; "
                             "DistributedOptimizer needs them on one device")
        for p in params:
            if p.is_sparse or p.layout != torch.strided:
                raise ValueError(f"parameter {names[params.index(p)]!r} has layout {p.layout}; only dense "
                                 "(strided) parameters are supported")
        keys: list[Any] = [group_of[id(p)] for p in params]
        cap = self._config.bucket_cap_bytes
        if self._groups is not None:   # Horovod's explicit grouping: each group is fused on its own
            index = {id(p): i for i, p in enumerate(params)}
            spec = self._groups if isinstance(self._groups, int) else \
                [[index[pid] for pid in group if pid in index] for group in self._groups]
            keys, cap = list(zip(keys, explicit_groups(len(params), spec))), 0
        plan = buckets.plan(params, cap, keys, names)
        self._params, self._param_names = params, names
        self._index = {id(p): i for i, p in enumerate(params)}
        self._plan_no += 1
        self._buckets: list[_Bucket] = []
        self._where: list[tuple[int, int]] = [(-1, -1)] * len(params)  # param -> (bucket, position)
        for b, bk in enumerate(plan):
            wire_name, warning = backend_wire_dtype(bk.dtype, self._config.compression, self._rt.name)
            key = (self._rt.name, f"{self._config.compression.wire_dtype}<-{bk.dtype}")
            if warning and key not in _warned:  # once per process and kind of fallback
                _warned.add(key)
                warnings.warn(f"hvdllm: {warning}", RuntimeWarning, stacklevel=3)
            wire = getattr(torch, wire_name) if wire_name != bk.dtype else None
            self._buckets.append(_Bucket(bk, params, wire, self._config.scales(self._group_size, wire_name),
                                         self._bucket_length(bk)))
            for pos, i in enumerate(bk.indices):
                self._where[i] = (b, pos)
        self._tracker = LaunchTracker(plan, len(params), self._config.backward_passes_per_step,
                                      ordered=self._rt.name != "horovod")
        ref = weakref.ref(self)
        for p in params:
            self._hooks.append(p.register_hook(_make_hook(ref, id(p), self._plan_no, type(self)._attach)))
            self._hooks.append(p.register_post_accumulate_grad_hook(
                _make_hook(ref, id(p), self._plan_no, type(self)._on_grad)))

    def _bucket_length(self, plan: Bucket) -> int:
        """The least length of a bucket's flat buffer (a subclass may need padding)."""
        return 0

    def _replan_if_changed(self) -> None:
        """At the start of a step: re-plan if a parameter was frozen or unfrozen since the plan (every
        rank runs the same model code, so every rank re-plans at the same step)."""
        if not self._tracker.active and [id(p) for p in self._trainable()] != self._planned:
            self._build()

    # --- during backward -----------------------------------------------------------------------
    def _attach(self, pid: int, grad: torch.Tensor | None = None) -> None:
        """Before autograd accumulates a gradient into ``.grad=None``: make ``.grad`` the zeroed bucket
        view, so autograd accumulates into the bucket instead of allocating a tensor to copy in later.
        A sparse gradient stays sparse (it is reduced as Horovod does, see :meth:`_pack`)."""
        self._replan_if_changed()
        i = self._index.get(pid)
        if grad is not None and grad.is_sparse:
            return
        if i is not None and self._params[i].grad is None:
            b, pos = self._where[i]
            view = self._buckets[b].views[pos]
            view.zero_()
            self._params[i].grad = view

    def _on_grad(self, pid: int, _param: Any = None) -> None:
        """After autograd accumulated a gradient: count it; launch the buckets that became ready."""
        i = self._index.get(pid)
        if i is None:
            return
        self._synchronized = False
        complete, launch = self._tracker.mark(i)
        if complete:
            self._pack(i)
        for b in launch:
            self._launch(b)

    def _pack(self, i: int) -> None:
        """Put parameter i's gradient (or zeros) into its bucket slot; its .grad becomes that slot."""
        b, pos = self._where[i]
        bucket = self._buckets[b]
        p, view = bucket.params[pos], bucket.views[pos]
        g = p.grad
        if g is None:
            view.zero_()
            bucket.flags[pos] = 0.0
            return
        if g.is_sparse and not self._sparse_as_dense:
            # Horovod's sparse allreduce (allgather of indices and values) at synchronize(); the bucket
            # slot carries zeros and a flag above any count of dense ranks, so every rank learns that
            # this parameter takes the sparse path this step (and joins it, with no entries if need be).
            self._sparse[i] = g
            view.zero_()
            bucket.flags[pos] = float(self._group_size + 1)
            return
        if g.is_sparse:
            self._densified.add(i)
            g = g.to_dense()
        elif g.layout != torch.strided:
            raise ValueError(f"parameter {self._param_names[i]!r} has a {g.layout} gradient; only dense "
                             "(strided) or sparse COO gradients are supported")
        if g.data_ptr() != view.data_ptr() or g.stride() != view.stride():
            view.copy_(g)
            p.grad = view
        bucket.flags[pos] = 1.0

    def _launch(self, b: int) -> None:
        bucket = self._buckets[b]
        flags = bucket.buffer[bucket.numel:]
        flags.copy_(torch.tensor(bucket.flags, dtype=flags.dtype))
        if self._rt.name == "local":
            return
        target = bucket.buffer
        if bucket.wire is not None:
            bucket.wire.copy_(bucket.buffer)
            target = bucket.wire
        if bucket.prescale != 1.0:  # (the flags stay > 0)
            target.mul_(bucket.prescale)
        bucket.handle = self._rt.allreduce_async_(target, Sum, self._config.process_set,
                                                  name=f"hvdllm.dp{self._id}.{self._plan_no}.bucket{b}")

    # --- step ----------------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Finish every bucket's reduction, then scale (average, clip) the gradients in place.

        step() calls it; call it yourself to inspect or modify the reduced gradients, then step inside
        ``with optimizer.skip_synchronize():`` (Horovod's pattern; e.g. fp16: unscale, then
        :meth:`clip_grad_norm_`).
        """
        self._replan_if_changed()
        sparse: list[tuple[int, float]] = []
        for b in self._tracker.remaining():
            for i in self._buckets[b].positions:
                if not self._tracker.complete(i):
                    self._pack(i)
            self._launch(b)
        for bucket in self._buckets:
            # Postscale (Average's f/size, 1/k for average_aggregated_gradients), on the wire before the
            # cast back: the sum may not fit the gradient's dtype (fp16 summed as fp32 on MPI).
            if bucket.handle is None:  # the local backend: nothing travelled
                post, reduced = bucket.prescale * bucket.postscale, bucket.grads
                flag_unit = 1.0        # what one rank's presence flag of 1 became
            else:
                bucket.handle.wait()
                bucket.handle = None
                post, reduced = bucket.postscale, bucket.wire if bucket.wire is not None else bucket.grads
                flag_unit = bucket.prescale * (post if bucket.wire is not None else 1.0)
            if post != 1.0:
                reduced.mul_(post)  # (the flags stay > 0)
            if reduced is bucket.wire:
                bucket.buffer.copy_(bucket.wire)
            present = bucket.buffer[bucket.numel:].tolist()
            for pos, p in enumerate(bucket.params):
                if present[pos] > (self._group_size + 0.5) * flag_unit:
                    sparse.append((bucket.positions[pos], bucket.prescale * bucket.postscale))
                elif present[pos] > 0:
                    if p.grad is None or p.grad.data_ptr() != bucket.views[pos].data_ptr():
                        p.grad = bucket.views[pos]
                else:
                    p.grad = None
        self._reduce_sparse(sorted(sparse))
        for i in self._densified:       # sparse_as_dense: back to sparse for the update, as Horovod
            p = self._params[i]
            if p.grad is not None:
                p.grad = p.grad.to_sparse()
        self._densified = set()
        self._finish_synchronize()

    def _finish_synchronize(self) -> None:
        """The reduction is done: retire old hooks, clip (or just measure) by the global norm."""
        self._tracker.reset()
        for h in self._retired:
            h.remove()
        self._retired = []
        if self._config.max_grad_norm is not None:
            self.clip_grad_norm_(self._config.max_grad_norm)
        else:
            self.grad_norm = self._global_norm()
        self._synchronized = True

    def _reduce_sparse(self, sparse: list[tuple[int, float]]) -> None:
        """Parameters that had a sparse gradient on some rank: sparse_allreduce (Sum) in parameter order
        on every rank, values scaled as the buckets are (Average's 1/size, 1/k, predivide). They travel
        row-sparse (sparse_dim 1, the layout of embeddings' gradients), so a rank without a gradient
        can take part with an empty one of the same layout."""
        handles = []
        for i, unit in sparse:
            p = self._params[i]
            local = self._sparse.pop(i, None)
            if local is None:          # no gradient here this step: take part with no entries
                local = torch.sparse_coo_tensor(torch.zeros((1, 0), dtype=torch.long, device=p.device),
                                                torch.zeros((0, *p.shape[1:]), dtype=p.dtype, device=p.device),
                                                p.shape)
            elif local.sparse_dim() != 1:   # one layout on every rank: row-sparse, as embeddings' gradients
                local = local.to_dense().to_sparse(1)
            name = f"hvdllm.dp{self._id}.{self._plan_no}.sparse.{self._param_names[i]}"
            handles.append((p, unit, sparse_allreduce_async(local.coalesce(), name, Sum, self._config.process_set)))
        for p, unit, handle in handles:
            p.grad = handle.wait() * unit
        self._sparse = {}

    def _global_norm(self) -> float:
        """The L2 norm of the whole model's reduced gradient: ``grad_norm_fn()`` when given (tensor/pipeline
        parallelism: the unsplit model's), else the norm over this optimizer's buckets."""
        if self._grad_norm_fn is not None:
            return float(self._grad_norm_fn())
        norms = [torch.linalg.vector_norm(bk.grads, dtype=torch.float32) for bk in self._buckets]
        norms += [torch.linalg.vector_norm(p.grad.coalesce().values(), dtype=torch.float32)
                  for p in self._params if p.grad is not None and p.grad.is_sparse]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale the reduced gradients by the core's clipping rule for their global norm; returns that
        norm (also kept in ``grad_norm``). step() calls it when ``max_grad_norm`` is set; call it yourself
        between synchronize() and a ``skip_synchronize()`` step (fp16: after the loss scaler's unscale_)."""
        self.grad_norm = self._global_norm()
        coef = clip_coefficient_of(self.grad_norm, max_norm)
        if coef != 1.0:
            for bucket in self._buckets:
                bucket.grads.mul_(coef)
            for p in self._params:
                if p.grad is not None and p.grad.is_sparse:
                    p.grad = p.grad * coef
        return self.grad_norm

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Inside this block step() does not synchronize (you called synchronize() already)."""
        self._should_sync = False
        try:
            yield
        finally:
            self._should_sync = True

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Reduce the gradients (see synchronize) and step the wrapped optimizer; returns what it returns.

        A ``closure`` is evaluated once, before the reduction (optimizers that re-evaluate it, like
        LBFGS, are not supported).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._should_sync and not self._synchronized:
            self.synchronize()
        out = self._step_reduced()
        self._synchronized = False
        return loss if closure is not None else out

    def _step_reduced(self) -> Any:
        """The update once the gradients are reduced: the wrapped optimizer's step (ZeRO steps shards)."""
        return self._inner.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As the wrapped optimizer's; refuses while a backward pass awaits its step()."""
        self._check_idle("zero_grad()")
        self._inner.zero_grad(set_to_none=set_to_none)

    def reset_world(self) -> None:
        """Follow an elastic reset (hvdllm.torch.elastic): take the new backend and group size, drop any
        reduction in flight (the failed peers' ops died with the old backend) and the gradients of the
        step in progress, and rebuild the buckets."""
        self._rt = _runtime()
        self._group_size = len(self._config.process_set.members(self._rt.world.size))
        self._synchronized, self._should_sync = False, True
        self._sparse, self._densified = {}, set()
        self._rebuild(restart_names=True)  # bucket names restart with the new backend, as in a worker that joins now

    def set_backward_passes_per_step(self, passes: int) -> None:
        """Horovod's method: local backward passes summed per reduction from the next step on (an elastic
        trainer keeps its global batch on fewer ranks by accumulating more). Every rank calls it alike."""
        if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
            raise ValueError(f"backward_passes_per_step={passes!r} must be an integer >= 1")
        self._check_idle("set_backward_passes_per_step()")
        if passes != self._config.backward_passes_per_step:
            self._config = dataclasses.replace(self._config, backward_passes_per_step=passes)
            self._rebuild(restart_names=False)

    @property
    def backward_passes_per_step(self) -> int:
        return self._config.backward_passes_per_step

    @backward_passes_per_step.setter
    def backward_passes_per_step(self, passes: int) -> None:
        self.set_backward_passes_per_step(passes)

    def _rebuild(self, restart_names: bool) -> None:
        """Drop every hook (an old plan's would share the plan number) and plan the buckets again, under
        plan number 0 (``restart_names``: as a worker joining now) or the current one: bucket names
        carry it, and ranks that re-plan for other reasons (a joiner needs no new accumulation) must agree."""
        for h in self._hooks + self._retired:
            h.remove()
        self._hooks, self._retired = [], []
        # Gradients are views into the old buckets: one left by a step that failed mid-way would keep
        # its partial sum, and autograd would go on accumulating into it, never reduced (a rolled-back
        # elastic step trained on stale gradients). The new plan's buckets attach to .grad = None.
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None
        self._plan_no = -1 if restart_names else self._plan_no - 1   # (_build counts it up again)
        self._build()

    def gradient_bytes(self) -> int:
        """Bytes of the gradient buckets (and their wire buffers) this optimizer holds now."""
        return sum(t.numel() * t.element_size() for b in self._buckets for t in (b.buffer, b.wire) if t is not None)

    def peak_gradient_bytes(self, reset: bool = False) -> int:
        """The most :meth:`gradient_bytes` held at once since construction or the last ``reset=True``
        (which starts counting again from what is held now). Replicated buckets live for the whole run;
        ZeRO-2 allocates and frees them within a step and notes each high point. Counts hvdllm's own
        buffers only: not sparse gradients, nor copies a backend makes for the wire (e.g. bf16 as fp32)."""
        peak = max(self._peak_gradient_bytes, self.gradient_bytes())
        if reset:
            self._peak_gradient_bytes = self.gradient_bytes()
        return peak

    def _note_gradient_bytes(self) -> None:
        """Record a possible high point of :meth:`gradient_bytes` (called where a subclass allocates)."""
        self._peak_gradient_bytes = max(self._peak_gradient_bytes, self.gradient_bytes())

    def _check_idle(self, what: str) -> None:
        if self._tracker.pending:
            raise RuntimeError(f"{what} was called after backward() but before step() (or synchronize()); "
                               "the gradients' reduction is in flight: call step() first")

    def __del__(self) -> None:
        for h in getattr(self, "_hooks", []) + getattr(self, "_retired", []):
            h.remove()


def _make_hook(ref: "weakref.ReferenceType[_DistributedOptimizer]", pid: int, plan_no: int,
               method: Callable[[_DistributedOptimizer, int, torch.Tensor], None]) -> Callable[[torch.Tensor], None]:
    def hook(tensor: torch.Tensor) -> None:
        opt = ref()
        if opt is not None and opt._plan_no == plan_no:
            method(opt, pid, tensor)

    return hook


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters: Iterable[Any] | None = None,
                         compression: Any = Compression.none, backward_passes_per_step: int = 1,
                         op: Any = Average, bucket_cap_mb: float = 25, max_grad_norm: float | None = None,
                         process_set: ProcessSet = WORLD, average_aggregated_gradients: bool = False,
                         gradient_predivide_factor: float = 1.0, grad_norm_fn: Callable[..., float] | None = None,
                         num_groups: int = 0, groups: int | list[list[torch.Tensor]] | None = None,
                         sparse_as_dense: bool = False, zero_stage: int = 0,
                         zero_inflight_mb: float | None = None) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` so that step() uses gradients reduced (averaged by default) over the ranks.

    The result is an instance of the wrapped optimizer's class (isinstance checks and LR schedulers
    keep working) whose param_groups, state, state_dict and load_state_dict are the wrapped one's.
    After each step, ``grad_norm`` holds the global gradient norm (after averaging, before clipping).
    ``gradient_predivide_factor`` f is Horovod's: gradients are divided by f before the sum and by
    size/f after it (op=Average only). ``grad_norm_fn``: the hook through which tensor/pipeline
    parallelism supplies the global norm (a collective returning the unsplit model's gradient norm,
    called after the reduction) used by the clipping and reported as ``grad_norm``.

    Horovod's ``groups`` (an int k: the parameters in k consecutive groups; or lists of parameters, one
    group each, others alone) fuses each group's gradients into its own bucket(s) instead of the
    ``bucket_cap_mb`` plan; ``num_groups`` is its deprecated alias. Sparse gradients (e.g.
    ``nn.Embedding(sparse=True)``) are reduced with :func:`hvdllm.torch.sparse_allreduce_async`
    (allgather of indices and values) and stay sparse; with ``sparse_as_dense=True`` they are reduced
    dense and turned back into sparse tensors for the update, as in Horovod.
    ``zero_stage`` (ZeRO, :mod:`hvdllm.torch.zero`): 0 replicates the optimizer state on every rank;
    1 shards it over the ranks of ``process_set``; 2 also reduce-scatters the gradients to the shards.
    ``zero_inflight_mb`` (stage 2 only): the most MiB of full-size gradient buffers alive at once (buckets
    accumulating, reduce-scatters in flight); a bucket that would exceed it first waits for the oldest
    reduce-scatter. None (default): twice the largest bucket; ``math.inf``: no bound; 0: one at a time.
    """
    stage = parse_stage(zero_stage)
    inflight_mb = parse_inflight_mb(zero_inflight_mb, stage)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, _DistributedOptimizer):
        raise ValueError("optimizer is already a DistributedOptimizer; wrap the plain optimizer once")
    config = ReductionConfig.create(op=op, compression=compression, backward_passes_per_step=backward_passes_per_step,
                                    average_aggregated_gradients=average_aggregated_gradients,
                                    max_grad_norm=max_grad_norm, bucket_cap_mb=bucket_cap_mb,
                                    process_set=process_set, gradient_predivide_factor=gradient_predivide_factor)
    base = type(optimizer)
    if grad_norm_fn is not None and not callable(grad_norm_fn):
        raise ValueError(f"grad_norm_fn={grad_norm_fn!r} must be a callable returning the global gradient norm")
    grouping = _groups_arg(num_groups, groups)
    if stage:
        cls = type(base.__name__, (ZeroOptimizer, _DistributedOptimizer, base), {"__module__": __name__})
        return cls(optimizer, named_parameters, config, grad_norm_fn, stage, grouping, bool(sparse_as_dense),
                   inflight_mb)
    cls = type(base.__name__, (_DistributedOptimizer, base), {"__module__": __name__})
    return cls(optimizer, named_parameters, config, grad_norm_fn, grouping, bool(sparse_as_dense))


def _groups_arg(num_groups: Any, groups: Any) -> int | list[list[int]] | None:
    """Horovod's ``groups``/``num_groups`` validated: a positive int, lists of parameters (as lists of
    their ids; each parameter once), or None."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 0:
        raise ValueError(f"num_groups={num_groups!r} must be an int >= 0 (0: no explicit groups)")
    if num_groups:
        warnings.warn("DistributedOptimizer: num_groups is deprecated (as in Horovod); use groups=",
                      DeprecationWarning, stacklevel=3)
        groups = num_groups if groups is None else groups
    if groups is None:
        return None
    if isinstance(groups, (list, tuple)):
        seen: set[int] = set()
        out = []
        for group in groups:
            if not isinstance(group, (list, tuple)) or not all(isinstance(p, torch.Tensor) for p in group):
                raise ValueError(f"groups must be a positive int or a list of lists of parameters, got an item "
                                 f"{type(group).__name__}")
            ids = [id(p) for p in group]
            if seen & set(ids) or len(set(ids)) != len(ids):
                raise ValueError("a parameter can only appear once in groups")
            seen |= set(ids)
            out.append(ids)
        return out
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups={groups!r} must be a positive int or a list of lists of parameters")
    return groups
