"""One recipe, two frameworks: `hvdllm train --init-from` in torch and Keras, and the same losses.

From one checkpoint (a short torch run of the tiny preset), the torch and the Keras trainer each run
the same 50-step recipe (fp32, dropout 0, same data order, same LR schedule, AdamW from the core,
clipping, weight decay on matrices): the loss of every step agrees within 1e-4 (measured: ~2e-6; the
two frameworks add the same numbers in different orders, so the last bits differ and the difference
grows slowly with the steps). Then the Keras run's weights go back into torch (`--init-from` a Keras
run, also into --tp 2 and --pp 2 torch runs): torch's step-0 validation loss equals Keras's final one.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HVDLLM_PROGRESS", "lines")

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("torch")

from hvdllm.cli import main  # noqa: E402
from hvdllm.train import checkpoint as ckpt  # noqa: E402
from hvdllm.train.metrics import read_metrics  # noqa: E402
from tests.multirank import run_ranks  # noqa: E402

# The tiny preset itself; one thread per framework (fast and deterministic on a loaded machine).
RECIPE = ["--preset", "tiny", "--global-batch", "16", "--micro-batch", "8", "--set", "run.threads=1",
          "--set", "run.log_interval=1", "--set", "run.eval_interval=0", "--set", "run.eval_sequences=32",
          "--set", "run.checkpoint_interval=0", "--set", "sample.tokens=0", "--set", "run.tensorboard=false"]
STEPS = 50
TOLERANCE = 1e-4


def train(framework: str, out: Path, *extra: str) -> int:
    return main(["train", "--framework", framework, *RECIPE, "--out", str(out), *extra])


def column(run: Path, name: str) -> dict[int, float]:
    return {int(r["step"]): float(r[name]) for r in read_metrics(run / "metrics.csv") if r[name]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parity")
    assert train("torch", root / "init", "--max-steps", "3") == 0
    for fw in ("torch", "tensorflow"):
        assert train(fw, root / fw, "--max-steps", str(STEPS), "--init-from", str(root / "init")) == 0
    return root


@pytest.mark.timeout(600)
def test_torch_and_keras_log_the_same_losses_from_the_same_weights(runs: Path) -> None:
    a, b = column(runs / "torch", "loss"), column(runs / "tensorflow", "loss")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    diff = {s: abs(a[s] - b[s]) for s in a}
    worst = max(diff, key=diff.get)
    print(f"max |loss_torch - loss_keras| over {STEPS} steps: {diff[worst]:.3g} (step {worst})")
    assert diff[worst] <= TOLERANCE, (worst, a[worst], b[worst])
    assert a[STEPS] < a[1] - 1.0                      # and it trained
    # the runs started from the init checkpoint's weights (step 0), not from their own seeded init
    init = column(runs / "init", "loss")
    assert a[1] < init[1] - 0.05, (a[1], init[1])
    gn_a, gn_b = column(runs / "torch", "grad_norm"), column(runs / "tensorflow", "grad_norm")
    assert all(abs(gn_a[s] - gn_b[s]) <= 1e-3 * gn_a[s] for s in gn_a)
    va, vb = column(runs / "torch", "val_loss"), column(runs / "tensorflow", "val_loss")
    assert abs(va[STEPS] - vb[STEPS]) <= TOLERANCE
    # a fresh optimizer and step 0: the checkpoints count this run's steps only
    assert [s for s, _ in ckpt.list_checkpoints(runs / "torch")] == [STEPS]
    assert ckpt.read_meta(ckpt.latest_checkpoint(runs / "tensorflow"))["step"] == STEPS


@pytest.mark.timeout(300)
def test_keras_weights_start_a_torch_run_and_torch_weights_a_keras_run(runs: Path, tmp_path: Path) -> None:
    # --init-from a checkpoint folder (not only a run folder), of the other framework
    for src, fw in (("tensorflow", "torch"), ("torch", "tensorflow")):
        out = tmp_path / f"{fw}_from_{src}"
        folder = ckpt.latest_checkpoint(runs / src)
        assert train(fw, out, "--max-steps", "1", "--set", "run.eval_interval=1", "--init-from", str(folder)) == 0
        val0 = column(out, "val_loss")[0]
        want = column(runs / src, "val_loss")[STEPS]
        assert abs(val0 - want) <= 1e-5, (src, fw, val0, want)


@pytest.mark.timeout(300)
def test_keras_weights_start_tensor_and_pipeline_parallel_torch_runs(runs: Path, tmp_path: Path) -> None:
    # each rank loads its shards of the unsplit Keras weights: step-0 validation = Keras's final one
    import json

    base = ["train", *RECIPE, "--max-steps", "1", "--set", "run.eval_interval=1", "--set", "run.progress=false",
            "--init-from", str(runs / "tensorflow")]
    outs = {layout: tmp_path / layout for layout in ("tp", "pp")}
    argv = [[*base, f"--{layout}", "2", "--out", str(out)] for layout, out in outs.items()]
    reps = run_ranks("train_runs_worker.py", np=2, launcher="gloo", args=[json.dumps(argv)], timeout=280)
    assert [r["codes"] for r in reps] == [[0, 0]] * 2, reps
    want = column(runs / "tensorflow", "val_loss")[STEPS]
    for layout, out in outs.items():
        assert abs(column(out, "val_loss")[0] - want) <= 1e-5, (layout, column(out, "val_loss"), want)


@pytest.mark.timeout(300)
def test_bad_init_from_exits_2_with_one_line_and_writes_nothing(runs: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    lacking = tmp_path / "lacking"
    shutil.copytree(ckpt.latest_checkpoint(runs / "init"), lacking)
    from safetensors.numpy import save_file

    arrays = ckpt.load_arrays(lacking / "model.safetensors")
    arrays.pop("ln_f.weight")
    save_file(arrays, str(lacking / "model.safetensors"))
    cases = [(["--init-from", str(tmp_path / "missing")], "no such file"),
             (["--init-from", str(tmp_path / "empty")], "no checkpoint there"),
             (["--init-from", str(runs / "init"), "--set", "model.n_embd=64"], "model.n_embd=128 in the checkpoint"),
             (["--init-from", str(lacking)], "ln_f.weight")]
    for fw in ("torch", "tensorflow"):
        for extra, needle in cases:
            out = tmp_path / "run"
            code = train(fw, out, "--max-steps", "1", *extra)
            err = capsys.readouterr().err
            assert code == 2 and err.count("\n") == 1 and needle in err, (fw, extra, err)
            assert err.startswith("hvdllm: error: --init-from"), err
            assert not out.exists(), (fw, extra)


def test_checkpoints_of_both_frameworks_hold_the_same_names_and_close_weights(runs: Path) -> None:
    a, _ = ckpt.read_checkpoint(ckpt.latest_checkpoint(runs / "torch"))
    b, _ = ckpt.read_checkpoint(ckpt.latest_checkpoint(runs / "tensorflow"))
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        np.testing.assert_allclose(a["model"][k], b["model"][k], atol=1e-4, err_msg=k)
