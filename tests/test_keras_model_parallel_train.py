"""`hvdllm train --framework tensorflow` with --tp 2, --pp 2 (1F1B and GPipe) on 2 ranks and --tp 2 --pp 2 (1F1B)
on 4 ranks logs the losses, gradient norms and validation losses of the one-process Keras run of the same config
(within 1e-5) and the same sample; its checkpoints hold the unsplit weights (a one-process Keras GPT loads
them) and the unsplit Adam moments keyed by parameter name; runs stopped halfway and resumed log what the run
in one go logged; a data-parallel resume of a model-parallel checkpoint and bad layouts are one-line errors.

Each rank count is one launch of tests/workers/train_runs_worker.py (start-up dominates the cost)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hvdllm.train import checkpoint as ckpt
from tests.multirank import run_ranks
from tests.test_pipeline_train import ARGS as PP_ARGS
from tests.train_runs import assert_bad_input, assert_resumed_equals, column, resume_runs

# The torch pipeline tests' tiny config (clipping active, tied embeddings across the stages).
ARGS = [*PP_ARGS, "--framework", "tensorflow", "--set", "run.eval_sequences=8"]
COLUMNS = (("loss", 1e-5), ("val_loss", 1e-5), ("grad_norm", 1e-5))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keras_mp") / "np1"
    (r,) = run_ranks("train_runs_worker.py", np=1, launcher="python", timeout=150,
                     args=[json.dumps([[*ARGS, "--out", str(out)]])])
    assert r["codes"] == [0], r
    return out


def assert_equals_reference(run: Path, reference: Path) -> None:
    """Same logged columns as the one-process run, same sample, and an unsplit checkpoint that a
    one-process Keras GPT loads, holding the one-process run's weights."""
    from hvdllm.models.gpt_keras import GPT, GPTConfig, load_torch_state_dict

    assert [s for s, _ in column(run, "loss")] == [1, 2, 3, 4]
    for col, tol in COLUMNS:
        np.testing.assert_allclose([v for _, v in column(run, col)], [v for _, v in column(reference, col)],
                                   rtol=tol, err_msg=f"{run.name} {col}")
    assert (run / "sample.txt").read_text() == (reference / "sample.txt").read_text()
    (f1, _), (f2, m2) = (ckpt.read_checkpoint(ckpt.latest_checkpoint(d)) for d in (reference, run))
    assert m2["optimizer_format"] == "unsplit" and f2["model"].keys() == f1["model"].keys()
    load_torch_state_dict(GPT(GPTConfig(**m2["model"])), f2["model"], strict=True)
    for k in f1["model"]:
        np.testing.assert_allclose(f2["model"][k], f1["model"][k], rtol=1e-4, atol=1e-5, err_msg=k)
    names = {k[len("state."):].rsplit(".", 1)[0] for k in f2["optimizer"] if k.startswith("state.")}
    assert names == set(f1["model"]), names ^ set(f1["model"])


@pytest.mark.timeout(560)
def test_tp2_and_pp2_on_two_ranks(reference: Path, tmp_path: Path) -> None:
    tp2, f1b, gpipe, halves = (tmp_path / n for n in ("tp2", "1f1b", "gpipe", "halves"))
    pp = [*ARGS, "--pp", "2"]
    runs = [[*ARGS, "--tp", "2", "--out", str(tp2)], [*pp, "--out", str(f1b)],
            [*pp, "--set", "parallel.schedule=gpipe", "--out", str(gpipe)], *resume_runs(pp, halves, 2),
            [*ARGS, "--out", str(halves), "--resume", "--tp", "1", "--pp", "1"]]       # data parallel: refused
    reps = run_ranks("train_runs_worker.py", np=2, launcher="gloo", timeout=520, args=[json.dumps(runs)])
    assert [rep["codes"] for rep in reps] == [[0] * 5 + [2]] * 2, reps
    refusal = reps[0]["errors"][-1]
    assert "dp=1 x tp=1 x pp=2" in refusal and "dp=2 x tp=1 x pp=1" in refusal, refusal
    for run in (tp2, f1b, gpipe):
        assert_equals_reference(run, reference)
    assert_resumed_equals(f1b, halves, 2)


@pytest.mark.timeout(880)
def test_tp2_pp2_on_four_ranks_and_resume(reference: Path, tmp_path: Path) -> None:
    """tp2 x pp2 equals the one-process run, and stopped halfway and resumed (every rank cuts its shards of
    the unsplit weights and moments) it logs what the run in one go logged."""
    f1b, halves = tmp_path / "1f1b", tmp_path / "halves"
    both = [*ARGS, "--tp", "2", "--pp", "2"]
    runs = [[*both, "--out", str(f1b)], *resume_runs(both, halves, 2)]
    # 4 ranks on 2 shared cores: 20 ms negotiation cycles, as the torch 4-rank test (1 ms starved gloo).
    reps = run_ranks("train_runs_worker.py", np=4, launcher="gloo", timeout=820, args=[json.dumps(runs)],
                     env={"HOROVOD_CYCLE_TIME": "20"})
    assert [rep["codes"] for rep in reps] == [[0, 0, 0]] * 4, reps
    assert_equals_reference(f1b, reference)
    assert_resumed_equals(f1b, halves, 2)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("extra, words", [
    (["--pp", "3"], "--pp 3"),                                        # more stages than the 2 layers
    (["--tp", "2"], "does not divide the world size 1"),             # world size 1, not divisible by tp*pp
    (["--set", "parallel.schedule=zigzag"], "parallel.schedule='zigzag'"),
])
def test_bad_layouts_are_one_line_errors(tmp_path: Path, extra: list[str], words: str) -> None:
    assert_bad_input(ARGS + extra, words, tmp_path / "run")
