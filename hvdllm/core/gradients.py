"""Data-parallel gradient reduction, defined once for every adapter (pure functions + a config).

What every ``DistributedOptimizer`` / ``DistributedGradientTape`` does, in this order:

1. *Accumulate*: with ``backward_passes_per_step=k`` the k local gradients are **summed** (Horovod's
   semantic; scale the loss by 1/k, or pass ``average_aggregated_gradients=True``, for a mean).
   The reduction happens on the pass where :func:`is_reduction_pass` is true.
2. *Reduce*: gradients are grouped into buckets (:func:`hvdllm.core.buckets.plan_buckets`), cast to the
   compression's wire dtype (:func:`wire_dtype`; only floating gradients are compressed; a backend that
   cannot sum that 16-bit type reduces uncompressed, :func:`backend_wire_dtype`), multiplied by the
   *prescale*, **summed** on the wire, multiplied by the *postscale* and cast back
   (:meth:`ReductionConfig.scales`: Horovod's ``gradient_predivide_factor`` f gives prescale 1/f and,
   for Average, postscale f/N). With one rank nothing travels and nothing is cast.
3. *Clip*: with ``max_grad_norm`` the global L2 norm is taken **after** the reduction, so every rank
   computes the same coefficient (:func:`clip_coefficient_of`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from hvdllm.core.compression import CompressionSpec, effective_wire_dtype, parse_compression
from hvdllm.core.ops import Average, ReduceOp, gradient_op
from hvdllm.core.process_sets import WORLD, ProcessSet


@dataclasses.dataclass(frozen=True)
class ReductionConfig:
    """Validated options of a data-parallel gradient reduction (shared by the torch and TF wrappers)."""

    op: ReduceOp = Average
    compression: CompressionSpec = parse_compression(None)
    backward_passes_per_step: int = 1
    average_aggregated_gradients: bool = False
    max_grad_norm: float | None = None
    bucket_cap_mb: float = 25.0
    process_set: ProcessSet = WORLD
    gradient_predivide_factor: float = 1.0

    @classmethod
    def create(cls, op: object = Average, compression: object = None, backward_passes_per_step: object = 1,
               average_aggregated_gradients: bool = False, max_grad_norm: object = None,
               bucket_cap_mb: object = 25.0, process_set: ProcessSet | None = None,
               gradient_predivide_factor: object = 1.0) -> "ReductionConfig":
        """Parse and validate user options; bad values raise ValueError naming the value and what is allowed."""
        k = backward_passes_per_step
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"backward_passes_per_step={k!r} must be an integer >= 1")
        if max_grad_norm is not None:
            if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) \
                    or not math.isfinite(max_grad_norm) or max_grad_norm <= 0:
                raise ValueError(f"max_grad_norm={max_grad_norm!r} must be a finite number > 0, or None")
            max_grad_norm = float(max_grad_norm)
        if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) \
                or not math.isfinite(bucket_cap_mb) or bucket_cap_mb < 0:
            raise ValueError(f"bucket_cap_mb={bucket_cap_mb!r} must be a number >= 0 (0: one bucket per dtype)")
        if process_set is not None and not isinstance(process_set, ProcessSet):
            raise ValueError(f"process_set={process_set!r} must be an hvdllm ProcessSet")
        f = gradient_predivide_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 0:
            raise ValueError(f"gradient_predivide_factor={f!r} must be a finite number > 0")
        parsed_op = gradient_op(op)
        if f != 1.0 and parsed_op is not Average:
            raise ValueError(f"gradient_predivide_factor={f!r} needs op=hvd.Average (got {parsed_op!r}); "
                             "with other ops leave it at 1.0")
        return cls(parsed_op, parse_compression(compression), k, bool(average_aggregated_gradients),
                   max_grad_norm, float(bucket_cap_mb), process_set or WORLD, float(f))

    @property
    def bucket_cap_bytes(self) -> int:
        """The bucket cap in bytes (0 means one bucket per dtype)."""
        return int(self.bucket_cap_mb * 1024 * 1024)

    @property
    def local_scale(self) -> float:
        """Factor applied to the sum of the k local gradients before the reduction (1 or 1/k)."""
        return 1.0 / self.backward_passes_per_step if self.average_aggregated_gradients else 1.0

    def scales(self, size: int, wire_dtype: str | None = None) -> tuple[float, float]:
        """``(prescale, postscale)`` around the **sum** on the wire over ``size`` ranks: the one
        data-parallel semantics of both adapters.

        prescale = local_scale / f and postscale = f / size for Average (1 for Sum), with f Horovod's
        ``gradient_predivide_factor``: f = size divides before the sum (no fp16 overflow as ranks grow),
        f = 1 after it. A 16-bit ``wire_dtype`` takes f = size unless f was given, so its sum cannot
        overflow. Their product is always local_scale x op.postscale(size).
        """
        f = self.gradient_predivide_factor
        if wire_dtype in _16BIT and f == 1.0 and self.op is Average:
            f = float(size)
        return reduction_scales(self.op, size, f, self.local_scale)


def reduction_scales(op: ReduceOp, size: int, predivide: float = 1.0,
                     local_scale: float = 1.0) -> tuple[float, float]:
    """``(prescale, postscale)`` that realise ``op`` as prescale -> SUM over ``size`` ranks -> postscale
    (see :meth:`ReductionConfig.scales`)."""
    if size < 1:
        raise ValueError(f"size={size} must be >= 1")
    if op is Average:
        return local_scale / predivide, predivide / size
    return local_scale / predivide, predivide


def is_reduction_pass(passes_done: int, backward_passes_per_step: int) -> bool:
    """True when the pass just counted (``passes_done`` >= 1, counted after it) closes an accumulation window."""
    return passes_done % backward_passes_per_step == 0


def wire_dtype(grad_dtype: str, compression: CompressionSpec) -> str:
    """The dtype a gradient of ``grad_dtype`` travels in: compression applies to floating gradients only."""
    return effective_wire_dtype(grad_dtype, compression, None)[0]


_16BIT = ("float16", "bfloat16")
# The 16-bit wire dtypes each backend can sum: Horovod's CPU ops lack bf16, MPI has no fp16/bf16 sum.
REDUCIBLE_16BIT: dict[str, frozenset[str]] = {
    "horovod": frozenset({"float16"}),
    "mpi": frozenset(),
    "local": frozenset({"float16", "bfloat16"}),
}


def backend_wire_dtype(grad_dtype: str, compression: CompressionSpec, backend: str) -> tuple[str, str | None]:
    """The wire dtype on ``backend``, and a warning when compression falls back to the gradient's dtype.

    A backend that cannot sum the compressed 16-bit type reduces the gradient in its own dtype (exact,
    no bandwidth saving) rather than in a wider type after rounding, so the fallback never loses accuracy;
    a 16-bit *gradient* such a backend cannot sum travels as float32.
    """
    supported = REDUCIBLE_16BIT.get(backend)
    wire, fell_back = effective_wire_dtype(grad_dtype, compression, supported)
    warning = None if not fell_back else (
        f"{compression!r}: the {backend} backend cannot reduce {compression.wire_dtype}; "
        f"{grad_dtype} gradients are reduced uncompressed")
    if supported is not None and wire in _16BIT and wire not in supported:
        wire = "float32"
    return wire, warning


def clip_coefficient_of(total_norm: Any, max_norm: float, maximum: Callable[[Any, Any], Any] = max,
                        eps: float = 1e-6) -> Any:
    """The one clipping rule: the factor for gradients whose global L2 norm is ``total_norm``, as
    torch.nn.utils.clip_grad_norm_'s ``min(1, max_norm / (total_norm + eps))``.

    Written ``max_norm / maximum(total_norm + eps, max_norm)`` so that it also works on values that stay
    on a device or in a graph: ``maximum`` is the framework's elementwise maximum (np.maximum,
    tf.maximum, torch.maximum; Python's ``max`` for floats).
    """
    if max_norm <= 0:
        raise ValueError(f"max_grad_norm={max_norm} must be > 0")
    return max_norm / maximum(total_norm + eps, max_norm)


def warmup_multiplier(progress: float, size: int, warmup_epochs: float) -> float:
    """Horovod's gradual-warmup factor of the scaled learning rate after ``progress`` epochs (a float,
    counted to the *end* of the current batch): from 1/size up to 1 at ``warmup_epochs``, then 1."""
    if warmup_epochs <= 0:
        raise ValueError(f"warmup_epochs={warmup_epochs} must be > 0")
    if progress >= warmup_epochs:
        return 1.0
    return 1.0 / size * (progress * (size - 1) / warmup_epochs + 1.0)


def gradual_warmup_lr(initial_lr: float, size: int, warmup_epochs: float, epoch: int, batch: int,
                      steps_per_epoch: int) -> float:
    """Learning rate of the gradual warmup for data parallelism (Goyal et al., 2017; Horovod's callback).

    The rate grows linearly from ``initial_lr / size`` to ``initial_lr`` over ``warmup_epochs``, step by
    step; it reaches ``initial_lr`` on the last batch of the warmup and stays there. ``initial_lr`` is the
    already-scaled rate (single-process lr x size, the linear scaling rule).
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1")
    return float(initial_lr) * warmup_multiplier(epoch + (batch + 1) / steps_per_epoch, size, warmup_epochs)


def validate_groups(groups: Any, num_groups: Any = 0) -> Any:
    """Horovod's ``num_groups``/``groups`` pair: ``num_groups`` (deprecated) stands in for a missing
    ``groups``; ``groups`` is None, an integer > 0 or a list of lists of variables."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 0:
        raise ValueError(f"num_groups={num_groups!r} must be an integer >= 0")
    if groups is None and num_groups:
        groups = num_groups
    if groups is None or isinstance(groups, list):
        return groups
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"groups={groups!r} must be an integer > 0 or a list of lists of variables")
    return groups


def group_indices(count: int, groups: Any, position: Callable[[Any], int | None]) -> list[list[int]] | None:
    """Horovod's explicit grouping of ``count`` gradients into fused reductions, as index lists.

    ``groups`` an integer g: the gradients in g consecutive, near-equal groups; a list of lists of
    variables: each inner list one group (``position(var)`` is its gradient's index, None when that
    variable has no gradient here), every other gradient a group of its own. None: no explicit groups.
    """
    if groups is None:
        return None
    if isinstance(groups, int):
        d, r = divmod(count, groups)
        parts = [list(range(i * d + min(i, r), (i + 1) * d + min(i + 1, r))) for i in range(groups)]
        return [p for p in parts if p]
    out: list[list[int]] = []
    seen: set[int] = set()
    for group in groups:
        idx = [i for i in (position(v) for v in group) if i is not None and i not in seen]
        seen.update(idx)
        if idx:
            out.append(sorted(idx))
    return out + [[i] for i in range(count) if i not in seen]
