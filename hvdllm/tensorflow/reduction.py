"""The flat gradient reduction shared by the replicated optimizer/tape (:mod:`hvdllm.tensorflow.distributed`)
and ZeRO (:mod:`hvdllm.tensorflow.zero`): graph-op naming, wire dtype, prescale -> sum -> postscale."""
from __future__ import annotations

import warnings
from typing import Any

import tensorflow as tf

from hvdllm.core.gradients import ReductionConfig, backend_wire_dtype
from hvdllm.core.ops import Sum
from hvdllm.core.process_sets import ProcessSet


def _in_xla_context() -> bool:
    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # private module moved: assume no XLA rather than fail
        return False
    if tf.executing_eagerly():
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


_GRAPH_OPS = [0]


def restart_op_names() -> None:
    """Number graph collectives from 1 again: after an elastic reset every worker, old or new, traces
    its functions afresh and must give the same collectives the same names."""
    _GRAPH_OPS[0] = 0


def _op_name(kind: str) -> str | None:
    """A rank-independent key for a collective built in a graph (None when eager, where order keys it).

    Horovod keys graph ops by name; its default (the tensors' names) includes Keras's auto-numbered
    model/optimizer scopes, which differ across ranks as soon as one rank builds an extra model. Ranks
    build the same collectives in the same order, so a per-process counter names them identically.
    """
    if tf.executing_eagerly():
        return None
    _GRAPH_OPS[0] += 1
    return f"hvdllm_{kind}_{_GRAPH_OPS[0]}"


def _dense(g: Any) -> tf.Tensor:
    """IndexedSlices (embedding gradients) become dense tensors: one fused reduction for all gradients."""
    return tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g


_WARNED: set[tuple[str, str]] = set()


def _wire(dtype: str, config: ReductionConfig, backend: str) -> str:
    """The core's wire dtype for this backend; warns once per (backend, dtype) when compression falls back."""
    wire, warning = backend_wire_dtype(dtype, config.compression, backend)
    if warning and (backend, wire) not in _WARNED:
        _WARNED.add((backend, wire))
        warnings.warn(warning, stacklevel=3)
    return wire


def _set_size(rt: Any, process_set: ProcessSet) -> int:
    return len(process_set.members(rt.world.size))


def reduce_flat(flat: tf.Tensor, config: ReductionConfig, rt: Any, size: int, scatter: bool = False) -> tf.Tensor:
    """One flat gradient buffer through the core's prescale -> sum on the wire -> postscale over ``size``
    ranks: allreduced (same length back), or with ``scatter`` reduce-scattered (each rank gets its
    1/size part; the length must divide). On one rank nothing travels; only the scales apply."""
    wire = _wire(flat.dtype.name, config, rt.name) if size > 1 else flat.dtype.name
    prescale, postscale = config.scales(size, wire)
    if prescale != 1.0:  # in the gradient's dtype, before a 16-bit wire can overflow
        flat = flat * tf.constant(prescale, flat.dtype)
    if size > 1:
        send = tf.cast(flat, tf.as_dtype(wire))
        if scatter:
            summed = rt.reducescatter(send, Sum, config.process_set, name=_op_name("scatter"))
        else:
            summed = rt.allreduce(send, Sum, config.process_set, name=_op_name("grads"))
        if postscale != 1.0:  # on the wire buffer: a widened (fp32) sum of 16-bit gradients fits after it
            summed = summed * tf.constant(postscale, summed.dtype)
        return tf.cast(summed, flat.dtype)
    return flat * tf.constant(postscale, flat.dtype) if postscale != 1.0 else flat
