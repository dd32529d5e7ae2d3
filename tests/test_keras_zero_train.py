"""`hvdllm train --framework tensorflow --zero 1|2` on real ranks: the same run as --zero 0, and resumes that
change the world size and the stage both ways (checkpoints hold the unsplit state in the replicated optimizer's
format, so any world size or stage loads it).

Runs (the torch pipeline tests' tiny config: 4 steps, clipping active, AdamW with the vectors excluded
from weight decay; three launches, start-up dominates the cost):
- 2 ranks (Gloo): --zero 0, --zero 1, --zero 2; "down": --zero 2 stopped at step 2; "up" resumed with --zero 1;
- 1 process: "up": --zero 0 stopped at step 2 (before the 2-rank launch); "down" resumed with --zero 0;
  --zero 1 in one process (the local backend);
- mpirun (mpi4py backend: the ZeRO update's collectives run as ordered ops in the compiled step): --zero 2.
Each is compared with the 2-rank --zero 0 run: every logged loss, validation loss and gradient norm, and the
last checkpoint's weights and optimizer state, within 1e-5 relative. Why not bitwise: ZeRO sums the clipping
norm from the shards in float64 (the replicated path per tensor in float32), and 1 vs 2 ranks sum a step's
gradients in another order (accumulation vs allreduce); Adam's normalised update carries those last-bit
differences into a few near-zero elements (the torch ZeRO trainer test uses the same 1e-5).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hvdllm.train import checkpoint as ckpt
from tests.multirank import run_ranks
from tests.test_pipeline_train import ARGS as PP_ARGS
from tests.train_runs import assert_bad_input, assert_same_run

ARGS = [*PP_ARGS, "--framework", "tensorflow", "--set", "run.eval_sequences=8"]
TOL = 1e-5


def _launch(np: int, launcher: str, runs: list[list[str]], timeout: float) -> None:
    reps = run_ranks("train_runs_worker.py", np=np, launcher=launcher, timeout=timeout, args=[json.dumps(runs)])
    assert [rep["codes"] for rep in reps] == [[0] * len(runs)] * np, reps


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keras_zero_train")
    d = {n: root / n for n in ("z0", "z1", "z2", "down", "up", "np1_z1")}
    _launch(1, "python", [[*ARGS, "--zero", "0", "--exit-at-step", "2", "--out", str(d["up"])]], 300)
    _launch(2, "gloo", [[*ARGS, "--zero", "0", "--out", str(d["z0"])],
                        [*ARGS, "--zero", "1", "--out", str(d["z1"])],
                        [*ARGS, "--zero", "2", "--out", str(d["z2"])],
                        [*ARGS, "--zero", "2", "--exit-at-step", "2", "--out", str(d["down"])],
                        [*ARGS, "--zero", "1", "--resume", "--out", str(d["up"])]], 900)
    _launch(1, "python", [[*ARGS, "--zero", "0", "--resume", "--out", str(d["down"])],
                          [*ARGS, "--zero", "1", "--out", str(d["np1_z1"])]], 300)
    return d


@pytest.mark.timeout(1600)
def test_zero_1_and_2_log_the_zero_0_run_and_resume_across_world_sizes_and_stages(runs: dict[str, Path]) -> None:
    for name in ("z1", "z2", "np1_z1"):
        assert_same_run(runs["z0"], runs[name], TOL)
    for name in ("down", "up"):         # 2 ranks --zero 2 -> 1 rank --zero 0; 1 rank --zero 0 -> 2 ranks --zero 1
        assert [s for s, _ in ckpt.list_checkpoints(runs[name])] == [2, 4], name
        assert_same_run(runs["z0"], runs[name], TOL)
    (f0, m0), (f2, m2) = (ckpt.read_checkpoint(ckpt.latest_checkpoint(runs[n])) for n in ("z0", "z2"))
    assert m2["config"]["parallel"]["zero"] == 2 and len(f2["optimizer"]) == len(f0["optimizer"]) > 2


@pytest.mark.timeout(600)
def test_zero_2_on_the_mpi4py_backend(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "mpi_z2"
    _launch(2, "mpirun", [[*ARGS, "--zero", "2", "--out", str(out)]], 400)
    assert_same_run(runs["z0"], out, TOL)


def test_keras_zero_with_tp_or_pp_exits_2(tmp_path: Path) -> None:
    assert_bad_input(["train", "--framework", "tensorflow", "--zero", "1", "--tp", "2"],
                     "--zero 1 with --tp 2 --pp 1 needs --framework torch", tmp_path / "out")
