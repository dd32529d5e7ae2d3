"""`horovodrun -np 4 hvdllm train --tp 2 --pp 2` (4 ranks oversubscribed on the CPU) logs the losses, gradient
norms and validation losses of the unsplit one-process run, with the 1F1B and the GPipe schedule; its checkpoint
holds the unsplit weights and Adam moments; a run stopped halfway and resumed logs the same losses as the run
in one go; a resume with a data-parallel layout is refused with a one-line error naming both layouts.

All the 4-rank runs share one launch (tests/workers/train_runs_worker.py): start-up dominates their cost."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hvdllm.models.gpt import GPT, GPTConfig
from hvdllm.train import checkpoint as ckpt
from tests.multirank import run_ranks
from tests.train_runs import assert_resumed_equals, column, resume_runs
from tests.test_pipeline_train import ARGS as PP_ARGS

# The pipeline test's tiny config (clipping active, tied embeddings across the stages), with fewer
# validation sequences: evaluation is a pipeline forward per micro-batch, the bulk of these runs' time.
ARGS = [*PP_ARGS, "--set", "run.eval_sequences=8"]
TP_PP = ["--tp", "2", "--pp", "2"]


def _moments_by_name(files: dict, meta: dict) -> dict[str, np.ndarray]:
    """A data-parallel checkpoint's Adam moments keyed "<param>.<moment>" (its state is keyed by the
    optimizer's index: matrices first, then the rest, each in the model's parameter order)."""
    named = list(GPT(GPTConfig(**meta["model"])).named_parameters())
    order = [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]
    return {f"{n}.{m}": files["optimizer"][f"state.{i}.{m}"] for i, n in enumerate(order)
            for m in ("exp_avg", "exp_avg_sq")}


@pytest.mark.timeout(880)
def test_tp2_pp2_train_equals_unsplit_and_resumes(tmp_path: Path) -> None:
    one, f1b, gpipe, halves = (tmp_path / n for n in ("np1", "1f1b", "gpipe", "halves"))
    (r,) = run_ranks("train_worker.py", np=1, launcher="python", args=[*ARGS, "--out", str(one)], timeout=150)
    assert r["code"] == 0
    runs = [[*ARGS, *TP_PP, "--out", str(f1b)],
            [*ARGS, *TP_PP, "--set", "parallel.schedule=gpipe", "--out", str(gpipe)],
            *resume_runs([*ARGS, *TP_PP], halves, 2),
            [*ARGS, "--out", str(halves), "--resume", "--tp", "1", "--pp", "1"]]
    # 4 ranks on 2 shared cores: with Horovod's 1 ms negotiation cycle (its default for model-parallel jobs)
    # two launches hit gloo's 30 s receive timeout (ranks starved); with 20 ms they did not. Slow either way
    # (~140-400 s, by the machine's load): every pipeline exchange is a synchronous, spinning broadcast.
    reps = run_ranks("train_runs_worker.py", np=4, launcher="gloo", timeout=720, args=[json.dumps(runs)],
                     env={"HOROVOD_CYCLE_TIME": "20"})
    assert [rep["codes"] for rep in reps] == [[0, 0, 0, 0, 2]] * 4, reps
    refusal = reps[0]["errors"][-1]                      # (rank 0 prints bad input)
    assert "dp=1 x tp=2 x pp=2" in refusal and "dp=4 x tp=1 x pp=1" in refusal, refusal
    for run in (f1b, gpipe):
        assert [s for s, _ in column(run, "loss")] == [1, 2, 3, 4]
        for col, tol in (("loss", 1e-5), ("val_loss", 1e-5), ("grad_norm", 1e-5)):
            np.testing.assert_allclose([v for _, v in column(run, col)], [v for _, v in column(one, col)],
                                       rtol=tol, err_msg=f"{run.name} {col}")
    # stopped at step 2 and resumed: the same run as in one go
    assert_resumed_equals(f1b, halves, 2)
    (fa, ma), (f0, m0) = (ckpt.read_checkpoint(ckpt.latest_checkpoint(d)) for d in (f1b, one))
    # the checkpoint holds the unsplit model and the unsplit Adam moments, keyed by parameter name
    assert ma["optimizer_format"] == "unsplit"
    assert fa["model"].keys() == f0["model"].keys()
    for k in f0["model"]:
        np.testing.assert_allclose(fa["model"][k], f0["model"][k], rtol=1e-4, atol=1e-5, err_msg=k)
    ref = _moments_by_name(f0, m0)
    assert {f"{k[len('state.'):]}" for k in fa["optimizer"] if not k.endswith(".step")} == set(ref)
    for k, v in ref.items():
        np.testing.assert_allclose(fa["optimizer"][f"state.{k}"], v, rtol=1e-3, atol=1e-9, err_msg=k)
