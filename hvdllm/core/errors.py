"""Horovod's exception types, so ``except hvd.HorovodInternalError`` catches what Horovod raises."""
from __future__ import annotations

from typing import Any, Callable


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


def lazy_module_getattr(module: str) -> Callable[[str], type[Exception]]:
    """An adapter package's module ``__getattr__``: ``hvd.HorovodInternalError`` resolved on first use
    (importing Horovod's package costs ~0.5 s that scripts which never catch it should not pay)."""
    def __getattr__(name: str) -> type[Exception]:
        if name == "HorovodInternalError":
            return horovod_internal_error()
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


LAZY_NAMES = ("HorovodInternalError",)


def lazy_module_dir(module_globals: dict[str, Any]) -> Callable[[], list[str]]:
    """An adapter package's module ``__dir__``: its names plus the lazily resolved ones above, so
    ``dir(hvd)`` lists every name ``hvd.<name>`` answers (as ``dir(horovod.torch)`` does)."""
    def __dir__() -> list[str]:
        return sorted(set(module_globals) | set(LAZY_NAMES))

    return __dir__
