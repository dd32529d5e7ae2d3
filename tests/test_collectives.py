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
        "named_sum": total,
        "named_bcast": [float(n - 1)] * 2,
        "named_gather": [float(r) for r in range(n)],
        "named_grouped": [total, [1.5 * n] * 2],
        "named_async": total,
        "named_object": n - 1,
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


def _contract() -> dict:
    """The Collectives protocol's methods and their signatures (self dropped)."""
    import inspect

    from hvdllm.core.collectives import Collectives

    names = [n for n, v in vars(Collectives).items() if inspect.isfunction(v) and not n.startswith("_")]
    return {n: list(inspect.signature(getattr(Collectives, n)).parameters.values())[1:] for n in names}


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_every_backend_implements_the_collectives_protocol(framework: str) -> None:
    """Each backend class (horovod, and numpy for mpi/local) has every protocol method with the protocol's
    parameters (names, order, defaults); a local backend instance passes the runtime check."""
    import importlib
    import inspect

    from hvdllm.core.collectives import Collectives

    backends = importlib.import_module(f"hvdllm.{framework}.backends")
    contract = _contract()
    assert {"allreduce", "allreduce_async_", "grouped_allreduce", "broadcast", "allgather", "barrier",
            "broadcast_object"} <= set(contract)
    classes = [c for c in vars(backends).values() if inspect.isclass(c) and c.__module__ == backends.__name__
               and hasattr(c, "allreduce")]
    assert len(classes) == 2, classes
    for cls in classes:
        for name, want in contract.items():
            got = list(inspect.signature(getattr(cls, name)).parameters.values())[1:]
            assert [(p.name, p.default) for p in got[:len(want)]] == [(p.name, p.default) for p in want], (cls, name)
            assert all(p.default is not inspect.Parameter.empty for p in got[len(want):]), (cls, name)
    local = backends.create()
    assert local.name == "local" and isinstance(local, Collectives)
