"""hvdllm.torch's backends: Horovod's torch ops, or the core's numpy collectives (mpi, local)."""
from __future__ import annotations

from functools import partialmethod
from typing import Any, Sequence

import torch

from hvdllm.core.ops import Average, ReduceOp
from hvdllm.core.process_sets import WORLD, ProcessSet
from hvdllm.core.backends import HorovodBase, NumpyBase, create_backend
from hvdllm.core.collectives import Deferred
from hvdllm.core.waiting import wait_until


def horovod_module() -> Any:
    """horovod.torch when Horovod is installed *and* built with PyTorch support, else None."""
    try:
        import horovod.torch
    except Exception:  # ImportError, or a missing/incompatible extension library
        return None
    return horovod.torch


def horovod_available() -> bool:
    return horovod_module() is not None


def _differentiable(*xs: torch.Tensor) -> bool:
    """Horovod's blocking ops are autograd functions; keep them where a gradient must flow back."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _wire(x: torch.Tensor) -> torch.Tensor:
    """Horovod's CPU ops have no bf16: such tensors travel as fp32."""
    return x.float() if x.dtype == torch.bfloat16 else x


def _copy_into(targets: Sequence[torch.Tensor], results: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for t, r in zip(targets, results):
            if r is not t:
                t.copy_(r)


class HorovodTorch(HorovodBase):
    """Collectives on horovod.torch (Gloo or MPI controller, whatever horovodrun chose).

    Each collective is started by a ``_start_<kind>`` method (Horovod handle, finishing function); the
    blocking forms wait for it without spinning, or call Horovod's autograd op where a gradient flows.
    """

    def __init__(self, process_sets: Sequence[ProcessSet], model_parallel: bool) -> None:
        import horovod.torch as hvd

        super().__init__(hvd, process_sets, has_accelerator=torch.cuda.is_available(),
                         model_parallel=model_parallel)

    def start(self, kind: str, *args: Any, **kwargs: Any) -> Deferred:
        handle, finish = getattr(self, f"_start_{kind}")(*args, **kwargs)
        return Deferred(lambda: finish(self._wait(handle)), lambda: self.hvd.poll(handle))

    def _reduce_kw(self, op: ReduceOp, process_set: ProcessSet, name: str | None, prescale_factor: float,
                   postscale_factor: float) -> dict:
        return {"name": name, "op": self._op(op), "process_set": self._ps(process_set),
                "prescale_factor": prescale_factor, "postscale_factor": postscale_factor}

    def _start_reduction(self, hvd_op: str, x: torch.Tensor, op: ReduceOp = Average,
                         process_set: ProcessSet = WORLD, name: str | None = None, prescale_factor: float = 1.0,
                         postscale_factor: float = 1.0):
        """allreduce/reducescatter of one tensor (``hvd_op``: Horovod's async function)."""
        kw = self._reduce_kw(op, process_set, name, prescale_factor, postscale_factor)
        return getattr(self.hvd, hvd_op)(_wire(x), **kw), lambda out: out.to(x.dtype)

    def _start_grouped_reduction(self, hvd_op: str, xs: Sequence[torch.Tensor], op: ReduceOp = Average,
                                 process_set: ProcessSet = WORLD, name: str | None = None,
                                 prescale_factor: float = 1.0, postscale_factor: float = 1.0):
        """grouped allreduce/reducescatter (``hvd_op``: Horovod's async function)."""
        kw = self._reduce_kw(op, process_set, name, prescale_factor, postscale_factor)
        handle = getattr(self.hvd, hvd_op)([_wire(x) for x in xs], **kw)
        return handle, lambda out: [o.to(x.dtype) for o, x in zip(out, xs)]

    _start_allreduce = partialmethod(_start_reduction, "allreduce_async")
    _start_reducescatter = partialmethod(_start_reduction, "reducescatter_async")
    _start_grouped_allreduce = partialmethod(_start_grouped_reduction, "grouped_allreduce_async")
    _start_grouped_reducescatter = partialmethod(_start_grouped_reduction, "grouped_reducescatter_async")

    def _start_allreduce_(self, x: torch.Tensor, op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                          name: str | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0):
        """In place on ``x``; bf16 tensors travel as fp32 (a copy), others without one. A fixed ``name``
        per recurring tensor lets Horovod's response cache skip the negotiation."""
        buf = _wire(x)
        handle = self.hvd.allreduce_async_(buf, **self._reduce_kw(op, process_set, name, prescale_factor,
                                                                  postscale_factor))
        return handle, lambda _: (_copy_into([x], [buf]), x)[1]

    def _start_grouped_allreduce_(self, xs: Sequence[torch.Tensor], op: ReduceOp = Average,
                                  process_set: ProcessSet = WORLD, name: str | None = None,
                                  prescale_factor: float = 1.0, postscale_factor: float = 1.0):
        bufs = [_wire(x) for x in xs]
        kw = self._reduce_kw(op, process_set, name, prescale_factor, postscale_factor)
        handle = self.hvd.grouped_allreduce_async_(bufs, **kw)
        return handle, lambda _: (_copy_into(xs, bufs), list(xs))[1]

    def _start_allgather(self, x: torch.Tensor, process_set: ProcessSet = WORLD, name: str | None = None):
        x = x if x.dim() else x.reshape(1)
        handle = self.hvd.allgather_async(_wire(x), name=name, process_set=self._ps(process_set))
        return handle, lambda out: out.to(x.dtype)

    def _start_grouped_allgather(self, xs: Sequence[torch.Tensor], process_set: ProcessSet = WORLD,
                                 name: str | None = None):
        handle = self.hvd.grouped_allgather_async([_wire(x) for x in xs], name=name,
                                                  process_set=self._ps(process_set))
        return handle, lambda out: [o.to(x.dtype) for o, x in zip(out, xs)]

    def _start_broadcast(self, x: torch.Tensor, root_rank: int, process_set: ProcessSet = WORLD,
                         name: str | None = None):
        handle = self.hvd.broadcast_async(_wire(x), root_rank, name=name, process_set=self._ps(process_set))
        return handle, lambda out: out.to(x.dtype)

    def _start_broadcast_(self, x: torch.Tensor, root_rank: int, process_set: ProcessSet = WORLD,
                          name: str | None = None):
        buf = _wire(x)
        handle = self.hvd.broadcast_async_(buf, root_rank, name=name, process_set=self._ps(process_set))
        return handle, lambda _: (_copy_into([x], [buf]), x)[1]

    def _start_alltoall(self, x: torch.Tensor, splits: Any = None, process_set: ProcessSet = WORLD,
                        name: str | None = None):
        handle = self.hvd.alltoall_async(_wire(x), splits, name=name, process_set=self._ps(process_set))
        return handle, lambda out: (out[0].to(x.dtype), out[1])

    def allreduce(self, x: torch.Tensor, op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                  name: str | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0
                  ) -> torch.Tensor:
        if _differentiable(x):
            return self.hvd.allreduce(_wire(x), **self._reduce_kw(op, process_set, name, prescale_factor,
                                                                  postscale_factor)).to(x.dtype)
        return self.start("allreduce", x, op, process_set, name, prescale_factor, postscale_factor).wait()

    def allreduce_async_(self, x: torch.Tensor, op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                         name: str | None = None, prescale_factor: float = 1.0,
                         postscale_factor: float = 1.0) -> Deferred:
        return self.start("allreduce_", x, op, process_set, name, prescale_factor, postscale_factor)

    def grouped_allreduce(self, xs: Sequence[torch.Tensor], op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                          name: str | None = None, prescale_factor: float = 1.0,
                          postscale_factor: float = 1.0) -> list[torch.Tensor]:
        if _differentiable(*xs):
            kw = self._reduce_kw(op, process_set, name, prescale_factor, postscale_factor)
            return [o.to(x.dtype) for o, x in zip(self.hvd.grouped_allreduce([_wire(x) for x in xs], **kw), xs)]
        return self.start("grouped_allreduce", xs, op, process_set, name, prescale_factor, postscale_factor).wait()

    def broadcast(self, x: torch.Tensor, root_rank: int, process_set: ProcessSet = WORLD,
                  name: str | None = None) -> torch.Tensor:
        if _differentiable(x):
            return self.hvd.broadcast(x, root_rank, process_set=self._ps(process_set), name=name)
        return self.start("broadcast", x, root_rank, process_set, name).wait()

    def allgather(self, x: torch.Tensor, process_set: ProcessSet = WORLD, name: str | None = None) -> torch.Tensor:
        if _differentiable(x):
            return self.hvd.allgather(x if x.dim() else x.reshape(1), name=name, process_set=self._ps(process_set))
        return self.start("allgather", x, process_set, name).wait()

    def grouped_allgather(self, xs: Sequence[torch.Tensor], process_set: ProcessSet = WORLD,
                          name: str | None = None) -> list[torch.Tensor]:
        if _differentiable(*xs):
            return list(self.hvd.grouped_allgather(list(xs), name=name, process_set=self._ps(process_set)))
        return self.start("grouped_allgather", xs, process_set, name).wait()

    def alltoall(self, x: torch.Tensor, splits: Any = None, process_set: ProcessSet = WORLD,
                 name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if _differentiable(x):
            splits = torch.as_tensor(_splits(x, splits, process_set.size(self.world.size)), dtype=torch.int32)
            out, received = self.hvd.alltoall(x, splits, name=name, process_set=self._ps(process_set))
            return out, received
        return self.start("alltoall", x, splits, process_set, name).wait()

    def reducescatter(self, x: torch.Tensor, op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                      name: str | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0
                      ) -> torch.Tensor:
        if _differentiable(x):
            return self.hvd.reducescatter(x, **self._reduce_kw(op, process_set, name, prescale_factor,
                                                                postscale_factor))
        return self.start("reducescatter", x, op, process_set, name, prescale_factor, postscale_factor).wait()

    def grouped_reducescatter(self, xs: Sequence[torch.Tensor], op: ReduceOp = Average,
                              process_set: ProcessSet = WORLD, name: str | None = None,
                              prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> list[torch.Tensor]:
        if _differentiable(*xs):
            kw = self._reduce_kw(op, process_set, name, prescale_factor, postscale_factor)
            return list(self.hvd.grouped_reducescatter(list(xs), **kw))
        return self.start("grouped_reducescatter", xs, op, process_set, name, prescale_factor,
                          postscale_factor).wait()

    def join(self, device: int = -1) -> int:
        return int(self.hvd.join(device))

    def _wait(self, handle: Any) -> torch.Tensor:
        """The op's result; sleeps between polls where Horovod's synchronize() would spin, with a deadline
        (core.waiting)."""
        wait_until(lambda: self.hvd.poll(handle), timeout=self.wait_timeout, what="a Horovod collective")
        return self.hvd.synchronize(handle)

    def barrier(self, process_set: ProcessSet = WORLD) -> None:
        """Horovod's barrier, waited for like the other ops (polled, with the deadline): its own
        ``hvd.barrier`` spins, and on shared cores the ranks waiting at a barrier took half the CPU from
        the ranks still working (hvdllm plan measured 4 ranks on 2 cores at 1/3 of the rate)."""
        from horovod.torch import mpi_ops

        ps = self._ps(process_set)
        start = getattr(mpi_ops.mpi_lib, "horovod_torch_barrier", None)
        if start is None or not hasattr(mpi_ops, "_handle_map"):        # another Horovod: its own wait
            self.hvd.barrier(process_set=ps)
            return
        handle = start(ps.process_set_id)
        mpi_ops._handle_map[handle] = (None, None)
        self._wait(handle)


def _splits(x: torch.Tensor, splits: Any, n: int) -> list[int]:
    """Explicit alltoall splits (Horovod's autograd op needs them to route the gradient back)."""
    if splits is None:
        return [x.shape[0] // n] * n
    return [int(v) for v in torch.as_tensor(splits).reshape(-1).tolist()]


def _as_numpy(x: torch.Tensor) -> tuple[Any, torch.dtype]:
    """A contiguous CPU numpy view/copy; bf16 (which numpy lacks) travels as float32."""
    t = x.detach()
    dtype = t.dtype
    if dtype == torch.bfloat16:
        t = t.float()
    return t.cpu().contiguous().numpy(), dtype


class NumpyTorch(NumpyBase):
    """Collectives for the mpi and local backends: torch tensors through the core's numpy code."""

    @staticmethod
    def _back(a: Any, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(a).to(device=like.device, dtype=dtype)

    def allreduce(self, x: torch.Tensor, op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                  name: str | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0
                  ) -> torch.Tensor:
        a, dtype = _as_numpy(x)
        return self._back(self.impl.allreduce(a, op, process_set, prescale_factor, postscale_factor), x, dtype)

    def reducescatter(self, x: torch.Tensor, op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                      name: str | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0
                      ) -> torch.Tensor:
        a, dtype = _as_numpy(x)
        out = self.impl.reducescatter(a, op, process_set, prescale_factor, postscale_factor)
        return self._back(out, x, dtype)

    def alltoall(self, x: torch.Tensor, splits: Any = None, process_set: ProcessSet = WORLD,
                 name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        a, dtype = _as_numpy(x)
        counts = None if splits is None else torch.as_tensor(splits).reshape(-1).tolist()
        out, received = self.impl.alltoall(a, counts, process_set)
        return self._back(out, x, dtype), torch.from_numpy(received)

    def _in_place(self, kind: str, *args: Any, **kwargs: Any) -> Any:
        """``allreduce_``/``grouped_allreduce_``/``broadcast_``: the result written into the inputs."""
        results = getattr(self, kind)(*args, **kwargs)
        if kind.startswith("grouped_"):
            _copy_into(args[0], results)
            return list(args[0])
        _copy_into([args[0]], [results])
        return args[0]

    def allreduce_async_(self, x: torch.Tensor, op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                         name: str | None = None, prescale_factor: float = 1.0,
                         postscale_factor: float = 1.0) -> Deferred:
        """In place on ``x``. A CPU contiguous fp32/fp16/fp64 tensor is reduced without a copy.

        ``name`` is accepted for Horovod parity and unused: MPI matches collectives by call order."""
        zero_copy = x.device.type == "cpu" and x.is_contiguous() and x.dtype != torch.bfloat16
        buf = x.detach().numpy() if zero_copy else _as_numpy(x)[0].copy()
        pending = self.impl.allreduce_async_(buf, op, process_set, prescale_factor, postscale_factor)

        def finish() -> torch.Tensor:
            pending.wait()
            if not zero_copy:
                x.data.copy_(torch.from_numpy(buf).to(x.dtype))
            return x

        return Deferred(finish)

    def broadcast(self, x: torch.Tensor, root_rank: int, process_set: ProcessSet = WORLD,
                  name: str | None = None) -> torch.Tensor:
        a, dtype = _as_numpy(x)
        return self._back(self.impl.broadcast(a, root_rank, process_set), x, dtype)

    def allgather(self, x: torch.Tensor, process_set: ProcessSet = WORLD, name: str | None = None) -> torch.Tensor:
        a, dtype = _as_numpy(x)
        return self._back(self.impl.allgather(a, process_set), x, dtype)


def create(process_sets: Sequence[ProcessSet | Sequence[int]] | None = None) -> HorovodTorch | NumpyTorch:
    """Discover the backend (see hvdllm.core.backend) and initialise it."""
    return create_backend(process_sets, horovod_available, HorovodTorch, NumpyTorch)
