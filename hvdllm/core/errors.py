"""Horovod's exception types, so ``except hvd.HorovodInternalError`` catches what Horovod raises."""
from __future__ import annotations


class HvdllmInternalError(RuntimeError):
    """A collective failed inside the backend (Horovod's HorovodInternalError where Horovod is absent)."""


def horovod_internal_error() -> type[Exception]:
    """Horovod's HorovodInternalError when Horovod is installed (pure Python: no compiled extension is
    loaded), else :class:`HvdllmInternalError`. Called by the adapters: the core itself never imports
    Horovod."""
    try:
        from horovod.common.exceptions import HorovodInternalError
    except ImportError:
        return HvdllmInternalError
    return HorovodInternalError
