"""What the torch and Keras model-parallel trainers share, framework-free: the process sets a tp x pp job
registers at ``hvd.init`` and the ``--tp`` check (which checkpoints a layout can resume:
hvdllm.train.resume)."""
from __future__ import annotations

from hvdllm.core.backend import launched_size
from hvdllm.core.grid import ProcessGrid
from hvdllm.core.process_sets import ProcessSet
from hvdllm.train.config import ConfigError
from hvdllm.train.run_setup import RunSetup

__all__ = ["grid_process_sets", "check_tp"]


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
