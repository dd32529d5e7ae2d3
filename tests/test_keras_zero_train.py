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

With tensor/pipeline parallelism (4 ranks, one launch): dp=2 x tp=2 and dp=2 x pp=2 at --zero 1 and 2 against
--zero 0, bitwise (see the test), and --zero 2 checkpoints resumed at another stage.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hvdllm.train import checkpoint as ckpt
from tests.multirank import run_ranks
from tests.test_pipeline_train import ARGS as PP_ARGS
from tests.train_runs import assert_identical_run, assert_same_run

ARGS = [*PP_ARGS, "--framework", "tensorflow", "--set", "run.eval_sequences=8"]
TOL = 1e-5
NORM_RTOL = 1e-12


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


# 4 ranks on 2 shared cores: 20 ms negotiation cycles, as the other 4-rank train tests (1 ms starved gloo).
@pytest.mark.timeout(1500)
def test_zero_with_tp_and_pp_on_four_ranks_equals_zero_0_and_resumes_as_another_stage(tmp_path: Path) -> None:
    """dp=2 x tp=2 and dp=2 x pp=2 (two micro-batches per rank and step, clipping active): --zero 1 and --zero 2
    log the --zero 0 run's losses exactly and end with bitwise its weights and Adam moments; only the logged
    gradient norm may differ in the last float64 bits (ZeRO sums each tensor's square from its dp shards; the
    clip coefficient, rounded to float32, came out the same). Each rank holds at most half (+ padding) of the
    --zero 0 run's optimizer-state bytes. A --zero 2 run stopped at step 2 and resumed with --zero 0 (tp) or
    --zero 1 (pp) logs and ends as the --zero 0 run (the checkpoint holds the unsplit moments by name)."""
    d = {f"{lay}_{kind}": tmp_path / f"{lay}_{kind}" for lay in ("tp", "pp") for kind in ("z0", "z1", "z2", "half")}
    layouts = {"tp": [*ARGS, "--tp", "2"], "pp": [*ARGS, "--pp", "2"]}
    runs = [[*args, "--zero", z, "--out", str(d[f"{lay}_z{z}"])] for lay, args in layouts.items() for z in "012"]
    for lay, later in (("tp", "0"), ("pp", "1")):
        runs += [[*layouts[lay], "--zero", "2", "--exit-at-step", "2", "--out", str(d[f"{lay}_half"])],
                 [*layouts[lay], "--zero", later, "--resume", "--out", str(d[f"{lay}_half"])]]
    reps = run_ranks("train_runs_worker.py", np=4, launcher="gloo", timeout=1400, args=[json.dumps(runs)],
                     env={"HOROVOD_CYCLE_TIME": "20"})
    assert [rep["codes"] for rep in reps] == [[0] * len(runs)] * 4, reps
    for lay in ("tp", "pp"):
        ref = d[f"{lay}_z0"]
        for other in ("z1", "z2", "half"):
            assert_identical_run(ref, d[f"{lay}_{other}"], NORM_RTOL)
        assert [s for s, _ in ckpt.list_checkpoints(d[f"{lay}_half"])] == [2, 4]
        (f0, m0), (f2, m2) = (ckpt.read_checkpoint(ckpt.latest_checkpoint(d[f"{lay}_{z}"])) for z in ("z0", "z2"))
        assert m2["config"]["parallel"]["zero"] == 2 and m2["optimizer_format"] == "unsplit"
        assert f2["optimizer"].keys() == f0["optimizer"].keys()
        for z in ("z1", "z2"):
            _, meta = ckpt.read_checkpoint(ckpt.latest_checkpoint(d[f"{lay}_{z}"]))
            full, shard = m0["optimizer_state_bytes"], meta["optimizer_state_bytes"]
            assert len(full) == len(shard) == 4 and all(b > 0 for b in full), (lay, z, full, shard)
            # dp=2: half of each bucket's two moments, plus at most one padding element per bucket (two: the
            # decayed matrices, the rest) and moment: 16 bytes; 64 allowed
            assert all(s <= f / 2 + 64 for s, f in zip(shard, full)), (lay, z, full, shard)
