"""`hvdllm train --tp N`: the tensor-parallel step runner the PyTorch trainer plugs in (``--pp`` > 1:
:mod:`hvdllm.train.pipeline_torch`), and what both model-parallel runners share.

The trainer stays data-parallel in shape: this module gives it (1) the process sets of the
dp x tp x pp grid to register at ``hvd.init``, (2) a :class:`StepRunner` whose model is this rank's
tensor-parallel shard of the same seeded GPT the one-process run builds, (3) the data-parallel group
for the DistributedOptimizer, and (4) the *global* gradient norm for its ``grad_norm_fn`` hook (sharded
weights summed over the tensor-parallel group, replicated ones counted once), so clipping, hence the
update, equals the unsplit one.
Checkpoints and the final sample use the gathered, unsplit model; checkpoints also hold the unsplit
optimizer state, which :class:`ShardLayout` cuts back into every rank's shards on ``--resume``.
"""
from __future__ import annotations

from typing import Any

import torch

import hvdllm.torch as hvd
from hvdllm.core.backend import launched_size
from hvdllm.core.grid import ProcessGrid
from hvdllm.core.process_sets import ProcessSet
from hvdllm.models.gpt import GPT
from hvdllm.torch.parallel.gpt import parallelize_gpt
from hvdllm.torch.parallel.shards import ShardLayout
from hvdllm.torch.parallel.tensor import vocab_parallel_cross_entropy
from hvdllm.train.run_setup import RunSetup
from hvdllm.train.config import ConfigError
from hvdllm.train.runner_torch import Precision, StepRunner, accumulate_forward_backward


def grid_process_sets(tp: int, pp: int, world_size: int | None = None) -> list[ProcessSet] | None:
    """The process sets ``hvd.init`` must register for a tp x pp job: None for plain data parallelism
    (``hvd.init()``'s defaults), [] when the grid does not fit (the trainer's validation then reports
    that as bad input)."""
    if tp == 1 and pp == 1:
        return None
    n = launched_size() if world_size is None else world_size
    try:
        grid = ProcessGrid.infer(n, tp=tp, pp=pp)
    except ValueError:
        return []
    sets = grid.process_sets()
    if grid.dp == 1:        # one-rank data-parallel groups: the DistributedOptimizer still gets a set
        sets += [ProcessSet([r]) for r in range(n)]
    return sets


def check_tp(s: RunSetup) -> None:
    """``--tp N`` must divide the attention heads and the vocabulary (a one-line ConfigError)."""
    tp = s.cfg.parallel.tp
    if s.gpt.n_head % tp or s.gpt.vocab_size % tp:
        raise ConfigError(f"--tp {tp}: model.n_head={s.gpt.n_head} and model.vocab_size={s.gpt.vocab_size} "
                          f"must both be divisible by it")


def runner_parts(s: RunSetup, layout: ShardLayout, device: torch.device) -> dict[str, Any]:
    """The StepRunner fields every model-parallel layout shares: the gathered unsplit model, the global
    gradient norm, the data-parallel group and the layout itself (checkpoints: unsplit optimizer state)."""

    def full_model() -> GPT:
        """The unsplit GPT with the current weights, on every rank (a collective)."""
        plain = GPT(s.gpt)
        plain.load_state_dict(layout.full_state_dict())
        return plain.to(device)

    def generate(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("sample from runner.full_model(): a model-parallel rank cannot generate alone")

    return {"model": layout.module, "full_model": full_model, "grad_norm": layout.grad_norm,
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
