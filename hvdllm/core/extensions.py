"""Horovod's ``check_extension``: is a compiled extension library present next to a package?

horovod.torch and horovod.tensorflow export it (their ``__init__`` calls it to fail early with a hint);
hvdllm exports the same function so scripts that call it keep working.
"""
from __future__ import annotations

import os
import sysconfig


def extension_full_path(pkg_path: str, *args: str) -> str:
    """``<dir of pkg_path>/<args[:-1]>/<args[-1]><EXT_SUFFIX>`` (e.g. ``mpi_lib_v2.cpython-311-x86_64-linux-gnu.so``)."""
    if not args:
        raise ValueError("extension_full_path needs at least the extension's base name after pkg_path")
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or sysconfig.get_config_var("SO") or ".so"
    return os.path.join(os.path.dirname(pkg_path), *args[:-1], args[-1] + suffix)


def check_extension(ext_name: str, ext_env_var: str, pkg_path: str, *args: str) -> None:
    """Raise ImportError naming the missing file and the build variable when the extension was not built."""
    full_path = extension_full_path(pkg_path, *args)
    if not os.path.exists(full_path):
        raise ImportError(f"Extension {ext_name} has not been built: {full_path} not found\n"
                          f"If this is not expected, reinstall Horovod with {ext_env_var}=1 to debug the build error.")
