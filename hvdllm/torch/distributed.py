"""Data-parallel training for PyTorch: ``hvd.DistributedOptimizer``, a drop-in for horovod.torch's.

How a step runs (the semantics are the core's, :mod:`hvdllm.core.gradients`):

- At construction the optimizer's parameters are planned into buckets (:func:`plan_buckets`: one
  dtype each, up to ``bucket_cap_mb``, in reverse registration order). Each bucket owns one flat
  buffer; after its first reduction a parameter's ``.grad`` *is* a view into that buffer, so later
  backward passes accumulate straight into it (no copies in or out).
- A post-accumulate-grad hook counts each parameter's backward passes; once every parameter of a
  bucket has its ``backward_passes_per_step`` passes, the bucket's summed reduction starts
  asynchronously, while backward keeps computing the earlier layers (overlap). On the mpi backend
  buckets start strictly in plan order (MPI matches collectives by order); Horovod matches them by
  name, so there a bucket starts as soon as it is ready.
- ``step()`` starts every bucket not started yet (gradients missing on this rank travel as zeros, so
  no rank can hang), waits, then scales once by ``op``'s postscale times the clip coefficient (the
  global norm is taken after the reduction, so it is identical everywhere) and steps the wrapped
  optimizer. Each bucket carries one presence flag per parameter: a parameter that got no gradient on
  *any* rank keeps ``grad=None`` (the optimizer skips it, as it would in one process).

Compression: ``Compression.fp16`` casts each bucket to fp16 for the wire. Backends that cannot reduce
a 16-bit type (Horovod's CPU ops have no bf16; MPI has neither fp16 nor bf16) reduce in the
gradient's dtype instead, after one warning. The local backend (one process) sends nothing and casts
nothing.
"""
from __future__ import annotations

import contextlib
import itertools
import warnings
import weakref
from typing import Any, Callable, Iterable, Iterator

import torch

from hvdllm.core.buckets import LaunchTracker, TensorSpec, clip_coefficient, plan_buckets
from hvdllm.core.compression import Compression
from hvdllm.core.gradients import ReductionConfig, backend_wire_dtype
from hvdllm.core.ops import Average, Sum
from hvdllm.core.process_sets import WORLD, ProcessSet
from hvdllm.torch.basics import collectives

__all__ = ["DistributedOptimizer"]

_instances = itertools.count()
_warned: set[tuple[str, str]] = set()

# 16-bit dtypes each backend can reduce (None: no communication at all).
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


_runtime = collectives  # the backend (hvdllm.core.collectives.Collectives)


class _Bucket:
    """One planned bucket: its parameters, their views into the flat buffer, the wire buffer."""

    def __init__(self, index: int, params: list[torch.nn.Parameter], positions: list[int],
                 dtype: torch.dtype, wire: torch.dtype | None) -> None:
        self.index, self.params, self.positions = index, params, positions
        self.numel = sum(p.numel() for p in params)
        device = params[0].device
        # The gradients, then one presence flag per parameter (summed over ranks like the gradients).
        self.buffer = torch.zeros(self.numel + len(params), dtype=dtype, device=device)
        self.views, off = [], 0
        for p in params:
            self.views.append(self.buffer[off:off + p.numel()].view_as(p))
            off += p.numel()
        self.grads = self.buffer[:self.numel]
        self.flags = [0.0] * len(params)
        self.wire = None if wire is None else torch.empty(self.buffer.numel(), dtype=wire, device=device)
        self.handle: Any = None


