"""What the CPU offers for mixed precision: bf16 units from the ``flags`` line of ``/proc/cpuinfo``.

Pure functions over the flags text (testable with any string) and one thin reader. On CPUs with
AVX512_BF16 (AMD Zen 4+, Intel Cooper Lake+) or AMX-BF16 (Intel Sapphire Rapids+) oneDNN runs bf16
matmuls natively, so ``run.precision=bf16`` (fp32 master weights and optimizer state, bf16 compute)
trains faster at the same loss; without them bf16 is emulated and usually slower than fp32.
"""
from __future__ import annotations

# cpuinfo flag -> what it is called in messages
BF16_FLAGS = {"avx512_bf16": "AVX512_BF16", "amx_bf16": "AMX-BF16"}


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of the first ``flags`` line of ``/proc/cpuinfo`` text (x86; ARM's is ``Features``)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def bf16_units(flags: frozenset[str]) -> tuple[str, ...]:
    """The bf16 units among ``flags``, by name (empty when the CPU has none)."""
    return tuple(name for flag, name in BF16_FLAGS.items() if flag in flags)


def precision_advice(precision: str, device_type: str, flags: frozenset[str]) -> str | None:
    """The start-up line about bf16 units on a CPU run: which units there are and, when the run is fp32,
    the setting that uses them; None on other devices or CPUs without bf16 units."""
    units = bf16_units(flags)
    if device_type != "cpu" or not units:
        return None
    have = f"this CPU has bf16 units ({', '.join(units)})"
    if precision == "fp32":
        return (f"{have}: --set run.precision=bf16 computes in bf16 on them (fp32 master weights and "
                "optimizer state), usually faster at the same loss")
    if precision == "bf16":
        return f"{have}: run.precision=bf16 uses them"
    return None


def read_cpuinfo(path: str = "/proc/cpuinfo") -> str:
    """The text of ``/proc/cpuinfo`` ("" where there is none: macOS, Windows, sandboxes)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


__all__ = ["BF16_FLAGS", "cpu_flags", "bf16_units", "precision_advice", "read_cpuinfo"]
