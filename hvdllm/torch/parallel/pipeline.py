"""Pipeline parallelism for PyTorch: GPT stage modules and an executor that runs the core's schedules.

Each rank owns one stage (a contiguous run of transformer blocks, plus the embeddings on the first
stage and the final norm, head and loss on the last). :class:`PipelineExecutor` executes the per-stage
program of :func:`hvdllm.core.pipeline.build_schedule` (GPipe or 1F1B) over micro-batches:
activations go forward and their gradients backward between adjacent stages as a broadcast inside the
two-rank process set of that link (Horovod has no send/recv; the same call works on the mpi and local
backends). Broadcasts are named per link and sequence number so Horovod matches them even when the
stages issue different numbers of other collectives (their data-parallel reductions differ).

Tied embeddings: the first stage owns the token embedding (a parameter); the last stage's LM head
holds a plain tensor copy, refreshed from the first stage at the start of every step (a broadcast in
the embedding group). After its last backward the last stage sends the head's gradient back, and the
first stage adds it to the embedding's gradient *inside* its own last backward (a tensor hook), so the
parameter's gradient is complete when autograd delivers it: hook-based data-parallel reducers (the
DistributedOptimizer, with ``backward_passes_per_step`` = micro-batches) see the final value.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, ContextManager, Sequence

import torch
import torch.nn as nn
from torch.nn import functional as F

from hvdllm.core.collectives import Collectives
from hvdllm.core.grid import ProcessGrid
from hvdllm.core.pipeline import StageProgram, partition_layers
from hvdllm.core.process_sets import ProcessSet
from hvdllm.torch import basics

__all__ = ["GPTStage", "PipelineExecutor", "gpt_stage_bounds", "ActivationMeter"]


def gpt_stage_bounds(model: nn.Module, num_stages: int) -> list[tuple[int, int]]:
    """[start, end) block ranges per stage, balancing parameter counts (embeddings on the first stage,
    final norm and an untied head on the last)."""
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.h]
    first = sum(p.numel() for m in (model.wte, model.wpe) for p in m.parameters())
    last = sum(p.numel() for p in model.ln_f.parameters())
    if not model.config.tie_embeddings:
        last += model.lm_head.weight.numel()
    return partition_layers(blocks, num_stages, first_extra=first, last_extra=last)


class GPTStage(nn.Module):
    """Stage ``stage`` of ``num_stages`` of a GPT (plain or :class:`TensorParallelGPT`).

    Parameter names are the model's (``h.3.mlp.c_fc.weight``...). With tied embeddings the last stage's
    ``lm_head.weight`` is a plain tensor (not a parameter) that the executor refreshes from the first
    stage. ``model`` is consumed: parts other stages own are dropped from it.
    """

    def __init__(self, model: nn.Module, stage: int, num_stages: int,
                 bounds: Sequence[tuple[int, int]] | None = None) -> None:
        super().__init__()
        bounds = list(bounds) if bounds is not None else gpt_stage_bounds(model, num_stages)
        if len(bounds) != num_stages or not 0 <= stage < num_stages:
            raise ValueError(f"stage {stage} of {num_stages} does not fit the partition {bounds}")
        self.config = model.config
        self.stage, self.num_stages = stage, num_stages
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        self.start, self.end = bounds[stage]
        self.h = nn.ModuleDict({str(i): model.h[i] for i in range(self.start, self.end)})
        tied = model.config.tie_embeddings
        if self.is_first:
            self.wte, self.wpe, self.drop = model.wte, model.wpe, model.drop
        if self.is_last:
            self.ln_f, self.lm_head = model.ln_f, model.lm_head
        # Tied embedding across stages: the first stage's parameter, the last stage's head holder.
        shared = tied and num_stages > 1
        self.__dict__["tied_weight"] = model.wte.weight if shared and self.is_first else None
        self.__dict__["tied_head"] = model.lm_head if shared and self.is_last else None
        if self.tied_head is not None:
            copy = self.tied_head.weight.detach().clone()
            del self.tied_head.weight              # a parameter no more: the first stage owns it
            self.tied_head.weight = copy
        # Keep the model's own embed/head/loss code without registering its (other stages') parameters.
        self.__dict__["_model"] = model
        model.h = nn.ModuleList()
        if not self.is_first:
            model.wpe = model.wte = None
        if not self.is_last:
            model.ln_f = model.lm_head = None

    def activation_shape(self, idx: torch.Tensor) -> tuple[int, ...]:
        """Shape of the activation this stage receives or sends for a micro-batch of token ids."""
        return (*idx.shape, self.config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (first stage) or the previous stage's activation -> this stage's output."""
        if self.is_first:
            x = self._model.embed(x)
        for block in self.h.values():
            x = block(x)
        return self._model.head(x) if self.is_last else x

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the last stage's logits (vocabulary-parallel for a TP model): the mean over
        all positions, or per position (``reduction="none"``, shaped like ``targets``)."""
        if hasattr(self._model, "loss"):
            return self._model.loss(logits, targets, reduction)
        per = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), reduction=reduction)
        return per.view(targets.shape) if reduction == "none" else per


class ActivationMeter:
    """Bytes of activations saved for backward that are alive right now, and the peak.

    Counts each storage once (views share it) and skips parameters, through
    ``torch.autograd.graph.saved_tensors_hooks``; a storage is released when the autograd graph that
    saved it is freed (after its backward).
    """

    def __init__(self, exclude: Sequence[torch.Tensor] = ()) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._count: dict[int, int] = {}
        self._bytes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self._count[key] -= 1
        if not self._count[key]:
            del self._count[key]
            self.live -= self._bytes.pop(key)

    def pack(self, t: torch.Tensor) -> Any:
        key = t.untyped_storage().data_ptr()
        if key in self._exclude or key == 0:
            return t
        if key not in self._count:
            self._count[key] = 0
            self._bytes[key] = t.untyped_storage().nbytes()
            self.live += self._bytes[key]
            self.peak = max(self.peak, self.live)
        self._count[key] += 1
        box = _Saved(t)
        weakref.finalize(box, self._release, key)
        return box

    @staticmethod
    def unpack(box: Any) -> torch.Tensor:
        return box.t if isinstance(box, _Saved) else box

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Saved:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class PipelineExecutor(StageProgram):
    """Runs one stage of a pipeline over micro-batches with a GPipe or 1F1B schedule.

    ``step(inputs, targets)`` does the forwards and backwards of all micro-batches, leaving in each
    parameter's ``.grad`` the gradient of the mean loss over the micro-batches (as the unsplit model's
    backward of the mean over the whole batch), and returns that loss on every stage. Call the
    optimizer (data-parallel inside ``grid.dp_group``) afterwards.
    """

    def __init__(self, stage_module: GPTStage, grid: ProcessGrid, rank: int, schedule: str = "1f1b",
                 collectives: Collectives | None = None, track_memory: bool = False,
                 autocast: Callable[[], ContextManager[Any]] | None = None) -> None:
        super().__init__(grid, rank, schedule)
        if stage_module.stage != self.stage or stage_module.num_stages != grid.pp:
            raise ValueError(f"stage module {stage_module.stage}/{stage_module.num_stages} does not match "
                             f"{grid.describe(rank)}")
        self.collectives = collectives if collectives is not None else basics.collectives()
        self.module = stage_module
        shares = stage_module.tied_weight is not None or getattr(stage_module, "tied_head", None) is not None
        self.emb_set = grid.embedding_group(rank) if shares else None
        self.meter = ActivationMeter(list(stage_module.parameters())) if track_memory else None
        self.autocast = autocast if autocast is not None else contextlib.nullcontext

    def _exchange(self, x: torch.Tensor, root: int, ps: ProcessSet, tag: str) -> torch.Tensor:
        """Broadcast ``x`` from ``root`` in ``ps``; 16-bit tensors (autocast outputs) travel as fp32 (exact
        both ways; not every backend moves bf16) and come back in their own dtype."""
        if x.dtype in (torch.bfloat16, torch.float16):
            return self.collectives.broadcast(x.float().contiguous(), root, ps, name=self._name(tag)).to(x.dtype)
        return self.collectives.broadcast(x.contiguous(), root, ps, name=self._name(tag))

    def refresh_tied_head(self) -> tuple[torch.Tensor | None, Any]:
        """Copy the first stage's current embedding into the last stage's tied head (a broadcast in the
        embedding group); returns (the embedding parameter on the first stage, the head on the last)."""
        mod = self.module
        owner, head = (mod.tied_weight, getattr(mod, "tied_head", None)) if self.emb_set is not None else (None, None)
        if owner is not None:                       # the first stage sends the current embedding ...
            self._exchange(owner.detach(), self.first_rank, self.emb_set, "emb")
        if head is not None:                        # ... into the last stage's head
            w = self._exchange(torch.empty_like(head.weight), self.first_rank, self.emb_set, "emb")
            head.weight = w.requires_grad_()
        return owner, head

    @torch.no_grad()
    def eval_loss_sum(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward of one batch through the stages (no schedule, no backward): the sum over sequences of
        each sequence's mean loss, on every stage (float64)."""
        mod = self.module
        self.refresh_tied_head()                    # the head must see the embedding as updated since
        h = x
        if not mod.is_first:
            buf = torch.zeros(mod.activation_shape(x), dtype=next(mod.parameters()).dtype)
            h = self._exchange(buf, self.prev_rank, self.prev_set, f"eval.{self.link_prev}")
        with self.autocast():
            h = mod(h)
        if not mod.is_last:
            self._exchange(h, self.rank, self.next_set, f"eval.{self.link_next}")
            total = torch.zeros((), dtype=torch.float64)
        else:
            total = mod.loss(h, y, reduction="none").mean(dim=1).sum().double()
        if self.num_stages > 1:
            total = self.collectives.broadcast(total, self.last_rank, self.pp_set, name=self._name("eval_loss"))
        return total

    def step(self, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
        """Forward and backward of every micro-batch (token ids and targets, one per micro-batch)."""
        m = len(inputs)
        if m < 1 or len(targets) != m:
            raise ValueError(f"need one target per micro-batch and at least one micro-batch, got "
                             f"{len(inputs)} inputs and {len(targets)} targets")
        mod, dtype = self.module, next(self.module.parameters()).dtype
        recv_in: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        out_grads: dict[int, torch.Tensor] = {}
        in_grads: dict[int, torch.Tensor] = {}
        total = torch.zeros((), dtype=torch.float64)
        owner, head = self.refresh_tied_head()
        actions = self.schedule(m).actions[self.stage]
        last_backward = max(i for i, a in enumerate(actions) if a.op == "backward")
        for i, a in enumerate(actions):
            mb = a.mb
            if a.op == "recv_act":
                buf = torch.zeros(mod.activation_shape(inputs[mb]), dtype=dtype)
                recv_in[mb] = self._exchange(buf, self.prev_rank, self.prev_set, self.link_prev).requires_grad_()
            elif a.op == "forward":
                x = inputs[mb] if mod.is_first else recv_in[mb]
                with self.meter.hooks() if self.meter is not None else contextlib.nullcontext(), self.autocast():
                    out = mod(x)
                    if mod.is_last:
                        out = mod.loss(out, targets[mb]) / m
                if mod.is_last:
                    total += out.detach().double()
                outputs[mb] = out
            elif a.op == "send_act":
                self._exchange(outputs[mb].detach(), self.rank, self.next_set, self.link_next)
            elif a.op == "recv_grad":
                buf = torch.zeros_like(outputs[mb])      # (the output's dtype: autocast may make it 16-bit)
                out_grads[mb] = self._exchange(buf, self.next_rank, self.next_set, self.link_next)
            elif a.op == "backward":
                out = outputs.pop(mb)
                hook = None
                if owner is not None and i == last_backward:   # the head's gradient joins the last backward
                    head_grad = self._exchange(torch.zeros_like(owner), self.last_rank, self.emb_set, "emb")
                    hook = owner.register_hook(lambda g: g + head_grad)
                torch.autograd.backward(out, None if mod.is_last else out_grads.pop(mb))
                if hook is not None:
                    hook.remove()
                if not mod.is_first:
                    x = recv_in.pop(mb)
                    in_grads[mb] = x.grad if x.grad is not None else torch.zeros_like(x)
            elif a.op == "send_grad":
                self._exchange(in_grads.pop(mb), self.rank, self.prev_set, self.link_prev)
        if head is not None:
            g = head.weight.grad if head.weight.grad is not None else torch.zeros_like(head.weight)
            self._exchange(g, self.rank, self.emb_set, "emb")
        if self.num_stages > 1:
            total = self.collectives.broadcast(total, self.last_rank, self.pp_set, name=self._name("loss"))
        return float(total)
