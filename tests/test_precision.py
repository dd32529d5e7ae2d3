"""Mixed precision that composes: `run.precision=bf16` (fp32 master weights and optimizer state, bf16
compute) with data, tensor and pipeline parallelism and ZeRO 1/2 on torch and Keras; bf16 training reaches
the fp32 validation loss; fp16 on a CPU is a one-line error; the start-up advice about CPU bf16 units.

Tolerances: bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per op). Over the composition runs'
4 steps of a 2-layer model the logged losses stay within 2% of the fp32 run's; a bf16
run at any layout is compared with the one-process bf16 run at 1% (the layouts change only the order of
fp32 reductions and where bf16 roundings happen). ZeRO 1/2 in bf16 reduce the same fp32 gradients as the
bf16 dp 2 run (--zero 0): stage 1 ends bitwise equal here, stage 2 differs in fp32 last bits (its
reduce-scatter sums in another order, as in the fp32 ZeRO tests' 1e-5); such a difference moves a weight
across a bf16 rounding boundary (2^-8 relative) in rare elements and changes the bf16 rounding noise that
is the whole gradient of the attention's key bias (softmax ignores a constant per query, so its true
gradient is 0), which Adam turns into full +-lr steps: that 96-element tensor came to 2e-2 of its norm
while the model as a whole moved 7e-5. So the ZeRO runs must log the dp 2 run's losses, validation losses
and gradient norms within ZERO_TOL and hold its weights and Adam moments within ZERO_TOL of their global
norm: far below what an unreduced gradient or a shard left unstepped changes (~lr = 2e-3 per step on
weights ~0.02: several % of the norm). Every bf16 run's checkpoint holds fp32 master weights and Adam
moments: values with non-zero low 16 bits (a bf16 copy has none). The convergence runs (40 steps of `tiny`, 16 x 128 tokens
per step; a few dozen steps keep the run time to 1-2 min per framework on 2 shared cores) compare the
final validation loss at 2%, the issue's bound."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hvdllm.core.cpu import bf16_units, cpu_flags, precision_advice
from hvdllm.train import checkpoint as ckpt
from tests.multirank import run_ranks
from tests.test_pipeline_train import ARGS as PP_ARGS
from tests.train_runs import assert_bad_input, assert_same_run, column

# 2 layers of width 32, 4 steps of 4 micro-batches, clipping active (tests/test_pipeline_train.py's run)
ARGS = [*PP_ARGS, "--set", "run.eval_sequences=8"]
BF16 = ["--set", "run.precision=bf16"]
LAYOUTS = {"dp2": [], "tp2": ["--tp", "2"], "pp2": ["--pp", "2"], "z1": ["--zero", "1"], "z2": ["--zero", "2"]}
ZERO_TOL = 1e-3


def _low_bits_used(run: Path) -> dict[str, float]:
    """Per checkpoint part (model, optimizer): the fraction of float values whose low 16 bits are not all
    zero, i.e. that a bf16 tensor cannot hold (fp32 master copies: nearly all; bf16 ones: none)."""
    files, _ = ckpt.read_checkpoint(ckpt.latest_checkpoint(run))
    out = {}
    for kind in ("model", "optimizer"):
        arrays = [np.asarray(a) for a in files[kind].values() if np.asarray(a).dtype == np.float32]
        assert arrays, f"{run.name}: no float32 {kind} tensors in the checkpoint"
        bits = np.concatenate([a.reshape(-1).view(np.uint32) & 0xFFFF for a in arrays])
        out[kind] = float(np.mean(bits != 0))
    return out


def _losses(run: Path, col: str = "loss") -> np.ndarray:
    return np.array([v for _, v in column(run, col)])


def _composition(tmp_path: Path, framework: list[str], timeout: float) -> None:
    base = [*ARGS, *framework]
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    (one,) = run_ranks("train_runs_worker.py", np=1, launcher="python", timeout=timeout,
                       args=[json.dumps([[*base, "--out", str(fp32)], [*base, *BF16, "--out", str(bf16)]])])
    assert one["codes"] == [0, 0], one
    runs = {name: [*base, *BF16, *extra, "--out", str(tmp_path / name)] for name, extra in LAYOUTS.items()}
    reps = []
    # one process registers one layout's process sets (dp2 and ZeRO need none)
    for launch in (["tp2", "dp2", "z1", "z2"], ["pp2"]):
        reps += run_ranks("train_runs_worker.py", np=2, launcher="gloo", timeout=timeout,
                          args=[json.dumps([runs[n] for n in launch])], env={"HOROVOD_CYCLE_TIME": "20"})
    assert [r["codes"] for r in reps] == [[0] * 4] * 2 + [[0]] * 2, reps
    ref32, ref16 = _losses(fp32), _losses(bf16)
    assert len(ref16) == 4 and np.all(np.isfinite(ref16)) and np.any(ref16 != ref32)
    print(f"bf16 vs fp32 loss, max relative difference: one process {np.max(np.abs(ref16 / ref32 - 1)):.2e}, "
          + ", ".join(f"{n} {np.max(np.abs(_losses(tmp_path / n) / ref32 - 1)):.2e}" for n in LAYOUTS if (tmp_path / n).exists()))
    np.testing.assert_allclose(ref16, ref32, rtol=0.02, err_msg="bf16 vs fp32, one process")
    for name in runs:
        got = _losses(tmp_path / name)
        assert len(got) == 4 and np.all(np.isfinite(got)), name
        assert np.any(got != ref32), f"{name}: bf16 left no trace (did it run in fp32?)"
        np.testing.assert_allclose(got, ref16, rtol=0.01, err_msg=f"bf16 {name} vs bf16 one process")
        np.testing.assert_allclose(got, ref32, rtol=0.02, err_msg=f"bf16 {name} vs fp32 one process")
        np.testing.assert_allclose(_losses(tmp_path / name, "val_loss"), _losses(fp32, "val_loss"), rtol=0.02,
                                   err_msg=f"bf16 {name} val_loss vs fp32")
        assert not any("bfloat16" in e for r in reps for e in r["errors"]), reps  # no bf16 wire warnings
    for run in (bf16, *(tmp_path / name for name in runs)):
        used = _low_bits_used(run)
        assert min(used.values()) > 0.9, (run.name, used)          # fp32 master weights and Adam moments
    for name in ("z1", "z2"):
        assert_same_run(tmp_path / "dp2", tmp_path / name, ZERO_TOL, per_tensor=False)


@pytest.mark.timeout(900)
def test_bf16_composes_with_dp_tp_pp_zero_torch(tmp_path: Path) -> None:
    _composition(tmp_path, [], timeout=600)


@pytest.mark.timeout(900)
def test_bf16_composes_with_dp_tp_pp_zero_keras(tmp_path: Path) -> None:
    _composition(tmp_path, ["--framework", "tensorflow"], timeout=700)


# A few dozen steps of `tiny` (the preset's batch and lr), evaluated at the end on 64 windows.
CONVERGE = ["train", "--preset", "tiny", "--max-steps", "40", "--set", "run.eval_interval=40",
            "--set", "run.eval_sequences=64", "--set", "run.log_interval=10", "--set", "sample.tokens=0",
            "--set", "schedule.warmup_steps=5", "--set", "run.threads=1", "--set", "run.tensorboard=false",
            "--set", "run.progress=false"]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("framework", [[], ["--framework", "tensorflow"]], ids=["torch", "keras"])
def test_bf16_tiny_reaches_the_fp32_validation_loss(tmp_path: Path, framework: list[str]) -> None:
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    base = [*CONVERGE, *framework]
    (rep,) = run_ranks("train_runs_worker.py", np=1, launcher="python", timeout=800,
                       args=[json.dumps([[*base, "--out", str(fp32)], [*base, *BF16, "--out", str(bf16)]])])
    assert rep["codes"] == [0, 0], rep
    (s32, v32), (s16, v16) = column(fp32, "val_loss")[-1], column(bf16, "val_loss")[-1]
    assert s32 == s16 == 40
    print(f"{framework or 'torch'}: val loss at step 40: fp32 {v32:.4f}, bf16 {v16:.4f} ({v16 / v32 - 1:+.2%})")
    assert v32 < 0.8 * column(fp32, "val_loss")[0][1]          # it did train
    assert abs(v16 - v32) / v32 < 0.02, (v16, v32)


def test_fp16_on_cpu_is_a_one_line_error(tmp_path: Path) -> None:
    assert_bad_input([*ARGS, "--set", "run.precision=fp16"], "run.precision=fp16 needs a GPU", tmp_path / "run")


# -- the core's detection (pure functions on /proc/cpuinfo text) ---------------------------------------------
EPYC = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\nbugs\t\t: none\n"
SPR = "flags : fpu avx512f amx_bf16 amx_tile avx512_bf16\n"
OLD = "flags : fpu sse avx2\n"


def test_bf16_units_from_cpuinfo_flags() -> None:
    assert bf16_units(cpu_flags(EPYC)) == ("AVX512_BF16",)
    assert bf16_units(cpu_flags(SPR)) == ("AVX512_BF16", "AMX-BF16")
    assert bf16_units(cpu_flags(OLD)) == () and cpu_flags("") == frozenset()
    assert "avx512_bf16x" not in cpu_flags("flags : avx512_bf16")  # whole words only
    assert bf16_units(cpu_flags("flags : avx512_bf16x")) == ()


def test_precision_advice_recommends_bf16_only_on_fp32_cpu_runs() -> None:
    advice = precision_advice("fp32", "cpu", cpu_flags(EPYC))
    assert "AVX512_BF16" in advice and "--set run.precision=bf16" in advice
    said = precision_advice("bf16", "cpu", cpu_flags(SPR))
    assert "AMX-BF16" in said and "--set" not in said
    assert precision_advice("fp32", "cpu", cpu_flags(OLD)) is None
    assert precision_advice("fp32", "cuda", cpu_flags(EPYC)) is None
    assert precision_advice("fp16", "cpu", cpu_flags(EPYC)) is None
