"""`hvdllm train` building blocks, in one process: config layers, data order, tokenizers, checkpoints, metrics."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hvdllm.data import (BPETokenizer, ByteTokenizer, TokenWindows, check_source, embedded_text, tokenizer_from_dict,
                         write_token_file)
from hvdllm.train import checkpoint as ckpt
from hvdllm.train import config as C
from hvdllm.train.metrics import MetricsLogger, plot_loss, read_metrics

ROOT = Path(__file__).resolve().parents[1]


# -- config ------------------------------------------------------------------------------------------
def test_layers_and_preset_defaults(tmp_path: Path) -> None:
    cfg = C.build([])
    assert cfg.model.preset == "tiny" and cfg.batch.global_batch == C.TRAIN_PRESETS["tiny"]["batch.global_batch"]
    toml = tmp_path / "c.toml"
    toml.write_text('[optim]\nlr = 0.01\n[model]\npreset = "small"\nn_layer = 2\n')
    yaml = tmp_path / "c.yaml"
    yaml.write_text("optim:\n  lr: 0.02\nrun:\n  max_steps: 7\n")
    cfg = C.build([C.load_file(str(toml)), C.parse_sets(["optim.lr=0.03", "run.precision=bf16"]),
                   {"run.max_steps": 5}])
    assert cfg.model.preset == "small" and cfg.gpt_config().n_layer == 2 and cfg.gpt_config().n_embd == 256
    assert cfg.optim.lr == 0.03 and cfg.run.max_steps == 5 and cfg.run.precision == "bf16"
    assert cfg.batch.micro_batch == C.TRAIN_PRESETS["small"]["batch.micro_batch"]
    y = C.build([C.load_file(str(yaml))])
    assert y.optim.lr == 0.02 and y.run.max_steps == 7
    # the saved TOML reads back to the same config
    r = C.resolved(cfg, 256)
    (tmp_path / "r.toml").write_text(C.to_toml(r))
    assert C.build([C.load_file(str(tmp_path / "r.toml"))]) == r
    assert C.from_dict(r.to_dict()) == r


@pytest.mark.parametrize("layers,needle", [
    ([{"model.preset": "huge"}], "model.preset='huge'"),
    ([{"optim.lrr": 1}], "optim.lrr"),
    ([{"nosuch.x": 1}], "nosuch.x"),
    ([{"optim.lr": "fast"}], "optim.lr='fast'"),
    ([{"batch.global_batch": 10, "batch.micro_batch": 4}], "--global-batch 10"),
    ([{"data.seq_len": 1000}], "longer than the model's context"),
    ([{"run.exit_at_step": 9, "run.max_steps": 5}], "--exit-at-step 9"),
    ([{"run.precision": "fp8"}], "run.precision='fp8'"),
])
def test_bad_config_names_the_value(layers: list, needle: str) -> None:
    with pytest.raises(C.ConfigError) as e:
        C.build(layers)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_plan_accumulation() -> None:
    cfg = C.build([{"batch.global_batch": 16, "batch.micro_batch": 4}])
    assert C.plan(cfg, 1).accum == 4 and C.plan(cfg, 2).accum == 2 and C.plan(cfg, 4).accum == 1
    with pytest.raises(C.ConfigError, match="not divisible by --micro-batch 4 x 8"):
        C.plan(cfg, 8)


# -- data ----------------------------------------------------------------------------------------------
def test_embedded_corpus_is_deterministic_text() -> None:
    a, b = embedded_text(), embedded_text()
    assert a == b and len(a) > 500_000 and "assert" in a


def test_batch_order_depends_only_on_step_and_global_batch() -> None:
    tokens = np.arange(10_000, dtype=np.uint16) % 251
    w = TokenWindows([tokens[:6000], tokens[6000:]], 16, 0.1, seed=3)
    assert not set(w.train_ids) & set(w.val_ids) and len(w.val_ids) > 0
    full = w.micro_batches(5, 8, 0, 1, 8)[0]
    halves = [w.micro_batches(5, 8, r, 2, 2) for r in range(2)]
    x = np.concatenate([mb[0] for r in halves for mb in r])
    y = np.concatenate([mb[1] for r in halves for mb in r])
    assert (x == full[0]).all() and (y == full[1]).all() and (x[:, 1:] == y[:, :-1]).all()
    w2 = TokenWindows([tokens[:6000], tokens[6000:]], 16, 0.1, seed=3)
    assert (w2.step_windows(123, 8) == w.step_windows(123, 8)).all()   # across "epochs" too
    seen = np.concatenate([w.step_windows(s, 8) for s in range(len(w.train_ids) // 8)])
    assert len(set(seen.tolist())) == len(seen)                            # no repeats within an epoch


def test_sources_and_bad_paths(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        check_source(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="no such file"):
        check_source(str(tmp_path / "missing"))
    d = tmp_path / "bins"
    d.mkdir()
    write_token_file(d / "a.bin", np.arange(300) % 256)
    assert check_source(str(d)) == "tokens" and check_source(None) == "embedded"
    assert np.array_equal(np.memmap(d / "a.bin", dtype=np.uint16), np.arange(300) % 256)


def test_tokenizers_round_trip() -> None:
    text = "def f(x):\n    return x + 1\n\n" * 50 + "Über naïve café\n"
    assert ByteTokenizer().decode(ByteTokenizer().encode(text)) == text
    bpe = BPETokenizer.train(text, 300)
    ids = bpe.encode(text)
    assert len(ids) < len(text.encode()) and bpe.decode(ids) == text
    again = tokenizer_from_dict(bpe.to_dict())
    assert np.array_equal(again.encode(text), ids)


# -- checkpoints ---------------------------------------------------------------------------------------
def test_checkpoint_round_trip_and_keep(tmp_path: Path) -> None:
    state = {"state": {0: {"step": np.array(3.0, np.float32), "exp_avg": np.ones((2, 3), np.float32)}},
             "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": [0], "fused": None}]}
    arrays, skel = ckpt.flatten_state(state)
    for step in (1, 2, 3):
        ckpt.write_checkpoint(tmp_path, step, {"model": {"w": np.full((2, 2), step, np.float32)}, "optimizer": arrays},
                              {"note": "x", "optimizer": skel}, extra_files={"tokenizer.json": b"{}"}, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    files, meta = ckpt.read_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert meta["step"] == 3 and (files["model"]["w"] == 3).all()
    back = ckpt.unflatten_state(files["optimizer"], meta["optimizer"])
    assert back["param_groups"][0]["betas"] == (0.9, 0.95) and back["state"][0]["exp_avg"].shape == (2, 3)
    assert float(back["state"][0]["step"]) == 3.0


WRITER = """
import sys, numpy as np
sys.path.insert(0, {root!r})
from hvdllm.train import checkpoint as ckpt
big = {{"w": np.zeros((512, 1024), np.float32)}}
ckpt.write_checkpoint({run!r}, 1, {{"model": big}}, {{}})
print("first", flush=True)
ckpt.write_checkpoint({run!r}, 2, {{"model": big, "optimizer": big}}, {{}})
print("second", flush=True)
"""


@pytest.mark.timeout(120)
def test_killed_writer_leaves_previous_checkpoint(tmp_path: Path) -> None:
    """SIGKILL a process in the middle of writing checkpoint 2: checkpoint 1 stays the newest and loads."""
    env = dict(os.environ, HVDLLM_CHECKPOINT_WRITE_DELAY="1.5")
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT), run=str(tmp_path))], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not list((tmp_path / "checkpoints").glob(".tmp-step_00000002-*/model.safetensors")):
            assert time.time() < deadline and proc.poll() is None, "writer never started checkpoint 2"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step_00000001"
    files, meta = ckpt.read_checkpoint(latest)
    assert meta["step"] == 1 and files["model"]["w"].shape == (512, 1024)
    ckpt.write_checkpoint(tmp_path, 2, {"model": {"w": np.ones(3, np.float32)}}, {})   # the next writer cleans up
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000002"


# -- metrics -------------------------------------------------------------------------------------------
def test_metrics_resume_drops_rows_after_checkpoint(tmp_path: Path) -> None:
    m = MetricsLogger(tmp_path, tensorboard=False)
    for s in (1, 2, 3, 4):
        m.log({"step": s, "loss": 1.0 / s, "val_loss": 2.0 if s == 2 else None})
    m = MetricsLogger(tmp_path, resume_step=2, tensorboard=False)
    m.log({"step": 3, "loss": 0.5})
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == ["1", "2", "3"] and rows[2]["loss"] == "0.5" and rows[1]["val_loss"] == "2.0"
    assert plot_loss(tmp_path).is_file()


# -- evaluation split ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n, dp, mb", [(3, 2, 1), (1, 2, 1), (5, 4, 2), (8, 2, 2), (2, 4, 3), (0, 2, 1)])
def test_eval_batches_cover_every_window_once_and_pad_to_one_count(n: int, dp: int, mb: int) -> None:
    from hvdllm.core.evaluation import eval_batches
    windows = np.arange(100, 100 + n)
    plans = [eval_batches(windows, r, dp, mb) for r in range(dp)]
    assert len({len(p) for p in plans}) == 1                      # every rank runs as many forwards
    counted = [int(i) for p in plans for ids, c in p if c for i in ids]
    assert sorted(counted) == list(windows)                        # each window counted exactly once
    assert all(1 <= len(ids) <= mb for p in plans for ids, _ in p)
    assert all(not c for p in plans for _, c in p[next((k for k, (_, c) in enumerate(p) if not c), len(p)):])
    with pytest.raises(ValueError, match="dp_rank=2, dp_size=2"):
        eval_batches(windows, 2, 2, 1)
