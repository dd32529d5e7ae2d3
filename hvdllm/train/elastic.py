"""``hvdllm train --elastic``: the trainers' loop under Horovod elastic, framework-free.

Under ``horovodrun -np N --min-np A --max-np B --host-discovery-script S`` (Gloo) the loop runs inside
``hvd.elastic.run`` with a state holding the model, the optimizer, the step and the unlogged losses.
Every ``run.elastic_commit_every`` steps (and at every checkpoint) the state is committed to host
memory. When a worker dies the survivors restore the last commit and enter the loop again on the new
set of workers; a worker that joins receives rank 0's state in the elastic sync. Each entry re-plans
the batch for the current size: the global batch stays, the per-rank accumulation changes (an error
when the new size cannot divide it), and the data of each step is picked by the global step
(hvdllm.data's ``micro_batches``), so the run walks the same data whatever the size.

Outside an elastic launch the same code runs once (Horovod's ``elastic.run`` does the same); with
several ranks on a backend other than Horovod (mpirun + mpi4py) ``--elastic`` is bad input.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable

from hvdllm.core import elastic as core_elastic
from hvdllm.train.config import ConfigError, plan
from hvdllm.train.loop import RunEnd
from hvdllm.train.metrics import LossLog
from hvdllm.train.progress import say
from hvdllm.train.run_setup import RunSetup


def check_backend(backend: str, size: int) -> None:
    """ConfigError unless ``--elastic`` can run here: Horovod, or a single process (a normal job)."""
    if backend != "horovod" and (size > 1 or core_elastic.elastic_launch()):
        raise ConfigError(f"--elastic needs Horovod's elastic launch (horovodrun --min-np/--max-np "
                          f"--host-discovery-script, Gloo); this job runs on the {backend!r} backend with {size} "
                          f"ranks; allowed: horovodrun, or one process (a normal job), or drop --elastic")


def replan(s: RunSetup, rank: int, size: int, step: int) -> RunSetup:
    """``s`` for ``size`` workers entering at ``step``: the same global batch, the accumulation re-derived."""
    try:
        p = plan(s.cfg, size)
    except ConfigError as e:
        raise ConfigError(f"--elastic: {size} worker(s) now: {e}") from None
    return dataclasses.replace(s, plan=p, rank=rank, size=size, start_step=step)


def op_names() -> Callable[[str], str]:
    """Names for the collectives the loop issues, counted from this entry on. Horovod matches ops by
    name and numbers unnamed ones per process, for the life of the process: after a reset a survivor's
    count and a joiner's differ, and their unnamed ops would never meet (a hang). Every worker takes a
    fresh namer at each entry, so the names agree."""
    counter = itertools.count()
    return lambda tag: f"hvdllm.elastic.{tag}.{next(counter)}"


def reseed(seed: int, rank: int, step: int) -> int:
    """The torch/TF seed of ``rank`` after a reset at ``step`` (dropout: differs per rank and per entry,
    reproducibly; the step-0 seed is the normal run's ``seed + 1 + rank``)."""
    return seed + 1 + rank + 1_000_003 * step


def commit_hook(state: Any, losses: LossLog) -> Callable[[int], None]:
    """The loop's ``StepHooks.commit``: the step and the losses not yet logged (averaged over the
    ranks now, a collective) go into the state, then ``state.commit()``."""

    def commit(step: int) -> None:
        state.step = step
        state.losses = losses.pending()
        state.commit()

    return commit


def run_elastic(s: RunSetup, state: Any, run: Callable[[Callable[..., RunEnd]], Callable[..., RunEnd]],
                world: Callable[[], tuple[int, int]], enter: Callable[[RunSetup, bool], None],
                train: Callable[[RunSetup, bool], RunEnd]) -> RunEnd:
    """Run ``train(s, rejoin)`` under ``run`` (``hvd.elastic.run``). ``state`` holds ``step``,
    ``losses`` and ``fresh`` besides the trainer's model and optimizer; ``world()`` is (rank, size)
    now; ``enter(s, rejoin)`` adapts the trainer to the re-planned ``s`` (its accumulation, loss log,
    RNG) before each entry."""

    def body(state: Any) -> RunEnd:
        rank, size = world()
        rejoin = not state.fresh          # (synced from rank 0: the same on every worker, joiners too)
        state.fresh = False
        here = replan(s, rank, size, int(state.step))
        enter(here, rejoin)
        state.save()                      # (a joiner's snapshot is the synced state, not its own start)
        if rejoin and here.is_root:
            say(f"hvdllm: elastic: {size} worker(s) from step {here.start_step} (micro-batch "
                f"{here.cfg.batch.micro_batch} x {here.plan.accum} accumulation x {size} ranks = global batch "
                f"{here.cfg.batch.global_batch})")
        return train(here, rejoin)

    return run(body)(state)
