"""`hvdllm train --pp N`: the pipeline-parallel step runner the PyTorch trainer plugs in.

Each rank holds one stage (:class:`GPTStage`) of the same seeded GPT the one-process run builds;
:class:`PipelineRuntime` runs the step's micro-batches (the gradient-accumulation count) with the
configured schedule (``parallel.schedule``: 1f1b or gpipe). Gradient clipping uses the global norm of
the unsplit model (squares summed over the stages; the tied embedding lives on the first stage only,
so it counts once). Every collective issued here is named deterministically: Horovod matches ops by
name, and stages issue different numbers of collectives.
"""
from __future__ import annotations

import itertools
import math
from typing import Any

import torch

import hvdllm.torch as hvd
from hvdllm.core.ops import Sum
from hvdllm.models.gpt import GPT
from hvdllm.torch.parallel.pipeline import GPTStage, PipelineRuntime


def pipeline_runner(s: Any, precision: Any, device: torch.device) -> Any:
    """The StepRunner for ``--pp N`` (N > 1, ``--tp 1``): see the module docstring."""
    from hvdllm.train.config import ConfigError
    from hvdllm.torch.parallel.train import add_global_norm_clipping
    from hvdllm.train.trainer_torch import StepRunner

    tp, pp = s.cfg.parallel.tp, s.cfg.parallel.pp
    if tp > 1:
        raise ConfigError(f"--tp {tp} with --pp {pp}: combining tensor and pipeline parallelism in "
                          "`hvdllm train` is not supported yet; allowed: --tp N with --pp 1, or --pp N with --tp 1")
    if s.cfg.run.precision != "fp32":
        raise ConfigError(f"run.precision={s.cfg.run.precision} with --pp {pp}: pipeline training runs in "
                          "fp32 only; allowed: run.precision=fp32")
    if s.resume_from is not None:
        raise ConfigError(f"--resume with --pp {pp}: resuming a pipeline-parallel run is not supported yet")
    grid, rank = s.grid, s.rank
    stage = GPTStage(GPT(s.gpt), grid.coords(rank).pp, pp).to(device)
    runtime = PipelineRuntime(stage, grid, rank, schedule=s.cfg.parallel.schedule, collectives=hvd.collectives())
    rt = runtime.rt
    counter = itertools.count()

    def name(tag: str) -> str:
        return f"hvdllm.pp.train.{tag}.{next(counter)}"

    def forward_backward(micro: list) -> torch.Tensor:
        loss = runtime.step([x for x, _ in micro], [y for _, y in micro])
        return torch.tensor(loss, dtype=torch.float32)

    def eval_loss_sum(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        return runtime.eval_loss_sum(x, y), int(y.shape[0])

    def global_norm() -> float:
        sq = torch.zeros((), dtype=torch.float64)
        for p in stage.parameters():
            if p.grad is not None:
                sq += p.grad.detach().double().pow(2).sum().cpu()
        return math.sqrt(float(rt.allreduce(sq, Sum, runtime.pp_set, name=name("grad_norm"))))

    def full_model() -> GPT:
        """The unsplit GPT with the current weights, on every stage (a collective over the pp group)."""
        state: dict[str, torch.Tensor] = {}
        mine = {k: v.detach().cpu() for k, v in stage.state_dict().items()}
        for p in range(pp):
            root = grid.rank_of(grid.coords(rank).dp, 0, p)
            state.update(rt.broadcast_object(mine if root == rank else None, root, runtime.pp_set))
        if s.gpt.tie_embeddings:
            state["lm_head.weight"] = state["wte.weight"]
        plain = GPT(s.gpt)
        plain.load_state_dict(state)
        return plain.to(device)

    def generate(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("sample from runner.full_model(): a pipeline stage cannot generate alone")

    def prepare_optimizer(optimizer: Any) -> Any:
        return add_global_norm_clipping(optimizer, stage, global_norm, s.cfg.optim.max_grad_norm)

    return StepRunner(model=stage, forward_backward=forward_backward, eval_loss_sum=eval_loss_sum,
                      generate=generate, full_model=full_model, prepare_optimizer=prepare_optimizer,
                      dp_group=grid.dp_group(rank), collective_name=name)
