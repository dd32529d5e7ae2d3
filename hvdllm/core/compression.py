"""Gradient compression specs: the dtype a buffer travels in during an allreduce.

Compression here is a cast: fp16 halves the bytes on the wire (range +-65504, ~3 decimal digits),
bf16 halves them with fp32's range but ~2 decimal digits. The reduction sums in the wire dtype, then
the result is cast back to the gradient's dtype and scaled (see ReduceOp.postscale).
"""
from __future__ import annotations

import dataclasses

FLOATING = ("float16", "bfloat16", "float32", "float64")


@dataclasses.dataclass(frozen=True)
class CompressionSpec:
    name: str
    wire_dtype: str | None  # numpy-style dtype name; None keeps the gradient's dtype

    def __repr__(self) -> str:
        return f"Compression.{self.name}"


class Compression:
    """Horovod-compatible names: ``Compression.none``, ``Compression.fp16``, ``Compression.bf16``."""

    none = CompressionSpec("none", None)
    fp16 = CompressionSpec("fp16", "float16")
    bf16 = CompressionSpec("bf16", "bfloat16")


def parse_compression(value: object) -> CompressionSpec:
    """Accept a spec, its name, or Horovod's compressor classes (matched by class name)."""
    if isinstance(value, CompressionSpec):
        return value
    if value is None:
        return Compression.none
    name = value if isinstance(value, str) else getattr(value, "__name__", type(value).__name__)
    key = str(name).lower().replace("compressor", "")
    for spec in (Compression.none, Compression.fp16, Compression.bf16):
        if key == spec.name:
            return spec
    raise ValueError(f"unknown compression {value!r}; allowed: Compression.none, Compression.fp16, Compression.bf16")


def effective_wire_dtype(grad_dtype: str, spec: CompressionSpec, supported: frozenset[str] | set[str] | None
                         ) -> tuple[str, bool]:
    """The dtype a gradient of ``grad_dtype`` really travels in on a backend, and whether it fell back.

    Only floating gradients are compressed. ``supported`` lists the 16-bit wire dtypes the backend can
    reduce (None: all); an unsupported one falls back to the gradient's own dtype (no compression),
    reported by the second value so the adapter can warn once.
    """
    want = spec.wire_dtype if spec.wire_dtype is not None and grad_dtype in FLOATING else grad_dtype
    if want == grad_dtype or supported is None or want in supported:
        return want, False
    return grad_dtype, True
