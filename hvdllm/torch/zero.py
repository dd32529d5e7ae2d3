"""ZeRO stages 1 and 2 for PyTorch: ``hvd.DistributedOptimizer(opt, ..., zero_stage=1|2)``.

The gradient buckets of :mod:`hvdllm.torch.distributed` are kept (hooks, accumulation, overlap,
compression); each bucket's flat space is partitioned over the data-parallel ranks by the core
(:mod:`hvdllm.core.zero`) and every rank owns one *shard parameter* per bucket: a flat tensor of the
parameters' dtype holding its slice of the bucket's parameters. A fresh instance of the wrapped
optimizer's class steps only those shard parameters (the same groups and hyperparameters; the
wrapper's ``param_groups`` are its groups, so LR schedulers built on the wrapper act), so each rank
keeps 1/N of the optimizer state. A step:

1. reduce the gradients: stage 1 allreduces each bucket (as plain data parallelism) and takes the
   rank's slice; stage 2 reduce-scatters each (zero-padded) bucket from the backward hooks as soon as
   its gradients are ready, so only the shard arrives. A stage-2 bucket's full-size buffer exists from
   its first gradient until its reduce-scatter is finished (polled from the later hooks, or at
   ``step()``); the parameters' ``.grad`` views into it are dropped when it is sent. The full-size
   buffers alive at once (buckets accumulating, reduce-scatters in flight) are bounded by
   ``zero_inflight_mb`` (default: twice the largest bucket): a bucket that would exceed it first waits
   for the oldest reduce-scatter in flight (only buckets still accumulating can make the bound be
   exceeded). That wait runs inside backward: ranks that send their buckets in different orders
   (rank-dependent branches) could wait for each other, so it is given up after
   ``hvdllm.core.zero.INFLIGHT_WAIT_S`` and the bound switched off, with a warning. With accumulation
   (``backward_passes_per_step`` k > 1) each bucket is reduce-scattered once per backward pass
   (:class:`hvdllm.core.zero.PassTracker`) and the shards are summed in an fp32 accumulator (as
   DeepSpeed's stage 2), so no full buffer persists between passes; the k local
   gradients are then summed after the reduction instead of before (another rounding order than
   ``zero_stage=0``, within 1e-6 relative over 50 steps in the tests). One process (the local
   backend) has nothing to scatter: its buckets are the shards and stay until the step;
2. clip by the global norm: stage 1 holds every reduced gradient, so ``step()`` takes the norm
   locally as ``zero_stage=0`` does (no collective); stage 2 (and an explicit ``clip_grad_norm_``
   after ``synchronize()``, when the shards may have been changed) allreduces the shards' squared
   norms (per parameter when tensor/pipeline parallelism supplies ``grad_norm_fn``, which then
   combines them over its groups);
3. copy the current parameters into the shards (so weights changed outside, e.g. by a broadcast or a
   load, are respected), step the inner optimizer on the shards, allgather the updated shards (one
   grouped allgather per dtype: a single negotiation on Horovod) and copy them back into every parameter.

``state_dict()``/``load_state_dict()`` give and take the unsplit torch.optim format (a collective
gather at save; each rank cuts its own shard at load), so checkpoints move between world sizes and
stages. Elementwise optimizers only: rules with per-tensor norms (LAMB) would see shards instead of
tensors. A parameter with no gradient on any rank is stepped with a zero gradient (its optimizer
state still evolves), unlike plain data parallelism, which skips it.
"""
from __future__ import annotations

import collections
import dataclasses
import inspect
import math
import warnings
from typing import Any, Callable, Iterable

import torch

from hvdllm.core.buckets import Bucket
from hvdllm.core.gradients import ReductionConfig, clip_coefficient_of
from hvdllm.core.ops import Sum
from hvdllm.core.waiting import CollectiveTimeout, wait_until
from hvdllm.core.zero import INFLIGHT_WAIT_S, PassTracker, Piece, ShardPlan, pieces
from hvdllm.torch import buckets

__all__ = ["ZeroOptimizer"]

_PER_TENSOR_RULES = ("LAMB", "LBFGS", "Adafactor", "SparseAdam")


