"""Horovod's collective API of hvdllm.torch and hvdllm.tensorflow on real ranks, against numpy references.

One launch per (launcher, ranks) runs every case (tests/workers/horovod_api_worker.py); 3 ranks catch
uneven splits. Each rank reports which cases it checked, so a skipped case fails the test too.
"""
from __future__ import annotations

import pytest

from tests.multirank import run_ranks

OPS = ("Average", "Sum", "Min", "Max", "Product")
REDUCE = [f"{kind}_{op}" for op in OPS for kind in ("allreduce", "reducescatter")]
REDUCE += [f"allreduce_int_{op}" for op in ("Sum", "Min", "Max", "Product")]
EVERY_RANK = set(REDUCE) | {
    "average_true", "average_false", "scaled_sum", "scaled_average", "reducescatter_scaled",
    "grouped_reducescatter", "reducescatter_async", "allreduce_async", "allreduce_", "allreduce_async_",
    "grouped_allreduce", "grouped_allreduce_async", "grouped_allreduce_", "grouped_allreduce_async_",
    "allgather_uneven", "allgather_async", "grouped_allgather", "grouped_allgather_async", "broadcast_async",
    "broadcast_async_", "broadcast_", "allgather_object", "alltoall_even", "alltoall_splits", "alltoall_async",
    "queries"}
IN_SUBSET = {"ps_allreduce_max", "ps_allreduce_async", "ps_allgather", "ps_reducescatter", "ps_alltoall", "ps_object"}
TORCH_ONLY = {"reducescatter_async", "allreduce_async", "allreduce_", "allreduce_async_", "grouped_allreduce_async",
              "grouped_allreduce_", "grouped_allreduce_async_", "allgather_async", "grouped_allgather_async",
              "broadcast_async", "broadcast_async_", "broadcast_", "alltoall_async", "ps_allreduce_async",
              "join_optimizer"}
JOIN = {"join_sums", "join_last", "join_broadcast", "join_optimizer"}

LAUNCHES = [("python", 1, "local"), ("gloo", 2, "horovod"), ("gloo", 3, "horovod"), ("horovod-mpi", 2, "horovod"),
            ("mpirun", 2, "mpi"), ("mpirun", 3, "mpi")]
CASES = [("torch", *launch) for launch in LAUNCHES] + [
    ("tensorflow", "python", 1, "local"), ("tensorflow", "gloo", 3, "horovod"), ("tensorflow", "mpirun", 3, "mpi")]


def expected_cases(framework: str, launcher: str, rank: int, size: int, backend: str) -> set[str]:
    cases = set(EVERY_RANK)
    if rank < max(1, size - 1):
        cases |= IN_SUBSET
    cases |= JOIN if backend != "horovod" else JOIN - {"join_broadcast"}   # Horovod refuses broadcast after join
    if backend == "mpi" and size > 1:
        cases.add("join_unsupported")
    if launcher == "horovod-mpi":
        cases |= {"adasum"} if size == 2 else set()
    else:
        cases.add("adasum_error")
    return cases if framework == "torch" else cases - TORCH_ONLY


@pytest.mark.timeout(400)
@pytest.mark.parametrize("framework,launcher,np,backend", CASES, ids=[f"{f}-{l}-np{n}" for f, l, n, _ in CASES])
def test_horovod_api(framework: str, launcher: str, np: int, backend: str) -> None:
    reports = run_ranks("horovod_api_worker.py", np=np, launcher=launcher, timeout=360, args=[framework])
    for rank, rep in enumerate(reports):
        assert (rep["rank"], rep["size"], rep["backend"]) == (rank, np, backend)
        assert rep["failures"] == [], (rank, rep["failures"])
        want = expected_cases(framework, launcher, rank, np, backend)
        assert set(rep["checked"]) == want, (rank, sorted(set(rep["checked"]) ^ want))


def test_every_public_horovod_torch_name_is_in_hvdllm_torch() -> None:
    """Functions, classes and constants of horovod.torch 0.28.1 (its implementation submodules aside),
    listed by dir() too; the timeline functions with Horovod's signature."""
    import inspect
    import types

    hvt = pytest.importorskip("horovod.torch")
    import hvdllm.torch as ours

    public = {n for n in dir(hvt) if not n.startswith("_") and not isinstance(getattr(hvt, n), types.ModuleType)}
    assert sorted(public - set(dir(ours))) == []
    for name in ("start_timeline", "stop_timeline"):
        assert list(inspect.signature(getattr(ours, name)).parameters) == \
            list(inspect.signature(getattr(hvt, name)).parameters)
    assert inspect.signature(ours.SyncBatchNorm).parameters.keys() == \
        inspect.signature(hvt.SyncBatchNorm).parameters.keys()
    horovod_opt = set(inspect.signature(hvt.DistributedOptimizer).parameters)
    assert horovod_opt <= set(inspect.signature(ours.DistributedOptimizer).parameters)
