"""`hvdllm plan`: --json rows (DESIGN.md keys), the table and best flags, a measured profile reused with
--profile, --verify on one rank, and bad input (exit 2, one line, nothing written)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hvdllm.cli import main
from hvdllm.plan.measure import load_profile

KEYS = {"dp", "tp", "pp", "zero", "micro_batch", "schedule", "fits", "memory_bytes_per_rank", "predicted_step_s"}
PROFILE = {"flops_per_s": {"1": 2e8, "2": 3e8, "4": 4e8, "8": 5e8, "16": 5e8}, "allreduce_latency_s": 1e-4,
           "allreduce_bw": 2e9, "p2p_latency_s": 1e-4, "p2p_bw": 2e9, "optimizer_s_per_param": 2e-9,
           "memory_bytes": 4e9, "backend": "test", "host": "test"}


def _profile(tmp: Path, **over) -> str:
    p = tmp / "profile.json"
    p.write_text(json.dumps({**PROFILE, **over}))
    return str(p)


def _json_rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_json_rows_have_the_design_keys_and_are_ranked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", "--preset", "tiny", "--ranks", "2", "--profile", _profile(tmp_path), "--json"]) == 0
    rows = _json_rows(capsys.readouterr().out)
    assert len(rows) == 27            # 19 layouts + the 4 with dp=2 again with --zero 1 and --zero 2
    assert {r["zero"] for r in rows if r["dp"] > 1} == {0, 1, 2} and {r["zero"] for r in rows if r["dp"] == 1} == {0}
    for r in rows:
        assert KEYS <= set(r) and "measured_step_s" not in r
        assert r["dp"] * r["tp"] * r["pp"] == 2 and isinstance(r["fits"], bool)
        assert r["memory_bytes_per_rank"] > 0 and r["predicted_step_s"] > 0
    times = [r["predicted_step_s"] for r in rows]
    assert times == sorted(times)
    assert {(r["dp"], r["tp"], r["pp"]) for r in rows} == {(2, 1, 1), (1, 2, 1), (1, 1, 2)}


def test_too_little_memory_marks_layouts_and_ranks_fitting_first(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # 20 MiB per rank: only the small-micro-batch layouts of the tiny model fit
    assert main(["plan", "--preset", "tiny", "--ranks", "2", "--profile", _profile(tmp_path, memory_bytes=20 * 2**20),
                 "--json"]) == 0
    rows = _json_rows(capsys.readouterr().out)
    fits = [r["fits"] for r in rows]
    assert any(fits) and not all(fits) and fits == sorted(fits, reverse=True)
    assert all((r["memory_bytes_per_rank"] <= 20 * 2**20) == r["fits"] for r in rows)


def test_table_and_best_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", "--preset", "small", "--global-batch", "8", "--ranks", "4", "--profile",
                 _profile(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].split()[:4] == ["#", "dp", "tp", "pp"]
    best = [line for line in lines if line.startswith("best: horovodrun -np 4 hvdllm train ")]
    assert len(best) == 1 and "--preset small --global-batch 8 --micro-batch" in best[0]


def test_measure_writes_a_profile_that_is_reused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prof = tmp_path / "p" / "machine.json"
    assert main(["plan", "--preset", "tiny", "--global-batch", "4", "--ranks", "1", "--profile", str(prof),
                 "--json"]) == 0
    first = _json_rows(capsys.readouterr().out)
    data = load_profile(str(prof))
    assert sorted(int(k) for k in data["flops_per_s"]) == [1, 2, 4]
    assert all(v > 0 for v in data["flops_per_s"].values()) and data["optimizer_s_per_param"] > 0
    stamp = prof.stat().st_mtime_ns
    assert main(["plan", "--preset", "tiny", "--global-batch", "4", "--ranks", "1", "--profile", str(prof),
                 "--json"]) == 0
    assert _json_rows(capsys.readouterr().out) == first      # same profile, same predictions, not re-measured
    assert prof.stat().st_mtime_ns == stamp


def test_verify_adds_measured_step_time(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", "--preset", "tiny", "--global-batch", "4", "--ranks", "1", "--profile", _profile(tmp_path),
                 "--verify", "1", "--json"]) == 0
    rows = _json_rows(capsys.readouterr().out)
    # two rounds: the layout ran twice, the faster run counts
    assert len(rows[0]["measured_runs_s"]) == 2 and rows[0]["measured_step_s"] == min(rows[0]["measured_runs_s"]) > 0
    assert all("measured_step_s" not in r for r in rows[1:])


def test_verify_choice_spans_the_shapes_and_skips_near_ties() -> None:
    from hvdllm.plan.cli import verify_choice

    def row(dp: int, tp: int, pp: int, t: float, fits: bool = True) -> dict:
        return {"dp": dp, "tp": tp, "pp": pp, "predicted_step_s": t, "fits": fits}

    rows = [row(2, 1, 1, 1.00), row(2, 1, 1, 1.05), row(2, 1, 1, 1.08), row(2, 1, 1, 1.30, fits=False),
            row(2, 1, 1, 1.40), row(1, 1, 2, 2.00), row(1, 2, 1, 2.10), row(2, 1, 1, 3.0)]
    pick = lambda k: [rows.index(r) for r in verify_choice(rows, k)]  # noqa: E731
    # the shape bests (0, 5; 6 is within 10% of 5), then the next best more than 10% from all chosen
    assert pick(3) == [0, 4, 5]
    assert pick(4) == [0, 4, 5, 7]
    # near-ties fill in, best first, once nothing farther apart is left; layouts that do not fit never
    assert pick(6) == [0, 1, 4, 5, 6, 7]
    assert pick(20) == [0, 1, 2, 4, 5, 6, 7]


def test_bad_input_exits_2_one_line_nothing_written(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"flops_per_s": {"1": 1e9}}))
    new = tmp_path / "new" / "profile.json"
    cases = [
        (["--ranks", "0"], "--ranks 0"),
        (["--ranks", "5"], "no layout of 5 ranks"),
        (["--global-batch", "0"], "--global-batch 0"),
        (["--preset", "huge"], "huge"),
        (["--verify", "-1"], "--verify -1"),
        (["--config", str(tmp_path / "missing.toml")], "missing.toml"),
        (["--profile", str(broken)], "broken.json"),
        (["--profile", str(partial)], "missing allreduce_latency_s"),
        (["--ranks", "abc"], "abc"),
    ]
    for args, needle in cases:
        code = main(["plan", *args, *([] if "--profile" in args else ["--profile", str(new)])])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert err.count("\n") == 1 and needle in err, (args, err)
        assert not new.exists() and not new.parent.exists(), args


def test_two_ranks_are_measured_under_horovodrun(tmp_path: Path) -> None:
    """`hvdllm plan --ranks 2` from one process measures on 2 real ranks (horovodrun --gloo): the
    collectives' latency and bandwidth over Horovod, the compute with the ranks sharing the cores."""
    import subprocess
    import sys

    from tests.multirank import ROOT, base_env

    prof = tmp_path / "two.json"
    r = subprocess.run([sys.executable, "-m", "hvdllm.cli", "plan", "--preset", "tiny", "--global-batch", "4",
                        "--ranks", "2", "--profile", str(prof), "--json"], cwd=ROOT, env=base_env(),
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    data = load_profile(str(prof))
    assert data["backend"] == "horovod" and data["ranks"] == 2 and data["assumed"] == []
    # each rank pinned to its own share of the host's cores (round robin when the cores are fewer)
    cores = sorted(os.sched_getaffinity(0))
    t = max(1, len(cores) // 2)
    assert data["bind_cores"] is True and data["threads_per_rank"] == t
    assert data["cores_by_rank"] == [cores[(r * t) % len(cores):][:t] for r in range(2)]
    assert data["allreduce_latency_s"] > 0 and data["p2p_latency_s"] > 0 and data["allreduce_bw"] > 0
    assert list(data["insitu_s"]) == ["2"] and data["insitu_s"]["2"] > 0      # kappa on the 2-rank world
    assert list(data["insitu_bw"]) == ["2"] and data["insitu_bw"]["2"] > 0
    # the tensor-parallel shard on the 2-rank world, at the micro-batches of the tp=2 layouts (1, 2, 4)
    assert list(data["tp_probe_s"]) == ["2"] and sorted(map(int, data["tp_probe_s"]["2"])) == [1, 2, 4]
    assert all(v > 0 for v in data["tp_probe_s"]["2"].values()) and data["probe_layers"] == 4
    # rank 0 computing while rank 1 waits (a pipeline's idle stage), and a ping-pong to a waiting peer
    assert list(data["idle_speedup"]) == ["1"] and data["idle_speedup"]["1"] > 0
    assert data["pp_exchange_latency_s"] > 0 and data["pp_exchange_bw"] > 0
    # and, from a first launch as a plain data-parallel job, the rates at the dp=2 layouts' micro-batches
    assert sorted(map(int, data["dp_flops_per_s"])) == [1, 2] and min(data["dp_flops_per_s"].values()) > 0
    rows = _json_rows(r.stdout)
    # dp=2 with --zero 0, 1 and 2 (2 micro-batches each), tp=2, pp=2
    assert len(rows) == 2 * 3 + 3 + 6 and all(x["dp"] * x["tp"] * x["pp"] == 2 for x in rows)


def test_keras_plans_zero_with_tensor_and_pipeline_parallelism(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`hvdllm train --framework tensorflow` shards with --zero 1|2 on every layout with dp > 1, --tp/--pp
    included (as torch): plan offers those, and --zero 0 only where dp = 1."""
    cfg = tmp_path / "keras.toml"
    cfg.write_text('[run]\nframework = "tensorflow"\n')
    assert main(["plan", "--config", str(cfg), "--ranks", "4", "--profile", _profile(tmp_path), "--json"]) == 0
    rows = _json_rows(capsys.readouterr().out)
    assert {r["zero"] for r in rows if r["tp"] * r["pp"] == 1} == {0, 1, 2}
    assert {r["zero"] for r in rows if r["dp"] > 1 and r["tp"] * r["pp"] > 1} == {0, 1, 2}
    assert {r["zero"] for r in rows if r["dp"] == 1} == {0}
