"""TF/Keras 3 data parallelism on real ranks (Gloo, Horovod-MPI, mpirun + mpi4py) and on one process.

The worker (tests/workers/tf_dp_worker.py) runs every case in one launch: np=2 ``model.fit`` with
different data per rank must end with bitwise-identical weights on the ranks, equal (about 1e-6) to a
single-process ``model.fit`` on the concatenated batches, which rank 0 computes itself.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from hvdllm.core.compression import Compression
from hvdllm.core.gradients import (ReductionConfig, backend_wire_dtype, clip_coefficient_of, gradual_warmup_lr, is_reduction_pass,
                                   wire_dtype)
from hvdllm.core.ops import Average, Sum
from tests.multirank import run_ranks

# Every case reports "<case>_w" (its final weights) unless named here; check_reports asserts each requested
# case reported. Every "<name>_w" comes with "<name>_diff" against the one-process reference: fp32 rounding
# (2e-6) unless named here.
TOL = {"fit_clip": 1e-5}
FP16_WIRE = 2e-3  # fit_fp16 where fp16 really travels (Horovod); mpi falls back to fp32 and one process sends nothing
PROOF = {"tape_sum": ("tape_sum",), "broadcast_variables": ("bcast_eager", "bcast_function_w"),
         "metric_average": ("metric_avg",), "warmup": ("warmup_lrs",), "jit": ("jit_error", "jit_callback_w"),
         "errors": ("errors",)}
# Gloo runs every case. mpirun (mpi4py: collectives enter graphs as numpy_functions) reruns the graph,
# cond and eager paths; horovod-mpi has Gloo's ops under another controller, so a few cases suffice there.
# (Oversubscribed MPI ranks spin while waiting, so those launches are the slow ones on 2 cores.)
GLOO_CASES = ("fit_sgd,fit_momentum,fit_adam,fit_accum_sum,fit_accum_mean,fit_clip,fit_fp16,fit_bf16,fit_hvdllm_adam,"
              "loop_tape_eager,loop_tape_function,loop_optimizer,loop_optimizer_accum,unused_tape,"
              "unused_optimizer_accum,tape_sum,broadcast_callback,broadcast_variables,metric_average,warmup,jit")
MPIRUN_CASES = ("fit_adam,fit_accum_sum,fit_fp16,loop_tape_eager,unused_tape,unused_optimizer_accum,tape_sum,"
                "broadcast_variables,metric_average")
HOROVOD_MPI_CASES = "fit_adam,fit_accum_sum,loop_tape_eager,tape_sum,broadcast_variables"
LOCAL_CASES = ("fit_adam,fit_accum_sum,fit_fp16,loop_tape_function,loop_optimizer_accum,unused_tape,"
               "unused_optimizer_accum,warmup,jit,errors")


def check_reports(reports: list[dict], n: int, cases: str) -> None:
    """Every requested case reported on every rank, and what it reported is right, for ``n`` ranks."""
    rank0 = reports[0]
    for case in cases.split(","):
        for key in PROOF.get(case, (f"{case}_w",)):
            assert all(key in rep for rep in reports), f"case {case!r} did not report {key!r}"
    for name in [key[:-2] for key in rank0 if key.endswith("_w")]:
        assert all(rep[f"{name}_w"] == rank0[f"{name}_w"] for rep in reports), f"{name}: ranks' weights differ"
        tol = FP16_WIRE if name == "fit_fp16" and rank0["backend"] == "horovod" and n > 1 else TOL.get(name, 2e-6)
        assert rank0[f"{name}_diff"] < tol, (name, rank0[f"{name}_diff"])
    if "fit_clip_grad_norm" in rank0:  # reported by the optimizer, the same on every rank, above the cap
        assert all(rep["fit_clip_grad_norm"] == rank0["fit_clip_grad_norm"] for rep in reports)
        assert rank0["fit_clip_grad_norm"] > 0.05
    if "fit_accum_sum_iterations" in rank0:
        assert rank0["fit_accum_sum_iterations"] == 2  # 4 passes, k=2: the optimizer stepped twice
    if "tape_sum" in rank0:
        for rep in reports:
            assert rep["tape_sum"] == {"a": [float(sum(2 * (1 + q) for q in range(n))), 4.0 * n], "b": 2.0 * n}
            assert rep[f"tape_fp16_predivide_{n}"] == 40000.0  # 40000 / n per rank on the wire, fits fp16
            # factor 1 on a 16-bit wire: the core divides before the sum anyway (ReductionConfig.scales),
            # so 40000 * n never overflows fp16 (it did, inf, when factor 1 meant sum-then-divide)
            assert rep["tape_fp16_predivide_1"] == 40000.0
    if "bcast_eager" in rank0:
        for rep in reports:
            assert rep["bcast_eager"] == [[float(n - 1)] * 3, [n - 1, n], [[10.0 + n - 1] * 2] * 2]
        assert rank0["bcast_function_diff"] == 0.0  # a broadcast copies
    if "metric_avg" in rank0:
        for rep in reports:
            assert sorted(rep["metric_avg"]) == ["loss", "mae", "val_loss", "val_mae"]
            for key, per_epoch in rep["metric_avg"].items():
                for epoch, value in enumerate(per_epoch):
                    raws = [other["metric_raw"][epoch][key] for other in reports]
                    assert value == pytest.approx(float(np.mean(raws)), rel=1e-6), (key, epoch)
        if n > 1:  # the ranks saw different data: averaging changed something
            assert reports[0]["metric_raw"][0]["loss"] != reports[1]["metric_raw"][0]["loss"]
    if "warmup_lrs" in rank0:
        steps = rank0["warmup_steps"]
        want = [0.2 / n * ((e + (b + 1) / steps) * (n - 1) / 2 + 1) if e < 2 else 0.2
                for e in range(3) for b in range(steps)]
        for rep in reports:
            assert rep["warmup_lrs"] == pytest.approx(want, rel=1e-6)
            assert rep["warmup_logged_lr"] == pytest.approx([want[steps - 1], want[2 * steps - 1], 0.2], rel=1e-6)
            assert rep["warmup_lrs"][steps - 1] == pytest.approx(0.2 / n * ((n - 1) / 2 + 1), rel=1e-6)
    if "jit_error" in rank0:
        for rep in reports:
            if n > 1:
                assert rep["jit_error"] and "jit_compile=False" in rep["jit_error"], rep["jit_error"]
            else:  # one process: nothing to reduce, XLA is fine
                assert rep["jit_error"] is None


@pytest.mark.timeout(600)
@pytest.mark.parametrize("launcher,backend,cases", [
    ("gloo", "horovod", GLOO_CASES),
    ("horovod-mpi", "horovod", HOROVOD_MPI_CASES),
    ("mpirun", "mpi", MPIRUN_CASES),
])
def test_keras_data_parallel_two_ranks(launcher: str, backend: str, cases: str) -> None:
    reports = run_ranks("tf_dp_worker.py", np=2, launcher=launcher, args=[cases], timeout=560)
    for r, rep in enumerate(reports):
        assert (rep["rank"], rep["size"], rep["backend"]) == (r, 2, backend)
    check_reports(reports, 2, cases)


@pytest.mark.timeout(400)
def test_keras_one_process_local_backend() -> None:
    (rep,) = run_ranks("tf_dp_worker.py", np=1, launcher="python", args=[LOCAL_CASES], timeout=360)
    assert (rep["rank"], rep["size"], rep["backend"]) == (0, 1, "local")
    check_reports([rep], 1, LOCAL_CASES)
    errors = rep["errors"]
    assert all(isinstance(msg, str) and "\n" not in msg for msg in errors.values()), errors
    assert "backward_passes_per_step=0" in errors["passes"]
    assert "max_grad_norm=-1.0" in errors["clip"]
    assert "int4" in errors["compression"] and "'max'" in errors["op"]
    assert "already distributed" in errors["twice"]
    assert "gradient_predivide_factor=0.0" in errors["predivide"] and "op=hvd.Average" in errors["predivide_sum"]
    assert "gradient_accumulation_steps=2" in errors["keras_accumulation"]
    assert rep["wrapped"] == {"isinstance": True, "class": "Adam", "config_class": "Adam"}


# --- the core's rules, without TensorFlow -----------------------------------------------------------

def test_reduction_config_parses_and_validates() -> None:
    cfg = ReductionConfig.create(op="sum", compression="fp16", backward_passes_per_step=4,
                                 average_aggregated_gradients=True, max_grad_norm=1, bucket_cap_mb=1)
    assert (cfg.op, cfg.compression, cfg.max_grad_norm, cfg.bucket_cap_bytes) == (Sum, Compression.fp16, 1.0, 2**20)
    assert cfg.local_scale == 0.25
    assert ReductionConfig.create().op is Average and ReductionConfig.create(backward_passes_per_step=4).local_scale == 1
    for kwargs, text in [({"backward_passes_per_step": 0}, "backward_passes_per_step=0"),
                         ({"backward_passes_per_step": 1.5}, "backward_passes_per_step=1.5"),
                         ({"max_grad_norm": 0.0}, "max_grad_norm=0.0"),
                         ({"max_grad_norm": math.inf}, "max_grad_norm=inf"),
                         ({"bucket_cap_mb": -1}, "bucket_cap_mb=-1"),
                         ({"op": "max"}, "'max'"), ({"compression": "zip"}, "'zip'")]:
        with pytest.raises(ValueError, match=text.replace(".", r"\.")):
            ReductionConfig.create(**kwargs)


def test_accumulation_compression_clip_warmup_rules() -> None:
    assert [is_reduction_pass(p, 3) for p in range(1, 7)] == [False, False, True, False, False, True]
    assert wire_dtype("float32", Compression.fp16) == "float16"
    assert wire_dtype("float32", Compression.bf16) == "bfloat16"
    assert wire_dtype("int64", Compression.fp16) == "int64"
    assert wire_dtype("float32", Compression.none) == "float32"
    assert backend_wire_dtype("float32", Compression.fp16, "horovod") == ("float16", None)
    wire, warning = backend_wire_dtype("float32", Compression.bf16, "horovod")
    assert wire == "float32" and "bfloat16" in warning
    assert backend_wire_dtype("float32", Compression.fp16, "mpi")[0] == "float32"
    assert backend_wire_dtype("float32", Compression.none, "mpi") == ("float32", None)
    for norm in (0.0, 0.5, 1.0, 3.0, 1e6):
        assert clip_coefficient_of(np.float64(norm), 1.0, np.maximum) == pytest.approx(min(1.0, 1.0 / (norm + 1e-6)))
        assert clip_coefficient_of(norm, 1.0) == pytest.approx(min(1.0, 1.0 / (norm + 1e-6)))
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        clip_coefficient_of(1.0, 0, np.maximum)
    # 2 ranks, 2 warmup epochs of 4 steps: lr/2 -> lr linearly, exactly lr at the end of the warmup
    lrs = [gradual_warmup_lr(0.2, 2, 2, e, b, 4) for e in range(3) for b in range(4)]
    assert lrs[0] == pytest.approx(0.1 * (1 + 0.25 / 2))
    assert lrs[7] == pytest.approx(0.2) and lrs[8:] == [0.2] * 4
    assert all(a < b for a, b in zip(lrs[:7], lrs[1:8]))
    assert gradual_warmup_lr(0.2, 1, 2, 0, 0, 4) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="warmup_epochs=0"):
        gradual_warmup_lr(0.2, 2, 0, 0, 0, 4)


def test_check_reports_fails_on_a_case_that_did_not_report() -> None:
    rep = {"rank": 0, "size": 1, "backend": "local", "fit_sgd_w": [1.0], "fit_sgd_diff": 0.0}
    check_reports([rep], 1, "fit_sgd")
    with pytest.raises(AssertionError, match="'fit_adam' did not report"):
        check_reports([rep], 1, "fit_sgd,fit_adam")
    with pytest.raises(AssertionError, match="fit_fp16"):  # mpi reduces fp32 when asked for fp16: exact
        check_reports([{**rep, "backend": "mpi", "fit_fp16_w": [1.0], "fit_fp16_diff": 1e-4}] * 2, 2, "fit_fp16")
