"""DistributedOptimizer's Horovod arguments (groups/num_groups as bucket grouping, sparse gradients
through sparse_allreduce, sparse_as_dense) and hvd.sparse_allreduce_async at 2 ranks on Horovod and
mpi4py (and one process), against one-process training on the combined batch
(tests/workers/horovod_optimizer_worker.py)."""
from __future__ import annotations

import pytest

from hvdllm.core.buckets import explicit_groups, split_list
from tests.multirank import run_ranks

CASES = {"groups_int", "groups_lists", "num_groups", "sparse_grads", "sparse_as_dense", "sparse_missing_on_a_rank",
         "sparse_sum_predivide", "sparse_allreduce_sum", "sparse_allreduce_average"}
LAUNCHES = [("python", 1, "local"), ("gloo", 2, "horovod"), ("mpirun", 2, "mpi")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher,np,backend", LAUNCHES, ids=[f"{l}-np{n}" for l, n, _ in LAUNCHES])
def test_horovod_optimizer_arguments(launcher: str, np: int, backend: str) -> None:
    reports = run_ranks("horovod_optimizer_worker.py", np=np, launcher=launcher, timeout=240)
    for rank, rep in enumerate(reports):
        assert (rep["rank"], rep["size"], rep["backend"]) == (rank, np, backend)
        assert rep["failures"] == [], (rank, rep["failures"])
        assert set(rep["checked"]) == CASES


def test_explicit_groups() -> None:
    assert split_list(list(range(5)), 2) == [[0, 1, 2], [3, 4]]
    assert explicit_groups(5, 2) == [0, 0, 0, 1, 1]
    assert explicit_groups(4, [[3, 1], [0]]) == [1, 0, 2, 0]
    with pytest.raises(ValueError, match="only appear once"):
        explicit_groups(3, [[0], [0]])
    with pytest.raises(ValueError, match="positive int"):
        explicit_groups(3, 0)
