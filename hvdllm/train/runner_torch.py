"""The PyTorch trainer's replaceable part: a :class:`StepRunner` (what a parallelism layout gives the
loop), the whole-model runner for data parallelism, and the run's precision (autocast, fp16 loss scaler).
Tensor- and pipeline-parallel runners: :mod:`hvdllm.train.model_parallel_torch`,
:mod:`hvdllm.train.pipeline_torch`.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import torch
import torch.nn.functional as F

from hvdllm.core.process_sets import ProcessSet
from hvdllm.models.gpt import GPT, GPTConfig
from hvdllm.torch.parallel.shards import ShardLayout

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass
class Precision:
    """Autocast context and (fp16) loss scaler for one run."""

    name: str
    device: torch.device
    scaler: Any = None

    def autocast(self) -> Any:
        if self.name == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss


def make_precision(name: str, device: torch.device) -> Precision:
    scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
    return Precision(name, device, scaler)


@dataclasses.dataclass
class StepRunner:
    """What a parallelism layout provides to the loop.

    ``model``: the module with this rank's parameters (checkpointed, broadcast and optimized);
    ``forward_backward(micro_batches)``: backward of sum(loss_i) / len(micro_batches) (the loss already
    scaled for fp16), returning the detached mean loss of this rank's micro-batches;
    ``eval_loss_sum(x, y)``: sum over sequences of each sequence's mean loss, and the count;
    ``generate(idx, n, ...)``: autoregressive sampling (rank 0 calls it at the end).
    """

    model: torch.nn.Module
    forward_backward: Callable[[list[Batch]], torch.Tensor]
    eval_loss_sum: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]]
    generate: Callable[..., torch.Tensor]
    # Model-parallel layouts (hvdllm.train.model_parallel_torch): a collective returning the unsplit GPT
    # (checkpoints, sampling), one returning the unsplit model's gradient norm (the DistributedOptimizer's
    # grad_norm_fn: clipping by the global norm), and the data-parallel process set the gradients are
    # averaged over (None: the whole world).
    full_model: Callable[[], torch.nn.Module] | None = None
    grad_norm: Callable[[], float] | None = None
    dp_group: ProcessSet | None = None
    # Pipeline parallel: a fresh deterministic op name per call, for every collective the loop issues
    # (stages issue different numbers of collectives, and Horovod numbers unnamed ones per process).
    collective_name: Callable[[str], str] | None = None
    # Model parallel: this rank's weights and optimizer state as the unsplit model's (checkpoints hold
    # those, so tp/pp runs resume).
    shards: ShardLayout | None = None

    def op_name(self, tag: str) -> str | None:
        """The name for a collective the loop issues (None where the runner does not name them)."""
        return self.collective_name(tag) if self.collective_name is not None else None


def accumulate_forward_backward(loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                                precision: Precision, device: torch.device) -> Callable[[list[Batch]], torch.Tensor]:
    """``forward_backward`` for a model run whole on this rank: backward of each micro-batch's loss
    (``loss_of(x, y)``) / len(micro), returning the detached mean loss (shared by the dp and tp runners)."""

    def forward_backward(micro: list[Batch]) -> torch.Tensor:
        total = torch.zeros((), device=device)
        for x, y in micro:
            with precision.autocast():
                loss = loss_of(x, y)
            precision.scale(loss / len(micro)).backward()
            total += loss.detach().float()
        return total / len(micro)

    return forward_backward


def data_parallel_runner(gpt: GPTConfig, precision: Precision, device: torch.device) -> StepRunner:
    """The whole model on every rank (tp = pp = 1)."""
    model = GPT(gpt).to(device)
    forward_backward = accumulate_forward_backward(lambda x, y: model(x, y)[1], precision, device)

    @torch.no_grad()
    def eval_loss_sum(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        with precision.autocast():
            logits, _ = model(x)
        per_tok = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        return per_tok.view(y.shape).mean(dim=1).sum(), int(y.shape[0])

    return StepRunner(model=model, forward_backward=forward_backward, eval_loss_sum=eval_loss_sum,
                      generate=model.generate)
