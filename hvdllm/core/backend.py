"""Which communication backend a process uses: horovod, mpi (mpi4py) or local (one process).

The choice is made once, at ``init()``:
- ``HVDLLM_BACKEND=horovod|mpi|local`` forces one;
- otherwise Horovod when the job was launched (horovodrun, mpirun/mpiexec, srun with PMI; see
  hvdllm.core.launch) and Horovod is importable and built for the framework; mpi4py under an MPI
  launcher without Horovod; else local. A launch hvdllm cannot join (torchrun, srun without PMI) is an
  error naming the fix.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping

from hvdllm.core import launch

BACKENDS = ("horovod", "mpi", "local")

def launched_by(env: Mapping[str, str] | None = None) -> str | None:
    """Name of the launcher that started this process (see hvdllm.core.launch), or None for a plain
    ``python script.py`` (and a one-task srun step: nothing to join)."""
    found = launch.detect(env)
    if found.launcher == "srun" and found.size <= 1:
        return None
    return found.launcher


def launched_size(env: Mapping[str, str] | None = None) -> int:
    """The number of ranks the launcher started (1 for a plain ``python``), readable before ``init``."""
    return launch.detect(env).size


def choose_backend(
    horovod_available: Callable[[], bool],
    mpi_available: Callable[[], bool],
    env: Mapping[str, str] | None = None,
) -> str:
    """Pick the backend name. The probes are called lazily: they may import heavy modules."""
    env = os.environ if env is None else env
    launch.check(launch.detect(env))          # torchrun, srun without PMI: an error naming the fix
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
    if launcher != "horovodrun" and mpi_available():
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
