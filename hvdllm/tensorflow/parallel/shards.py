"""How a model-parallel Keras rank's variables relate to the unsplit GPT's: gather, cut, global norm,
optimizer moments (the Keras twin of :mod:`hvdllm.torch.parallel.shards`).

A rank of a tp x pp layout holds a :class:`GPTStage` (of a plain or tensor-parallel Keras GPT) whose
variables carry the unsplit PyTorch GPT's parameter names (``GPTStage.named_weights``). Arrays keyed by
those names, in PyTorch's layout (Dense kernels transposed), are gathered over the tensor-parallel
group by the model's ``shard_specs`` and merged over the pipeline stages (a ``broadcast_object`` per
stage in the pp group), or cut back into this rank's shards (:func:`hvdllm.core.shards.shard_array`).
Checkpoints thus hold the unsplit weights and Adam moments keyed by parameter name, which any
tp x pp layout (and a one-process run, for the weights) loads.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from hvdllm.core.collectives import Collectives
from hvdllm.core.grid import ProcessGrid
from hvdllm.core.ops import Sum
from hvdllm.core.shards import join_shards, merge_stages, shard_array

__all__ = ["ShardLayout"]

MOMENTS = {"exp_avg": "_momentums", "exp_avg_sq": "_velocities"}   # PyTorch's names -> Keras Adam's slots


class ShardLayout:
    """This rank's place in a tp x pp layout of a Keras GPT. ``module``: its :class:`GPTStage`;
    ``tp_model``: the :class:`TensorParallelGPT` the stage's layers come from, or None (whole layers)."""

    def __init__(self, module: Any, tp_model: Any, grid: ProcessGrid, rank: int, collectives: Collectives,
                 name: Callable[[str], str] | None = None) -> None:
        self.module, self.tp_model, self.grid, self.rank, self.collectives = module, tp_model, grid, rank, collectives
        self.coords = grid.coords(rank)
        self.tp_group = grid.group("tp", rank)
        self.pp_set = grid.pp_group(rank)
        self.named = module.named_weights()                 # (name, variable, transposed)
        self._name = name or (lambda tag: None)

    def is_sharded(self, name: str) -> bool:
        return self.tp_model is not None and self.tp_group.size > 1 and name in self.tp_model.shard_specs

    # -- unsplit <-> local --------------------------------------------------------------------------------
    def merge_stages(self, mine: dict[str, Any]) -> dict[str, Any]:
        """Every stage's entries merged, on every stage (a collective over the pp group)."""
        return merge_stages(mine, self.grid, self.rank, self.collectives)

    def full(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Unsplit arrays of the whole model from this rank's shards (PyTorch names and layout), on every
        rank (collective: the same names on every rank of the tp group, in the same order)."""
        mine = {}
        for n, a in arrays.items():
            if self.is_sharded(n):
                dim, segments = self.tp_model.shard_specs[n]
                stacked = self.collectives.allgather(tf.convert_to_tensor(a)[None], self.tp_group.process_set,
                                                     name=self._name("gather"))
                a = join_shards(list(np.asarray(stacked)), dim, segments)
            mine[n] = np.asarray(a)
        return self.merge_stages(mine)

    def local(self, name: str, full: np.ndarray) -> np.ndarray:
        """This rank's shard of the unsplit array ``full`` of parameter ``name`` (PyTorch layout)."""
        if not self.is_sharded(name):
            return np.asarray(full)
        dim, segments = self.tp_model.shard_specs[name]
        return shard_array(np.asarray(full), dim, self.tp_group.index, self.tp_group.size, segments)

    def _torch_layout(self, values: Sequence[Any]) -> dict[str, np.ndarray]:
        """Arrays aligned with ``self.named`` (Keras layout) keyed by name, in PyTorch's layout."""
        out = {}
        for (n, _, transposed), v in zip(self.named, values):
            a = np.asarray(v)
            out[n] = np.ascontiguousarray(a.T if transposed else a)
        return out

    def full_weights(self) -> dict[str, np.ndarray]:
        """The unsplit GPT's weights under PyTorch's names and layout (``torch_state_dict``'s keys)."""
        return self.full(self._torch_layout([v.numpy() for _, v, _ in self.named]))

    def _assign_local(self, variables: Sequence[Any], arrays: Mapping[str, np.ndarray], key: Callable[[str], str],
                      where: str) -> None:
        for (n, _, transposed), var in zip(self.named, variables):
            if key(n) not in arrays:
                raise ValueError(f"{where}: the checkpoint has no {key(n)}")
            piece = self.local(n, arrays[key(n)])
            piece = piece.T if transposed else piece
            if tuple(piece.shape) != tuple(var.shape):
                raise ValueError(f"{where}: {key(n)} cuts to shape {list(piece.shape)}, this rank holds "
                                 f"{list(var.shape)}")
            var.assign(piece.astype(np.float32))

    def load_full_weights(self, arrays: Mapping[str, np.ndarray], where: str) -> None:
        """Copy this rank's shards of the unsplit weights into its variables (no communication)."""
        self._assign_local([v for _, v, _ in self.named], arrays, lambda n: n, where)

    # -- gradient norm ------------------------------------------------------------------------------------
    def grad_norm(self, grads: Sequence[tf.Tensor], variables: Sequence[Any]) -> float:
        """L2 norm of the unsplit model's gradient: sharded squares summed over tp, replicated ones counted
        once per stage, then summed over the stages. ``grads`` align with ``variables``."""
        names = {id(v): n for n, v, _ in self.named}
        sq = np.zeros(2)                                    # [sharded, replicated]
        for g, v in zip(grads, variables):
            sq[0 if self.is_sharded(names.get(id(v), "")) else 1] += float(tf.reduce_sum(tf.square(
                tf.cast(g, tf.float64))))
        sharded, replicated = sq
        if self.tp_group.size > 1:
            sharded = float(self.collectives.allreduce(tf.constant([sharded], tf.float64), Sum,
                                                       self.tp_group.process_set, name=self._name("grad_norm_tp"))[0])
        total = sharded + replicated
        if self.grid.pp > 1:
            total = float(self.collectives.allreduce(tf.constant([total], tf.float64), Sum, self.pp_set,
                                                     name=self._name("grad_norm_pp"))[0])
        return math.sqrt(total)

    # -- optimizer state (Keras Adam/AdamW: iterations, momentums, velocities) ---------------------------
    def _slots(self, optimizer: Any, attr: str) -> list[Any]:
        slots = getattr(optimizer, attr)
        return [slots[optimizer._get_variable_index(v)] for _, v, _ in self.named]

    def optimizer_state(self, optimizer: Any) -> dict[str, np.ndarray]:
        """``state.<name>.exp_avg`` / ``.exp_avg_sq`` (unsplit, PyTorch layout) and ``iterations``, on every
        rank (a collective)."""
        out = {"iterations": np.asarray(optimizer.iterations.numpy())}
        for moment, attr in MOMENTS.items():
            arrays = self.full(self._torch_layout([s.numpy() for s in self._slots(optimizer, attr)]))
            out.update({f"state.{n}.{moment}": a for n, a in arrays.items()})
        return out

    def load_optimizer_state(self, optimizer: Any, arrays: Mapping[str, np.ndarray], where: str) -> None:
        """Load :meth:`optimizer_state`'s output (from any tp x pp layout): each rank takes its shards."""
        if "iterations" not in arrays:
            raise ValueError(f"{where}: the checkpoint's optimizer state has no iterations")
        for moment, attr in MOMENTS.items():
            self._assign_local(self._slots(optimizer, attr), arrays, lambda n: f"state.{n}.{moment}", where)
        optimizer.iterations.assign(int(arrays["iterations"]))
