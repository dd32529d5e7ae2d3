"""`hvdllm train --framework tensorflow` end to end: the loss falls, exit + resume is bitwise the
uninterrupted run, np=2 (Horovod Gloo) logs the np=1 losses, the checkpoint samples in Keras and torch.

One 50-step reference run (in this process, through the CLI's main) serves every test of the module.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HVDLLM_PROGRESS", "lines")

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")

from hvdllm.cli import main  # noqa: E402
from hvdllm.train import checkpoint as ckpt  # noqa: E402
from hvdllm.train.metrics import read_metrics  # noqa: E402
from tests.multirank import run_ranks  # noqa: E402

# A fixed small shape (not the preset's, which may grow): 2 layers, width 64, context 64.
ARGS = ["--preset", "tiny", "--set", "model.n_layer=2", "--set", "model.n_embd=64", "--set", "model.block_size=64",
        "--max-steps", "50", "--global-batch", "16", "--micro-batch", "8",
        "--set", "run.log_interval=5", "--set", "run.eval_interval=25", "--set", "run.eval_sequences=32",
        "--set", "run.checkpoint_interval=0", "--set", "sample.tokens=40", "--set", "run.tensorboard=false"]
SAME = ("step", "loss", "val_loss", "lr", "grad_norm")       # the columns that do not depend on the clock


def train(out: Path, *extra: str) -> int:
    return main(["train", "--framework", "tensorflow", *ARGS, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keras") / "full"
    assert train(out) == 0
    return out


def rows(run: Path) -> list[dict[str, str]]:
    return read_metrics(run / "metrics.csv")


@pytest.mark.timeout(300)
def test_validation_loss_falls_and_run_dir_is_complete(reference: Path) -> None:
    r = rows(reference)
    val = {int(x["step"]): float(x["val_loss"]) for x in r if x["val_loss"]}
    assert sorted(val) == [0, 25, 50]
    assert val[0] > 5.0 and val[50] < val[0] - 1.5, val          # ~5.5 (uniform over bytes) -> ~3.3
    train_loss = [float(x["loss"]) for x in r if x["loss"]]
    assert len(train_loss) == 10 and train_loss[-1] < train_loss[0] - 1.5
    for name in ("config.toml", "tokenizer.json", "loss.png", "sample.txt"):
        assert (reference / name).is_file(), name
    assert (reference / "sample.txt").read_text().startswith("The ")
    found = ckpt.list_checkpoints(reference)
    assert [s for s, _ in found] == [50]
    meta = ckpt.read_meta(found[0][1])
    assert meta["framework"] == "tensorflow" and meta["step"] == 50


@pytest.mark.timeout(120)
def test_checkpoint_samples_in_keras_and_loads_into_torch(reference: Path) -> None:
    from hvdllm.train import trainer_keras

    a = trainer_keras.sample_checkpoint(str(reference), "The ", 30, seed=3)
    b = trainer_keras.sample_checkpoint(str(reference), "The ", 30, seed=3)
    assert a == b and a.startswith("The ") and len(a.encode()) >= 4
    torch = pytest.importorskip("torch")
    from hvdllm.models.config import GPTConfig
    from hvdllm.models.gpt import GPT as TorchGPT

    files, meta = ckpt.read_checkpoint(ckpt.latest_checkpoint(reference))
    model = TorchGPT(GPTConfig(**meta["model"]))
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in files["model"].items()},
                                                strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}     # tied to wte
    # the torch model on the Keras weights reaches the Keras run's validation loss
    from hvdllm.data import ByteTokenizer, TokenWindows, embedded_text

    w = TokenWindows([ByteTokenizer().encode(embedded_text())], 64, 0.1, 1337)
    x, y = w.batch(w.val_windows(32))
    with torch.no_grad():
        _, loss = model(torch.from_numpy(x), torch.from_numpy(y))
    val50 = float(rows(reference)[-1]["val_loss"])
    assert abs(float(loss) - val50) < 1e-4, (float(loss), val50)


@pytest.mark.timeout(300)
def test_exit_at_step_then_resume_is_bitwise_the_uninterrupted_run(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    assert train(out, "--exit-at-step", "20") == 0
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [20]
    assert int(rows(out)[-1]["step"]) == 20 and not (out / "sample.txt").exists()
    assert train(out, "--resume") == 0
    got, want = rows(out), rows(reference)
    assert [{k: g[k] for k in SAME} for g in got] == [{k: w[k] for k in SAME} for w in want]
    a, _ = ckpt.read_checkpoint(ckpt.latest_checkpoint(out))
    b, _ = ckpt.read_checkpoint(ckpt.latest_checkpoint(reference))
    for stem in ("model", "optimizer"):
        assert a[stem].keys() == b[stem].keys()
        for k in a[stem]:
            assert np.array_equal(a[stem][k], b[stem][k]), (stem, k)


@pytest.mark.timeout(300)
def test_two_ranks_gloo_log_the_one_rank_losses(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "np2"
    reports = run_ranks("train_keras_worker.py", np=2, launcher="gloo",
                        args=[*ARGS, "--out", str(out), "--exit-at-step", "20"], timeout=280)
    assert [r["status"] for r in reports] == [0, 0] and reports[0]["size"] == 2
    got = reports[0]["rows"]
    want = [w for w in rows(reference) if int(w["step"]) <= 20]
    assert [g["step"] for g in got] == [w["step"] for w in want]
    for g, w in zip(got, want):
        for k in ("loss", "val_loss"):
            if w[k]:
                assert abs(float(g[k]) - float(w[k])) < 1e-5, (g["step"], k, g[k], w[k])
        assert g["lr"] == w["lr"]
        if w["loss"]:
            gn, want_gn = float(g["grad_norm"]), float(w["grad_norm"])
            assert want_gn > 0 and abs(gn - want_gn) < 1e-4 * want_gn, (g["step"], gn, want_gn)


@pytest.mark.timeout(120)
def test_bad_input_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for extra, words in ((["--set", "run.precision=fp16"], "fp16"), (["--tp", "2"], "--tp 2"),
                         (["--data", str(tmp_path / "missing")], "missing")):
        out = tmp_path / "bad"
        assert train(out, *extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
        assert not out.exists()
