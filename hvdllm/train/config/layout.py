"""How a config's global batch maps onto a job's ranks. The dp x tp x pp divisibility rule is the
core's (:meth:`hvdllm.core.grid.ProcessGrid.infer`); this adds the batch's."""
from __future__ import annotations

import dataclasses

from hvdllm.core.grid import ProcessGrid
from hvdllm.train.config.fields import ConfigError
from hvdllm.train.config.schema import TrainConfig


@dataclasses.dataclass(frozen=True)
class Plan:
    """The job's grid and how the global batch maps onto it."""

    grid: ProcessGrid
    accum: int               # micro-batches per rank per optimizer step
    per_rank: int            # sequences per rank per optimizer step

    @property
    def world_size(self) -> int:
        return self.grid.size

    @property
    def dp_size(self) -> int:
        return self.grid.dp

    @property
    def tokens_per_step(self) -> int:
        return self.per_rank * self.dp_size


def plan(cfg: TrainConfig, world_size: int) -> Plan:
    """The grid and gradient accumulation for ``world_size`` ranks (ConfigError if they do not divide)."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    try:
        grid = ProcessGrid.infer(world_size, tp=tp, pp=pp)
    except ValueError as e:
        raise ConfigError(f"--tp {tp} --pp {pp}: {e}") from None
    g, mb, dp = cfg.batch.global_batch, cfg.batch.micro_batch, grid.dp
    if g % (mb * dp):
        raise ConfigError(f"--global-batch {g} is not divisible by --micro-batch {mb} x {dp} data-parallel ranks; "
                          f"allowed: a multiple of {mb * dp}")
    return Plan(grid=grid, accum=g // (mb * dp), per_rank=g // dp)
