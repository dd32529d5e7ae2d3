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
from hvdllm.train import config as C

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


# The bad-input catalogue of the command line: (arguments after `hvdllm train --out RUN`, text the one
# stderr line must contain). {tmp} is the test's folder, holding the files _files() writes.
BAD_TRAIN = [
    # unknown keys, presets, choices
    (["--preset", "huge"], "model.preset='huge'"),
    (["--set", "model.preset=huge"], "model.preset='huge'"),
    (["--set", "optim.lrr=1"], "optim.lrr"),
    (["--set", "nosuch.x=1"], "nosuch.x"),
    (["--set", "lr=1"], "'lr'"),
    (["--set", "optim.lr"], "optim.lr"),
    (["--framework", "jax"], "run.framework='jax'"),
    (["--set", "run.precision=fp8"], "run.precision='fp8'"),
    (["--set", "schedule.decay=step"], "schedule.decay='step'"),
    (["--set", "parallel.schedule=zigzag"], "parallel.schedule='zigzag'"),
    (["--set", "run.device=tpu"], "run.device='tpu'"),
    # --elastic: data parallel, torch, a commit interval >= 1
    (["--elastic", "--tp", "2"], "--elastic is data parallel only (--tp 2 --pp 1)"),
    (["--elastic", "--pp", "2"], "--elastic is data parallel only (--tp 1 --pp 2)"),
    (["--elastic", "--framework", "tensorflow"], "--elastic with --framework tensorflow"),
    (["--set", "run.elastic_commit_every=0"], "run.elastic_commit_every=0"),
    (["--set", "run.elastic_commit_every=2.5"], "run.elastic_commit_every"),
    (["--set", "run.compression=int8"], "run.compression='int8'"),
    (["--set", "data.tokenizer=word"], "data.tokenizer='word'"),
    # wrong types
    (["--set", "optim.lr=fast"], "optim.lr='fast'"),
    (["--max-steps", "abc"], "run.max_steps='abc'"),
    (["--set", "run.max_steps=1.5"], "run.max_steps='1.5'"),
    (["--set", "run.tensorboard=maybe"], "run.tensorboard='maybe'"),
    (["--set", "run.max_steps=none"], "run.max_steps='none'"),
    (["--config", "{tmp}/float_for_int.toml"], "run.max_steps=2.5"),
    (["--config", "{tmp}/str_for_bool.yaml"], "optim.fused='sometimes'"),
    # inf / nan in every float section
    (["--set", "optim.lr=inf"], "optim.lr=inf"),
    (["--set", "optim.lr=nan"], "optim.lr=nan"),
    (["--set", "optim.weight_decay=-inf"], "optim.weight_decay=-inf"),
    (["--set", "optim.max_grad_norm=nan"], "optim.max_grad_norm=nan"),
    (["--set", "run.bucket_cap_mb=inf"], "run.bucket_cap_mb=inf"),
    (["--set", "run.peak_flops=nan"], "run.peak_flops=nan"),
    (["--set", "sample.temperature=nan"], "sample.temperature=nan"),
    (["--set", "data.val_fraction=nan"], "data.val_fraction=nan"),
    (["--set", "model.dropout=inf"], "model.dropout=inf"),
    (["--set", "schedule.min_lr_ratio=nan"], "schedule.min_lr_ratio=nan"),
    (["--config", "{tmp}/inf.toml"], "optim.lr=inf"),
    (["--config", "{tmp}/nan.yaml"], "optim.eps=nan"),
    # negative, zero, out of range
    (["--set", "optim.lr=-0.001"], "optim.lr=-0.001"),
    (["--set", "optim.lr=0"], "optim.lr=0.0"),
    (["--set", "optim.eps=0"], "optim.eps=0.0"),
    (["--set", "optim.beta1=1"], "optim.beta1=1.0"),
    (["--set", "optim.beta2=-0.1"], "optim.beta2=-0.1"),
    (["--set", "run.bucket_cap_mb=-1"], "run.bucket_cap_mb=-1.0"),
    (["--set", "sample.top_k=-1"], "sample.top_k=-1"),
    (["--set", "sample.tokens=-5"], "sample.tokens=-5"),
    (["--set", "sample.temperature=0"], "sample.temperature=0.0"),
    (["--set", "data.val_fraction=1"], "data.val_fraction=1.0"),
    (["--set", "schedule.min_lr_ratio=1.5"], "schedule.min_lr_ratio=1.5"),
    (["--set", "schedule.warmup_steps=-1"], "schedule.warmup_steps=-1"),
    (["--set", "model.dropout=1"], "model.dropout=1.0"),
    (["--set", "model.n_layer=0"], "model.n_layer=0"),
    (["--set", "model.vocab_size=70000"], "model.vocab_size=70000"),
    (["--set", "data.bpe_vocab_size=100"], "data.bpe_vocab_size=100"),
    (["--set", "run.seed=-1"], "run.seed=-1"),
    (["--set", "run.keep_checkpoints=0"], "run.keep_checkpoints=0"),
    (["--set", "run.log_interval=0"], "run.log_interval=0"),
    (["--set", "run.threads=-2"], "run.threads=-2"),
    (["--max-steps", "0"], "run.max_steps=0"),
    (["--global-batch", "0"], "batch.global_batch=0"),
    (["--micro-batch", "-2"], "batch.micro_batch=-2"),
    (["--exit-at-step", "0"], "run.exit_at_step=0"),
    (["--out", ""], "run.out=''"),
    # fields that do not fit together
    (["--global-batch", "10", "--micro-batch", "4"], "--global-batch 10"),
    (["--max-steps", "5", "--exit-at-step", "9"], "--exit-at-step 9"),
    (["--set", "data.seq_len=4096"], "data.seq_len=4096"),
    (["--set", "model.n_head=3"], "model.n_head=3"),
    # impossible layouts (this process is a world of 1 rank; the tiny preset has 4 layers)
    (["--tp", "0"], "parallel.tp=0"),
    (["--pp", "8"], "--pp 8"),
    (["--tp", "2"], "does not divide the world size 1"),
    (["--pp", "2"], "does not divide the world size 1"),
    # files
    (["--config", "{tmp}/nope.toml"], "nope.toml"),
    (["--config", "{tmp}/conf.ini"], "conf.ini"),
    (["--config", "{tmp}/broken.toml"], "broken.toml"),
    (["--config", "{tmp}/unknown_key.toml"], "optim.learning_rate"),
    (["--config", "{tmp}/list.yaml"], "list.yaml"),
    (["--data", "{tmp}/missing.txt"], "missing.txt"),
    (["--data", "{tmp}/empty.txt"], "empty.txt"),
    (["--data", "{tmp}/emptydir"], "emptydir"),
    (["--data", "{tmp}/tiny.txt"], "tiny.txt"),
]

