"""Small TF helpers shared by the adapter: variable references (Horovod's ``vars_to_refs``/``refs_to_vars``)
that also work for Keras 3 variables, which have no ``ref()`` (the reason Horovod's own tape and callbacks
crash on Keras 3), and Horovod's ``device`` arguments as a scope."""
from __future__ import annotations

import contextlib
from typing import Any

import tensorflow as tf


class _Ref:
    """A hashable stand-in for ``variable.ref()`` where the variable has none (Keras 3 variables)."""

    def __init__(self, var: Any) -> None:
        self._var = var

    def deref(self) -> Any:
        return self._var

    def __hash__(self) -> int:
        return id(self._var)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Ref) and other._var is self._var


def ref(var: Any) -> Any:
    return var.ref() if hasattr(var, "ref") else _Ref(var)


def vars_to_refs(vars: Any) -> Any:
    """Hashable references of a variable or a (nested) list of them, as tuples (Horovod's helper; also
    for Keras 3 variables, which have no ``ref()``)."""
    if isinstance(vars, list):
        return tuple(vars_to_refs(v) for v in vars)
    return ref(vars)


def refs_to_vars(refs: Any) -> Any:
    """The inverse of :func:`vars_to_refs`."""
    if isinstance(refs, tuple):
        return [refs_to_vars(r) for r in refs]
    return refs.deref()


def ref_index(variables: Any) -> dict[Any, int]:
    """Each variable's reference -> its position in ``variables``."""
    return {ref(v): i for i, v in enumerate(variables)}


def device_scope(device: str) -> Any:
    """``tf.device(device)``, or no scope for Horovod's default ``''``."""
    return tf.device(device) if device else contextlib.nullcontext()
