"""Horovod's exception types, so ``except hvd.HorovodInternalError`` catches what Horovod raises."""
from __future__ import annotations

try:  # pure Python in Horovod's package: importable without its compiled extensions
    from horovod.common.exceptions import HorovodInternalError
except ImportError:
    class HorovodInternalError(RuntimeError):  # type: ignore[no-redef]
        """A collective failed inside the backend (Horovod's name, for scripts that catch it)."""
