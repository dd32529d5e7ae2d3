"""`hvdllm train` with PyTorch, end to end: the loss falls, np=2 == np=1, exact resume, sample."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from hvdllm.cli import main
from hvdllm.train import checkpoint as ckpt
from hvdllm.train.metrics import read_metrics
from tests.multirank import run_ranks

QUIET = ["--set", "run.threads=1", "--set", "run.tensorboard=false", "--set", "run.progress=false"]
# A smaller model than the tiny preset where only equality matters (keeps the test suite fast on 2 cores).
SMALLER = ["--set", "model.n_layer=2", "--set", "model.n_embd=64", "--set", "model.block_size=64"]


def _final(run: Path) -> tuple[dict, dict]:
    files, meta = ckpt.read_checkpoint(ckpt.latest_checkpoint(run))
    return files, meta


def _column(run: Path, name: str) -> list[tuple[int, float]]:
    """(step, value) of a metrics.csv column where it is filled in (values parse exactly: repr'd floats)."""
    return [(int(r["step"]), float(r[name])) for r in read_metrics(run / "metrics.csv") if r[name]]


@pytest.mark.timeout(240)
def test_validation_loss_falls_and_sample(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    code = main(["train", "--preset", "tiny", "--out", str(run), "--max-steps", "50", "--global-batch", "8",
                 "--micro-batch", "8", "--set", "run.eval_interval=25", "--set", "run.eval_sequences=32",
                 "--set", "sample.tokens=40", *QUIET])
    assert code == 0
    val = dict(_column(run, "val_loss"))
    assert sorted(val) == [0, 25, 50]
    assert val[0] > 5.0                      # ~ln(256): an untrained byte model
    assert val[50] < val[0] - 1.5, val       # falls clearly within 50 steps
    losses = [v for _, v in _column(run, "loss")]
    assert losses[-1] < losses[0] - 1.0
    for name in ("config.toml", "tokenizer.json", "metrics.csv", "loss.png", "sample.txt"):
        assert (run / name).is_file(), name
    assert "resolved config" in capsys.readouterr().out
    # the sample command reads the run's newest checkpoint
    assert main(["sample", "--checkpoint", str(run), "--prompt", "def ", "--tokens", "25"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def ") and len(text) > 10


@pytest.mark.timeout(240)
def test_exit_and_resume_is_bitwise_identical(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    common = ["--max-steps", "8", "--global-batch", "8", "--micro-batch", "4", "--set", "run.log_interval=3",
              "--set", "run.eval_interval=4", "--set", "run.checkpoint_interval=0", "--set", "sample.tokens=5",
              "--set", "model.dropout=0.1", *SMALLER, *QUIET]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--out", str(a), *common]) == 0
    assert main(["train", "--out", str(b), "--exit-at-step", "4", *common]) == 0
    assert [s for s, _ in ckpt.list_checkpoints(b)] == [4]
    assert main(["train", "--out", str(b), "--resume", *common]) == 0
    fa, ma = _final(a)
    fb, mb = _final(b)
    assert ma["step"] == mb["step"] == 8
    for kind in ("model", "optimizer", "rng"):
        assert fa[kind].keys() == fb[kind].keys()
        for k in fa[kind]:
            assert np.array_equal(fa[kind][k], fb[kind][k]), (kind, k)
    for col in ("loss", "val_loss", "lr"):
        assert _column(a, col) == _column(b, col), col
    assert [s for s, _ in _column(a, "loss")] == [3, 6, 8]
    # a resume with another model shape is refused before anything is written
    capsys.readouterr()
    assert main(["train", "--out", str(b), "--resume", *common, "--set", "model.n_embd=32"]) == 2   # (was 64)
    assert "model.n_embd" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_two_ranks_train_like_one(tmp_path: Path) -> None:
    """np=2 (gloo, accumulation 1, each rank pinned to its cores) == np=1 (accumulation 2) on the same
    global batch, step by step."""
    args = ["train", "--max-steps", "6", "--global-batch", "8", "--micro-batch", "4", "--set", "run.log_interval=1",
            "--set", "run.eval_interval=3", "--set", "sample.tokens=5", *SMALLER, *QUIET]
    one, two = tmp_path / "np1", tmp_path / "np2"
    (r1,) = run_ranks("train_worker.py", np=1, launcher="python", args=[*args, "--out", str(one)], timeout=200)
    reps = run_ranks("train_worker.py", np=2, launcher="gloo", timeout=200,
                     args=[*args, "--set", "run.bind_cores=true", "--out", str(two)])
    assert r1["code"] == 0 and [r["code"] for r in reps] == [0, 0]
    cores = sorted(os.sched_getaffinity(0))                  # pinned: each rank its own half (or core r % n)
    t = max(1, len(cores) // 2)
    assert [r["cores"] for r in reps] == [cores[(i * t) % len(cores):][:t] for i in range(2)]
    assert [r["backend"] for r in reps] == ["horovod", "horovod"] and reps[0]["size"] == 2
    l1, l2 = _column(one, "loss"), _column(two, "loss")
    assert [s for s, _ in l1] == [s for s, _ in l2] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in l2], [v for _, v in l1], rtol=1e-5)
    v1, v2 = _column(one, "val_loss"), _column(two, "val_loss")
    np.testing.assert_allclose([v for _, v in v2], [v for _, v in v1], rtol=1e-5)
    f1, _ = _final(one)
    f2, _ = _final(two)
    for k in f1["model"]:
        np.testing.assert_allclose(f2["model"][k], f1["model"][k], rtol=1e-4, atol=1e-5, err_msg=k)
