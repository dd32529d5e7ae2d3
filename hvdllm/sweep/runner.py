"""Runs the trials of a sweep as ``hvdllm train`` subprocesses, up to ``parallel`` at a time.

Each trial is ``python -m hvdllm.cli train <train args> --set key=value ... --out DIR/trials/NNN``
(under ``horovodrun -np K --gloo`` with ``np`` > 1), in its own process group, killed with the sweep
(Linux parent-death signal; SIGTERM/SIGINT to the sweep stop its trials). While a trial runs its
metrics.csv is read every ``poll_s``; the Optuna pruner (median rule) stops trials whose training
loss is worse than the median of the finished trials at the same step (status ``pruned``).
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from hvdllm.sweep import records as R
from hvdllm.sweep.study import Study

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: receive SIGKILL when the sweep process dies (Linux), never outlive it."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def threads_per_trial(parallel: int, np_: int) -> int:
    """CPU threads for each rank so that concurrent trials do not oversubscribe the host."""
    return max(1, (os.cpu_count() or 1) // (parallel * np_))


def train_command(train_args: list[str], values: dict[str, Any], run_dir: Path, np_: int, threads: int) -> list[str]:
    """The command line of one trial (the user's ``--set run.threads=...`` wins over ours)."""
    train = [sys.executable, "-m", "hvdllm.cli", "train", "--set", f"run.threads={threads}",
             "--set", "run.progress=false", *train_args, *R.set_flags(values), "--out", str(run_dir)]
    if np_ <= 1:
        return train
    horovodrun = shutil.which("horovodrun") or str(Path(sys.executable).with_name("horovodrun"))
    return [horovodrun, "-np", str(np_), "--gloo", *train]


def _max_steps(run_dir: Path) -> int | None:
    """run.max_steps from the config.toml the trial saved at its start (None before it exists)."""
    import tomllib

    try:
        return int(tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))["run"]["max_steps"])
    except (OSError, ValueError, KeyError, TypeError, tomllib.TOMLDecodeError):
        return None


@dataclasses.dataclass
class _Running:
    rec: R.TrialRecord
    trial: Any                      # the optuna trial
    proc: subprocess.Popen
    log: Any
    reported: set[int] = dataclasses.field(default_factory=set)
    pruned: bool = False


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the trial's process group, SIGKILL it after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_trials(sweep_dir: Path, study: Study, train_args: list[str], total: int, parallel: int, np_: int,
               on_change: Callable[[list[R.TrialRecord]], None], say: Callable[[str], None],
               poll_s: float = 0.5) -> list[R.TrialRecord]:
    """Run every trial 0..total-1 that has not ended yet; returns all records (ended ones included)."""
    recs = R.load_records(sweep_dir)
    for n in sorted(recs):
        if recs[n].finished:
            curve, _ = R.read_curve(sweep_dir / "trials" / R.trial_name(n))
            study.add_finished(recs[n].values, recs[n].status, recs[n].val_loss, curve)
    todo = [n for n in range(total) if not (n in recs and recs[n].finished)]
    if len(todo) < total:
        say(f"resuming: {total - len(todo)} of {total} trials ended before, {len(todo)} to run")
    threads = threads_per_trial(parallel, np_)
    running: dict[int, _Running] = {}

    def finish(r: _Running) -> None:
        curve, val = R.read_curve(Path(r.rec.run_dir))
        rc = r.proc.returncode
        r.rec.status = "pruned" if r.pruned else "done" if rc == 0 else "failed"
        r.rec.val_loss, r.rec.returncode = (val if r.rec.status == "done" else None), rc
        r.log.close()
        study.tell(r.trial, r.rec.status, r.rec.val_loss)
        R.save_record(sweep_dir, r.rec)
        recs[r.rec.trial] = r.rec
        shown = "" if r.rec.val_loss is None else f" val_loss {r.rec.val_loss:.4f}"
        ended = sum(x.finished for x in recs.values())
        say(f"trial {R.trial_name(r.rec.trial)} {r.rec.status}{shown} [{ended}/{total}]"
            + (f" (exit {rc}; see {r.rec.run_dir}.log)" if r.rec.status == "failed" else ""))
        on_change(list(recs.values()))

    try:
        while todo or running:
            while todo and len(running) < parallel:
                n = todo.pop(0)
                old = recs.get(n)
                trial = study.ask(n, old.values if old is not None else None)
                run_dir = sweep_dir / "trials" / R.trial_name(n)
                rec = R.TrialRecord(trial=n, values=dict(trial.params), run_dir=str(run_dir))
                if run_dir.exists():          # an interrupted attempt: start the trial over
                    shutil.rmtree(run_dir)
                R.save_record(sweep_dir, rec)
                log = open(f"{run_dir}.log", "w", encoding="utf-8")
                cmd = train_command(train_args, rec.values, run_dir, np_, threads)
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True, preexec_fn=_die_with_parent)
                running[n] = _Running(rec, trial, proc, log)
                say(f"trial {R.trial_name(n)} started: " + " ".join(R.set_flags(rec.values)[1::2]))
            time.sleep(poll_s)
            for n, r in list(running.items()):
                curve, _ = R.read_curve(Path(r.rec.run_dir))
                last = _max_steps(Path(r.rec.run_dir))
                curve = [(s, v) for s, v in curve if last is None or s < last]    # a finished run is not stopped
                if r.proc.poll() is None and study.report(r.trial, curve, r.reported):
                    r.pruned = True
                    _stop(r.proc)
                if r.proc.poll() is not None:
                    del running[n]
                    finish(r)
    finally:
        for r in running.values():       # interrupted: stop the trials; their records stay "running"
            _stop(r.proc, grace_s=2.0)
            r.log.close()
    return [recs[n] for n in sorted(recs)]
