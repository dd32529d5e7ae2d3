"""The training loop both trainers run, framework-free: schedule, logging, eval, checkpoints, exit.

A trainer supplies a :class:`StepHooks` (one optimizer step, the evaluation, a checkpoint, the last
gradient norm, a text sample) and this module does the rest the same way for torch and Keras: the
learning rate of each step from the core's schedule, the metrics rows (loss = mean over the global
batch), the progress bar, periodic eval and checkpoints, ``--exit-at-step``, the loss plot and the
final sample. Every hook that communicates is called on every rank at the same point, so the ranks
issue the same collectives in the same order.

Failures and preemption: an exception leaving the loop carries the step it interrupted
(hvdllm.core.failure.mark_step: the failing rank's last line names it). Every
``run.stop_check_interval`` steps the ranks agree, with one tiny allreduce, whether any of them got
SIGTERM/SIGUSR1 or spent ``run.max_minutes`` (hvdllm.core.preemption); if so all checkpoint that step
and the run ends :attr:`RunEnd.stopped` (the trainers exit with EXIT_PREEMPTED). With
``run.stop_check_overlap`` the allreduce starts before the step, with the codes as they are then, and
finishes after it, so it waits for no round of its own: a stop asked during step k then ends the run
after step k + 1.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from pathlib import Path
from typing import Callable

import numpy as np

from hvdllm.core.failure import mark_step
from hvdllm.core.preemption import StopRequest, start_agreement
from hvdllm.core.schedules import LRSchedule
from hvdllm.train import replicas
from hvdllm.train.config import TrainConfig
from hvdllm.train.metrics import LossLog, MetricsLogger, plot_loss
from hvdllm.train.progress import Progress, Throughput, say
from hvdllm.train.run_setup import RunSetup


def make_schedule(cfg: TrainConfig) -> LRSchedule:
    """Learning rate of optimizer step ``i`` (0-based): the core's warmup + decay over run.max_steps
    (a warmup longer than the run is cut to the run)."""
    warmup = min(cfg.schedule.warmup_steps, cfg.run.max_steps)
    return LRSchedule(cfg.optim.lr, warmup, cfg.run.max_steps, decay=cfg.schedule.decay,
                      min_lr=cfg.optim.lr * cfg.schedule.min_lr_ratio)


def should_log(step: int, cfg: TrainConfig) -> bool:
    return step % cfg.run.log_interval == 0 or step == cfg.run.max_steps


def should_eval(step: int, cfg: TrainConfig) -> bool:
    return (cfg.run.eval_interval > 0 and step % cfg.run.eval_interval == 0) or step == cfg.run.max_steps


def should_checkpoint(step: int, cfg: TrainConfig) -> bool:
    return ((cfg.run.checkpoint_interval > 0 and step % cfg.run.checkpoint_interval == 0)
            or step == cfg.run.max_steps or step == cfg.run.exit_at_step)


SAMPLE_FILE = "sample.txt"


def write_sample(run_dir: Path, prompt: str, text: str) -> None:
    (run_dir / SAMPLE_FILE).write_text(text, encoding="utf-8")
    say(f"--- sample (prompt {prompt!r}) ---\n{text}\n--- end of sample ---")


@dataclasses.dataclass
class StepHooks:
    """What a trainer provides to :func:`run_training`.

    ``step(i, lr)``: optimizer step ``i`` (0-based) at learning rate ``lr``; returns this rank's mean loss.
    ``evaluate()``: the validation loss, equal on every rank (a collective).
    ``save(step, losses)``: write a checkpoint after ``step`` (a collective); returns its path on rank 0.
    ``grad_norm()``: the global gradient norm of the last step (after averaging, before clipping) or None.
    ``sample(prompt, tokens, temperature, top_k, seed)``: called on every rank at the end; rank 0 returns
    the generated text (model-parallel runs gather the model collectively first).
    ``check_replicas(step)``: raise when the data-parallel replicas differ (hvdllm.train.replicas).
    ``start_sum_over_ranks(vector)``: start the element-wise sum of a small float64 vector over all ranks
    (a collective) and return the function that waits for it and returns the sum.
    """

    step: Callable[[int, float], float]
    evaluate: Callable[[], float]
    save: Callable[[int, LossLog], Path | None]
    grad_norm: Callable[[], float | None]
    sample: Callable[[str, int, float, int, int], str | None]
    start_sum_over_ranks: Callable[[np.ndarray], Callable[[], np.ndarray]]
    check_replicas: Callable[[int], None] | None = None   # compare data-parallel replicas (a collective)
    # --elastic: keep the state of this step in host memory (a collective; may raise Horovod's
    # HostsUpdatedInterrupt, which hvd.elastic.run handles). Called every run.elastic_commit_every steps
    # and at every checkpoint.
    commit: Callable[[int], None] | None = None


@dataclasses.dataclass(frozen=True)
class RunEnd:
    """How :func:`run_training` ended: the last step done; ``stopped`` names who asked the run to stop
    early and why (None: it ran to --max-steps or --exit-at-step)."""

    step: int
    stopped: str | None = None


def run_training(s: RunSetup, hooks: StepHooks, losses: LossLog, flops_per_token: float, peak: float,
                 ranks: int, note: str, rejoin: bool = False) -> RunEnd:
    """Train from ``s.start_step`` to ``--max-steps`` (or ``--exit-at-step``, or an agreed stop).

    ``rejoin``: an elastic run entering again after a reset (from its last commit, ``s.start_step``):
    metrics.csv drops the rows past that step (the rolled-back steps are trained and logged again) and
    the step-0 evaluation is not repeated."""
    cfg = s.cfg
    at = _Position(s.start_step)
    stop = StopRequest(cfg.run.max_minutes * 60 if cfg.run.max_minutes is not None else None,
                       on_signal=lambda sig: _announce_signal(s.rank, sig, at.step)).install()
    metrics = MetricsLogger(s.run_dir, enabled=s.is_root,
                            resume_step=s.start_step if s.resume_from is not None or rejoin else None,
                            tensorboard=cfg.run.tensorboard)
    tput = Throughput(flops_per_token, peak, ranks)
    progress = Progress(cfg.run.max_steps, s.start_step, enabled=s.is_root and cfg.run.progress)
    progress.note(note)
    step = s.start_step
    try:
        if s.resume_from is None and not rejoin and cfg.run.eval_interval > 0:
            val0 = hooks.evaluate()
            metrics.log({"step": 0, "val_loss": val0})
            progress.note(f"step 0: val loss {val0:.4f}")

        schedule = make_schedule(cfg)
        tokens_per_step = cfg.batch.global_batch * s.windows.seq_len
        while step < cfg.run.max_steps:
            lr = float(schedule(step))
            agreement = None
            if cfg.run.stop_check_overlap and _stop_check_due(step + 1, cfg):
                agreement = start_agreement(stop.code(), s.rank, s.size, hooks.start_sum_over_ranks)
            at.step = step + 1             # (after the codes are read: a stop announced at step k is in k's)
            try:
                losses.add(hooks.step(step, lr))
            except BaseException as e:
                raise mark_step(e, step + 1)
            step += 1
            _test_delay()
            tput.add(tokens_per_step)
            progress.step()

            if should_log(step, cfg):
                mean = losses.mean()
                tps, mfu = tput.read()
                val = hooks.evaluate() if should_eval(step, cfg) else None
                metrics.log({"step": step, "loss": mean, "val_loss": val, "lr": lr, "grad_norm": hooks.grad_norm(),
                             "tokens_per_s": tps, "mfu": mfu, "elapsed_s": tput.elapsed()})
                progress.show(step, mean, tps, mfu, val, lr)
                if not math.isfinite(mean):
                    raise FloatingPointError(f"loss is {mean} at step {step}; lower optim.lr or use fp32")
            elif should_eval(step, cfg):
                val = hooks.evaluate()
                metrics.log({"step": step, "val_loss": val, "lr": lr})
                progress.note(f"step {step}: val loss {val:.4f}")

            saved = should_checkpoint(step, cfg)
            if hooks.check_replicas is not None and replicas.due(step, cfg, saved):
                hooks.check_replicas(step)               # before a checkpoint: never save diverged replicas
            if saved:
                _save(hooks, step, losses, progress)
            if not cfg.run.stop_check_overlap and _stop_check_due(step, cfg):
                agreement = start_agreement(stop.code(), s.rank, s.size, hooks.start_sum_over_ranks)
                at.step = step + 1         # a signal from here on is announced at (and seen after) the next step
            stopped = agreement() if agreement is not None else None
            if stopped is not None and not saved:
                _save(hooks, step, losses, progress)
            if stopped is not None or (cfg.run.exit_at_step is not None and step == cfg.run.exit_at_step
                                       and step < cfg.run.max_steps):
                progress.close()
                metrics.close()
                if s.is_root:
                    plot_loss(s.run_dir)
                    why = f"stopping early ({stopped})" if stopped else "exiting (--exit-at-step)"
                    say(f"hvdllm: {why} after step {step}, checkpoint written; continue with --resume")
                return RunEnd(step, stopped)
            if hooks.commit is not None and step < cfg.run.max_steps and (
                    saved or step % cfg.run.elastic_commit_every == 0):
                hooks.commit(step)
    except BaseException as e:
        raise mark_step(e, step)
    finally:
        stop.uninstall()
        progress.close()

    metrics.close()
    sp = cfg.sample
    text = hooks.sample(sp.prompt, sp.tokens, sp.temperature, sp.top_k, sp.seed)
    if s.is_root:
        plot_loss(s.run_dir)
        write_sample(s.run_dir, sp.prompt, text or "")
        say(f"done: {step} steps in {tput.elapsed():.0f} s; run directory {s.run_dir}")
    return RunEnd(step)


def _stop_check_due(step: int, cfg: TrainConfig) -> bool:
    """Whether the ranks agree on stopping after ``step`` (never after the last: the run ends anyway)."""
    return step < cfg.run.max_steps and step % cfg.run.stop_check_interval == 0


@dataclasses.dataclass
class _Position:
    """The step a rank is at (steps done, or the one in progress), for lines printed from a signal handler."""

    step: int


def _announce_signal(rank: int, sig: int, step: int) -> None:
    """One line when a stop signal arrives: the rank and the step it is at. Launchers that end a job
    after one rank died (mpirun, horovodrun --mpi) send the others SIGTERM before SIGKILL, so this is
    the surviving ranks' last word naming their step. Written with os.write: safe in a handler."""
    name = signal.Signals(sig).name
    os.write(2, f"hvdllm: rank {rank} got {name} at step {step}: finishing the step, then a checkpoint "
                f"(when a launcher sends it because another rank ended, the job ends here)\n".encode())


_TEST_DELAY_ENV = "HVDLLM_TEST_STEP_DELAY_S"   # test-only: seconds to sleep after each step (slow runs down)


def _test_delay() -> None:
    delay = float(os.environ.get(_TEST_DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)


def _save(hooks: StepHooks, step: int, losses: LossLog, progress: Progress) -> None:
    path = hooks.save(step, losses)
    if path is not None:
        progress.note(f"checkpoint {path}")
