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

# PyTorch's moment names -> Keras Adam's slot names (a ZeRO optimizer's ``unsplit_slots`` keys) and attributes
MOMENTS = {"exp_avg": ("momentum", "_momentums"), "exp_avg_sq": ("velocity", "_velocities")}


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

    def _cut(self, arrays: Mapping[str, np.ndarray], key: Callable[[str], str], where: str) -> list[np.ndarray]:
        """Per named variable, this rank's piece of ``arrays[key(name)]`` in Keras layout, checked against
        the variable's shape (ValueError naming the array and both shapes)."""
        out = []
        for n, var, transposed in self.named:
            if key(n) not in arrays:
                raise ValueError(f"{where}: the checkpoint has no {key(n)}")
            piece = self.local(n, arrays[key(n)])
            piece = piece.T if transposed else piece
            if tuple(piece.shape) != tuple(var.shape):
                raise ValueError(f"{where}: {key(n)} cuts to shape {list(piece.shape)}, this rank holds "
                                 f"{list(var.shape)}")
            out.append(piece.astype(np.float32))
        return out

    def load_full_weights(self, arrays: Mapping[str, np.ndarray], where: str) -> None:
        """Copy this rank's shards of the unsplit weights into its variables (no communication)."""
        for (_, var, _), piece in zip(self.named, self._cut(arrays, lambda n: n, where)):
            var.assign(piece)

    # -- gradient norm ------------------------------------------------------------------------------------
    def grad_norm(self, grads: Sequence[tf.Tensor], variables: Sequence[Any]) -> float:
        """L2 norm of the unsplit model's gradient (:meth:`norm_of_squares`); ``grads`` align with ``variables``."""
        return self.norm_of_squares([float(tf.reduce_sum(tf.square(tf.cast(g, tf.float64)))) for g in grads],
                                    variables)

    def norm_of_squares(self, squares: Sequence[float], variables: Sequence[Any]) -> float:
        """L2 norm of the unsplit model's gradient from this rank's per-variable squared norms (aligned with
        ``variables``; a ZeRO optimizer's are already summed over the data-parallel ranks): sharded squares
        summed over tp, replicated ones counted once per stage, then summed over the stages."""
        names = {id(v): n for n, v, _ in self.named}
        sq = np.zeros(2)                                    # [sharded, replicated]
        for s, v in zip(squares, variables):
            sq[0 if self.is_sharded(names.get(id(v), "")) else 1] += float(s)
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
    def _moments(self, optimizer: Any) -> dict[str, list[np.ndarray]]:
        """Per PyTorch moment name, the optimizer's slot of each named variable (Keras layout, this rank's
        tp shard): a ZeRO optimizer's gathered over its data-parallel group (a collective)."""
        if getattr(optimizer, "zero_stage", 0):
            slots = optimizer.unsplit_slots()
            return {m: [slots[(optimizer._get_variable_index(v), slot)] for _, v, _ in self.named]
                    for m, (slot, _) in MOMENTS.items()}
        return {m: [getattr(optimizer, attr)[optimizer._get_variable_index(v)].numpy() for _, v, _ in self.named]
                for m, (_, attr) in MOMENTS.items()}

    def optimizer_state(self, optimizer: Any) -> dict[str, np.ndarray]:
        """``state.<name>.exp_avg`` / ``.exp_avg_sq`` (unsplit, PyTorch layout) and ``iterations``, on every
        rank (a collective)."""
        out = {"iterations": np.asarray(optimizer.iterations.numpy())}
        for moment, values in self._moments(optimizer).items():
            arrays = self.full(self._torch_layout(values))
            out.update({f"state.{n}.{moment}": a for n, a in arrays.items()})
        return out

    def load_optimizer_state(self, optimizer: Any, arrays: Mapping[str, np.ndarray], where: str) -> None:
        """Load :meth:`optimizer_state`'s output (from any tp x pp layout and ``--zero`` stage): each rank
        takes its shards (a ZeRO optimizer: its data-parallel shard of those)."""
        if "iterations" not in arrays:
            raise ValueError(f"{where}: the checkpoint's optimizer state has no iterations")
        pieces = {m: self._cut(arrays, lambda n, m=m: f"state.{n}.{m}", where) for m in MOMENTS}
        if getattr(optimizer, "zero_stage", 0):
            optimizer.load_unsplit_slots({(optimizer._get_variable_index(v), slot): a
                                          for m, (slot, _) in MOMENTS.items()
                                          for (_, v, _), a in zip(self.named, pieces[m])})
        else:
            for m, (_, attr) in MOMENTS.items():
                slots = getattr(optimizer, attr)
                for (_, v, _), a in zip(self.named, pieces[m]):
                    slots[optimizer._get_variable_index(v)].assign(a)
        optimizer.iterations.assign(int(arrays["iterations"]))