class _Shard:
    """This rank's shard of one bucket: its plan, pieces, flat parameter and gradient."""

    def __init__(self, plan: ShardPlan, rank: int, own: tuple[Piece, ...], like: torch.Tensor) -> None:
        self.plan, self.rank, self.pieces = plan, rank, own
        self.lo, self.hi = plan.range(rank)
        self.param = torch.nn.Parameter(torch.zeros(plan.shard_numel, dtype=like.dtype, device=like.device))
        self.padded: torch.Tensor | None = None  # gradient copy when the shard runs past the bucket's end
        self.acc: torch.Tensor | None = None     # stage 2 with accumulation: the passes' shards summed

    def accumulate(self, shard_grad: torch.Tensor) -> None:
        """Add one backward pass's reduced shard to the accumulator (fp32, or the parameters' dtype if wider)."""
        if self.acc is None:
            dtype = torch.promote_types(self.param.dtype, torch.float32)
            self.acc = torch.zeros(self.plan.shard_numel, dtype=dtype, device=self.param.device)
        self.acc[:shard_grad.numel()].add_(shard_grad)

    def set_grad(self, grad: torch.Tensor) -> None:
        """``grad``: the shard's reduced gradient, either all ``shard_numel`` elements or only the real ones."""
        if grad.numel() != self.plan.shard_numel:
            if self.padded is None:
                self.padded = torch.zeros_like(self.param)
            self.padded[:grad.numel()].copy_(grad)
            grad = self.padded
        self.param.grad = grad if grad.dtype == self.param.dtype else grad.to(self.param.dtype)


@dataclasses.dataclass(eq=False)
class _Flight:
    """A stage-2 reduce-scatter in flight: bucket ``b``'s sent full-size buffers, kept until it finishes."""

    b: int
    handle: Any
    buffer: torch.Tensor
    wire: torch.Tensor | None


