"""`hvdllm train --pp N [--tp T]`: the pipeline-parallel step runner the PyTorch trainer plugs in.

Each rank holds one stage (:class:`GPTStage`) of the same seeded GPT the one-process run builds; with
``--tp T`` > 1 the stage is this rank's tensor-parallel shard of the stage's layers (the stage
partition is computed on the unsplit model, so every tp rank of a stage holds the same layers).
Activations passed between stages are the full hidden states (replicated inside a tp group), so each
rank exchanges them with the rank of the same (dp, tp) coordinates on the adjacent stage; the last
stage's loss and evaluation use the vocabulary-parallel cross-entropy. :class:`PipelineExecutor` runs
the step's micro-batches (the gradient-accumulation count) with the configured schedule
(``parallel.schedule``: 1f1b or gpipe). Gradient clipping, the gathered model and the checkpointed
optimizer state come from :class:`ShardLayout` (the unsplit model's norm and tensors). Every
collective issued here is named deterministically: Horovod matches ops by name, and stages issue
different numbers of collectives.
"""
from __future__ import annotations

import itertools
import torch

import hvdllm.torch as hvd
from hvdllm.models.gpt import GPT
from hvdllm.torch.parallel.gpt import parallelize_gpt
from hvdllm.torch.parallel.pipeline import GPTStage, PipelineExecutor, gpt_stage_bounds
from hvdllm.torch.parallel.shards import ShardLayout
from hvdllm.train.run_setup import RunSetup
from hvdllm.train.config import ConfigError
from hvdllm.train.model_parallel import check_tp
from hvdllm.train.model_parallel_torch import runner_parts
from hvdllm.train.runner_torch import Batch, Precision, StepRunner


def pipeline_runner(s: RunSetup, precision: Precision, device: torch.device) -> StepRunner:
    """The StepRunner for ``--pp N`` (N > 1, any ``--tp``): see the module docstring."""
    tp, pp = s.cfg.parallel.tp, s.cfg.parallel.pp
    if s.cfg.run.precision == "fp16":
        raise ConfigError(f"run.precision=fp16 with --pp {pp}: the pipeline has no loss scaling; "
                          "allowed: run.precision=fp32 or bf16")
    check_tp(s)
    grid, rank = s.grid, s.rank
    plain = GPT(s.gpt)
    bounds = gpt_stage_bounds(plain, pp)          # balanced on the unsplit model: the same for every tp
    tp_model = parallelize_gpt(plain, grid.group("tp", rank)) if tp > 1 else None
    stage = GPTStage(tp_model if tp_model is not None else plain, grid.coords(rank).pp, pp, bounds).to(device)
    pipeline = PipelineExecutor(stage, grid, rank, schedule=s.cfg.parallel.schedule, collectives=hvd.collectives(),
                                autocast=precision.autocast)
    counter = itertools.count()

    def name(tag: str) -> str:
        return f"hvdllm.pp.train.{tag}.{next(counter)}"

    def forward_backward(micro: list[Batch]) -> torch.Tensor:
        loss = pipeline.step([x for x, _ in micro], [y for _, y in micro])
        return torch.tensor(loss, dtype=torch.float32)

    def eval_loss_sum(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        return pipeline.eval_loss_sum(x, y), int(y.shape[0])

    layout = ShardLayout(stage, tp_model, grid, rank, pipeline.collectives, name)
    return StepRunner(forward_backward=forward_backward, eval_loss_sum=eval_loss_sum, collective_name=name,
                      **runner_parts(s, layout, device))
