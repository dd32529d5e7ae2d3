"""hvdllm.torch.elastic: Horovod's elastic API on hvdllm, with real workers killed and added back.

The worker (tests/workers/elastic_torch_worker.py) is a Horovod-style elastic script with the import
swapped. It keeps the global batch (16 = 2 workers x 8 = 1 x 16) and the ElasticSampler hands out
the same 16 shuffled indices per global step whatever the number of workers, so an interrupted run
walks the uninterrupted trajectory: only the order of the gradient mean's fp32 additions differs
(~1e-7 relative per step over 36 steps of a well-conditioned least-squares fit), hence rtol 1e-5.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

import hvdllm.torch as hvd
from tests.multirank import run_elastic, run_ranks
from tests.threads import one_torch_thread  # noqa: F401

WORKER = "elastic_torch_worker.py"
RTOL = 1e-5


@pytest.fixture(scope="module")
def reference() -> dict:
    """The uninterrupted run: one plain process (local backend), where elastic.run just runs."""
    (ref,) = run_ranks("elastic_torch_worker.py", np=1, launcher="python", timeout=120)
    assert ref["backend"] == "local" and ref["steps"] == 36
    return ref


def test_kill_one_worker_survivor_finishes_on_the_curve(reference: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="hvdllm-elastic-") as d:
        reports, output = run_elastic(WORKER, Path(d), ["--kill-at", "5", f"{d}/killed"], grow=False)
        assert (Path(d) / "killed").exists(), output
    (survivor,) = reports  # one worker left at the end
    assert survivor["backend"] == "horovod" and survivor["size"] == 1, output
    # two workers until the kill at step 5, then one from the last commit (step 3) on
    assert survivor["sizes"] == [[0, 2], [3, 1]] and survivor["resets"][-1] == 1, output
    assert survivor["steps"] == reference["steps"]
    assert survivor["final_loss"] == pytest.approx(reference["final_loss"], rel=RTOL), output
    assert survivor["weight"] == pytest.approx(reference["weight"], rel=RTOL, abs=1e-6), output


def test_killed_worker_replaced_job_grows_back_to_two(reference: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="hvdllm-elastic-") as d:
        reports, output = run_elastic(WORKER, Path(d), ["--kill-at", "5", f"{d}/killed"], grow=True)
    assert [r["rank"] for r in reports] == [0, 1] and all(r["size"] == 2 for r in reports), output
    assert reports[0]["sizes"] == [[0, 2], [3, 1], [3, 2]] and reports[0]["resets"] == [1, 2], output
    assert reports[1]["sizes"] == [[3, 2]], output  # the newcomer starts from the commit at step 3
    for r in reports:
        assert r["steps"] == reference["steps"]
        assert r["final_loss"] == pytest.approx(reference["final_loss"], rel=RTOL), output
    assert reports[0]["weight"] == reports[1]["weight"]


def test_mpi_backend_refuses_elastic_naming_horovod() -> None:
    reports = run_ranks("elastic_torch_worker.py", np=2, launcher="mpirun", args=["--expect-refusal"], timeout=120)
    for r in reports:
        assert "needs the horovod backend" in r["error"] and "'mpi' backend with 2 ranks" in r["error"]


def test_one_process_commit_restore_and_callbacks() -> None:
    """Local backend: run() runs the function once; restore() undoes everything since commit()."""
    hvd.init()
    assert hvd.backend() == "local"
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                         named_parameters=model.named_parameters())
    sampler = hvd.elastic.ElasticSampler(list(range(10)), shuffle=False)
    state = hvd.elastic.TorchState(model=model, optimizer=optimizer, sampler=sampler, epoch=2, tokens=[1])
    calls: list[int] = []
    state.register_reset_callbacks([lambda: calls.append(1)])

    def step() -> None:
        optimizer.zero_grad()
        model(torch.ones(4, 3)).square().sum().backward()
        optimizer.step()

    @hvd.elastic.run
    def train(state: hvd.elastic.TorchState, n: int) -> str:
        step()
        state.sampler.record_batch(0, 4)
        state.epoch = 3
        state.commit()
        saved = [p.detach().clone() for p in model.parameters()]
        saved_momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
        for _ in range(n):
            step()
        state.sampler.record_batch(1, 4)
        state.epoch, state.tokens = 9, [1, 2]
        state.restore()
        assert all(torch.equal(a, b) for a, b in zip(saved, model.parameters()))
        assert all(torch.equal(optimizer.state[p]["momentum_buffer"], m) for p, m in zip(model.parameters(),
                                                                                       saved_momentum))
        assert (state.epoch, state.tokens) == (3, [1])
        assert state.sampler.processed_num == 4 and list(state.sampler) == list(range(4, 10))
        state.check_host_updates()  # no elastic launch: nothing announced, no interrupt
        return "done"

    assert train(state, 3) == "done"
    assert calls == []  # no reset happened
    object_state = hvd.elastic.ObjectState(lr=0.5)
    object_state.lr = 0.1
    object_state.restore()
    assert object_state.lr == 0.5
