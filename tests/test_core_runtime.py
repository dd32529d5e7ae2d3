"""Single-process tests of the core: imports, backend choice, ops, process sets, local comm."""
from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

import hvdllm.core
from hvdllm.core import Average, ProcessSet, Sum, choose_backend, launched_by, parse_op
from hvdllm.core.collectives import NumpyCollectives, local_world
from hvdllm.core.compression import Compression, parse_compression


def test_core_imports_no_framework() -> None:
    modules = [m.name for m in pkgutil.walk_packages(hvdllm.core.__path__, "hvdllm.core.")]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(','.join(m for m in ('torch', 'tensorflow', 'keras', 'horovod') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"hvdllm.core imported {out.stdout.strip()}"
    assert len(modules) >= 6


@pytest.mark.parametrize(
    "env,hvd,mpi,want",
    [
        ({}, True, True, "local"),
        ({"HOROVOD_RANK": "0", "HOROVOD_SIZE": "2"}, True, True, "horovod"),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, True, True, "horovod"),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, False, True, "mpi"),
        ({"PMI_SIZE": "2"}, False, True, "mpi"),
        ({"OMPI_COMM_WORLD_SIZE": "2", "HVDLLM_BACKEND": "mpi"}, True, True, "mpi"),
        ({"HVDLLM_BACKEND": "LOCAL", "HOROVOD_RANK": "1"}, True, True, "local"),
    ],
)
def test_choose_backend(env: dict, hvd: bool, mpi: bool, want: str) -> None:
    assert choose_backend(lambda: hvd, lambda: mpi, env) == want


def test_choose_backend_bad_value_is_one_line() -> None:
    with pytest.raises(ValueError) as err:
        choose_backend(lambda: True, lambda: True, {"HVDLLM_BACKEND": "nccl"})
    msg = str(err.value)
    assert "'nccl'" in msg and "horovod, mpi, local" in msg and "\n" not in msg


def test_choose_backend_missing_pieces() -> None:
    with pytest.raises(RuntimeError, match="Horovod"):
        choose_backend(lambda: False, lambda: True, {"HVDLLM_BACKEND": "horovod"})
    with pytest.raises(RuntimeError, match="mpi4py"):
        choose_backend(lambda: True, lambda: False, {"HVDLLM_BACKEND": "mpi"})
    with pytest.raises(RuntimeError, match="neither"):
        choose_backend(lambda: False, lambda: False, {"OMPI_COMM_WORLD_SIZE": "2"})


