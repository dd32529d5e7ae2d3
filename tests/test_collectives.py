"""The basic collectives on real ranks, for both adapters and every launcher."""
from __future__ import annotations

import pytest

from tests.multirank import run_ranks

CASES = [
    ("torch", "gloo", "horovod"),
    ("torch", "horovod-mpi", "horovod"),
    ("torch", "mpirun", "mpi"),
    ("tensorflow", "gloo", "horovod"),
    ("tensorflow", "horovod-mpi", "horovod"),
    ("tensorflow", "mpirun", "mpi"),
]


def expected(n: int) -> dict:
    xs = [[i + 10.0 * r for i in range(4)] for r in range(n)]
    total = [sum(col) for col in zip(*xs)]
    return {
        "avg": [t / n for t in total],
        "sum": total,
        "sum_int": [sum(r + 1 for r in range(n))],
        "sum_bf16": [sum(1.5 + r for r in range(n))] * 3,
        "async_sum": total,
        "bcast": [[float(n - 1)] * 2] * 2,
        "gather": [[float(r)] * 2 for r in range(n) for _ in range(r + 1)],
        "gather_scalar": [float(r) for r in range(n)],
        "object": {"from": 0, "list": [0, 0, 0]},
        "object_from_none": {"from": 0},
    }


@pytest.mark.timeout(300)
@pytest.mark.parametrize("framework,launcher,backend", CASES, ids=[f"{f}-{l}" for f, l, _ in CASES])
def test_collectives_two_ranks(framework: str, launcher: str, backend: str) -> None:
    reports = run_ranks("collectives_worker.py", np=2, launcher=launcher, args=[framework])
    want = expected(2)
    for r, rep in enumerate(reports):
        assert (rep["rank"], rep["size"], rep["backend"]) == (r, 2, backend)
        assert rep["local_size"] == 2 and rep["local_rank"] == r
        assert rep["x_unchanged"] == [i + 10.0 * r for i in range(4)]
        assert rep["avg_default_op"] == rep["avg"]
        for key, value in want.items():
            assert rep[key] == value, (r, key)
        if framework == "tensorflow":
            assert rep["grouped_second"] == [1.0, 1.0]
            assert rep["graph_sum"] == want["sum"]
            assert rep["graph_bcast"] == [0.0, 1.0, 2.0, 3.0]
        else:
            assert ("set0" in rep) == (r == 0)
            if backend == "horovod":   # d/dw_r of sum_k (k+1) * (w_0 + w_1) = 1 + 2
                assert rep["grad_of_sum"] == [3.0, 3.0]
            if r == 0:
                assert rep["set0"] == [5.0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_plain_python_is_local(framework: str) -> None:
    (rep,) = run_ranks("collectives_worker.py", np=1, launcher="python", args=[framework])
    assert (rep["rank"], rep["size"], rep["backend"]) == (0, 1, "local")
    want = expected(1)
    for key, value in want.items():
        assert rep[key] == value, key
