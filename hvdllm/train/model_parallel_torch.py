"""`hvdllm train --tp N`: the tensor-parallel step runner the PyTorch trainer plugs in (``--pp`` > 1:
:mod:`hvdllm.train.pipeline_torch`), and what both model-parallel runners share.

The trainer stays data-parallel in shape: this module gives it (1) the process sets of the
dp x tp x pp grid to register at ``hvd.init``, (2) a :class:`StepRunner` whose model is this rank's
tensor-parallel shard of the same seeded GPT the one-process run builds, (3) the data-parallel group
for the DistributedOptimizer, and (4) gradient clipping on the *global* norm (sharded weights summed
over the tensor-parallel group, replicated ones counted once), so the update equals the unsplit one.
Checkpoints and the final sample use the gathered, unsplit model; checkpoints also hold the unsplit
optimizer state, which :class:`ShardLayout` cuts back into every rank's shards on ``--resume``.
"""
from __future__ import annotations

import types
from typing import Any, Callable

import torch

import hvdllm.torch as hvd
from hvdllm.core.buckets import clip_coefficient
from hvdllm.models.gpt import GPT
from hvdllm.torch.parallel.gpt import parallelize_gpt
from hvdllm.torch.parallel.shards import ShardLayout
from hvdllm.torch.parallel.tensor import vocab_parallel_cross_entropy
from hvdllm.train.model_parallel import check_tp
from hvdllm.train.run_setup import RunSetup
from hvdllm.train.runner_torch import Precision, StepRunner, accumulate_forward_backward


def add_global_norm_clipping(optimizer: Any, model: torch.nn.Module, norm_fn: Callable[[], float],
                             max_grad_norm: float | None) -> Any:
    """Make ``optimizer.synchronize()`` (which ``step()`` calls) clip on ``norm_fn()``, the unsplit
    model's norm, after the data-parallel average; ``optimizer.grad_norm`` then holds that norm. The
    DistributedOptimizer must be built with ``max_grad_norm=None`` (its own norm would be this part's)."""
    reduce_and_average = optimizer.synchronize

    def synchronize(self: Any) -> None:
        reduce_and_average()
        norm = norm_fn()
        self.grad_norm = norm
        if max_grad_norm is not None:
            coef = clip_coefficient(norm, max_grad_norm)
            if coef != 1.0:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(coef)

    optimizer.synchronize = types.MethodType(synchronize, optimizer)
    return optimizer


def runner_parts(s: RunSetup, layout: ShardLayout, device: torch.device) -> dict[str, Any]:
    """The StepRunner fields every model-parallel layout shares: the gathered unsplit model, global-norm
    clipping, the data-parallel group and the layout itself (checkpoints: unsplit optimizer state)."""

    def full_model() -> GPT:
        """The unsplit GPT with the current weights, on every rank (a collective)."""
        plain = GPT(s.gpt)
        plain.load_state_dict(layout.full_state_dict())
        return plain.to(device)

    def prepare_optimizer(optimizer: Any) -> Any:
        return add_global_norm_clipping(optimizer, layout.module, layout.grad_norm, s.cfg.optim.max_grad_norm)

    def generate(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("sample from runner.full_model(): a model-parallel rank cannot generate alone")

    return {"model": layout.module, "full_model": full_model, "prepare_optimizer": prepare_optimizer,
            "generate": generate, "dp_group": layout.grid.dp_group(layout.rank), "shards": layout}


def tensor_parallel_runner(s: RunSetup, precision: Precision, device: torch.device) -> StepRunner:
    """The StepRunner for ``--tp N`` with ``--pp 1`` (``--pp`` > 1: the pipeline runner)."""
    check_tp(s)
    group = s.grid.group("tp", s.rank)
    model = parallelize_gpt(GPT(s.gpt), group).to(device)
    layout = ShardLayout(model, model, s.grid, s.rank, hvd.collectives())

    forward_backward = accumulate_forward_backward(
        lambda x, y: model(x, y, gather_logits=False)[1], precision, device)

    @torch.no_grad()
    def eval_loss_sum(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        with precision.autocast():
            local, _ = model(x, gather_logits=False)
        per_tok = vocab_parallel_cross_entropy(local, y, group, model.vocab_start, reduction="none")
        return per_tok.mean(dim=1).sum(), int(y.shape[0])

    return StepRunner(forward_backward=forward_backward, eval_loss_sum=eval_loss_sum,
                      **runner_parts(s, layout, device))
