"""`hvdllm` command line: help, and bad input -> exit status 2, one stderr line, nothing written."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hvdllm.cli import main
from hvdllm.models.config import PRESETS
from hvdllm.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]


def test_help(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "sample" in out
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--framework", "--preset", "--config", "--set", "--data", "--out", "--max-steps", "--global-batch",
                 "--micro-batch", "--tp", "--pp", "--resume", "--exit-at-step", "metrics.csv", "exit status"):
        assert flag in out, flag
    assert main(["sample", "--help"]) == 0 and "--checkpoint" in capsys.readouterr().out


def test_console_script_and_module() -> None:
    """`python -m hvdllm.cli` works as the console script does (entry point hvdllm.cli:main)."""
    r = subprocess.run([sys.executable, "-m", "hvdllm.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "hvdllm" in r.stdout
    exe = Path(sys.executable).parent / "hvdllm"
    if exe.exists():
        r = subprocess.run([str(exe), "train", "--preset", "nope", "--out", "/nonexistent/x"], capture_output=True,
                           text=True, cwd=ROOT)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "nope" in r.stderr


def _bad_cases(tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "empty.txt").write_text("")
    (tmp / "emptydir").mkdir()
    (tmp / "bad.toml").write_text("[optim]\nlearning_rate = 1.0\n")
    (tmp / "tiny.txt").write_text("hello")
    return [
        (["--preset", "huge"], "huge"),
        (["--set", "optim.lrr=1"], "optim.lrr"),
        (["--set", "optim.lr=fast"], "optim.lr='fast'"),
        (["--config", str(tmp / "bad.toml")], "optim.learning_rate"),
        (["--config", str(tmp / "nope.toml")], "nope.toml"),
        (["--data", str(tmp / "missing.txt")], "missing.txt"),
        (["--data", str(tmp / "empty.txt")], "empty.txt"),
        (["--data", str(tmp / "emptydir")], "emptydir"),
        (["--data", str(tmp / "tiny.txt")], "tiny.txt"),
        (["--global-batch", "10", "--micro-batch", "4"], "--global-batch 10"),
        (["--set", "data.seq_len=4096"], "data.seq_len=4096"),
        (["--max-steps", "abc"], "abc"),
        (["--max-steps", "0"], "run.max_steps=0"),
        (["--framework", "jax"], "jax"),
    ]


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    for args, needle in _bad_cases(tmp_path):
        code = main(["train", "--out", str(out), *args])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert err.count("\n") == 1 and needle in err, (args, err)
        assert not out.exists(), args


def test_resume_from_another_shape_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shape = dict(PRESETS["tiny"].__dict__, vocab_size=512)
    ckpt.write_checkpoint(tmp_path, 3, {"model": {"w": np.zeros(2, np.float32)}}, {"framework": "torch", "model": shape})
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = main(["train", "--out", str(tmp_path), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "model.vocab_size=512" in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    # and without --resume, an existing run is not overwritten
    assert main(["train", "--out", str(tmp_path)]) == 2 and "--resume" in capsys.readouterr().err


def test_sample_without_checkpoint_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sample", "--checkpoint", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
