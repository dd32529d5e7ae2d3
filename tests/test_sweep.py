"""`hvdllm sweep`: search spaces, samplers (grid / random / TPE via Optuna), real trial runs, kill + resume."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hvdllm.cli import main
from hvdllm.sweep import records as R
from hvdllm.sweep.space import grid, load_space, parse_space
from hvdllm.sweep.study import Study

ROOT = Path(__file__).resolve().parents[1]
# A trial small enough to be dominated by the process start: a one-layer model on a small text file.
TINY = ["--preset", "tiny", "--max-steps", "2", "--global-batch", "4", "--micro-batch", "4",
        "--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.n_head=2", "--set", "data.seq_len=32",
        "--set", "run.eval_interval=0", "--set", "run.eval_sequences=4", "--set", "sample.tokens=0",
        "--set", "run.tensorboard=false", "--set", "run.log_interval=1"]


def _text(tmp: Path) -> Path:
    words = [f"w{i % 97}x{i % 13}" for i in range(6000)]
    p = tmp / "corpus.txt"
    p.write_text(" ".join(words) + "\n", encoding="utf-8")
    return p


def _write(tmp: Path, name: str, text: str) -> str:
    p = tmp / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "sweep.csv", newline="") as f:
        return list(csv.DictReader(f))


# -- spaces ----------------------------------------------------------------------------------------
def test_space_forms_toml_and_yaml(tmp_path: Path) -> None:
    toml = _write(tmp_path, "s.toml", 'optim.lr = {log_uniform = [1e-4, 3e-3]}\n'
                                      'optim.beta2 = {uniform = [0.9, 0.99]}\n'
                                      '[schedule]\nwarmup_steps = {int_uniform = [0, 5]}\n'
                                      '[batch]\nglobal_batch = [16, 32]\n')
    yaml = _write(tmp_path, "s.yaml", "optim.lr: {log_uniform: [1.0e-4, 3.0e-3]}\n"
                                      "schedule: {warmup_steps: {int_uniform: [0, 5]}}\n"
                                      "optim.beta2: {uniform: [0.9, 0.99]}\n"
                                      "batch:\n  global_batch: [16, 32]\n")
    a, b = load_space(toml), load_space(yaml)
    assert sorted((p.key, p.kind, p.low, p.high, p.choices) for p in a) == \
        sorted((p.key, p.kind, p.low, p.high, p.choices) for p in b)
    kinds = {p.key: p.kind for p in a}
    assert kinds == {"optim.lr": "log_uniform", "schedule.warmup_steps": "int_uniform",
                     "optim.beta2": "uniform", "batch.global_batch": "categorical"}


def test_grid_is_the_product_in_order() -> None:
    params = parse_space({"optim": {"lr": [1e-3, 2e-3, 3e-3]}, "schedule.warmup_steps": [0, 5],
                          "optim.weight_decay": {"int_uniform": [0, 1]}})
    g = grid(params)
    assert len(g) == 12
    assert g[0] == {"optim.lr": 1e-3, "schedule.warmup_steps": 0, "optim.weight_decay": 0}
    assert g[1] == {"optim.lr": 1e-3, "schedule.warmup_steps": 0, "optim.weight_decay": 1}
    assert len({json.dumps(x, sort_keys=True) for x in g}) == 12
    s = Study(params, "grid", 0, len(g))
    assert [dict(s.ask(n).params) for n in range(len(g))] == g


def _draw(sampler: str, seed: int, n: int, finished: int = 0) -> list[dict]:
    params = parse_space({"optim.lr": {"log_uniform": [1e-4, 3e-3]}, "schedule.warmup_steps": {"int_uniform": [0, 50]},
                          "optim.weight_decay": [0.0, 0.05, 0.1]})
    s = Study(params, sampler, seed, n)
    out = []
    for i in range(n):
        t = s.ask(i)
        out.append(dict(t.params))
        s.tell(t, "done", 3.0 + math.sin(i))       # a deterministic objective: TPE's draws depend on it
    return out


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_same_seed_same_trials(sampler: str) -> None:
    a, b, c = _draw(sampler, 7, 14), _draw(sampler, 7, 14), _draw(sampler, 8, 14)
    assert a == b
    assert a != c
    assert all(1e-4 <= t["optim.lr"] <= 3e-3 and 0 <= t["schedule.warmup_steps"] <= 50 for t in a)


def test_resumed_study_draws_what_an_uninterrupted_one_draws() -> None:
    """The study of a resumed sweep is rebuilt from records; its next trials equal the uninterrupted ones."""
    params = parse_space({"optim.lr": {"log_uniform": [1e-4, 3e-3]}, "optim.weight_decay": [0.0, 0.1]})
    full = _draw_with(params, "tpe", 14)
    s = Study(params, "tpe", 3, 14)
    for i, values in enumerate(full[:11]):
        s.add_finished(values, "done", 3.0 + math.cos(i), [(1, 4.0)])
    rest = []
    for i in range(11, 14):
        t = s.ask(i)
        rest.append(dict(t.params))
        s.tell(t, "done", 3.0 + math.cos(i))
    assert rest == full[11:]


def _draw_with(params: list, sampler: str, n: int) -> list[dict]:
    s = Study(params, sampler, 3, n)
    out = []
    for i in range(n):
        t = s.ask(i)
        out.append(dict(t.params))
        s.tell(t, "done", 3.0 + math.cos(i))
    return out


def test_pruner_stops_a_trial_worse_than_the_median() -> None:
    params = parse_space({"optim.lr": [1e-3, 2e-3, 3e-3, 4e-3, 5e-3]})
    s = Study(params, "grid", 0, 5)
    for n, loss in ((0, 3.0), (1, 3.2), (2, 3.1)):
        t = s.ask(n)
        assert not s.report(t, [(1, loss), (2, loss - 0.5)], set())
        s.tell(t, "done", loss - 0.6)
    good, bad = s.ask(3), s.ask(4)
    assert not s.report(good, [(1, 2.9)], set())
    assert s.report(bad, [(1, 5.0)], set())


# -- bad input ---------------------------------------------------------------------------------------
BAD_SPACES = [
    ("unknown.toml", "optim.lrr = [1e-3]\n", "optim.lrr"),
    ("unknown_section.toml", "nosuch.lr = [1e-3]\n", "nosuch.lr"),
    ("empty_list.toml", "optim.lr = []\n", "empty list"),
    ("low_high.toml", "optim.lr = {uniform = [3e-3, 1e-4]}\n", "low < high"),
    ("equal.toml", "optim.lr = {uniform = [1e-3, 1e-3]}\n", "low < high"),
    ("log0.toml", "optim.lr = {log_uniform = [0.0, 1e-3]}\n", "low > 0"),
    ("int.toml", "schedule.warmup_steps = {int_uniform = [0.5, 3]}\n", "integers"),
    ("form.toml", "optim.lr = {normal = [0, 1]}\n", "optim.lr"),
    ("scalar.toml", "optim.lr = 1e-3\n", "optim.lr"),
    ("reserved.toml", "run.out = ['a', 'b']\n", "run.out"),
    ("badtype.toml", "optim.lr = ['fast']\n", "fast"),
    ("nothing.toml", "", "empty"),
    ("broken.toml", "optim.lr = [\n", "TOML"),
    ("broken.yaml", "optim.lr: [1, \n", "YAML"),
    ("space.json", "{}", "unknown format"),
]


def test_bad_input_exits_2_one_line_nothing_written(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sweep"
    good = _write(tmp_path, "good.toml", "optim.lr = {log_uniform = [1e-4, 3e-3]}\n")
    cases = [([ "--space", _write(tmp_path, name, text)], needle) for name, text, needle in BAD_SPACES]
    cases += [
        (["--space", str(tmp_path / "missing.toml")], "missing.toml"),
        (["--space", good, "--sampler", "bayes"], "bayes"),
        (["--space", good, "--sampler", "grid"], "optim.lr"),                 # a continuous range in a grid
        (["--space", _write(tmp_path, "g.toml", "optim.lr = [1e-3, 2e-3]\n"), "--sampler", "grid", "--trials", "3"],
         "--trials 3"),
        (["--space", good, "--trials", "0"], "--trials 0"),
        (["--space", good, "--parallel", "0"], "--parallel 0"),
        (["--space", good, "--", "--preset", "huge"], "huge"),
        (["--space", good, "--", "--out", "x"], "--out"),
        (["--space", good, "--", "--bogus"], "--bogus"),
    ]
    for args, needle in cases:
        code = main(["sweep", "--out", str(out), *args])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert err.count("\n") == 1 and needle in err, (args, err)
        assert not out.exists(), args


# -- real trials ------------------------------------------------------------------------------------
def _sweep(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "hvdllm.cli", "sweep", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_random_sweep_of_8_trials_reports_the_best(tmp_path: Path) -> None:
    space = _write(tmp_path, "s.toml", "optim.lr = {log_uniform = [1e-4, 3e-3]}\n"
                                       "schedule.warmup_steps = {int_uniform = [0, 2]}\n")
    out = tmp_path / "sweep"
    p = _sweep(["--space", space, "--out", str(out), "--trials", "8", "--seed", "1", "--parallel", "2",
                "--", *TINY, "--data", str(_text(tmp_path))])
    text, _ = p.communicate(timeout=600)
    assert p.returncode == 0, text
    rows = _rows(out)
    assert [int(r["trial"]) for r in rows] == list(range(8))
    assert list(rows[0]) == ["trial", "optim.lr", "schedule.warmup_steps", "status", "val_loss", "run_dir"]
    # the median pruner may stop trials worse than the finished ones at the same step (log_interval=1)
    assert {r["status"] for r in rows} <= {"done", "pruned"}, rows
    done = [r for r in rows if r["status"] == "done"]
    assert len(done) >= 2 and all(math.isfinite(float(r["val_loss"])) for r in done), rows
    assert all(r["val_loss"] == "" for r in rows if r["status"] == "pruned")
    assert len({r["optim.lr"] for r in rows}) == 8
    best = min(done, key=lambda r: float(r["val_loss"]))
    assert f"best: trial {int(best['trial']):03d}" in text
    board = (out / "leaderboard.md").read_text()
    assert f"Best: trial {int(best['trial']):03d}" in board and f"optim.lr={best['optim.lr']}" in board
    for png in ("best_so_far.png", "loss_curves.png", "importance.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    for r in rows:   # each trial ran with its values
        assert f"lr = {float(r['optim.lr'])!r}" in (Path(r["run_dir"]) / "config.toml").read_text()
    # the same seed draws the same trials (checked here without running them again)
    params = load_space(space)
    s = Study(params, "random", 1, 8)
    assert [dict(s.ask(n).params) for n in range(8)] == \
        [{"optim.lr": float(r["optim.lr"]), "schedule.warmup_steps": int(r["schedule.warmup_steps"])} for r in rows]


def test_grid_sweep_killed_then_resumed_runs_each_point_once(tmp_path: Path) -> None:
    space = _write(tmp_path, "g.yaml", "optim.lr: [0.001, 0.002]\nschedule.warmup_steps: [0, 1]\n")
    out = tmp_path / "sweep"
    args = ["--space", space, "--out", str(out), "--sampler", "grid", "--", *TINY, "--data", str(_text(tmp_path))]
    p = _sweep(args, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "trials" / "001.json").exists():
        time.sleep(0.2)            # trial 000 has ended, 001 has started
    assert (out / "trials" / "001.json").exists(), "the sweep did not reach trial 001"
    os.killpg(p.pid, signal.SIGKILL)             # the sweep and its running trial, at once
    p.communicate(timeout=60)
    done_before = {n: r for n, r in R.load_records(out).items() if r.finished}
    assert set(done_before) == {0}
    stamps = {n: (R.record_path(out, n).stat().st_mtime_ns, (Path(r.run_dir) / "metrics.csv").stat().st_mtime_ns)
              for n, r in done_before.items()}

    resume = [*args[:6], "--resume", *args[6:]]
    again = _sweep(resume)
    text, _ = again.communicate(timeout=600)
    assert again.returncode == 0, text
    assert "1 of 4 trials ended before" in text
    rows = _rows(out)
    assert [(float(r["optim.lr"]), int(r["schedule.warmup_steps"])) for r in rows] == \
        [(0.001, 0), (0.001, 1), (0.002, 0), (0.002, 1)]
    assert {r["status"] for r in rows} <= {"done", "pruned"}
    for n, (rec_t, csv_t) in stamps.items():      # the finished trial was not run again
        assert R.record_path(out, n).stat().st_mtime_ns == rec_t
        assert (out / "trials" / f"{n:03d}" / "metrics.csv").stat().st_mtime_ns == csv_t
    assert text.count("started:") == 3
    # a finished sweep resumed runs nothing; a different space is refused
    third = _sweep(resume)
    assert third.communicate(timeout=300)[0].count("started:") == 0 and third.returncode == 0
    other = _write(tmp_path, "o.yaml", "optim.lr: [0.003]\n")
    assert main(["sweep", "--space", other, "--out", str(out), "--sampler", "grid", "--resume"]) == 2