class _DistributedOptimizer(torch.optim.Optimizer):
    """The wrapper's behaviour; :func:`DistributedOptimizer` mixes it into the wrapped optimizer's class."""

    def __init__(self, optimizer: torch.optim.Optimizer, named_parameters: Iterable[Any] | None,
                 config: ReductionConfig) -> None:
        # torch.optim.Optimizer.__init__ is deliberately not called: param_groups, state and defaults
        # are the wrapped optimizer's (see the properties below).
        self._inner = optimizer
        self._config = config
        self._rt = _runtime()
        self._id = next(_instances)
        self._hooks: list[Any] = []
        self._plan_no = -1
        self._should_sync = True
        self._synchronized = False
        self.grad_norm: float | None = None
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

    def _build(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        params: list[torch.nn.Parameter] = []
        seen: set[int] = set()
        for group in self._inner.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
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
        specs = [TensorSpec(n, tuple(p.shape), _dtype_name(p.dtype)) for n, p in zip(names, params)]
        plan = plan_buckets(specs, self._config.bucket_cap_bytes)
        self._params, self._param_names = params, names
        self._plan_no += 1
        self._buckets: list[_Bucket] = []
        self._where: list[tuple[int, int]] = [(-1, -1)] * len(params)  # param -> (bucket, position)
        for b, bk in enumerate(plan):
            dtype = params[bk.indices[0]].dtype
            wire_name, warning = backend_wire_dtype(bk.dtype, self._config.compression, self._rt.name)
            key = (self._rt.name, f"{self._config.compression.wire_dtype}<-{bk.dtype}")
            if warning and key not in _warned:  # once per process and kind of fallback
                _warned.add(key)
                warnings.warn(f"hvdllm: {warning}", RuntimeWarning, stacklevel=3)
            wire = getattr(torch, wire_name) if wire_name != bk.dtype else None
            self._buckets.append(_Bucket(b, [params[i] for i in bk.indices], list(bk.indices), dtype, wire))
            for pos, i in enumerate(bk.indices):
                self._where[i] = (b, pos)
        self._tracker = LaunchTracker(plan, len(params), self._config.backward_passes_per_step,
                                      ordered=self._rt.name != "horovod")
        ref = weakref.ref(self)
        for i, p in enumerate(params):
            self._hooks.append(p.register_post_accumulate_grad_hook(_make_hook(ref, i)))

    # --- during backward -----------------------------------------------------------------------
    def _on_grad(self, i: int) -> None:
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
        if g.layout != torch.strided:
            raise ValueError(f"parameter {self._param_names[i]!r} has a {g.layout} gradient; only dense "
                             "gradients are supported (e.g. nn.Embedding(sparse=False))")
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
        bucket.handle = self._rt.allreduce_async_(target, Sum, self._config.process_set,
                                                  name=f"hvdllm.dp{self._id}.{self._plan_no}.bucket{b}")

    # --- step ----------------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Finish every bucket's reduction, then scale (average, clip) the gradients in place.

        step() calls it; call it yourself to inspect or modify the reduced gradients, then step inside
        ``with optimizer.skip_synchronize():`` (Horovod's pattern).
        """
        for b in self._tracker.remaining():
            for i in self._buckets[b].positions:
                if not self._tracker.complete(i):
                    self._pack(i)
            self._launch(b)
        for bucket in self._buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
                bucket.handle = None
                if bucket.wire is not None:
                    bucket.buffer.copy_(bucket.wire)
        # Average's 1/size (and 1/k for average_aggregated_gradients), applied once, fused with clipping.
        postscale = self._config.op.postscale(self._group_size) * self._config.local_scale
        norms = [torch.linalg.vector_norm(bk.grads, dtype=torch.float32) for bk in self._buckets]
        summed = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        self.grad_norm = summed * postscale
        coef = postscale
        if self._config.max_grad_norm is not None:
            coef *= clip_coefficient(self.grad_norm, self._config.max_grad_norm)
        for bucket in self._buckets:
            if coef != 1.0:
                bucket.grads.mul_(coef)
            present = bucket.buffer[bucket.numel:].tolist()
            for pos, p in enumerate(bucket.params):
                if present[pos] > 0:
                    if p.grad is None or p.grad.data_ptr() != bucket.views[pos].data_ptr():
                        p.grad = bucket.views[pos]
                else:
                    p.grad = None
        self._tracker.reset()
        self._synchronized = True

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
        out = self._inner.step()
        self._synchronized = False
        return loss if closure is not None else out

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As the wrapped optimizer's; refuses while a backward pass awaits its step()."""
        self._check_idle("zero_grad()")
        self._inner.zero_grad(set_to_none=set_to_none)

    def reset_world(self) -> None:
        """Follow an elastic reset (hvdllm.torch.elastic): take the new backend and group size, drop any
        reduction in flight (the failed peers' ops died with the old backend) and rebuild the buckets."""
        self._rt = _runtime()
        self._group_size = len(self._config.process_set.members(self._rt.world.size))
        self._synchronized, self._should_sync = False, True
        self._plan_no = -1  # bucket names restart with the new backend, as in a worker that joins now
        self._build()

    def _check_idle(self, what: str) -> None:
        if self._tracker.pending:
            raise RuntimeError(f"{what} was called after backward() but before step() (or synchronize()); "
                               "the gradients' reduction is in flight: call step() first")

    def __del__(self) -> None:
        for h in getattr(self, "_hooks", []):
            h.remove()


def _make_hook(ref: "weakref.ReferenceType[_DistributedOptimizer]", i: int) -> Callable[[torch.Tensor], None]:
    def hook(_param: torch.Tensor) -> None:
        opt = ref()
        if opt is not None:
            opt._on_grad(i)

    return hook


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters: Iterable[Any] | None = None,
                         compression: Any = Compression.none, backward_passes_per_step: int = 1,
                         op: Any = Average, bucket_cap_mb: float = 25, max_grad_norm: float | None = None,
                         process_set: ProcessSet = WORLD, average_aggregated_gradients: bool = False
                         ) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` so that step() uses gradients reduced (averaged by default) over the ranks.

    The result is an instance of the wrapped optimizer's class (isinstance checks and LR schedulers
    keep working) whose param_groups, state, state_dict and load_state_dict are the wrapped one's.
    After each step, ``grad_norm`` holds the global gradient norm (after averaging, before clipping).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, _DistributedOptimizer):
        raise ValueError("optimizer is already a DistributedOptimizer; wrap the plain optimizer once")
    config = ReductionConfig.create(op=op, compression=compression, backward_passes_per_step=backward_passes_per_step,
                                    average_aggregated_gradients=average_aggregated_gradients,
                                    max_grad_norm=max_grad_norm, bucket_cap_mb=bucket_cap_mb,
                                    process_set=process_set)
    base = type(optimizer)
    cls = type(base.__name__, (_DistributedOptimizer, base), {"__module__": __name__})
    return cls(optimizer, named_parameters, config)
