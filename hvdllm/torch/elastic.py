"""Elastic training for PyTorch with Horovod's names (``hvd.elastic``), on hvdllm's backends.

    import hvdllm.torch as hvd
    hvd.init()
    state = hvd.elastic.TorchState(model=model, optimizer=optimizer, sampler=sampler, epoch=0, batch=0)

    @hvd.elastic.run
    def train(state): ...  # state.commit() every few batches

Under ``horovodrun --min-np A --max-np B --host-discovery-script S`` (Gloo) a worker that dies makes
the survivors restore the last commit, re-initialise hvdllm's backend (and every DistributedOptimizer
in the state) for the new set of workers, and go on; an added worker receives rank 0's state. On one
process (any backend) ``run`` simply runs the function, and commit/restore work in memory.
"""
from __future__ import annotations

import copy
import math
import random
from typing import Any, Callable

import torch

from hvdllm.core import elastic as _core
from hvdllm.torch import basics
from hvdllm.torch.sync import broadcast_optimizer_state, broadcast_parameters


def _reset() -> None:
    basics.reinit()


def run(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: run ``func(state, ...)`` elastically (see horovod.torch.elastic.run). No collective
    may run before the decorated call: new workers sync the state there."""
    return _core.run_fn(func, _reset, basics.backend, basics.size)


class ObjectState(_core.ObjectState):
    """Picklable objects given as keyword arguments, kept as attributes and synced from rank 0."""

    def __init__(self, bcast_object: Callable[[Any], Any] | None = None, get_rank: Callable[[], int] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(bcast_object or basics.broadcast_object, get_rank or basics.rank, **kwargs)


class ElasticSampler(torch.utils.data.Sampler):
    """Horovod's ElasticSampler: shards the not-yet-processed indices of the epoch over the current
    workers, re-sharding after a reset. Call ``record_batch`` after each batch and ``set_epoch`` at the
    end of each epoch; keep the sampler in the TorchState."""

    def __init__(self, dataset: Any, shuffle: bool = True, seed: int = 0) -> None:
        self.dataset, self.shuffle, self.seed = dataset, shuffle, seed
        self.epoch = 0
        self.processed_num = 0
        self.reset()

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.processed_num = epoch, 0
        self.reset()

    def record_batch(self, batch_idx: int, batch_size: int) -> None:
        """Count one batch of ``batch_size`` per worker as processed."""
        self.processed_num += batch_size * self.num_replicas

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "processed_num": self.processed_num}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.epoch, self.processed_num = state_dict["epoch"], state_dict["processed_num"]
        self.reset()

    def reset(self) -> None:
        """Re-read rank and size; shard what is left of this epoch."""
        self.num_replicas, self.rank = basics.size(), basics.rank()
        indices = list(range(len(self.dataset)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(indices)
        self.remaining_indices = indices[self.processed_num:]
        self.num_samples = math.ceil(len(self.remaining_indices) / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self):  # type: ignore[no-untyped-def]
        indices = self.remaining_indices + self.remaining_indices[:self.total_size - len(self.remaining_indices)]
        return iter(indices[self.rank:self.total_size:self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


class _Handler:
    """Save/restore/sync of one stateful object (a model, an optimizer, a sampler)."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.save()

    def save(self) -> None:
        self._saved = copy.deepcopy(self.value.state_dict())

    def restore(self) -> None:
        self.value.load_state_dict(self._saved)

    def reset(self) -> None:
        pass


class _ModelHandler(_Handler):
    def sync(self) -> None:
        broadcast_parameters(self.value.state_dict(), root_rank=0)


class _OptimizerHandler(_Handler):
    def sync(self) -> None:
        broadcast_optimizer_state(self.value, root_rank=0)

    def reset(self) -> None:
        if hasattr(self.value, "reset_world"):  # hvdllm's DistributedOptimizer: new backend, new size
            self.value.reset_world()


class _SamplerHandler(_Handler):
    def sync(self) -> None:
        self.value.load_state_dict(basics.broadcast_object(self.value.state_dict()))


_HANDLERS: tuple[tuple[type, type[_Handler]], ...] = (
    (torch.nn.Module, _ModelHandler), (torch.optim.Optimizer, _OptimizerHandler), (ElasticSampler, _SamplerHandler))


def _handler(value: Any) -> _Handler | None:
    return next((cls(value) for kind, cls in _HANDLERS if isinstance(value, kind)), None)


class TorchState(ObjectState):
    """Models, optimizers and ElasticSamplers (any number, as keyword arguments) plus picklable objects:
    each is an attribute; commit() copies them to host memory, restore() puts the copy back, and a
    sync gives every worker rank 0's."""

    def __init__(self, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                 **kwargs: Any) -> None:
        kwargs.update(model=model, optimizer=optimizer)
        handlers = {k: h for k, h in ((k, _handler(v)) for k, v in kwargs.items()) if h is not None}
        self._handlers = handlers
        for name, h in handlers.items():
            setattr(self, name, h.value)
        super().__init__(**{k: v for k, v in kwargs.items() if k not in handlers})

    def _each(self, action: str) -> None:
        for h in self._handlers.values():
            getattr(h, action)()

    def save(self) -> None:
        self._each("save")
        super().save()

    def restore(self) -> None:
        self._each("restore")
        super().restore()

    def sync(self) -> None:
        self._each("sync")
        super().sync()

    def reset(self) -> None:
        self._each("reset")

    def __setattr__(self, name: str, value: Any) -> None:
        handlers = self.__dict__.get("_handlers", {})
        if name in handlers and handlers[name].value is not value:
            handlers[name].value = value
            handlers[name].save()
        super().__setattr__(name, value)


__all__ = ["run", "TorchState", "ObjectState", "ElasticSampler"]