class ZeroOptimizer:
    """The ZeRO wrapper's behaviour: :func:`hvdllm.torch.DistributedOptimizer` mixes it in before its
    replicated wrapper (whose buckets, hooks and accumulation ``super()`` reaches) and the wrapped
    optimizer's class when ``zero_stage`` > 0 (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, named_parameters: Iterable[Any] | None,
                 config: ReductionConfig, grad_norm_fn: Callable[..., float] | None, stage: int,
                 groups: Any = None, sparse_as_dense: bool = False, inflight_mb: float | None = None) -> None:
        if type(optimizer).__name__ in _PER_TENSOR_RULES:
            raise ValueError(f"zero_stage={stage} needs an elementwise optimizer; {type(optimizer).__name__} "
                             f"uses per-tensor quantities (allowed: e.g. SGD, Adam, AdamW; or zero_stage=0)")
        self.zero_stage = stage
        self._user = optimizer
        self._model_groups = [list(g["params"]) for g in optimizer.param_groups]
        initial = optimizer.state_dict() if optimizer.state else None
        self._shards: list[_Shard] = []
        self._buckets_fresh = False   # (stage 1: see _finish_synchronize)
        self._inflight_mb = inflight_mb
        self._flights: collections.deque[_Flight] = collections.deque()   # stage 2: in launch order
        self._passes: PassTracker | None = None   # stage 2 with accumulation: a reduce-scatter per pass
        self._inflight_bytes = math.inf
        super().__init__(optimizer, named_parameters, config, grad_norm_fn, groups, sparse_as_dense)
        if initial is not None:   # state the wrapped optimizer had already: cut into this rank's shards
            self.load_state_dict(initial)
        optimizer.state.clear()

    # --- planning ------------------------------------------------------------------------------
    @property
    def model_param_groups(self) -> list[list[torch.nn.Parameter]]:
        """The model's parameters per param group (``param_groups`` hold the shard parameters)."""
        return self._model_groups

    def _trainable(self) -> list[torch.nn.Parameter]:
        seen: set[int] = set()
        return [p for ps in self._model_groups for p in ps if p.requires_grad and not (id(p) in seen or seen.add(id(p)))]

    def _group_of(self) -> dict[int, int]:
        return {id(p): g for g, ps in enumerate(self._model_groups) for p in ps}

    def _bucket_length(self, plan: Bucket) -> int:
        return ShardPlan(plan.numel, self._group_size).padded_numel

    def _build(self) -> None:
        saved = self.state_dict() if self._shards and any(self._inner.state.values()) else None  # (a re-plan)
        super()._build()
        members = list(self._config.process_set.members(self._rt.world.size))
        me = members.index(self._rt.world.rank)
        sizes = [p.numel() for p in self._params]
        group_of = self._group_of()
        self._shards = []
        per_group: list[list[torch.nn.Parameter]] = [[] for _ in self._model_groups]
        for bucket in self._buckets:
            plan = ShardPlan(bucket.numel, self._group_size)
            shard = _Shard(plan, me, pieces(bucket.plan, sizes, plan, me), bucket.params[0])
            self._shards.append(shard)
            per_group[group_of[id(bucket.params[0])]].append(shard.param)
        self._fill_shards()
        self._flights = collections.deque()
        self._passes = None
        if self.zero_stage == 2:   # a bucket is allocated when its first gradient of a step arrives
            k = self._config.backward_passes_per_step
            if k > 1 and self._rt.name != "local":
                self._passes = PassTracker([bk.plan.indices for bk in self._buckets], len(self._params), k,
                                           ordered=self._rt.name != "horovod")
            largest = max((self._full_bytes(bk) for bk in self._buckets), default=0)
            self._inflight_bytes = 2 * largest if self._inflight_mb is None else self._inflight_mb * 1024 * 1024
            for b in range(len(self._buckets)):
                self._release_bucket(b, drop_grads=False)
        self._inner = self._shard_optimizer(per_group)
        if saved is not None:
            self.load_state_dict(saved)

    def _shard_optimizer(self, per_group: list[list[torch.nn.Parameter]]) -> torch.optim.Optimizer:
        """A new optimizer of the wrapped one's class over the shard parameters, with the same groups' settings."""
        cls = type(self._user)
        accepted = inspect.signature(cls.__init__).parameters
        kwargs = {k: v for k, v in self._user.defaults.items() if k in accepted and k not in ("self", "params")}
        for k in accepted:  # constructor options kept as attributes (e.g. hvdllm.torch.optim's fused)
            if k not in kwargs and k not in ("self", "params") and k in vars(self._user):
                kwargs[k] = vars(self._user)[k]
        # the current settings: the wrapped optimizer's at construction, the shard optimizer's at a re-plan
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": ps}
                  for g, ps in zip(self._inner.param_groups, per_group)]
        return cls(groups, **kwargs)

    def _fill_shards(self) -> None:
        """Copy the parameters' current values into the shard parameters."""
        with torch.no_grad():
            for shard in self._shards:
                flat = shard.param.data
                for pc in shard.pieces:
                    flat[pc.in_shard].copy_(self._params[pc.index].detach().reshape(-1)[pc.in_tensor])

    # --- during backward -----------------------------------------------------------------------
    def _buffer_numel(self, bucket: Any) -> int:
        """Elements of a bucket's full-size buffer: the gradients and presence flags, or the padded length."""
        return max(bucket.numel + len(bucket.params), self._bucket_length(bucket.plan))

    def _full_bytes(self, bucket: Any) -> int:
        """Bytes of a bucket's full-size buffers once allocated (the gradients, and the wire copy if any)."""
        n = self._buffer_numel(bucket)
        wire = bucket.wire.element_size() if bucket.wire is not None else 0
        return n * (bucket.params[0].element_size() + wire)

    def _materialize(self, b: int) -> None:
        """Stage 2 frees a bucket's gradient buffer once it is sent; allocate it (zeroed) again, with the
        parameters' views, when the bucket's next gradient arrives: first, while the full-size buffers
        would exceed the in-flight bound, finish the oldest reduce-scatter (freeing its buffers)."""
        bucket = self._buckets[b]
        if bucket.buffer.numel():
            return
        need = self._full_bytes(bucket)
        while self._flights and self._full_bytes_held() + need > self._inflight_bytes:
            if not self._await(self._flights[0]):
                break
            self._finish(self._flights[0])
        size = self._buffer_numel(bucket)
        first = bucket.params[0]
        bucket.buffer = torch.zeros(size, dtype=first.dtype, device=first.device)
        bucket.views = buckets.views(bucket.buffer, bucket.plan, self._params)
        bucket.grads = bucket.buffer[:bucket.numel]
        if bucket.wire is not None:
            bucket.wire = torch.empty(size, dtype=bucket.wire.dtype, device=first.device)
        self._note_gradient_bytes()

    def _release_bucket(self, b: int, drop_grads: bool = True) -> None:
        """Stage 2: free bucket ``b``'s full-size gradient buffer (and, ``drop_grads``, the parameters'
        ``.grad`` views into it)."""
        bucket = self._buckets[b]
        if drop_grads:
            for p in bucket.params:
                p.grad = None
        bucket.buffer = bucket.buffer.new_empty(0)
        bucket.views, bucket.grads = [], bucket.buffer
        if bucket.wire is not None:
            bucket.wire = bucket.wire.new_empty(0)

    def _attach(self, pid: int, grad: torch.Tensor | None = None) -> None:
        if self.zero_stage == 2:
            self._replan_if_changed()
            i = self._index.get(pid)
            if i is not None:
                self._materialize(self._where[i][0])
        super()._attach(pid, grad)

    def _on_grad(self, pid: int, _param: Any = None) -> None:
        if self._passes is None:
            super()._on_grad(pid, _param)
        else:   # stage 2 with accumulation: a bucket is sent after each backward pass
            i = self._index.get(pid)
            if i is None:
                return
            self._synchronized = False
            self._tracker.mark(i)   # (counts the passes: more than k before step() is refused)
            for b, m in self._passes.mark(i):
                self._launch_pass(b, m)
        if self.zero_stage == 2 and self._rt.name != "local":
            self._poll_flights()

    def _launch_pass(self, b: int, m: int | None) -> None:
        """Stage 2: send bucket ``b`` (for pass ``m`` with accumulation), its missing gradients as zeros."""
        self._materialize(b)
        for i in self._buckets[b].positions:
            if m is not None or not self._tracker.complete(i):
                self._pack(i)
        self._launch(b, m)

    def _await(self, flight: _Flight) -> bool:
        """Wait (inside backward) for a reduce-scatter the bound needs finished; False, with the bound
        switched off for the run, when it does not complete within ``INFLIGHT_WAIT_S`` (a peer sends
        its buckets in another order and may be waiting for this rank: see hvdllm.core.zero)."""
        poll = getattr(flight.handle, "poll", None)
        if poll is None:
            return True
        try:
            wait_until(poll, timeout=INFLIGHT_WAIT_S, what="ZeRO-2's in-flight bound")
        except CollectiveTimeout:
            self._inflight_bytes = self._inflight_mb = math.inf   # (a re-plan keeps it off)
            warnings.warn(f"hvdllm: ZeRO-2 waited {INFLIGHT_WAIT_S:g} s for a reduce-scatter the other ranks had "
                          "not started (they send gradient buckets in another order, e.g. rank-dependent "
                          "branches); the zero_inflight_mb bound is off from now on (zero_inflight_mb=math.inf "
                          "skips the wait)", RuntimeWarning, stacklevel=2)
            return False
        return True

    def _poll_flights(self) -> None:
        """Finish the reduce-scatters seen complete (a bucket's passes in launch order: its accumulator
        sums them in one order on every run)."""
        held: set[int] = set()
        for flight in list(self._flights):
            poll = getattr(flight.handle, "poll", None)
            if flight.b not in held and poll is not None and poll():
                self._finish(flight)
            else:
                held.add(flight.b)

    def _finish(self, flight: _Flight) -> None:
        """Stage 2: a reduce-scatter is done: its (averaged) shard becomes the shard's gradient (with
        accumulation: is added to the shard's accumulator) and the sent full-size buffers are freed."""
        bucket, shard = self._buckets[flight.b], self._shards[flight.b]
        out = flight.handle.wait()
        if self._passes is None:
            if bucket.postscale != 1.0:
                out.mul_(bucket.postscale)
            shard.set_grad(out.to(bucket.buffer.dtype))
        else:
            shard.accumulate(out)   # (the postscale is applied once, to the sum, at synchronize())
        self._note_gradient_bytes()
        self._flights.remove(flight)   # (its handle and buffers go with it)

    def _full_bytes_held(self) -> int:
        """Stage 2: bytes of the full-size buffers alive now (buckets accumulating, reduce-scatters in flight)."""
        flights = sum(t.numel() * t.element_size() for f in self._flights for t in (f.buffer, f.wire) if t is not None)
        return super().gradient_bytes() + flights

    def _pack(self, i: int) -> None:
        g = self._params[i].grad
        if g is not None and g.is_sparse and not self._sparse_as_dense:
            raise ValueError(f"parameter {self._param_names[i]!r} has a sparse gradient: zero_stage="
                             f"{self.zero_stage} shards dense gradients; pass sparse_as_dense=True (or zero_stage=0)")
        super()._pack(i)
        self._densified.clear()   # (the shards step dense; nothing is turned back into a sparse gradient)

    def _launch(self, b: int, m: int | None = None) -> None:
        """Stage 1: the replicated allreduce. Stage 2: start the bucket's reduce-scatter (of pass ``m``
        with accumulation) and hand its buffers to the flight; the parameters' views are dropped."""
        if self.zero_stage == 1:
            super()._launch(b)
            return
        if self._rt.name == "local":
            return
        bucket, shard = self._buckets[b], self._shards[b]
        send = bucket.buffer[:shard.plan.padded_numel]
        send[bucket.numel:].zero_()
        if bucket.wire is not None:
            bucket.wire[:send.numel()].copy_(send)
            send = bucket.wire[:send.numel()]
        if bucket.prescale != 1.0:
            send.mul_(bucket.prescale)
        name = f"hvdllm.zero{self._id}.{self._plan_no}.bucket{b}" + ("" if m is None else f".pass{m}")
        handle = self._rt.start("reducescatter", send, Sum, self._config.process_set, name=name)
        self._flights.append(_Flight(b, handle, bucket.buffer, bucket.wire))
        self._release_bucket(b)

    # --- step ----------------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Finish every bucket's reduction; each shard parameter gets its slice of the averaged gradient
        (then clipped by the global norm when ``max_grad_norm`` is set)."""
        self._replan_if_changed()
        if self.zero_stage == 2 and self._rt.name != "local":
            self._synchronize_scattered()
            return
        for b in self._tracker.remaining():
            if self.zero_stage == 2:
                self._materialize(b)
            for i in self._buckets[b].positions:
                if not self._tracker.complete(i):
                    self._pack(i)
            self._launch(b)
        for bucket, shard in zip(self._buckets, self._shards):
            if bucket.handle is None:  # the local backend: nothing travelled
                post = bucket.prescale * bucket.postscale
                if post != 1.0:
                    bucket.grads.mul_(post)
                shard.set_grad(bucket.grads[shard.lo:shard.hi])
                continue
            bucket.handle.wait()
            bucket.handle = None
            reduced = bucket.wire if bucket.wire is not None else bucket.grads
            if bucket.postscale != 1.0:
                reduced.mul_(bucket.postscale)
            if reduced is bucket.wire:
                bucket.buffer.copy_(bucket.wire)
            shard.set_grad(bucket.grads[shard.lo:shard.hi])
        if self.zero_stage == 2:  # only the shards' gradients are kept: the local sums are not averaged
            for p in self._params:
                p.grad = None
        self._finish_synchronize()

    def _synchronize_scattered(self) -> None:
        """Stage 2 on a multi-rank backend: send what backward did not (every rank sends every bucket, each
        pass with accumulation, in one order), finish every reduce-scatter, set the shards' gradients."""
        if self._passes is None:
            todo: list[tuple[int, int | None]] = [(b, None) for b in self._tracker.remaining()]
        else:
            todo = list(self._passes.remaining())
        for b, m in todo:
            self._launch_pass(b, m)
        while self._flights:
            self._finish(self._flights[0])
        if self._passes is not None:
            for bucket, shard in zip(self._buckets, self._shards):
                acc = shard.acc if shard.acc is not None else torch.zeros_like(shard.param)
                if bucket.postscale != 1.0:
                    acc.mul_(bucket.postscale)
                shard.set_grad(acc)
                shard.acc = None
        for p in self._params:   # (dropped when sent; a sparse gradient packed as dense may remain)
            p.grad = None
        self._finish_synchronize()

    def _global_norm(self) -> float:
        """The global gradient norm. Stage 2, from the shards: one allreduce of squared norms over the dp
        ranks (per parameter when ``grad_norm_fn`` combines them over tensor/pipeline groups)."""
        if self.zero_stage == 1 and self._buckets_fresh:
            return self._replicated_norm()
        dev = self._params[0].device if self._params else torch.device("cpu")
        if self._grad_norm_fn is None:
            sq = torch.zeros(1, dtype=torch.float64, device=dev)
            for shard in self._shards:
                sq += shard.param.grad.detach().double().pow(2).sum()
        else:
            sq = torch.zeros(len(self._params), dtype=torch.float64, device=dev)
            for shard in self._shards:
                g = shard.param.grad.detach()
                for pc in shard.pieces:
                    sq[pc.index] += g[pc.in_shard].double().pow(2).sum()
        if self._rt.name != "local":
            sq = self._rt.allreduce(sq, Sum, self._config.process_set, name=f"hvdllm.zero{self._id}.norm")
        if self._grad_norm_fn is None:
            return float(sq[0].sqrt())
        return float(self._grad_norm_fn(squares=dict(zip(self._param_names, sq.cpu()))))

    def _finish_synchronize(self) -> None:
        # Stage 1: right after the reduction the buckets hold the whole reduced gradient on every rank,
        # so the norm needs no collective; later the shards may have changed (a GradScaler's unscale_
        # before an explicit clip_grad_norm_), so the norm is then taken from the shards.
        self._buckets_fresh = True
        if self._passes is not None:
            self._passes.reset()
        try:
            super()._finish_synchronize()
        finally:
            self._buckets_fresh = False

    def _replicated_norm(self) -> float:
        """Stage 1: every rank holds the whole reduced gradient in its buckets, so the norm needs no
        collective over the dp ranks: ``zero_stage=0``'s (identical on every rank), or per-parameter
        squares for ``grad_norm_fn``."""
        if self._grad_norm_fn is None:
            return super()._global_norm()
        squares = {}
        for bucket in self._buckets:
            for i, view in zip(bucket.positions, bucket.views):
                squares[self._param_names[i]] = view.detach().double().pow(2).sum()
        return float(self._grad_norm_fn(squares=squares))

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale the shards' gradients by the core's clipping rule for the global norm; returns the norm."""
        self.grad_norm = self._global_norm()
        coef = clip_coefficient_of(self.grad_norm, max_norm)
        if coef != 1.0:
            for shard in self._shards:
                shard.param.grad.mul_(coef)
        return self.grad_norm

    def _step_reduced(self) -> Any:
        """Step the shards, allgather them into every parameter (stage 2: release the gradient buffers)."""
        self._fill_shards()
        out = self._inner.step()
        self._gather()
        if self.zero_stage == 2:
            self._release()
        return out

    def _gather(self) -> None:
        """Every rank's updated shards, concatenated, back into the parameters: one grouped allgather per
        dtype, all started before any is waited on (on Horovod one negotiation cycle, not one per bucket)."""
        with torch.no_grad():
            flats = [s.param.detach() for s in self._shards]
            if self._rt.name != "local":
                by_dtype: dict[torch.dtype, list[int]] = {}
                for b, flat in enumerate(flats):
                    by_dtype.setdefault(flat.dtype, []).append(b)
                started = [(idx, self._rt.start("grouped_allgather", [flats[b] for b in idx], self._config.process_set,
                                                name=f"hvdllm.zero{self._id}.{self._plan_no}.gather.{buckets.dtype_name(dt)}"))
                           for dt, idx in by_dtype.items()]
                for idx, handle in started:
                    for b, out in zip(idx, handle.wait()):
                        flats[b] = out
            for bucket, flat in zip(self._buckets, flats):
                for i, off in zip(bucket.plan.indices, bucket.plan.offsets):
                    p = self._params[i]
                    p.copy_(flat[off:off + p.numel()].view_as(p))

    def _release(self) -> None:
        """Stage 2, after the step: drop the shards' gradients (and the local backend's buckets)."""
        for shard in self._shards:
            shard.param.grad, shard.acc = None, None
        for b in range(len(self._buckets)):
            self._release_bucket(b)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) the parameters' and the shards' gradients; refuses while a reduction is pending."""
        self._check_idle("zero_grad()")
        for p in [*self._params, *(s.param for s in self._shards)]:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    # --- state ---------------------------------------------------------------------------------
    def _state_index(self) -> dict[int, int]:
        """id(model parameter) -> its index in the torch.optim state-dict format (group order)."""
        out: dict[int, int] = {}
        for ps in self._model_groups:
            for p in ps:
                out.setdefault(id(p), len(out))
        return out

    def state_dict(self) -> dict[str, Any]:
        """The unsplit state in torch.optim's format, as the wrapped optimizer alone would give it (a
        collective over the data-parallel ranks: every rank must call it)."""
        inner = self._inner.state_dict()
        shard_index = {id(p): j for j, p in enumerate(p for g in self._inner.param_groups for p in g["params"])}
        index = self._state_index()
        state: dict[int, dict[str, Any]] = {}
        with torch.no_grad():
            for b, (bucket, shard) in enumerate(zip(self._buckets, self._shards)):
                entry = inner["state"].get(shard_index[id(shard.param)], {})
                for k in sorted(entry):
                    v = entry[k]
                    sharded = torch.is_tensor(v) and v.dim() == 1 and v.numel() == shard.plan.shard_numel
                    if sharded and self._rt.name != "local":
                        v = self._rt.allgather(v.detach(), self._config.process_set,
                                               name=f"hvdllm.zero{self._id}.{self._plan_no}.state{b}.{k}")
                    for i, off in zip(bucket.plan.indices, bucket.plan.offsets):
                        p = self._params[i]
                        val = v[off:off + p.numel()].view_as(p).clone() if sharded else \
                            (v.clone() if torch.is_tensor(v) else v)
                        state.setdefault(index[id(p)], {})[k] = val
        groups = []
        for g, ps in zip(inner["param_groups"], self._model_groups):
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": list(dict.fromkeys(index[id(p)] for p in ps))})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the unsplit torch.optim-format state (from any world size or stage); this rank keeps
        only its shards (no communication)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self._model_groups):
            raise ValueError(f"the state dict has {len(saved_groups)} param groups, the optimizer has "
                             f"{len(self._model_groups)}")
        saved_id: dict[int, Any] = {}
        for sg, ps in zip(saved_groups, self._model_groups):
            if len(sg["params"]) != len(ps):
                raise ValueError(f"a saved param group has {len(sg['params'])} parameters, the optimizer's "
                                 f"has {len(ps)}")
            saved_id.update({id(p): k for p, k in zip(ps, sg["params"])})
        saved_state = state_dict["state"]
        shard_params = [p for g in self._inner.param_groups for p in g["params"]]
        shard_index = {id(p): j for j, p in enumerate(shard_params)}
        state: dict[int, dict[str, Any]] = {}
        for bucket, shard in zip(self._buckets, self._shards):
            given = [(i, saved_state.get(saved_id[id(self._params[i])], {})) for i in bucket.plan.indices]
            keys = sorted({k for _, st in given for k in st})
            if not keys:
                continue
            entry: dict[str, Any] = {}
            for k in keys:
                i0, v0 = next((i, st[k]) for i, st in given if k in st)
                if torch.is_tensor(v0) and v0.dim() > 0 and v0.shape == self._params[i0].shape:
                    flat = torch.zeros(shard.plan.shard_numel, dtype=v0.dtype, device=shard.param.device)
                    parts = dict(given)
                    for pc in shard.pieces:
                        v = parts[pc.index].get(k)
                        if v is not None:
                            flat[pc.in_shard].copy_(v.detach().reshape(-1)[pc.in_tensor])
                    entry[k] = flat
                else:
                    entry[k] = v0.clone() if torch.is_tensor(v0) else v0
            state[shard_index[id(shard.param)]] = entry
        groups = []
        for sg, g in zip(saved_groups, self._inner.param_groups):
            groups.append({**{k: v for k, v in sg.items() if k != "params"},
                           "params": [shard_index[id(p)] for p in g["params"]]})
        self._inner.load_state_dict({"state": state, "param_groups": groups})

    def state_bytes(self) -> int:
        """Bytes of optimizer state tensors this rank holds (its shards)."""
        return sum(v.numel() * v.element_size() for st in self._inner.state.values() for v in st.values()
                   if torch.is_tensor(v))

    def gradient_bytes(self) -> int:
        """Bytes of gradient buffers this rank holds now: buckets (stage 2: only those between their first
        gradient and the end of their reduce-scatter, sent ones included), shard gradients that are not
        views into them and, with accumulation, the shard accumulators."""
        own = [s.padded for s in self._shards if s.padded is not None]
        if self.zero_stage == 2:
            own += [s.param.grad for s in self._shards if s.param.grad is not None and s.param.grad is not s.padded]
            own += [s.acc for s in self._shards if s.acc is not None and s.acc is not s.param.grad]
            return self._full_bytes_held() + sum(t.numel() * t.element_size() for t in own)
        return super().gradient_bytes() + sum(t.numel() * t.element_size() for t in own)

    def reset_world(self) -> None:
        """Elastic reset: re-plan the shards for the new world. The old shards cannot be gathered (their
        peers are gone): the state starts empty until ``TorchState.restore()`` loads the committed one."""
        self._shards = []
        super().reset_world()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise ValueError("add_param_group() is not supported with zero_stage > 0; put every group in the "
                         "optimizer before wrapping it")

    def __repr__(self) -> str:
        return f"DistributedOptimizer({self._user!r}, zero_stage={self.zero_stage})"
