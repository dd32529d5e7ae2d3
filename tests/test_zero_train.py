"""`hvdllm train --zero 1|2` on real ranks: the same run as --zero 0 under tensor and pipeline parallelism
(4 ranks: dp=2 x tp=2, dp=2 x pp=2), and a --zero 2 run on 4 ranks stopped at step 2 and resumed on 2
ranks with --zero 1 continues as the uninterrupted 4-rank run (checkpoints hold the unsplit state by
name, so world size and stage may change); the tensor-parallel --zero 2 run bounds its gradient buffers
to one bucket at a time (parallel.zero_inflight_mb=0) and still matches. Bad --zero values exit 2 with
one line.

ZeRO and replicated runs reduce the same gradients; they differ only where the clipping norm is summed
(shards in float64 vs buckets in float32) and, across world sizes, in the accumulation order: 1e-5."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hvdllm.train import checkpoint as ckpt
from tests.multirank import run_ranks
from tests.test_pipeline_train import ARGS as PP_ARGS
from tests.train_runs import assert_bad_input, assert_same_run

ARGS = [*PP_ARGS, "--set", "run.eval_sequences=8"]
TOL = 1e-5


def _same_run(a: Path, b: Path) -> None:
    assert_same_run(a, b, TOL)


@pytest.mark.timeout(1500)
def test_zero_with_tp_pp_and_resume_on_another_world_size_and_stage(tmp_path: Path) -> None:
    d = {n: tmp_path / n for n in ("tp_z0", "tp_z2", "pp_z0", "pp_z1", "dp_z0", "halves")}
    runs = [[*ARGS, "--tp", "2", "--zero", "0", "--out", str(d["tp_z0"])],
            [*ARGS, "--tp", "2", "--zero", "2", "--set", "parallel.zero_inflight_mb=0", "--out", str(d["tp_z2"])],
            [*ARGS, "--pp", "2", "--zero", "0", "--out", str(d["pp_z0"])],
            [*ARGS, "--pp", "2", "--zero", "1", "--out", str(d["pp_z1"])],
            [*ARGS, "--zero", "0", "--out", str(d["dp_z0"])],
            [*ARGS, "--zero", "2", "--exit-at-step", "2", "--out", str(d["halves"])]]
    reps = run_ranks("train_runs_worker.py", np=4, launcher="gloo", timeout=1000, args=[json.dumps(runs)],
                     env={"HOROVOD_CYCLE_TIME": "20"})
    assert [rep["codes"] for rep in reps] == [[0] * len(runs)] * 4, reps
    resumed = [[*ARGS, "--zero", "1", "--resume", "--out", str(d["halves"])]]
    reps = run_ranks("train_runs_worker.py", np=2, launcher="gloo", timeout=400, args=[json.dumps(resumed)])
    assert [rep["codes"] for rep in reps] == [[0], [0]], reps
    _same_run(d["tp_z0"], d["tp_z2"])
    _same_run(d["pp_z0"], d["pp_z1"])
    assert [s for s, _ in ckpt.list_checkpoints(d["halves"])] == [2, 4]
    _same_run(d["dp_z0"], d["halves"])      # 4 ranks --zero 2 to step 2, then 2 ranks --zero 1


@pytest.mark.parametrize("value,words", [("3", "parallel.zero=3"), ("-1", "parallel.zero=-1"),
                                         ("x", "parallel.zero='x'")])
def test_bad_zero_values_exit_2(tmp_path: Path, value: str, words: str) -> None:
    assert_bad_input(["train", "--zero", value], words, tmp_path / "out")


@pytest.mark.parametrize("args,words", [
    (["--zero", "1", "--set", "parallel.zero_inflight_mb=4"], "parallel.zero_inflight_mb=4.0 bounds torch ZeRO-2"),
    (["--zero", "2", "--framework", "tensorflow", "--set", "parallel.zero_inflight_mb=4"], "--framework tensorflow"),
    (["--zero", "2", "--set", "parallel.zero_inflight_mb=-1"], "parallel.zero_inflight_mb=-1")])
def test_bad_zero_inflight_values_exit_2(tmp_path: Path, args: list[str], words: str) -> None:
    assert_bad_input(["train", *args], words, tmp_path / "out")

