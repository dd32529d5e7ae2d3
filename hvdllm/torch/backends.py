"""hvdllm.torch's backends: Horovod's torch ops, or the core's numpy collectives (mpi, local)."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from hvdllm.core.ops import Average, ReduceOp
from hvdllm.core.process_sets import WORLD, ProcessSet
from hvdllm.core.backends import HorovodBase, NumpyBase, create_backend
from hvdllm.core.waiting import wait_until


def horovod_available() -> bool:
    """Horovod is installed *and* built with PyTorch support."""
    try:
        import horovod.torch  # noqa: F401
    except Exception:  # ImportError, or a missing/incompatible extension library
        return False
    return True


def _differentiable(x: torch.Tensor) -> bool:
    """Horovod's blocking ops are autograd functions; keep them where a gradient must flow back."""
    return x.requires_grad and torch.is_grad_enabled()


class _Waited:
    def __init__(self, fn: Any) -> None:
        self._fn, self._result, self._done = fn, None, False

    def wait(self) -> Any:
        if not self._done:
            self._result, self._done = self._fn(), True
        return self._result


class HorovodTorch(HorovodBase):
    """Collectives on horovod.torch (Gloo or MPI controller, whatever horovodrun chose)."""

    def __init__(self, process_sets: Sequence[ProcessSet], model_parallel: bool) -> None:
        import horovod.torch as hvd

        super().__init__(hvd, process_sets, has_accelerator=torch.cuda.is_available(),
                         model_parallel=model_parallel)

    def allreduce(self, x: torch.Tensor, op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                  name: str | None = None) -> torch.Tensor:
        if x.dtype == torch.bfloat16:  # Horovod's CPU ops have no bf16: reduce in fp32
            return self.allreduce(x.float(), op, process_set, name).to(torch.bfloat16)
        if _differentiable(x):
            return self.hvd.allreduce(x, op=self._op(op), process_set=self._ps(process_set), name=name)
        return self._wait(self.hvd.allreduce_async(x, name=name, op=self._op(op), process_set=self._ps(process_set)))

    def allreduce_async_(self, x: torch.Tensor, op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                         name: str | None = None) -> _Waited:
        """In place on ``x``; bf16 tensors travel as fp32 (a copy), others without one.

        A fixed ``name`` per recurring tensor lets Horovod's response cache skip the negotiation."""
        buf = x.float() if x.dtype == torch.bfloat16 else x
        handle = self.hvd.allreduce_async_(buf, name=name, op=self._op(op), process_set=self._ps(process_set))

        def finish() -> torch.Tensor:
            self._wait(handle)
            if buf is not x:
                x.data.copy_(buf)
            return x

        return _Waited(finish)

    def grouped_allreduce(self, xs: Sequence[torch.Tensor], op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                          name: str | None = None) -> list[torch.Tensor]:
        wire = [x.float() if x.dtype == torch.bfloat16 else x for x in xs]
        kw = {"name": name, "op": self._op(op), "process_set": self._ps(process_set)}
        if any(_differentiable(x) for x in wire):
            out = self.hvd.grouped_allreduce(wire, **kw)
        else:
            out = self._wait(self.hvd.grouped_allreduce_async(wire, **kw))
        return [o.to(x.dtype) for o, x in zip(out, xs)]

    def broadcast(self, x: torch.Tensor, root_rank: int, process_set: ProcessSet = WORLD,
                  name: str | None = None) -> torch.Tensor:
        if _differentiable(x):
            return self.hvd.broadcast(x, root_rank, process_set=self._ps(process_set), name=name)
        return self._wait(self.hvd.broadcast_async(x, root_rank, name=name, process_set=self._ps(process_set)))

    def allgather(self, x: torch.Tensor, process_set: ProcessSet = WORLD, name: str | None = None) -> torch.Tensor:
        x = x if x.dim() else x.reshape(1)
        if _differentiable(x):
            return self.hvd.allgather(x, name=name, process_set=self._ps(process_set))
        return self._wait(self.hvd.allgather_async(x, name=name, process_set=self._ps(process_set)))

    def _wait(self, handle: Any) -> torch.Tensor:
        """The op's result; sleeps between polls where Horovod's synchronize() would spin, with a deadline
        (core.waiting)."""
        wait_until(lambda: self.hvd.poll(handle), timeout=self.wait_timeout, what="a Horovod collective")
        return self.hvd.synchronize(handle)

    def barrier(self, process_set: ProcessSet = WORLD) -> None:
        self.hvd.barrier(process_set=self._ps(process_set))


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
                  name: str | None = None) -> torch.Tensor:
        a, dtype = _as_numpy(x)
        return self._back(self.impl.allreduce(a, op, process_set), x, dtype)

    def allreduce_async_(self, x: torch.Tensor, op: ReduceOp = Average, process_set: ProcessSet = WORLD,
                         name: str | None = None) -> _Waited:
        """In place on ``x``. A CPU contiguous fp32/fp16/fp64 tensor is reduced without a copy.

        ``name`` is accepted for Horovod parity and unused: MPI matches collectives by call order."""
        zero_copy = x.device.type == "cpu" and x.is_contiguous() and x.dtype != torch.bfloat16
        buf = x.detach().numpy() if zero_copy else _as_numpy(x)[0].copy()
        pending = self.impl.allreduce_async_(buf, op, process_set)

        def finish() -> torch.Tensor:
            pending.wait()
            if not zero_copy:
                x.data.copy_(torch.from_numpy(buf).to(x.dtype))
            return x

        return _Waited(finish)

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
