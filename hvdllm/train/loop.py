"""The training loop both trainers run, framework-free: schedule, logging, eval, checkpoints, exit.

A trainer supplies a :class:`StepHooks` (one optimizer step, the evaluation, a checkpoint, the last
gradient norm, a text sample) and this module does the rest the same way for torch and Keras: the
learning rate of each step from the core's schedule, the metrics rows (loss = mean over the global
batch), the progress bar, periodic eval and checkpoints, ``--exit-at-step``, the loss plot and the
final sample. Every hook that communicates is called on every rank at the same point, so the ranks
issue the same collectives in the same order.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

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
    """

    step: Callable[[int, float], float]
    evaluate: Callable[[], float]
    save: Callable[[int, LossLog], Path | None]
    grad_norm: Callable[[], float | None]
    sample: Callable[[str, int, float, int, int], str | None]
    check_replicas: Callable[[int], None] | None = None   # compare data-parallel replicas (a collective)


def run_training(s: RunSetup, hooks: StepHooks, losses: LossLog, flops_per_token: float, peak: float,
                 ranks: int, note: str) -> int:
    """Train from ``s.start_step`` to ``--max-steps`` (or ``--exit-at-step``); returns the last step done."""
    cfg = s.cfg
    metrics = MetricsLogger(s.run_dir, enabled=s.is_root,
                            resume_step=s.start_step if s.resume_from is not None else None,
                            tensorboard=cfg.run.tensorboard)
    tput = Throughput(flops_per_token, peak, ranks)
    progress = Progress(cfg.run.max_steps, s.start_step, enabled=s.is_root and cfg.run.progress)
    progress.note(note)
    if s.resume_from is None and cfg.run.eval_interval > 0:
        val0 = hooks.evaluate()
        metrics.log({"step": 0, "val_loss": val0})
        progress.note(f"step 0: val loss {val0:.4f}")

    schedule = make_schedule(cfg)
    tokens_per_step = cfg.batch.global_batch * s.windows.seq_len
    step = s.start_step
    try:
        while step < cfg.run.max_steps:
            lr = float(schedule(step))
            losses.add(hooks.step(step, lr))
            step += 1
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

            if hooks.check_replicas is not None and replicas.due(step, cfg, should_checkpoint(step, cfg)):
                hooks.check_replicas(step)               # before a checkpoint: never save diverged replicas
            if should_checkpoint(step, cfg):
                path = hooks.save(step, losses)
                if path is not None:
                    progress.note(f"checkpoint {path}")
            if cfg.run.exit_at_step is not None and step == cfg.run.exit_at_step and step < cfg.run.max_steps:
                progress.close()
                metrics.close()
                if s.is_root:
                    plot_loss(s.run_dir)
                    say(f"exiting after step {step} (--exit-at-step); continue with --resume")
                return step
    finally:
        progress.close()

    metrics.close()
    sp = cfg.sample
    text = hooks.sample(sp.prompt, sp.tokens, sp.temperature, sp.top_k, sp.seed)
    if s.is_root:
        plot_loss(s.run_dir)
        write_sample(s.run_dir, sp.prompt, text or "")
        say(f"done: {step} steps in {tput.elapsed():.0f} s; run directory {s.run_dir}")
    return step
