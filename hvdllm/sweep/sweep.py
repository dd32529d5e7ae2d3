"""``hvdllm sweep``: validate everything (nothing written on bad input), then run or resume the trials."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable

from hvdllm.sweep import plots, records as R
from hvdllm.sweep.space import Param, grid, load_space
from hvdllm.sweep.study import SAMPLERS, Study
from hvdllm.train.config import ConfigError

DEFAULT_TRIALS = 10
# Train arguments the sweep sets per trial.
OWN_FLAGS = ("--out", "--resume", "--exit-at-step")


@dataclasses.dataclass
class SweepOptions:
    space: str
    out: str
    trials: int | None = None
    sampler: str = "random"
    seed: int = 0
    parallel: int = 1
    np: int = 1
    resume: bool = False
    train_args: list[str] = dataclasses.field(default_factory=list)


def _say(msg: str) -> None:
    print(f"hvdllm sweep: {msg}", flush=True)


def _check_options(o: SweepOptions, params: list[Param]) -> int:
    """The number of trials; ConfigError on a bad option."""
    if o.sampler not in SAMPLERS:
        raise ConfigError(f"--sampler {o.sampler!r} is not allowed; allowed: {', '.join(SAMPLERS)}")
    for name, v in (("--parallel", o.parallel), ("--np", o.np)):
        if v < 1:
            raise ConfigError(f"{name} {v} must be >= 1")
    if o.seed < 0:
        raise ConfigError(f"--seed {o.seed} must be >= 0")
    if o.trials is not None and o.trials < 1:
        raise ConfigError(f"--trials {o.trials} must be >= 1")
    for a in o.train_args:
        if a.split("=")[0] in OWN_FLAGS:
            raise ConfigError(f"train argument {a} is set by the sweep for each trial; remove it")
    if o.sampler == "grid":
        size = len(grid(params))
        if o.trials is not None and o.trials != size:
            raise ConfigError(f"--trials {o.trials} with --sampler grid: the grid has {size} points "
                              "(leave --trials out to run exactly the grid)")
        return size
    return o.trials or DEFAULT_TRIALS


def _check_values(params: list[Param], sampler: str, check_train: Callable[[list[str]], None],
                  train_args: list[str]) -> None:
    """Every value the sweep may set is accepted by ``hvdllm train`` with the given arguments."""
    if sampler == "grid":
        for point in grid(params):
            check_train([*train_args, *R.set_flags(point)])
        return
    for p in params:
        ends = p.choices if p.kind == "categorical" else (
            (int(p.low), int(p.high)) if p.kind == "int_uniform" else (float(p.low), float(p.high)))
        for v in ends:
            check_train([*train_args, *R.set_flags({p.key: v})])


def _spec(o: SweepOptions, params: list[Param], trials: int) -> dict[str, Any]:
    space: dict[str, Any] = {}
    for p in params:
        space.update(p.to_dict())
    return {"space": space, "sampler": o.sampler, "seed": o.seed, "trials": trials, "np": o.np,
            "train_args": list(o.train_args)}


def _write_outputs(sweep_dir: Path, study: Study, recs: list[R.TrialRecord], keys: list[str],
                   train_args: list[str], total: int) -> None:
    R.write_atomic(sweep_dir / "sweep.csv", R.sweep_csv(recs, keys))
    R.write_atomic(sweep_dir / "leaderboard.md", R.leaderboard(recs, keys, train_args, total))
    plots.best_so_far(recs, sweep_dir / "best_so_far.png")
    plots.loss_curves(recs, sweep_dir / "loss_curves.png")
    plots.importance(study.importances(), sweep_dir / "importance.png")


def run_sweep(o: SweepOptions, check_train: Callable[[list[str]], None]) -> int:
    """Run (or resume) the sweep; ``check_train(argv)`` raises ConfigError for bad train arguments.

    Returns the exit status: 0 when every trial ended (done, pruned or failed) and at least one is done.
    """
    params = load_space(o.space)
    total = _check_options(o, params)
    _check_values(params, o.sampler, check_train, o.train_args)
    sweep_dir = Path(o.out)
    spec = _spec(o, params, total)
    spec_path = sweep_dir / R.SPEC_FILE
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise ConfigError(f"--out {sweep_dir}: exists and is not a directory")
    if spec_path.is_file():
        if not o.resume:
            raise ConfigError(f"--out {sweep_dir}: already holds a sweep; pass --resume to continue it "
                              "or choose another --out")
        saved = json.loads(spec_path.read_text(encoding="utf-8"))
        for k in ("space", "sampler", "seed", "trials", "np", "train_args"):
            if saved.get(k) != spec[k]:
                raise ConfigError(f"--resume: {k} differs from the saved sweep's ({saved.get(k)!r} in "
                                  f"{spec_path}, now {spec[k]!r})")
    (sweep_dir / "trials").mkdir(parents=True, exist_ok=True)
    R.write_atomic(spec_path, json.dumps(spec, indent=1))

    keys = [p.key for p in params]
    study = Study(params, o.sampler, o.seed, total)
    _say(f"{total} trials ({o.sampler} sampler, seed {o.seed}, up to {o.parallel} at a time) over "
         f"{', '.join(keys)} -> {sweep_dir}")
    recs = R.load_records(sweep_dir)
    _write_outputs(sweep_dir, study, list(recs.values()), keys, o.train_args, total)
    recs_list = run_trials_and_report(sweep_dir, study, o, total, keys)
    best = next((r for r in R.ranked(recs_list) if r.status == "done" and r.val_loss is not None), None)
    counts = {s: sum(r.status == s for r in recs_list) for s in R.FINISHED}
    _say(f"{counts['done']} done, {counts['pruned']} pruned, {counts['failed']} failed; "
         f"results in {sweep_dir / 'sweep.csv'} and {sweep_dir / 'leaderboard.md'}")
    if best is None:
        print("hvdllm sweep: no trial finished with a validation loss", file=sys.stderr)
        return 1
    _say(f"best: trial {R.trial_name(best.trial)} val_loss {best.val_loss:.4f} with "
         + " ".join(R.set_flags(best.values)))
    return 0


def run_trials_and_report(sweep_dir: Path, study: Study, o: SweepOptions, total: int,
                          keys: list[str]) -> list[R.TrialRecord]:
    from hvdllm.sweep.runner import run_trials

    def on_change(recs: list[R.TrialRecord]) -> None:
        _write_outputs(sweep_dir, study, recs, keys, o.train_args, total)

    recs = run_trials(sweep_dir, study, o.train_args, total, o.parallel, o.np, on_change, _say)
    on_change(recs)
    return recs
