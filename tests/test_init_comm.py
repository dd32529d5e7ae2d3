"""Horovod's ``init(comm=None, process_sets=None)``: comm as the world communicator or all ranks, on real
ranks (Horovod MPI and mpi4py backends); a subset is refused in one line; the pre-comm positional form
``init([process sets])`` keeps meaning process sets."""
from __future__ import annotations

import pytest

from hvdllm.core.frontend import _comm_problem, _looks_like_process_sets
from hvdllm.core.process_sets import ProcessSet
from tests.multirank import run_ranks


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher,backend", [("horovod-mpi", "horovod"), ("mpirun", "mpi")])
def test_init_comm_on_real_ranks(launcher: str, backend: str) -> None:
    reports = run_ranks("init_comm_worker.py", np=2, launcher=launcher, timeout=240)
    for r in reports:
        assert r["backend"] == backend and r["size"] == 2 and r["total"] == 3.0
        assert r["uninitialised"]
        assert len(r["errors"]) == 2 and "init(comm=[0])" in r["errors"][0]
        assert "communicator of 1 ranks" in r["errors"][1] and "allowed" in r["errors"][1]


class _Comm:
    def __init__(self, size: int, rank: int) -> None:
        self.size, self.rank = size, rank

    def Get_size(self) -> int:
        return self.size

    def Get_rank(self) -> int:
        return self.rank


def test_comm_rules() -> None:
    assert _comm_problem(None, 0, 1) == "" and _comm_problem([1, 0], 1, 2) == "" and _comm_problem(_Comm(2, 1), 1, 2) == ""
    assert "init(comm=[0, 2])" in _comm_problem([0, 2], 0, 2)
    assert "communicator of 1 ranks" in _comm_problem(_Comm(1, 0), 0, 2)
    assert "allowed" in _comm_problem("world", 0, 1)
    assert _looks_like_process_sets([ProcessSet([0])]) and _looks_like_process_sets([[0, 1]])
    assert not _looks_like_process_sets([0, 1]) and not _looks_like_process_sets(None) and not _looks_like_process_sets([])


def test_one_process_init_comm() -> None:
    import hvdllm.torch as hvd

    hvd.shutdown()
    with pytest.raises(ValueError, match=r"init\(comm=\[0, 1\]\)"):
        hvd.init(comm=[0, 1])
    assert not hvd.is_initialized()
    hvd.init(comm=[0])
    assert hvd.size() == 1
