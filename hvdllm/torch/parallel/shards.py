"""How a model-parallel rank's tensors relate to the unsplit GPT's: gather, cut, global norm, optimizer state.

A rank of a tp x pp layout holds a module whose parameter names are the unsplit GPT's
(``h.3.mlp.c_fc.weight`` ...): a :class:`TensorParallelGPT`, or a :class:`GPTStage` of a plain or
tensor-parallel GPT. :class:`ShardLayout` turns tensors named like that module's parameters into the
unsplit model's (gathered over the tensor-parallel group by the model's ``shard_specs``, then merged
over the pipeline stages) and back (each rank cuts its shard). Checkpoints therefore hold the unsplit
weights *and* the unsplit Adam moments keyed by parameter name, which any tp x pp layout can load.

Collectives: tensor-parallel gathers run inside the tp group (every member issues the same ones), the
stage merge is one ``broadcast_object`` per stage in the pp group (root: the stage's rank with this
rank's (dp, tp) coordinates), and the norm's reductions are named by ``name`` where the caller names
its collectives (pipeline stages issue different numbers of ops; Horovod matches them by name).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn as nn

from hvdllm.core.collectives import Collectives
from hvdllm.core.grid import ProcessGrid
from hvdllm.core.ops import Sum
from hvdllm.core.shards import merge_stages
from hvdllm.torch.parallel.gpt import TensorParallelGPT
from hvdllm.torch.parallel.tensor import shard_tensor

__all__ = ["ShardLayout"]


class ShardLayout:
    """This rank's place in a tp x pp layout of a GPT (``tp_model``: the tensor-parallel GPT the
    module's blocks come from, or None when the layers are whole)."""

    def __init__(self, module: nn.Module, tp_model: TensorParallelGPT | None, grid: ProcessGrid, rank: int,
                 collectives: Collectives, name: Callable[[str], str] | None = None) -> None:
        self.module, self.tp_model, self.grid, self.rank, self.collectives = module, tp_model, grid, rank, collectives
        self.coords = grid.coords(rank)
        self.tp_group = grid.group("tp", rank)
        self.pp_set = grid.pp_group(rank)
        self.config = module.config
        self._name = name or (lambda tag: None)

    def describe(self) -> str:
        return f"dp={self.grid.dp} x tp={self.grid.tp} x pp={self.grid.pp}"

    def is_sharded(self, name: str) -> bool:
        return self.tp_model is not None and self.tp_group.size > 1 and name in self.tp_model.shard_specs

    # -- unsplit <-> local ---------------------------------------------------------------------------
    def merge_stages(self, mine: dict[str, Any]) -> dict[str, Any]:
        """Every stage's entries merged, on every stage (a collective over the pp group)."""
        return merge_stages(mine, self.grid, self.rank, self.collectives)

    def full(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unsplit CPU copies of tensors shaped and named like this rank's parameters, for the whole
        model, on every rank (collective: call with the same names on every rank of the tp group)."""
        mine = {}
        for n, t in tensors.items():
            whole = self.tp_model.full_tensor(n, t) if self.is_sharded(n) else t.detach().clone()
            mine[n] = whole.cpu()
        return self.merge_stages(mine)

    def local(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of the unsplit tensor ``full`` of parameter ``name``."""
        if not self.is_sharded(name):
            return full
        dim, segments = self.tp_model.shard_specs[name]
        return shard_tensor(full, dim, self.tp_group.index, self.tp_group.size, segments)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsplit GPT's state dict (the keys of ``GPT.state_dict()``), on every rank."""
        tied = self.config.tie_embeddings
        state = self.full({n: t for n, t in self.module.state_dict().items() if not (tied and n == "lm_head.weight")})
        if tied:
            state["lm_head.weight"] = state["wte.weight"]
        return state

    def load_full_state(self, arrays: Mapping[str, np.ndarray], where: str) -> None:
        """Copy this rank's shards of the unsplit weights ``arrays`` into the module (no communication)."""
        with torch.no_grad():
            for n, t in self.module.state_dict(keep_vars=True).items():
                if n == "lm_head.weight" and self.config.tie_embeddings:
                    continue                     # the token embedding itself (checkpoints hold it once)
                if n not in arrays:
                    raise ValueError(f"{where}: the checkpoint has no {n}")
                piece = self.local(n, torch.from_numpy(np.asarray(arrays[n]).copy()))
                if piece.shape != t.shape:
                    raise ValueError(f"{where}: {n} cuts to shape {list(piece.shape)}, this rank holds {list(t.shape)}")
                t.copy_(piece)

    # -- gradient norm -----------------------------------------------------------------------------------
    def grad_norm(self, squares: Mapping[str, torch.Tensor] | None = None) -> float:
        """L2 norm of the unsplit model's gradient: sharded squares summed over tp, replicated ones
        counted once per stage, then summed over the stages (the tied embedding lives on the first).
        ``squares``: each local parameter's squared gradient norm by name, when the gradients live
        elsewhere (a ZeRO optimizer's shards, already summed over the data-parallel ranks)."""
        sharded = torch.zeros((), dtype=torch.float64)
        replicated = torch.zeros((), dtype=torch.float64)
        for n, p in self.module.named_parameters():
            if squares is not None:
                if n not in squares:
                    continue
                sq = squares[n].detach().double().cpu()
            elif p.grad is None:
                continue
            else:
                sq = p.grad.detach().double().pow(2).sum().cpu()
            if self.is_sharded(n):
                sharded += sq
            else:
                replicated += sq
        if self.tp_group.size > 1:
            sharded = self.collectives.allreduce(sharded, Sum, self.tp_group.process_set,
                                                 name=self._name("grad_norm_tp"))
        total = sharded + replicated
        if self.grid.pp > 1:
            total = self.collectives.allreduce(total, Sum, self.pp_set, name=self._name("grad_norm_pp"))
        return math.sqrt(float(total))

    # -- optimizer state ---------------------------------------------------------------------------------
    def _indexed(self, optimizer: Any) -> list[tuple[str, torch.Tensor]]:
        """(name, parameter) in the optimizer's state-dict index order."""
        names = {id(p): n for n, p in self.module.named_parameters()}
        groups = getattr(optimizer, "model_param_groups", None)   # a ZeRO optimizer steps shard tensors
        if groups is None:
            groups = [g["params"] for g in optimizer.param_groups]
        return [(names[id(p)], p) for ps in groups for p in ps]

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The optimizer's state dict keyed by the unsplit model's parameter names, parameter-shaped
        state (Adam's moments) unsplit, on every rank (a collective). ``param_groups`` keep their
        hyperparameters only."""
        sd = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        moments: dict[str, dict[str, torch.Tensor]] = {}
        for i, (n, p) in enumerate(self._indexed(optimizer)):
            scalars[n] = {}
            for k, v in sd["state"].get(i, {}).items():
                if torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0:
                    moments.setdefault(k, {})[n] = v
                else:
                    scalars[n][k] = v.detach().cpu().clone() if torch.is_tensor(v) else v
        state = self.merge_stages(scalars)
        for k in sorted(moments):
            for n, v in self.full(moments[k]).items():
                state[n][k] = v
        groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(self, optimizer: Any, saved: Mapping[str, Any], where: str) -> None:
        """Load :meth:`optimizer_state`'s output (from any tp x pp layout): each rank takes its shards."""
        local = optimizer.state_dict()
        if len(saved["param_groups"]) != len(local["param_groups"]):
            raise ValueError(f"{where}: {len(saved['param_groups'])} optimizer param groups, this run has "
                             f"{len(local['param_groups'])}")
        state: dict[int, dict[str, Any]] = {}
        for i, (n, p) in enumerate(self._indexed(optimizer)):
            if n not in saved["state"]:
                raise ValueError(f"{where}: the checkpoint's optimizer state has no {n}")
            entry = {}
            for k, v in saved["state"][n].items():
                if torch.is_tensor(v) and v.dim() > 0:
                    v = self.local(n, v)
                    if v.shape != p.shape:
                        raise ValueError(f"{where}: optimizer {k} of {n} cuts to {list(v.shape)}, "
                                         f"the parameter is {list(p.shape)}")
                entry[k] = v
            if entry:
                state[i] = entry
        groups = [{**g, "params": lg["params"]} for g, lg in zip(saved["param_groups"], local["param_groups"])]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
