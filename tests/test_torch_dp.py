"""hvd.DistributedOptimizer and the broadcast helpers on real ranks (Gloo, Horovod-MPI, mpirun+mpi4py).

np=2 with different data on each rank must equal np=1 on the concatenated batch (the worker computes
that reference in-process), parameters must be bitwise identical on all ranks after every step, and a
branch unused on one rank must not hang the job.
"""
from __future__ import annotations

import subprocess

import pytest

from tests.multirank import ROOT, base_env, command, run_ranks

EXACT = 2e-6   # fp32 rounding: the average of two half-batch means vs one mean over the whole batch
FP16 = 2e-3    # fp16 wire: ~3 decimal digits per reduced gradient, over 20 SGD steps

LAUNCHERS = [("gloo", "horovod"), ("horovod-mpi", "horovod"), ("mpirun", "mpi")]


@pytest.mark.timeout(420)
@pytest.mark.parametrize("launcher,backend", LAUNCHERS, ids=[l for l, _ in LAUNCHERS])
def test_two_ranks_match_one_process(launcher: str, backend: str) -> None:
    reports = run_ranks("torch_dp_worker.py", np=2, launcher=launcher, timeout=400)
    assert [r["backend"] for r in reports] == [backend, backend]
    cases = reports[0]["cases"]
    assert len(cases) == 13
    for name in cases:
        per_rank = [rep["cases"][name] for rep in reports]
        # Bitwise identical parameters on every rank after every step.
        assert per_rank[0]["hashes"] == per_rank[1]["hashes"], name
        tol = FP16 if "fp16" in name else EXACT
        for r, res in enumerate(per_rank):
            assert res["max_diff"] < tol, (name, r, res["max_diff"])
            assert res["dead_untouched"], (name, r)  # no rank had a gradient: stays None, never stepped
            for got, want in res["norms"]:
                assert got == pytest.approx(want, rel=1e-5), (name, r)
    assert cases["adamw_accum_clip"]["norms"] and cases["sgd_accum_clip_manual_sync"]["norms"]
    # fp16 really travels as fp16 on Horovod (so the result differs from fp32 a little); MPI falls back.
    fp16 = cases["sgd_fp16"]
    if backend == "horovod":
        assert fp16["max_diff"] > 0 and not fp16["warnings"]
    else:
        assert fp16["max_diff"] < EXACT and len(fp16["warnings"]) == 1
    # No backend here reduces bf16: one warning, then an exact fp32 reduction.
    assert len(cases["adamw_bf16"]["warnings"]) == 1 and "bfloat16" in cases["adamw_bf16"]["warnings"][0]
    for rep in reports:
        assert rep["bcast_params"] == rep["bcast_params_want"] == reports[1]["bcast_params"]
        assert rep["bcast_state"] == reports[0]["bcast_state"]
        assert rep["bcast_state"][1:] == [0.01, 8]
        assert rep["bcast_empty_state"] == [0, 0.01, True]
        # Mixed dtypes (float32 step on the CPU, int64, float64) reach a rank whose own state was empty.
        assert rep["bcast_mixed"] == reports[0]["bcast_mixed"] and len(rep["bcast_mixed"]) == 8 * 3 + 2
        assert rep["bcast_mixed"]["0.count"] == ["", [7.0]] and rep["bcast_mixed"]["0.step"] == ["torch.float32", [1.0]]


@pytest.mark.timeout(420)
def test_example_script_same_result_at_np1_and_np2() -> None:
    """examples/torch_train.py: `python` and `horovodrun -np 2` train the same model (same global batch)."""
    checksums = {}
    for launcher, np in (("python", 1), ("gloo", 2)):
        cmd, extra = command(launcher, np, [str(ROOT / "examples" / "torch_train.py"), "--epochs", "1"])
        proc = subprocess.run(cmd, env=base_env(extra), capture_output=True, text=True, timeout=400, cwd=str(ROOT))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        done = [line for line in proc.stdout.splitlines() if "done size" in line]
        assert done and f"size {np}" in done[-1], proc.stdout[-3000:]
        checksums[np] = float(done[-1].split("checksum")[1])
    assert checksums[1] == pytest.approx(checksums[2], rel=1e-5, abs=1e-4)
