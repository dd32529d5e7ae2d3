"""Which launcher started this process, how many ranks it started, and whether hvdllm can join them.

Read from the environment before any communication library starts:
- ``horovodrun`` (Gloo): ``HOROVOD_RANK``/``HOROVOD_SIZE``; with ``--mpi`` it runs ``mpirun``;
- Open MPI ``mpirun``: ``OMPI_COMM_WORLD_RANK``/``_SIZE``;
- MPICH / Intel MPI (Hydra), ``srun --mpi=pmi2``: ``PMI_RANK``/``PMI_SIZE``;
- a PMIx server (Open MPI 5 ``prterun``, ``srun --mpi=pmix``): ``PMIX_RANK`` (size from the launcher);
- Slurm ``srun``: ``SLURM_PROCID`` with ``SLURM_STEP_NUM_TASKS`` (only a job step has it: the batch
  script itself is one process);
- ``torchrun``: ``RANK``/``WORLD_SIZE`` with ``TORCHELASTIC_RUN_ID`` or ``LOCAL_WORLD_SIZE``.

A launch hvdllm cannot join (torchrun; srun without PMI, whose tasks each see a one-rank MPI world) is
a :class:`LaunchError` naming the fix, never N independent one-rank jobs writing one run directory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping


class LaunchError(ValueError):
    """The job was launched in a way hvdllm cannot run correctly; the message names the fix."""


@dataclass(frozen=True)
class Launch:
    """What the environment says: ``launcher`` (None: a plain process), world ``size`` and ``rank``."""
    launcher: str | None
    size: int = 1
    rank: int = 0


LAUNCHERS = ("horovodrun", "mpirun", "pmi", "pmix", "srun", "torchrun")


def _int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = env.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def _slurm_step_size(env: Mapping[str, str]) -> int | None:
    return _int(env, "SLURM_STEP_NUM_TASKS") if "SLURM_PROCID" in env else None


def detect(env: Mapping[str, str] | None = None) -> Launch:
    """The launch this process belongs to (see the module docstring for the variables read)."""
    env = os.environ if env is None else env
    if "HOROVOD_RANK" in env or "HOROVOD_GLOO_RENDEZVOUS_ADDR" in env:
        return Launch("horovodrun", _int(env, "HOROVOD_SIZE") or 1, _int(env, "HOROVOD_RANK") or 0)
    if "OMPI_COMM_WORLD_SIZE" in env or "OMPI_COMM_WORLD_RANK" in env:
        return Launch("mpirun", _int(env, "OMPI_COMM_WORLD_SIZE") or 1, _int(env, "OMPI_COMM_WORLD_RANK") or 0)
    if "PMI_RANK" in env or "PMI_SIZE" in env:
        return Launch("pmi", _int(env, "PMI_SIZE", "SLURM_STEP_NUM_TASKS") or 1, _int(env, "PMI_RANK") or 0)
    if "PMIX_RANK" in env:
        size = _int(env, "PMIX_SIZE", "SLURM_STEP_NUM_TASKS", "OMPI_UNIVERSE_SIZE") or 1
        return Launch("pmix", size, _int(env, "PMIX_RANK") or 0)
    step = _slurm_step_size(env)
    if step is not None:
        return Launch("srun", step, _int(env, "SLURM_PROCID") or 0)
    if "TORCHELASTIC_RUN_ID" in env or ("LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env):
        return Launch("torchrun", _int(env, "WORLD_SIZE") or 1, _int(env, "RANK") or 0)
    return Launch(None)


def check(launch: Launch) -> None:
    """Raise :class:`LaunchError` for a multi-rank launch hvdllm cannot join."""
    if launch.size <= 1:
        return
    if launch.launcher == "torchrun":
        raise LaunchError(
            f"launched by torchrun with WORLD_SIZE={launch.size}: hvdllm's ranks are joined by Horovod or MPI, "
            f"so torchrun would start {launch.size} independent one-rank jobs; launch with "
            f"`horovodrun -np {launch.size} ...` or `mpirun -np {launch.size} ...` instead")
    if launch.launcher == "srun":
        raise LaunchError(
            f"launched by srun with {launch.size} tasks but without PMI (no PMI_RANK/PMIX_RANK): each task would "
            "be its own one-rank job; use `srun --mpi=pmix` (or --mpi=pmi2), or horovodrun/mpirun inside "
            "the allocation")


def check_world(launch: Launch, size: int, backend: str) -> None:
    """Raise :class:`LaunchError` when an MPI backend joined another number of ranks than the launcher
    started (horovodrun's Gloo world is its own launcher's, and elastic jobs change size on purpose)."""
    if launch.launcher != "horovodrun" and launch.size > 1 and size != launch.size:
        how = {"srun": "use `srun --mpi=pmix` with an MPI built for PMIx",
               "pmix": "build Open MPI (and Horovod's MPI) with PMIx support, or launch with mpirun",
               "pmi": "use the mpirun of the MPI that mpi4py and Horovod are built with"}
        fix = how.get(launch.launcher or "", "use the launcher of the MPI that Horovod and mpi4py are built with")
        raise LaunchError(
            f"{launch.launcher} started {launch.size} ranks but the {backend} backend sees a world of {size}: "
            f"the ranks would train as independent jobs; {fix}")
