"""Evaluation in `hvdllm train` issues the same collectives on every rank whatever run.eval_sequences is:
a 3-stage pipeline (each stage's activation exchange named per link) and dp2 x tp2 with 3 validation
sequences of micro-batch 1 (data-parallel rank 0 holds 2 batches, rank 1 one: it runs a discarded
padding batch so its tensor-parallel collectives stay paired) both log the one-process run's losses.
Before the fix the first hung in the final evaluation (stage 1 sent on link 1-2 under a name stage 2 did
not wait for), the second in the evaluation's all-reduce (Horovod names unnamed ops by a per-process
count, and the tp forwards had issued different numbers of them)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.multirank import run_ranks
from tests.test_pipeline_train import QUIET
from tests.train_runs import column

ARGS = ["train", "--preset", "tiny", "--max-steps", "2", "--global-batch", "4", "--micro-batch", "1",
        "--set", "model.n_layer=4", "--set", "model.n_embd=32", "--set", "run.log_interval=1",
        "--set", "run.eval_interval=0", "--set", "run.eval_sequences=3", "--set", "sample.tokens=2", *QUIET]


@pytest.mark.timeout(600)
def test_uneven_eval_split_and_3_stage_pipeline_log_the_one_process_losses(tmp_path: Path) -> None:
    one, pp3, tp2 = (tmp_path / n for n in ("np1", "pp3", "dp2tp2"))
    (r,) = run_ranks("train_worker.py", np=1, launcher="python", args=[*ARGS, "--out", str(one)], timeout=150)
    assert r["code"] == 0
    # (two launches: a process registers its process sets once, so one launch holds one layout)
    for np_, layout, run in ((4, ["--tp", "2"], tp2), (3, ["--pp", "3"], pp3)):
        reps = run_ranks("train_runs_worker.py", np=np_, launcher="gloo", timeout=300,
                         args=[json.dumps([[*ARGS, *layout, "--out", str(run)]])],
                         env={"HOROVOD_CYCLE_TIME": "20"})    # (as tests/test_tp_pp_train.py: ranks > cores)
        assert [rep["codes"] for rep in reps] == [[0]] * np_, reps
        for col in ("loss", "val_loss"):
            ref = column(one, col)
            assert [s for s, _ in column(run, col)] == [s for s, _ in ref], f"{run.name} {col}"
            np.testing.assert_allclose([v for _, v in column(run, col)], [v for _, v in ref], rtol=1e-5,
                                       err_msg=f"{run.name} {col}")
