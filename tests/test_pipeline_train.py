"""`horovodrun -np 2 hvdllm train --pp 2` logs the losses of the unsplit one-process run of the same config,
with the 1F1B and the GPipe schedule, and a pp run stopped halfway and resumed logs the same losses as the
run in one go; bad pipeline settings are one-line errors (exit 2, nothing written)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hvdllm.train import checkpoint as ckpt
from tests.multirank import run_ranks
from tests.train_runs import assert_bad_input, assert_resumed_equals, column, resume_runs

QUIET = ["--set", "run.threads=1", "--set", "run.tensorboard=false", "--set", "run.progress=false"]
# Two layers of width 32, four micro-batches per step; max_grad_norm 0.5 makes clipping (on the global
# norm summed over the stages) active, and the tiny preset ties the embeddings across the stages.
ARGS = ["train", "--preset", "tiny", "--max-steps", "4", "--global-batch", "8", "--micro-batch", "2",
        "--set", "model.n_layer=2", "--set", "model.n_embd=32", "--set", "run.log_interval=1",
        "--set", "run.eval_interval=2", "--set", "sample.tokens=5", "--set", "optim.max_grad_norm=0.5", *QUIET]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pp") / "np1"
    (r,) = run_ranks("train_worker.py", np=1, launcher="python", args=[*ARGS, "--out", str(out)], timeout=120)
    assert r["code"] == 0
    return out


@pytest.mark.timeout(260)
@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_pp2_train_logs_the_unsplit_losses(reference: Path, tmp_path: Path, schedule: str) -> None:
    out, halves = tmp_path / f"pp2-{schedule}", tmp_path / f"pp2-{schedule}-halves"
    pp_args = [*ARGS, "--pp", "2", "--set", f"parallel.schedule={schedule}"]
    runs = [[*pp_args, "--out", str(out)], *(resume_runs(pp_args, halves, 2) if schedule == "1f1b" else [])]
    reps = run_ranks("train_runs_worker.py", np=2, launcher="gloo", timeout=230, args=[json.dumps(runs)])
    assert [r["codes"] for r in reps] == [[0] * len(runs)] * 2, reps
    l1, l2 = column(reference, "loss"), column(out, "loss")
    assert [s for s, _ in l1] == [s for s, _ in l2] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in l2], [v for _, v in l1], rtol=1e-5)
    for col, tol in (("val_loss", 1e-5), ("grad_norm", 1e-4)):
        np.testing.assert_allclose([v for _, v in column(out, col)], [v for _, v in column(reference, col)],
                                   rtol=tol, err_msg=col)
    f1, _ = ckpt.read_checkpoint(ckpt.latest_checkpoint(reference))
    f2, _ = ckpt.read_checkpoint(ckpt.latest_checkpoint(out))
    assert f1["model"].keys() == f2["model"].keys()          # the checkpoint holds the unsplit model
    for k in f1["model"]:
        np.testing.assert_allclose(f2["model"][k], f1["model"][k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert (out / "sample.txt").read_text() == (reference / "sample.txt").read_text()
    if schedule == "1f1b":
        assert_resumed_equals(out, halves, 2)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra, words", [
    (["--pp", "3"], "--pp 3"),                                        # more stages than the 2 layers
    (["--pp", "2"], "does not divide the world size 1"),             # world size 1, not divisible by tp*pp
    (["--set", "parallel.schedule=zigzag"], "parallel.schedule='zigzag'"),
])
def test_bad_pipeline_settings_are_one_line_errors(tmp_path: Path, extra: list[str], words: str) -> None:
    assert_bad_input(ARGS + extra, words, tmp_path / "run")
