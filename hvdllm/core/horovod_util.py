"""Horovod's small public helpers (horovod.common.util, re-exported by its framework modules), written
once for every adapter with Horovod 0.28.1's signatures and results.

They are framework-free: list splitting, the Adasum power-of-two check, the ``average=``/``op=``
back-compat rule, version comparison, the extension check and the GPU query. Horovod itself is only
consulted (lazily) where the question is about Horovod's build.
"""
from __future__ import annotations

import os
import sysconfig
from typing import Any, Sequence

from hvdllm.core.ops import ReduceOp, resolve_op


def split_list(items: Sequence[Any], n: int) -> list:
    """``items`` in ``n`` consecutive chunks whose lengths differ by at most one (earlier ones longer)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be an integer >= 1")
    d, r = divmod(len(items), n)
    return [items[i * d + min(i, r):(i + 1) * d + min(i + 1, r)] for i in range(n)]


def check_num_rank_power_of_2(num_rank: int) -> bool:
    """True when ``num_rank`` is a power of two (Horovod's Adasum requires it)."""
    return num_rank != 0 and (num_rank & (num_rank - 1)) == 0


def handle_average_backwards_compatibility(op: Any, average: Any) -> ReduceOp:
    """Horovod's rule for the deprecated ``average=``: ``op`` wins, both is an error, neither is Average."""
    if op is not None and average is not None:
        raise ValueError("The op parameter supersedes average. Please provide only one of them.")
    return resolve_op(op, average)


def is_version_greater_equal_than(ver: str, target: str) -> bool:
    """``ver >= target`` as versions (PEP 440), e.g. ``is_version_greater_equal_than(tf.__version__, "2.6.0")``."""
    if not isinstance(ver, str) or not isinstance(target, str):
        raise ValueError(f"is_version_greater_equal_than needs two strings, got {ver!r} and {target!r}")
    from packaging import version

    return version.parse(ver) >= version.parse(target)


def check_extension(ext_name: str, ext_env_var: str, pkg_path: str, *args: str) -> None:
    """Raise ImportError when the compiled extension ``args[-1]`` (in ``args[:-1]`` beside ``pkg_path``)
    is missing, naming the build variable to set: Horovod's check, e.g.
    ``check_extension('horovod.tensorflow', 'HOROVOD_WITH_TENSORFLOW', horovod.tensorflow.__file__, 'mpi_lib')``."""
    if not args:
        raise ValueError("check_extension needs the extension's file name (and optional folders) after pkg_path")
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    full_path = os.path.join(os.path.dirname(pkg_path), *args[:-1], args[-1] + suffix)
    if not os.path.exists(full_path):
        raise ImportError(f"Extension {ext_name} has not been built: {full_path} not found\n"
                          f"If this is not expected, reinstall Horovod with {ext_env_var}=1 to debug the build error.")


def gpu_available(ext_base_name: str, verbose: bool = False) -> bool:
    """Whether Horovod's ``ext_base_name`` extension ("torch", "tensorflow") runs with a GPU; False where
    Horovod is not installed (hvdllm's mpi and local backends reduce on the CPU)."""
    try:
        from horovod.common import util
    except ImportError:
        return False
    return bool(util.gpu_available(ext_base_name, verbose))
