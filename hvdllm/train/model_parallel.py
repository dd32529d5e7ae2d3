"""What the torch and Keras model-parallel trainers share, framework-free: the process sets a tp x pp job
registers at ``hvd.init``, the ``--tp`` check, and which checkpoints a layout can resume.

Optimizer-state formats in checkpoints: ``"index"`` (the framework's own optimizer state of the whole
model: data parallel) and ``"unsplit"`` (keyed by parameter name, the unsplit model's moments: any
tp x pp layout loads it). A run resumes only the format its layout writes.
"""
from __future__ import annotations

from hvdllm.core.backend import launched_size
from hvdllm.core.grid import ProcessGrid
from hvdllm.core.process_sets import ProcessSet
from hvdllm.train import checkpoint as ckpt
from hvdllm.train.config import ConfigError
from hvdllm.train.run_setup import RunSetup

__all__ = ["grid_process_sets", "check_tp", "layout_text", "check_resume_layout", "OPTIMIZER_FORMATS"]

OPTIMIZER_FORMATS = {False: "index", True: "unsplit"}


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


def layout_text(dp: int, tp: int, pp: int) -> str:
    return f"dp={dp} x tp={tp} x pp={pp}"


def check_resume_layout(s: RunSetup) -> None:
    """Refuse, before anything is written, a checkpoint whose optimizer state this layout cannot load:
    data-parallel checkpoints resume data-parallel runs, model-parallel ones any tp x pp run."""
    meta = ckpt.read_meta(s.resume_from)
    par = meta.get("config", {}).get("parallel", {})
    tp, pp = int(par.get("tp", 1)), int(par.get("pp", 1))
    theirs = layout_text(int(meta.get("world_size", tp * pp)) // (tp * pp), tp, pp)
    ours = layout_text(s.plan.dp_size, s.cfg.parallel.tp, s.cfg.parallel.pp)
    saved = meta.get("optimizer_format") or ("index" if tp == pp == 1 else None)
    if saved is None:      # written before model-parallel checkpoints held the whole optimizer state
        raise ConfigError(f"--resume from {s.resume_from}: written by layout {theirs} with only rank 0's "
                          f"optimizer shard; it cannot be resumed (this run is {ours})")
    want = OPTIMIZER_FORMATS[s.cfg.parallel.tp * s.cfg.parallel.pp > 1]
    if saved != want:
        raise ConfigError(f"--resume from {s.resume_from}: written by layout {theirs}, this run is {ours}; "
                          f"allowed: resume with --tp {tp} --pp {pp}")
