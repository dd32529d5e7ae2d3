"""Checkpoints that prove themselves: meta.json records a sha256 and size per file, loading verifies it;
a corrupt or truncated newest checkpoint makes --resume warn once (naming the file) and fall back to the
previous good one; `hvdllm sample` on a checkpoint that does not verify exits 2 with one line."""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest

from hvdllm.cli import main
from hvdllm.train import checkpoint as ckpt
from hvdllm.train import resume
from hvdllm.train.config import ConfigError
from tests.test_train_torch import QUIET, SMALLER


def _tiny_state(seed: int) -> dict[str, dict[str, np.ndarray]]:
    """A tiny model's weights and Adam moments, as the trainers hand them to write_checkpoint."""
    import torch

    from hvdllm.models.config import GPTConfig
    from hvdllm.models.gpt import GPT
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=8))
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    moments = {f"{k}.exp_avg": np.full_like(v, 0.1 * seed) for k, v in weights.items()}
    return {"model": weights, "optimizer": moments, "rng": {"torch_cpu": np.arange(seed + 3, dtype=np.uint8)}}


def _write(run: Path, step: int) -> Path:
    return ckpt.write_checkpoint(run, step, _tiny_state(step), {"framework": "torch"},
                                 extra_files={"tokenizer.json": b'{"kind": "byte"}'}, keep=3)


def test_meta_records_every_file_and_read_checks_it(tmp_path: Path) -> None:
    d = _write(tmp_path, 5)
    meta = ckpt.verify(d)
    names = sorted(p.name for p in d.iterdir() if p.name != ckpt.META)
    assert sorted(meta["files"]) == names == ["model.safetensors", "optimizer.safetensors", "rng.safetensors",
                                              "tokenizer.json"]
    for name, rec in meta["files"].items():
        data = (d / name).read_bytes()
        assert rec == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    files, _ = ckpt.read_checkpoint(d)
    for k, v in _tiny_state(5)["model"].items():
        np.testing.assert_array_equal(files["model"][k], v)
    # a flipped byte keeps the size but not the sum; a missing file is named too
    before = (d / "optimizer.safetensors").read_bytes()
    raw = bytearray(before)
    raw[-3] ^= 0x10
    (d / "optimizer.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ckpt.CorruptCheckpoint, match=r"optimizer\.safetensors has sha256"):
        ckpt.read_checkpoint(d)
    (d / "optimizer.safetensors").write_bytes(before)
    ckpt.verify(d)
    (d / "rng.safetensors").unlink()
    with pytest.raises(ckpt.CorruptCheckpoint, match=r"rng\.safetensors is unreadable"):
        ckpt.verify(d)
    assert issubclass(ckpt.CorruptCheckpoint, ConfigError)          # the CLI's exit 2


@pytest.mark.parametrize("trial", range(20))
def test_truncated_newest_falls_back_to_the_previous_good_one(tmp_path: Path, trial: int) -> None:
    """20 seeded trials: a random file of the newest checkpoint (meta.json included) cut at a random byte."""
    rng = random.Random(1000 + trial)
    good = _write(tmp_path, 10)
    newest = _write(tmp_path, 20)
    victim = rng.choice(sorted(p for p in newest.iterdir()))
    data = victim.read_bytes()
    cut = rng.randrange(len(data))                 # 0 .. len-1 bytes survive
    victim.write_bytes(data[:cut])
    warnings: list[str] = []
    found, meta = resume.pick_checkpoint(tmp_path, warnings.append)
    assert found == good and meta["step"] == 10
    assert len(warnings) == 1 and str(victim) in warnings[0], warnings
    files, _ = ckpt.read_checkpoint(found)       # the fall-back loads and holds step 10's state
    for kind, arrays in _tiny_state(10).items():
        assert files[kind].keys() == arrays.keys()
        for k, v in arrays.items():
            np.testing.assert_array_equal(files[kind][k], v)


def test_no_checkpoint_or_none_that_verifies_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="holds no checkpoint to resume; run without --resume"):
        resume.pick_checkpoint(tmp_path, print)
    d = _write(tmp_path, 3)
    (d / "model.safetensors").write_bytes(b"")
    warnings: list[str] = []
    with pytest.raises(ConfigError, match=r"no checkpoint in .* verifies \(1 corrupt, newest step_00000003\)"):
        resume.pick_checkpoint(tmp_path, warnings.append)
    assert len(warnings) == 1