def test_launched_by() -> None:
    assert launched_by({}) is None
    assert launched_by({"HOROVOD_RANK": "0"}) == "horovodrun"
    assert launched_by({"OMPI_COMM_WORLD_SIZE": "4"}) == "mpirun"
    assert launched_by({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None


def test_ops() -> None:
    assert parse_op("average") is Average and parse_op("SUM") is Sum and parse_op(Sum) is Sum
    assert Average.postscale(4) == 0.25 and Sum.postscale(4) == 1.0
    with pytest.raises(ValueError, match="allowed: hvd.Average, hvd.Sum, hvd.Min"):
        parse_op("median")


def test_compression_names() -> None:
    assert parse_compression("fp16") is Compression.fp16
    assert parse_compression(None) is Compression.none
    assert Compression.bf16.wire_dtype == "bfloat16"
    with pytest.raises(ValueError, match="unknown compression 'int8'"):
        parse_compression("int8")


def test_process_sets() -> None:
    ps = ProcessSet([3, 1])
    assert ps.members(4) == (1, 3) and ps.rank_of(3, 4) == 1 and ps.size(4) == 2
    assert ProcessSet([1, 3]) == ps
    assert ProcessSet().members(3) == (0, 1, 2)
    with pytest.raises(ValueError, match="distinct"):
        ProcessSet([1, 1])
    with pytest.raises(ValueError, match="world size 2"):
        ps.members(2)


def test_local_numpy_collectives() -> None:
    comm, world = local_world()
    c = NumpyCollectives(comm, world)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(c.allreduce(x), x)
    np.testing.assert_array_equal(c.allreduce(x, Sum), x)
    np.testing.assert_array_equal(c.broadcast(x, 0), x)
    np.testing.assert_array_equal(c.allgather(x), x)
    assert c.allgather(np.float32(2.0)).shape == (1,)
    assert c.broadcast_object({"a": [1]}) == {"a": [1]}
    buf = x.copy()
    assert c.allreduce_async_(buf.reshape(-1)).wait() is not None
    np.testing.assert_array_equal(buf, x)
    c.barrier()
    with pytest.raises(ValueError, match="not registered"):
        c.allreduce(x, process_set=ProcessSet([0]))


def test_wait_until_sleeps_with_growing_delays(monkeypatch: pytest.MonkeyPatch) -> None:
    from hvdllm.core import waiting

    slept: list[float] = []
    monkeypatch.setattr(waiting.time, "sleep", slept.append)
    polls = iter([False] * 7 + [True])
    waiting.wait_until(lambda: next(polls), first_sleep=1e-4, max_sleep=1e-3)
    assert slept == pytest.approx([1e-4, 2e-4, 4e-4, 8e-4, 1e-3, 1e-3, 1e-3])
    slept.clear()
    waiting.wait_until(lambda: True)
    assert slept == []


class _FakeHorovod:
    """Just enough of horovod.torch for HorovodBase: records the environment at init."""

    global_process_set = object()

    def __init__(self) -> None:
        self.env_at_init: dict[str, str | None] = {}

    def ProcessSet(self, ranks: list) -> tuple:  # noqa: N802 - Horovod's name
        return tuple(ranks)

    def init(self, process_sets: Any = None) -> None:
        import os

        self.env_at_init["HOROVOD_CYCLE_TIME"] = os.environ.get("HOROVOD_CYCLE_TIME")

    rank = local_rank = cross_rank = staticmethod(lambda: 0)
    size = local_size = cross_size = staticmethod(lambda: 1)

    class mpi_ops:  # noqa: N801 - Horovod's module name
        is_homogeneous = staticmethod(lambda: True)


@pytest.mark.parametrize("user,accel,sets,want", [(None, False, None, "20"), ("3", False, None, "3"),
                                                  (None, True, None, None), (None, False, [ProcessSet([0])], None),
                                                  (None, False, [], None)])
def test_horovod_cycle_time_default(monkeypatch: pytest.MonkeyPatch, user: str | None, accel: bool,
                                    sets: list, want: str | None) -> None:
    from hvdllm.core.backends import HorovodBase

    monkeypatch.setenv("HOROVOD_CYCLE_TIME", "0")  # so that teardown restores the original state
    monkeypatch.delenv("HOROVOD_CYCLE_TIME")
    if user is not None:
        monkeypatch.setenv("HOROVOD_CYCLE_TIME", user)
    fake = _FakeHorovod()
    # init(process_sets=[]) (a pipeline of 2 stages on 2 ranks needs none) is a grid job, init() is not
    HorovodBase(fake, sets or [], has_accelerator=accel, model_parallel=sets is not None)
    assert fake.env_at_init["HOROVOD_CYCLE_TIME"] == want


def test_core_share_gives_each_local_rank_its_run_of_cores() -> None:
    from hvdllm.core.world import World

    share = lambda local_rank, local_size, cores: World(rank=local_rank, size=local_size, local_rank=local_rank,  # noqa: E731
                                                        local_size=local_size).core_share(cores)
    assert [share(r, 2, [0, 1, 2, 3]) for r in range(2)] == [[0, 1], [2, 3]]
    assert [share(r, 4, [0, 1]) for r in range(4)] == [[0], [1], [0], [1]]        # more ranks than cores
    assert [share(r, 3, [8, 2, 5, 9, 4, 7, 3, 6]) for r in range(3)] == [[2, 3], [4, 5], [6, 7]]  # sorted; 8, 9 idle
    assert share(0, 1, [0, 1]) == [0, 1]


def test_bind_to_cores_pins_threads_started_before_and_after() -> None:
    import threading

    import hvdllm.torch as hvd
    from hvdllm.core.world import bind_to_cores

    before = sorted(os.sched_getaffinity(0))
    seen: dict[str, set[int]] = {}
    started = threading.Event()
    release = threading.Event()

    def early() -> None:
        started.set()
        release.wait(10)
        seen["early"] = os.sched_getaffinity(0)

    t = threading.Thread(target=early)
    t.start()
    started.wait(10)
    try:
        hvd.init()
        assert hvd.bind_to_cores() == before                       # one rank: all of its cores, a no-op
        bind_to_cores(before[:1])
        release.set()
        t.join(10)
        late = threading.Thread(target=lambda: seen.setdefault("late", os.sched_getaffinity(0)))
        late.start()
        late.join(10)
        assert seen == {"early": set(before[:1]), "late": set(before[:1])}
    finally:
        release.set()
        bind_to_cores(before)
    assert sorted(os.sched_getaffinity(0)) == before
