"""hvd.SyncBatchNorm at 2 and 3 ranks (uneven batches), on Horovod and on the mpi4py backend, against
one-process torch.nn.BatchNorm1d/2d on the concatenated batch (tests/workers/sync_bn_worker.py)."""
from __future__ import annotations

import pytest

from tests.multirank import run_ranks

CASES = {"bn1d_2d", "bn1d_3d", "bn2d", "bn2d_cumulative", "bn1d_no_affine", "bn1d_no_running", "bad_input"}
LAUNCHES = [("python", 1, "local"), ("gloo", 2, "horovod"), ("gloo", 3, "horovod"), ("mpirun", 2, "mpi"),
            ("mpirun", 3, "mpi")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher,np,backend", LAUNCHES, ids=[f"{l}-np{n}" for l, n, _ in LAUNCHES])
def test_sync_batch_norm(launcher: str, np: int, backend: str) -> None:
    reports = run_ranks("sync_bn_worker.py", np=np, launcher=launcher, timeout=240)
    for rank, rep in enumerate(reports):
        assert (rep["rank"], rep["size"], rep["backend"]) == (rank, np, backend)
        assert rep["failures"] == [], (rank, rep["failures"])
        assert set(rep["checked"]) == CASES


def test_combine_moments_matches_numpy_on_the_concatenation() -> None:
    import numpy as np

    from hvdllm.core import batch_norm as bn

    rng = np.random.default_rng(0)
    parts = [rng.normal(5.0, 2.0, size=(k, 3)) for k in (1, 4, 7)]
    counts = np.array([[len(p)] for p in parts], dtype=float)
    means = np.stack([p.mean(0) for p in parts])
    m2s = np.stack([((p - p.mean(0)) ** 2).sum(0) for p in parts])
    total, mean, var = bn.combine_moments(counts, means, m2s)
    whole = np.concatenate(parts)
    assert total == 12
    np.testing.assert_allclose(mean, whole.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var, whole.var(0), rtol=1e-12)
    np.testing.assert_allclose(bn.unbiased(var, 12), whole.var(0, ddof=1), rtol=1e-12)
    assert bn.average_factor(None, 4) == 0.25 and bn.average_factor(0.1, 4) == 0.1
    with pytest.raises(ValueError, match="more than 1 value"):
        bn.unbiased(var, 1)


def test_combine_packets_reads_one_count_or_one_per_channel() -> None:
    """The gathered packets [count(s), mean, M2] (torch: one count; Keras under a mask: one per channel)."""
    import numpy as np

    from hvdllm.core import batch_norm as bn

    rng = np.random.default_rng(1)
    parts = [rng.normal(-3.0, 0.5, size=(k, 2)) for k in (2, 5)]
    means = [p.mean(0) for p in parts]
    m2s = [((p - p.mean(0)) ** 2).sum(0) for p in parts]
    whole = np.concatenate(parts)
    for per_channel in (False, True):
        counts = [np.full(2 if per_channel else 1, float(len(p))) for p in parts]
        every = np.stack([np.concatenate(row) for row in zip(counts, means, m2s)])
        _, mean, var = bn.combine_packets(every, 2)
        np.testing.assert_allclose(mean, whole.mean(0), rtol=1e-12)
        np.testing.assert_allclose(var, whole.var(0), rtol=1e-12)