BAD_SAMPLE = [
    (["--temperature", "nan"], "sample.temperature=nan"),
    (["--temperature", "-1"], "sample.temperature=-1.0"),
    (["--top-k", "-1"], "sample.top_k=-1"),
    (["--top-k", "two"], "sample.top_k='two'"),
    (["--tokens", "-1"], "sample.tokens=-1"),
    (["--seed", "-3"], "sample.seed=-3"),
]


def _files(tmp: Path) -> None:
    (tmp / "empty.txt").write_text("")
    (tmp / "emptydir").mkdir()
    (tmp / "tiny.txt").write_text("hello")
    (tmp / "conf.ini").write_text("[optim]\nlr = 1\n")
    (tmp / "broken.toml").write_text("[optim\nlr = 1\n")
    (tmp / "unknown_key.toml").write_text("[optim]\nlearning_rate = 1.0\n")
    (tmp / "float_for_int.toml").write_text("[run]\nmax_steps = 2.5\n")
    (tmp / "inf.toml").write_text("[optim]\nlr = inf\n")
    (tmp / "nan.yaml").write_text("optim:\n  eps: .nan\n")
    (tmp / "str_for_bool.yaml").write_text("optim:\n  fused: sometimes\n")
    (tmp / "list.yaml").write_text("- optim\n- lr\n")


@pytest.mark.parametrize("args, needle", BAD_TRAIN, ids=[" ".join(a) for a, _ in BAD_TRAIN])
def test_bad_train_input_exits_2_with_one_line_and_writes_nothing(args: list[str], needle: str, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    _files(tmp_path)
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), *(a.format(tmp=tmp_path) for a in args)])
    err = capsys.readouterr().err
    assert code == 2, (args, err)
    assert err.count("\n") == 1 and err.startswith("hvdllm: error: ") and needle in err, (args, err)
    assert not out.exists(), args


@pytest.mark.parametrize("args, needle", BAD_SAMPLE, ids=[" ".join(a) for a, _ in BAD_SAMPLE])
def test_bad_sample_input_exits_2_before_reading_the_checkpoint(args: list[str], needle: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    assert main(["sample", "--checkpoint", str(tmp_path / "nothing_here"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, (args, err)
    assert not any(tmp_path.iterdir())


def test_train_help_lists_every_key_with_type_default_and_allowed_values(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--help"]) == 0
    entries = " ".join(capsys.readouterr().out.split())          # undo the line wrapping
    for section, specs in C.SPECS.items():
        for name, spec in specs.items():
            default = "none" if spec.default is None else C.files._toml_value(spec.default)
            entry = f"{spec.key} ("
            assert entry in entries, spec.key
            text = entries[entries.index(entry):]
            assert f"{spec.base.__name__}, default {default}; allowed: {spec.allowed()}" in text[:300], spec.key
    assert "allowed: a finite float >= 0" in entries and "run.bucket_cap_mb (" in entries
    assert "model.preset (--preset; str" in entries


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
