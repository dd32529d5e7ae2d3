"""`horovodrun -np 2 hvdllm train --tp 2` logs the losses of the unsplit one-process run of the same config;
a tp run stopped halfway and resumed (--resume) logs the same losses as the run in one go."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hvdllm.train import checkpoint as ckpt
from tests.multirank import run_ranks
from tests.train_runs import assert_resumed_equals, column, resume_runs

QUIET = ["--set", "run.threads=1", "--set", "run.tensorboard=false", "--set", "run.progress=false"]


@pytest.mark.timeout(480)
def test_tp2_train_logs_the_unsplit_losses(tmp_path: Path) -> None:
    # max_grad_norm 0.5 makes clipping active, so the global (cross-shard) norm is exercised too.
    args = ["train", "--preset", "tiny", "--max-steps", "6", "--global-batch", "8", "--micro-batch", "4",
            "--set", "run.log_interval=1", "--set", "run.eval_interval=3", "--set", "sample.tokens=5",
            "--set", "optim.max_grad_norm=0.5", *QUIET]
    one, two, halves = tmp_path / "np1", tmp_path / "tp2", tmp_path / "tp2-halves"
    (r1,) = run_ranks("train_worker.py", np=1, launcher="python", args=[*args, "--out", str(one)], timeout=200)
    runs = [[*args, "--tp", "2", "--out", str(two)], *resume_runs([*args, "--tp", "2"], halves, 3)]
    reps = run_ranks("train_runs_worker.py", np=2, launcher="gloo", args=[json.dumps(runs)], timeout=250)
    assert r1["code"] == 0 and [r["codes"] for r in reps] == [[0, 0, 0]] * 2, reps
    l1, l2 = column(one, "loss"), column(two, "loss")
    assert [s for s, _ in l1] == [s for s, _ in l2] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in l2], [v for _, v in l1], rtol=1e-5)
    np.testing.assert_allclose([v for _, v in column(two, "val_loss")], [v for _, v in column(one, "val_loss")],
                               rtol=1e-5)
    np.testing.assert_allclose([v for _, v in column(two, "grad_norm")], [v for _, v in column(one, "grad_norm")],
                               rtol=1e-4)
    f1, _ = ckpt.read_checkpoint(ckpt.latest_checkpoint(one))
    f2, _ = ckpt.read_checkpoint(ckpt.latest_checkpoint(two))
    assert f1["model"].keys() == f2["model"].keys()          # the checkpoint holds the unsplit model
    for k in f1["model"]:
        np.testing.assert_allclose(f2["model"][k], f1["model"][k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert (two / "sample.txt").is_file()
    assert_resumed_equals(two, halves, 3)
