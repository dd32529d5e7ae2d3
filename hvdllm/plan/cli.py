"""``hvdllm plan``: rank every layout of a model on N ranks by predicted step time and memory.

On one process (``hvdllm plan --ranks N``) or on N (``horovodrun -np N hvdllm plan``, which also
measures the collectives over the real backend); see hvdllm.plan.measure for what is measured and
hvdllm.core.costmodel for the formulas. ``--verify K`` runs the K best layouts that fit for a few
steps with ``horovodrun -np N --gloo hvdllm train`` and adds the measured seconds per step.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from hvdllm.core import costmodel as CM
from hvdllm.core.backend import launched_size
from hvdllm.plan import measure as M
from hvdllm.train import config as C
from hvdllm.train.config import ConfigError
from hvdllm.train.run_setup import rank_threads

VERIFY_STEPS = 20         # steps per verification run, logged every VERIFY_LOG_INTERVAL: steps 4-20 are timed
VERIFY_ROUNDS = 2         # each layout runs once per round, the rounds one after the other; the fastest counts
VERIFY_LOG_INTERVAL = 4
VERIFY_APART = 0.10       # layouts predicted closer than this are verified only when no other is left
DP_RATES_ENV = "HVDLLM_PLAN_DP_RATES"   # set by plan on its first measuring launch (see measure_dp_rates)
VERIFY_TIMEOUT_S = 900    # a verification run still going after this is stopped (measured: none)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="model size: tiny (default), small, 124m")
    p.add_argument("--config", metavar="FILE", help="a train config (.toml/.yaml); its model and batch are planned")
    p.add_argument("--global-batch", type=int, metavar="N", help="sequences per optimizer step (default: the config's)")
    p.add_argument("--ranks", type=int, metavar="N", help="ranks to plan for (default: the job's size, else 1)")
    p.add_argument("--profile", metavar="FILE", help="machine profile JSON: read it if it exists (no measuring), "
                                                     "else measure and write it")
    p.add_argument("--verify", type=int, default=0, metavar="K", help="run the top K layouts a few steps and "
                                                                     "add the measured step time")
    p.add_argument("--json", action="store_true", help="one JSON object per layout and line")
    p.add_argument("--bind-cores", action=argparse.BooleanOptionalAction, default=True,
                   help="measure, verify and advise training with each rank pinned to its share of the cores "
                        "(hvdllm train --set run.bind_cores=true; default), which makes ranks sharing cores "
                        "steadier and faster")


def _config(args: argparse.Namespace) -> C.TrainConfig:
    layer: dict[str, Any] = dict(C.load_file(args.config)) if args.config else {}
    if args.preset is not None:
        layer["model.preset"] = args.preset
    if args.global_batch is not None:
        if args.global_batch < 1:
            raise ConfigError(f"--global-batch {args.global_batch} must be >= 1")
        layer["batch.global_batch"] = args.global_batch
        layer["batch.micro_batch"] = args.global_batch        # layouts choose their own micro-batch
    return C.build([layer])


def shape_of(cfg: C.TrainConfig) -> CM.ModelShape:
    g = cfg.gpt_config()
    return CM.ModelShape(vocab_size=g.vocab_size, seq_len=cfg.seq_len, n_layer=g.n_layer, n_head=g.n_head,
                         n_embd=g.n_embd, block_size=g.block_size, bias=g.bias, tie_embeddings=g.tie_embeddings)


def predict(shape: CM.ModelShape, layouts: list[CM.Layout], machine: CM.Machine,
            bucket_cap_bytes: float, knobs: CM.RunKnobs = CM.RunKnobs()) -> list[dict[str, Any]]:
    """One row per layout (DESIGN.md's keys plus the breakdown), best first: fitting, then fastest."""
    rows = []
    for lay in layouts:
        mem = CM.memory(shape, lay, bucket_cap_bytes)
        t = CM.step_time(shape, lay, machine, bucket_cap_bytes, knobs)
        rows.append({"dp": lay.dp, "tp": lay.tp, "pp": lay.pp, "zero": lay.zero, "micro_batch": lay.micro_batch,
                     "schedule": lay.schedule, "fits": mem.total <= machine.memory_bytes,
                     "memory_bytes_per_rank": int(mem.total), "predicted_step_s": t.total,
                     "tokens_per_s": lay.global_batch * shape.seq_len / t.total, "bottleneck": t.bottleneck,
                     "accum": lay.microbatches, "bubble": CM.bubble_fraction(lay)})
    rows.sort(key=lambda r: (not r["fits"], r["predicted_step_s"], r["tp"], r["pp"], r["zero"], -r["micro_batch"]))
    return rows


def train_flags(args: argparse.Namespace, cfg: C.TrainConfig, row: dict[str, Any]) -> list[str]:
    """``hvdllm train`` arguments that run the layout of ``row``."""
    flags = ["--config", args.config] if args.config else []
    flags += ["--preset", cfg.model.preset, "--global-batch", str(cfg.batch.global_batch),
              "--micro-batch", str(row["micro_batch"]), "--tp", str(row["tp"]), "--pp", str(row["pp"])]
    if row["pp"] > 1:
        flags += ["--set", f"parallel.schedule={row['schedule']}"]
    if row["zero"]:
        flags += ["--zero", str(row["zero"])]
    if args.bind_cores:
        flags += ["--set", "run.bind_cores=true"]
    return flags


def launcher(ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "hvdllm.cli"]
    horovodrun = shutil.which("horovodrun") or str(Path(sys.executable).with_name("horovodrun"))
    return [horovodrun, "-np", str(ranks), "--gloo", sys.executable, "-m", "hvdllm.cli"]


def measured_step_s(run_dir: Path) -> float | None:
    """Seconds per step from metrics.csv's elapsed_s: the median over the logged intervals after its
    first row at step 2 or later (the steps before it, with the warm-up, are not timed), so one interval
    that another process on the host slowed down does not decide the figure."""
    import statistics

    from hvdllm.sweep.records import read_column

    rows = read_column(run_dir, "elapsed_s")
    start = next((i for i, r in enumerate(rows) if r[0] >= 2), 0)
    per_step = [(e1 - e0) / (s1 - s0) for (s0, e0), (s1, e1) in zip(rows[start:], rows[start + 1:]) if s1 > s0]
    return statistics.median(per_step) if per_step else None


def verify_choice(rows: list[dict[str, Any]], k: int, apart: float = VERIFY_APART) -> list[dict[str, Any]]:
    """The ``k`` fitting layouts to verify, in ranked order.

    The best layout of each dp x tp x pp shape comes first, then the next best overall, so that the
    check spans the kinds of parallelism; a layout whose prediction is within ``apart`` (relative) of
    one already chosen is taken only when no other is left, since two runs that close cannot be ranked
    by a measurement of a few steps (run-to-run noise on shared CPU cores is ~10%).
    """
    fitting = [r for r in rows if r["fits"]]
    firsts = {id(r) for r in {(r["dp"], r["tp"], r["pp"]): r for r in reversed(fitting)}.values()}
    order = [r for r in fitting if id(r) in firsts] + [r for r in fitting if id(r) not in firsts]
    chosen: list[dict[str, Any]] = []
    for r in order:
        t = r["predicted_step_s"]
        if len(chosen) < k and all(abs(t - c["predicted_step_s"]) > apart * min(t, c["predicted_step_s"])
                                   for c in chosen):
            chosen.append(r)
    chosen += [r for r in order if all(r is not c for c in chosen)][: k - len(chosen)]
    return sorted(chosen, key=lambda r: fitting.index(r))


def verify(args: argparse.Namespace, cfg: C.TrainConfig, rows: list[dict[str, Any]], ranks: int,
           say: Callable[[str], None], rounds: int = VERIFY_ROUNDS) -> None:
    """Run the :func:`verify_choice` of ``args.verify`` layouts; set ``measured_step_s`` on their rows: the
    fastest of ``rounds`` runs, each round running every chosen layout once, so a layout's runs lie
    minutes apart (``measured_runs_s``: every run's figure). On a shared host one 20-step run can be
    slowed down for its whole length by other work (measured on this project's 2-core VM: the same
    layout at 0.27 s and 0.55 s per step within ten minutes); that is the host, not the layout."""
    chosen = verify_choice(rows, args.verify)
    for row in chosen:
        row["measured_runs_s"] = []
    with tempfile.TemporaryDirectory(prefix="hvdllm-plan-") as tmp:
        for r in range(rounds):
            for i, row in enumerate(chosen):
                out = Path(tmp) / f"{r}-{i:03d}"
                cmd = [*launcher(ranks), "train", *train_flags(args, cfg, row), "--max-steps", str(VERIFY_STEPS),
                       "--set", f"run.log_interval={VERIFY_LOG_INTERVAL}", "--set", "run.eval_interval=0",
                       "--set", f"run.eval_sequences={ranks}",          # at least one sequence per rank
                       "--set", "sample.tokens=0", "--set", "run.progress=false", "--set", "run.tensorboard=false",
                       "--out", str(out)]
                say(f"verify {r * len(chosen) + i + 1}/{rounds * len(chosen)}: dp {row['dp']} tp {row['tp']} pp "
                    f"{row['pp']} micro {row['micro_batch']} {row['schedule']}")
                code, tail = _run_group(cmd, VERIFY_TIMEOUT_S)
                if code != 0:
                    say(f"verify run failed (exit {code}): {tail}")
                    continue
                t = measured_step_s(out)
                if t is not None:
                    row["measured_runs_s"].append(t)
    for row in chosen:
        row["measured_step_s"] = min(row["measured_runs_s"], default=None)


def _run_group(cmd: list[str], timeout_s: float) -> tuple[int, str]:
    """Run ``cmd`` in its own process group; past ``timeout_s`` it is stopped (exit 124): SIGTERM first,
    which horovodrun passes on to the ranks it started in their own sessions, then SIGKILL."""
    import signal

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, " ".join(out.strip().splitlines()[-1:])
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.communicate(timeout=15)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        return 124, f"stopped after {timeout_s:.0f} s"


def measure_under_horovodrun(args: argparse.Namespace, ranks: int, say: Callable[[str], None]) -> dict[str, Any] | None:
    """Measure with ``horovodrun -np ranks`` (this command on every rank, collectives over the real
    backend, ranks sharing the cores as in training); None if that launch fails."""
    model = [a for flag, v in (("--preset", args.preset), ("--config", args.config),
                               ("--global-batch", args.global_batch)) if v is not None for a in (flag, str(v))]
    model.append("--bind-cores" if args.bind_cores else "--no-bind-cores")
    with tempfile.TemporaryDirectory(prefix="hvdllm-plan-") as tmp:
        target = args.profile or str(Path(tmp) / "profile.json")
        dp_target = Path(tmp) / "dp_rates.json"
        say(f"measuring on {ranks} ranks: {' '.join(launcher(ranks)[:4])} hvdllm plan ... (a data-parallel job, "
            "then a model-parallel one)")
        dp = subprocess.run([*launcher(ranks), "plan", *model, "--profile", str(dp_target), "--json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, DP_RATES_ENV: "1"})
        r = subprocess.run([*launcher(ranks), "plan", *model, "--profile", target, "--json"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0 or not Path(target).is_file():
            tail = r.stderr.strip().splitlines()[-1:] if r.stderr else []
            say(f"measuring on {ranks} ranks failed (exit {r.returncode}: {tail}); measuring one process instead")
            return None
        profile = M.load_profile(target)
        if dp.returncode == 0 and dp_target.is_file():
            profile["dp_flops_per_s"] = json.loads(dp_target.read_text(encoding="utf-8"))["dp_flops_per_s"]
            if args.profile:
                M.save_profile(profile, args.profile)
        else:
            say(f"measuring compute in a data-parallel job failed (exit {dp.returncode}); its layouts use the "
                "model-parallel job's rates")
        return profile


def measure_dp_rates(args: argparse.Namespace, cfg: C.TrainConfig, layouts: list[CM.Layout]) -> int:
    """The first of the two measuring launches (``DP_RATES_ENV`` set): the compute rates at the plain
    data-parallel layouts' micro-batches in a plain data-parallel job (Horovod's data-parallel cycle, as
    such a training job runs), written to ``--profile`` as ``dp_flops_per_s``."""
    import torch

    import hvdllm.torch as hvd

    hvd.init()
    torch.set_num_threads(rank_threads(hvd, args.bind_cores))
    micro = sorted({lay.micro_batch for lay in layouts if lay.plain_dp})
    rates = M.compute_rates(cfg.gpt_config(), cfg.seq_len, micro, hvd)
    if hvd.rank() == 0 and args.profile:
        M.save_profile({"dp_flops_per_s": {str(b): r for b, r in rates.items()}}, args.profile)
    return 0


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def table(rows: list[dict[str, Any]]) -> str:
    """The ranked layouts as a fixed-width table."""
    has_measured = any("measured_step_s" in r for r in rows)
    head = ["#", "dp", "tp", "pp", "zero", "micro", "accum", "schedule", "step_s", "tokens/s", "MiB/rank", "fits",
            "bottleneck"] + (["measured_s"] if has_measured else [])
    lines = []
    for i, r in enumerate(rows, 1):
        cells = [str(i), str(r["dp"]), str(r["tp"]), str(r["pp"]), str(r["zero"]), str(r["micro_batch"]),
                 str(r["accum"]), r["schedule"] if r["pp"] > 1 else "-", f"{r['predicted_step_s']:.4f}",
                 f"{r['tokens_per_s']:,.0f}", _mib(r["memory_bytes_per_rank"]), "yes" if r["fits"] else "NO",
                 r["bottleneck"]]
        if has_measured:
            m = r.get("measured_step_s")
            cells.append("" if m is None else f"{m:.4f}")
        lines.append(cells)
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), *(fmt(c) for c in lines)])


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation of two equally long lists (no ties expected)."""
    import numpy as np

    ra, rb = np.argsort(np.argsort(a)).astype(float), np.argsort(np.argsort(b)).astype(float)
    if len(a) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def run(args: argparse.Namespace, check_train: Callable[[list[str]], None]) -> int:
    """The ``plan`` command; ConfigError for bad input (before anything is measured or written)."""
    cfg = _config(args)
    launched = launched_size()
    ranks = args.ranks if args.ranks is not None else launched
    if ranks < 1:
        raise ConfigError(f"--ranks {ranks} must be >= 1")
    if launched > 1 and ranks != launched:
        raise ConfigError(f"--ranks {ranks} differs from this job's {launched} ranks; leave --ranks out under horovodrun")
    if args.verify < 0:
        raise ConfigError(f"--verify {args.verify} must be >= 0")
    if args.verify and launched > 1:
        raise ConfigError("--verify launches horovodrun itself: run hvdllm plan --verify K from one process")
    profile = None
    if args.profile and Path(args.profile).exists():
        try:
            profile = M.load_profile(args.profile)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    shape = shape_of(cfg)
    try:
        check_train(["--zero", "1", "--framework", cfg.run.framework])
        zero_stages: tuple[int, ...] = (0, 1, 2)
    except ConfigError:
        zero_stages = (0,)                       # no sharded optimizer in this hvdllm train (or framework)
    layouts = list(CM.layouts(ranks, shape, cfg.batch.global_batch, zero_stages))
    if not layouts:
        raise ConfigError(f"no layout of {ranks} ranks fits --global-batch {cfg.batch.global_batch} and "
                          f"model.n_head={shape.n_head}, n_layer={shape.n_layer}")

    if launched > 1 and os.environ.get(DP_RATES_ENV):
        return measure_dp_rates(args, cfg, layouts)
    hvd, threads = None, None
    if launched > 1:
        import hvdllm.torch as hvd

        from hvdllm.core.process_sets import ProcessSet

        pairs = [ProcessSet(list(m)) for m in M.pair_members(launched)]
        hvd.init(process_sets=pairs)          # a model-parallel job: the collectives' own latency
        threads = rank_threads(hvd, args.bind_cores)
    root = hvd is None or hvd.rank() == 0
    say = (lambda s: print(f"hvdllm plan: {s}", file=sys.stderr, flush=True)) if root else (lambda s: None)
    if profile is None and launched == 1 and ranks > 1:
        profile = measure_under_horovodrun(args, ranks, say)
    if profile is None:
        micro = sorted({lay.micro_batch for lay in layouts})
        pair = None
        if hvd is not None and pairs:
            pair = next(ps for ps in pairs if hvd.rank() in ps.ranks)
        tp_micro = sorted({lay.micro_batch for lay in layouts if lay.tp > 1})
        pp_micro = sorted({lay.micro_batch for lay in layouts if lay.pp > 1})
        profile = M.measure(cfg.gpt_config(), cfg.seq_len, micro, ranks, hvd, note=say, pair_set=pair,
                            tp_micro_batches=tp_micro, pp_micro_batches=pp_micro, threads=threads,
                            bound=hvd is not None and args.bind_cores)
        if args.profile and root:
            M.save_profile(profile, args.profile)
            say(f"profile written to {args.profile}")
    if not root:
        return 0
    for a in profile.get("assumed", []):
        say(f"assumed: {a}")
    knobs = CM.RunKnobs(log_interval=cfg.run.log_interval, stop_check_interval=cfg.run.stop_check_interval,
                        stop_overlapped=cfg.run.stop_check_overlap and cfg.run.framework == "torch",
                        zero2_per_pass=cfg.run.framework == "torch",
                        clipping=cfg.optim.max_grad_norm > 0)
    rows = predict(shape, layouts, M.machine(profile), cfg.run.bucket_cap_mb * 2**20, knobs)
    if args.verify:
        verify(args, cfg, rows, ranks, say)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(f"{len(rows)} layouts of {ranks} rank(s) for {cfg.model.preset} ({cfg.gpt_config().num_params() / 1e6:.2f}M "
              f"params), global batch {cfg.batch.global_batch} x {cfg.seq_len} tokens; profile: "
              f"{profile.get('backend')} on {profile.get('host')}")
        print(table(rows))
    best = rows[0]
    prefix = f"horovodrun -np {ranks} " if ranks > 1 else ""
    line = f"best: {prefix}hvdllm train {' '.join(train_flags(args, cfg, best))}" + (
        "" if best["fits"] else "   (NO layout fits the memory)")
    if args.json:
        say(line)
    else:
        print(line)
    measured = [r for r in rows if r.get("measured_step_s")]
    if len(measured) >= 2:
        pred, meas = [r["predicted_step_s"] for r in measured], [r["measured_step_s"] for r in measured]
        err = max(abs(p - m) / m for p, m in zip(pred, meas))
        say(f"verify: largest |predicted - measured| / measured {err:.0%}; Spearman {spearman(pred, meas):.2f} "
            f"over {len(measured)} layouts")
    return 0
