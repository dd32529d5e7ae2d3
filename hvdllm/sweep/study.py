"""Optuna glue for ``hvdllm sweep``: distributions, which parameters trial n gets, early stopping.

Reproducibility: trial n of a random or TPE sweep is drawn by a sampler seeded with ``(seed, n)``, so
the same seed gives the same trials whatever the order of completion, and a resumed sweep (whose
study is rebuilt from the trial records on disk) draws the trials it has not yet drawn exactly as an
uninterrupted sweep would (TPE: given the same finished trials; with ``--parallel`` > 1 the finished
set at each draw depends on timing). Grid trials are the grid's points in order.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hvdllm.sweep.space import Param, grid

SAMPLERS = ("grid", "random", "tpe")
PRUNE_AFTER = 3           # finished trials before the median rule may stop a trial

optuna.logging.set_verbosity(optuna.logging.WARNING)


def distribution(p: Param) -> BaseDistribution:
    """The Optuna distribution of one searched key."""
    if p.kind == "categorical":
        return CategoricalDistribution(list(p.choices))
    if p.kind == "int_uniform":
        return IntDistribution(int(p.low), int(p.high))
    return FloatDistribution(float(p.low), float(p.high), log=p.kind == "log_uniform")


def trial_seed(seed: int, n: int) -> int:
    """The sampler seed of trial ``n`` (distinct per trial, fixed by the sweep's seed)."""
    return (seed * 1_000_003 + n * 7_919 + 12_345) % (2**32)


def _sampler(name: str, seed: int, n: int, trials: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=trial_seed(seed, n), n_startup_trials=min(10, max(3, trials // 3)))
    return optuna.samplers.RandomSampler(seed=trial_seed(seed, n))


class Study:
    """An in-memory Optuna study (minimise the final validation loss) rebuilt from the trial records."""

    def __init__(self, params: list[Param], sampler: str, seed: int, trials: int) -> None:
        self.params, self.sampler, self.seed, self.trials = params, sampler, seed, trials
        self.dists = {p.key: distribution(p) for p in params}
        self._grid = grid(params) if sampler == "grid" else None
        self.study = optuna.create_study(
            direction="minimize", sampler=_sampler(sampler, seed, 0, trials),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNE_AFTER, n_warmup_steps=0))

    def add_finished(self, values: Mapping[str, Any], status: str, val_loss: float | None,
                     curve: Iterable[tuple[int, float]]) -> None:
        """Record a trial that ended before (on resume): the sampler and the pruner learn from it."""
        ok = _ok(status, val_loss)
        self.study.add_trial(optuna.trial.create_trial(
            params=dict(values), distributions=self.dists, value=val_loss if ok else None,
            state=TrialState.COMPLETE if ok else TrialState.PRUNED if status == "pruned" else TrialState.FAIL,
            intermediate_values={s: v for s, v in curve if math.isfinite(v)}))

    def ask(self, n: int, values: Mapping[str, Any] | None = None) -> optuna.trial.Trial:
        """Start trial ``n``: with ``values`` (a trial interrupted earlier, rerun as it was) or drawn."""
        if values is None and self._grid is not None:
            values = self._grid[n]
        if values is not None:
            self.study.enqueue_trial(dict(values), skip_if_exists=False)
        else:
            self.study.sampler = _sampler(self.sampler, self.seed, n, self.trials)
        return self.study.ask(self.dists)

    def report(self, trial: optuna.trial.Trial, curve: Iterable[tuple[int, float]], reported: set[int]) -> bool:
        """Report the (step, training loss) points not in ``reported`` (updated); True: prune the trial."""
        new = [(s, v) for s, v in curve if s not in reported and math.isfinite(v)]
        for step, v in new:
            trial.report(v, step)
            reported.add(step)
        return bool(reported) and trial.should_prune()

    def tell(self, trial: optuna.trial.Trial, status: str, val_loss: float | None) -> None:
        if _ok(status, val_loss):
            self.study.tell(trial, val_loss)
        else:
            self.study.tell(trial, state=TrialState.PRUNED if status == "pruned" else TrialState.FAIL)

    def importances(self) -> dict[str, float]:
        """Parameter importance over the finished trials (Optuna's evaluator; empty if too few)."""
        done = [t for t in self.study.trials if t.state == TrialState.COMPLETE]
        if len(done) < 2 or len(self.params) < 1:
            return {}
        try:
            return dict(optuna.importance.get_param_importances(
                self.study, evaluator=optuna.importance.PedAnovaImportanceEvaluator()))
        except Exception:        # too few distinct values for the evaluator: rank correlation instead
            return _rank_correlation(done, self.params)


def _ok(status: str, val_loss: float | None) -> bool:
    return status == "done" and val_loss is not None and math.isfinite(val_loss)


def _rank_correlation(done: list[Any], params: list[Param]) -> dict[str, float]:
    """|Spearman correlation| of each numeric key with the objective, normalised to sum 1."""
    import numpy as np

    y = np.argsort(np.argsort([t.value for t in done])).astype(float)
    out = {}
    for p in params:
        xs = [t.params.get(p.key) for t in done]
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
            xs = [p.choices.index(x) if x in p.choices else 0 for x in xs]
        x = np.argsort(np.argsort(xs)).astype(float)
        c = np.corrcoef(x, y)[0, 1] if x.std() > 0 and y.std() > 0 else 0.0
        out[p.key] = abs(float(c)) if math.isfinite(c) else 0.0
    total = sum(out.values())
    return {k: v / total for k, v in out.items()} if total > 0 else out
