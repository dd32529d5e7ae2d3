"""What a run shows while it trains (rank 0): the progress bar or lines, tokens/s and MFU against the
device's peak FLOP/s."""
from __future__ import annotations

import os
import sys
import time

from hvdllm.core.cpu import cpu_flags, read_cpuinfo


def say(msg: str) -> None:
    print(msg, flush=True)


def warn(msg: str) -> None:
    """One line on stderr: something the user should know that does not stop the run."""
    print(f"hvdllm: warning: {' '.join(msg.split())}", file=sys.stderr, flush=True)


# Dense bf16/fp16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' data sheets.
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
    "L40": 181e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
    "V100": 125e12, "T4": 65e12,
}


def cpu_peak_flops(threads: int) -> float:
    """A rough fp32 peak for ``threads`` cores: clock x FMA lanes (AVX-512: 64, AVX2: 32 FLOP/cycle)."""
    text = read_cpuinfo()
    mhz = next((float(line.split(":")[1]) for line in text.splitlines() if line.startswith("cpu MHz")), 2500.0)
    flags = cpu_flags(text)
    per_cycle = 64 if "avx512f" in flags else 32 if "avx2" in flags else 16
    return threads * mhz * 1e6 * per_cycle


def peak_flops(configured: float, device_name: str | None, threads: int) -> tuple[float, str]:
    """Peak FLOP/s of one rank and where the number comes from: run.peak_flops, HVDLLM_PEAK_FLOPS,
    the GPU table above, or a CPU estimate."""
    if configured > 0:
        return configured, "run.peak_flops"
    env = os.environ.get("HVDLLM_PEAK_FLOPS")
    if env:
        try:
            return float(env), "HVDLLM_PEAK_FLOPS"
        except ValueError:
            pass
    if device_name:
        for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):
            if key in device_name:
                return GPU_PEAK_FLOPS[key], f"{key} data sheet"
        return 0.0, "unknown GPU (set run.peak_flops)"
    return cpu_peak_flops(threads), f"CPU estimate for {threads} thread(s)"


class Throughput:
    """Tokens/s and MFU between two log points."""

    def __init__(self, flops_per_token: float, peak_per_rank: float, ranks: int) -> None:
        self.fpt, self.peak, self.ranks = flops_per_token, peak_per_rank, ranks
        self._t, self._tokens = time.perf_counter(), 0
        self.start = self._t

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def read(self) -> tuple[float, float | None]:
        now = time.perf_counter()
        dt = max(now - self._t, 1e-9)
        tps = self._tokens / dt
        self._t, self._tokens = now, 0
        mfu = tps * self.fpt / (self.peak * self.ranks) if self.peak > 0 else None
        return tps, mfu

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class Progress:
    """A tqdm bar on rank 0 when stderr is a terminal, else one plain line per log step (readable under
    horovodrun/mpirun, which collect output line by line). Other ranks print nothing."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.enabled, self.total, self._bar = enabled, total, None
        force = os.environ.get("HVDLLM_PROGRESS", "")
        if enabled and (force == "tqdm" or (force != "lines" and sys.stderr.isatty())):
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
            except ImportError:
                self._bar = None

    def step(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def show(self, step: int, loss: float, tps: float, mfu: float | None, val: float | None = None,
             lr: float | None = None) -> None:
        if not self.enabled:
            return
        parts = {"loss": f"{loss:.4f}", "tok/s": f"{tps:,.0f}", "mfu": f"{100 * mfu:.2f}%" if mfu is not None else "n/a"}
        if val is not None:
            parts["val"] = f"{val:.4f}"
        if lr is not None:
            parts["lr"] = f"{lr:.2e}"
        if self._bar is not None:
            self._bar.set_postfix(parts, refresh=True)
        else:
            say(f"step {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in parts.items()))

    def note(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            say(msg)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
