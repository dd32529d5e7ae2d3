"""Which of Horovod 0.28.1's public names hvdllm serves where: the declarative source of README's support
table (generated and checked by ``python -m tests.support_table``).

Every Horovod module maps to the hvdllm module of the same shape, and every name in it works on all
three backends except those listed in :data:`LIMITS` (the backends that can, and why).
"""
from __future__ import annotations

BACKENDS = ("horovod", "mpi", "local")

# Horovod's module -> the hvdllm module that holds the same names.
MODULES = {
    "horovod.torch": "hvdllm.torch",
    "horovod.tensorflow": "hvdllm.tensorflow",
    "horovod.tensorflow.keras": "hvdllm.tensorflow.keras",
    "horovod.keras": "hvdllm.keras",
}
# Submodules whose names count as public API (``hvd.callbacks.X``, ``hvd.elastic.X``).
SUBMODULES = ("callbacks", "elastic")

# name (any module) -> (backends that support it, why the others cannot); every other name: all three.
LIMITS: dict[str, tuple[tuple[str, ...], str]] = {
    "Adasum": (("horovod",), "Horovod's Adasum reduction needs its MPI controller (horovodrun --mpi)"),
}


def backends_of(name: str) -> tuple[str, ...]:
    """The backends that support Horovod's ``name`` (``callbacks.X``/``elastic.X`` count as ``X``)."""
    return LIMITS.get(name.rsplit(".", 1)[-1], (BACKENDS, ""))[0]


def limit_note(name: str) -> str:
    """Why some backend cannot serve ``name`` ('' when all can)."""
    return LIMITS.get(name.rsplit(".", 1)[-1], (BACKENDS, ""))[1]
