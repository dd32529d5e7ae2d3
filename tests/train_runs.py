"""Helpers for the model-parallel `hvdllm train` tests: metrics columns, bad input, and the "stopped halfway
and resumed == one go" runs and check (the runs go into one launch of tests/workers/train_runs_worker.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from hvdllm.train import checkpoint as ckpt
from hvdllm.train.metrics import read_metrics


def column(run: Path, name: str) -> list[tuple[int, float]]:
    """(step, value) of a metrics.csv column, rows where it is set."""
    return [(int(r["step"]), float(r[name])) for r in read_metrics(run / "metrics.csv") if r[name]]


def resume_runs(args: list[str], halves: Path, at: int) -> list[list[str]]:
    """Argument lists: the run of ``args`` into ``halves`` stopped after step ``at``, then resumed."""
    return [[*args, "--out", str(halves), "--exit-at-step", str(at)], [*args, "--out", str(halves), "--resume"]]


def assert_resumed_equals(one_go: Path, halves: Path, at: int, tol: float = 1e-6) -> None:
    """The resumed run logged what the run in one go logged, and its last checkpoint holds the same
    weights and optimizer state (all Adam moments)."""
    last = ckpt.list_checkpoints(one_go)[-1][0]
    assert [s for s, _ in ckpt.list_checkpoints(halves)] == [at, last]
    for col in ("loss", "val_loss", "grad_norm"):
        a, b = column(one_go, col), column(halves, col)
        assert [s for s, _ in a] == [s for s, _ in b], col
        np.testing.assert_allclose([v for _, v in b], [v for _, v in a], rtol=tol, err_msg=col)
    (fa, _), (fb, mb) = (ckpt.read_checkpoint(ckpt.latest_checkpoint(d)) for d in (one_go, halves))
    for kind in ("model", "optimizer"):
        assert fa[kind].keys() == fb[kind].keys(), kind
        for k in fa[kind]:
            np.testing.assert_allclose(fb[kind][k], fa[kind][k], rtol=tol, atol=1e-9, err_msg=f"{kind} {k}")


ATOL = 1e-8      # per element (rms) on top of the relative bound: a few fp32 ulps of weights ~1e-2


def assert_same_run(a: Path, b: Path, tol: float, per_tensor: bool = True) -> None:
    """Run ``b`` logged what ``a`` logged (loss, val_loss, grad_norm; rtol ``tol``) and its last checkpoint
    holds the same weights and optimizer state: per tensor ||b - a|| <= tol ||a|| + ATOL sqrt(n) (Adam's
    normalised update amplifies the last-bit differences of near-zero gradients in a few elements, which
    in a small tensor - a 192-element bias of norm 0.03 - came to 1.03e-5 of its norm once, at 4 ranks
    resumed on 2). ``per_tensor=False``: the weights, and the optimizer state, each as one vector (bf16
    rounding noise in a zero-gradient tensor is turned into whole lr steps by Adam)."""
    for col in ("loss", "val_loss", "grad_norm"):
        ca, cb = column(a, col), column(b, col)
        assert [s for s, _ in ca] == [s for s, _ in cb], col
        np.testing.assert_allclose([v for _, v in cb], [v for _, v in ca], rtol=tol, err_msg=f"{b.name} {col}")
    (fa, _), (fb, _) = (ckpt.read_checkpoint(ckpt.latest_checkpoint(d)) for d in (a, b))
    for kind in ("model", "optimizer"):
        assert fa[kind].keys() == fb[kind].keys(), kind
        groups = [[k] for k in fa[kind]] if per_tensor else [sorted(fa[kind])]
        for keys in groups:
            x, y = (np.concatenate([np.asarray(f[kind][k], np.float64).reshape(-1) for k in keys]) for f in (fb, fa))
            assert np.linalg.norm(x - y) <= tol * np.linalg.norm(y) + ATOL * np.sqrt(y.size), (b.name, kind, keys)


def assert_identical_run(a: Path, b: Path, norm_rtol: float) -> None:
    """Run ``b`` logged exactly ``a``'s losses and validation losses, its gradient norms within ``norm_rtol``
    (float64 sums taken in another order), and its last checkpoint holds bitwise the same weights and
    optimizer state."""
    for col in ("loss", "val_loss"):
        assert column(b, col) == column(a, col), (b.name, col)
    ga, gb = column(a, "grad_norm"), column(b, "grad_norm")
    assert [s for s, _ in ga] == [s for s, _ in gb]
    np.testing.assert_allclose([v for _, v in gb], [v for _, v in ga], rtol=norm_rtol, err_msg=f"{b.name} grad_norm")
    (fa, _), (fb, _) = (ckpt.read_checkpoint(ckpt.latest_checkpoint(d)) for d in (a, b))
    for kind in ("model", "optimizer"):
        assert fa[kind].keys() == fb[kind].keys(), kind
        for k in fa[kind]:
            assert np.array_equal(fb[kind][k], fa[kind][k]), (b.name, kind, k)


def assert_bad_input(args: list[str], words: str, out: Path, timeout: float = 120) -> None:
    """`hvdllm ARGS --out OUT` (one process) exits 2 with one line naming ``words`` (the only line starting
    with "hvdllm"; TensorFlow logs its start-up) and no traceback, and writes nothing."""
    from tests.multirank import ROOT

    code = "import sys; from hvdllm.cli import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.run([sys.executable, "-c", code, *args, "--out", str(out)], cwd=str(ROOT),
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("hvdllm")]
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in p.stderr, p.stderr
    assert not out.exists()
