"""Which communication backend a process uses: horovod, mpi (mpi4py) or local (one process).

The choice is made once, at ``init()``:
- ``HVDLLM_BACKEND=horovod|mpi|local`` forces one;
- otherwise Horovod when the job was launched (horovodrun, mpirun, Slurm srun) and Horovod is
  importable and built for the framework; mpi4py under ``mpirun`` without Horovod; else local.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping

BACKENDS = ("horovod", "mpi", "local")

# Variables that launchers (horovodrun, Open MPI, MPICH/PMI, PMIx) set to the world size in every rank.
_SIZE_VARS = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
_MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK")


def launched_by(env: Mapping[str, str] | None = None) -> str | None:
    """Name of the launcher that started this process, or None for a plain ``python script.py``."""
    env = os.environ if env is None else env
    if "HOROVOD_RANK" in env or "HOROVOD_GLOO_RENDEZVOUS_ADDR" in env:
        return "horovodrun"
    if any(v in env for v in _MPI_VARS):
        return "mpirun"
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "srun"
    return None


def launched_size(env: Mapping[str, str] | None = None) -> int:
    """The number of ranks the launcher started (1 for a plain ``python``), readable before ``init``."""
    env = os.environ if env is None else env
    return next((int(env[v]) for v in _SIZE_VARS if env.get(v, "").isdigit()), 1)


def choose_backend(
    horovod_available: Callable[[], bool],
    mpi_available: Callable[[], bool],
    env: Mapping[str, str] | None = None,
) -> str:
    """Pick the backend name. The probes are called lazily: they may import heavy modules."""
    env = os.environ if env is None else env
    forced = env.get("HVDLLM_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(
                f"HVDLLM_BACKEND={env['HVDLLM_BACKEND']!r} is not a backend; allowed: {', '.join(BACKENDS)}"
            )
        if forced == "horovod" and not horovod_available():
            raise RuntimeError("HVDLLM_BACKEND=horovod but Horovod is not installed for this framework "
                               "(run launch/install.sh, or check `horovodrun --check-build`)")
        if forced == "mpi" and not mpi_available():
            raise RuntimeError("HVDLLM_BACKEND=mpi but mpi4py cannot be imported (pip install mpi4py)")
        return forced
    launcher = launched_by(env)
    if launcher is None:
        return "local"
    if horovod_available():
        return "horovod"
    if launcher in ("mpirun", "srun") and mpi_available():
        return "mpi"
    raise RuntimeError(
        f"launched by {launcher} but neither Horovod (for this framework) nor mpi4py is importable; "
        "run launch/install.sh or set HVDLLM_BACKEND=local"
    )


def module_available(name: str) -> bool:
    """True when ``name`` can be imported (without importing it when it is a top-level package)."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