@pytest.mark.timeout(240)
def test_train_resume_falls_back_and_sample_refuses_a_corrupt_checkpoint(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    common = ["--max-steps", "4", "--global-batch", "4", "--micro-batch", "4", "--set", "run.eval_interval=0",
              "--set", "run.checkpoint_interval=1", "--set", "sample.tokens=3", *SMALLER, *QUIET]
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--exit-at-step", "2", *common]) == 0
    newest = ckpt.latest_checkpoint(run)
    assert newest.name == "step_00000002"
    model = newest / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])
    capsys.readouterr()
    # hvdllm sample on it: exit 2, one line naming the file
    assert main(["sample", "--checkpoint", str(newest)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(model) in err and "bytes" in err, err
    # --resume: one warning naming the file, continues from step 1, and rewrites step 2 (verified)
    assert main(["train", "--out", str(run), "--resume", *common]) == 0
    cap = capsys.readouterr()
    assert cap.err.count("hvdllm: warning:") == 1 and str(model) in cap.err, cap.err
    assert "step_00000001 (step 1)" in cap.out
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [3, 4]
    for _, d in ckpt.list_checkpoints(run):
        ckpt.verify(d)
    # resume into a run directory without a checkpoint says so
    assert main(["train", "--out", str(tmp_path / "fresh"), "--resume", *common]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err and not (tmp_path / "fresh").exists()


@pytest.mark.timeout(400)
def test_two_ranks_agree_on_the_fall_back_and_on_refusing(tmp_path: Path) -> None:
    """Rank 0 picks the checkpoint and every rank follows: both ranks resume from step 1 when step 2 is
    torn, and both exit 2 when the folder holds no checkpoint (no rank waits for the other)."""
    from tests.multirank import RankFailure, run_ranks

    common = ["train", "--max-steps", "3", "--global-batch", "4", "--micro-batch", "2", "--set",
              "run.eval_interval=0", "--set", "run.checkpoint_interval=1", "--set", "sample.tokens=2", *SMALLER,
              *QUIET]
    run = tmp_path / "run"
    assert main([*common, "--out", str(run), "--exit-at-step", "2"]) == 0
    model = ckpt.latest_checkpoint(run) / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-1])
    reports = run_ranks("train_worker.py", np=2, launcher="gloo", timeout=300,
                        args=[*common, "--out", str(run), "--resume"])
    assert [r["code"] for r in reports] == [0, 0]
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2, 3]
    meta = ckpt.verify(ckpt.latest_checkpoint(run))
    assert meta["world_size"] == 2
    # horovodrun exits 1 when a rank exits non-zero; each rank's own status is in its output
    with pytest.raises(RankFailure) as info:
        run_ranks("train_worker.py", np=2, launcher="gloo", timeout=300,
                  args=[*common, "--out", str(tmp_path / "none"), "--resume"])
    out = str(info.value)
    assert "reports from ranks [0, 1]" in out and out.count("holds no checkpoint to resume") == 1, out
    # each rank refused on its own: both reported status 2 (horovodrun may terminate the second rank
    # after its report but before its exit status or its message reaches the output)
    assert {r: rep["code"] for r, rep in info.value.reports.items()} == {0: 2, 1: 2}, out


@pytest.mark.timeout(300)
def test_allowed_batch_change_resumes_and_the_allowance_is_not_inherited(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    common = ["--global-batch", "4", "--micro-batch", "2", "--set", "run.eval_interval=0", "--set",
              "run.checkpoint_interval=1", "--set", "sample.tokens=2", *SMALLER, *QUIET]
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--max-steps", "1", *common]) == 0
    again = ["train", "--out", str(run), "--resume", "--max-steps", "2", "--global-batch", "8"]
    assert main(again) == 2
    assert "batch.global_batch=4 in the checkpoint, 8 in this run" in capsys.readouterr().err
    assert main([*again, "--set", "run.allow_batch_change=true"]) == 0
    assert ckpt.read_meta(ckpt.latest_checkpoint(run))["config"]["batch"]["global_batch"] == 8
    capsys.readouterr()
    # the next resume inherits global_batch=8 from the saved config, not the allowance
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "3"]) == 0
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "4", "--global-batch", "4"]) == 2
    assert "batch.global_batch=8 in the checkpoint, 4 in this run" in capsys.readouterr().err
