"""bf16 vs fp32 training on the `small` preset, PyTorch and Keras side by side: tokens/s and the loss
after N steps, with the bf16/fp32 ratios.

    python bench/precision.py                     # 3 interleaved rounds of 20 steps, torch and Keras
    python bench/precision.py --rounds 1 --steps 10 --frameworks torch

Each run is a plain ``hvdllm train --preset small --max-steps N`` (one process, the preset's global
batch of 32 x 128 tokens, the default fast optimizer path) in its own directory. Runs are interleaved
(round 1: every framework x precision, round 2: ..., the order rotating) so drifting machine load hits
all alike. Per run: the median tokens/s over the logged steps after the first two (start-up, tracing)
and the training loss at step N; per configuration the median over rounds. The training is seeded and
deterministic, so the loss does not vary between rounds (only its speed does). On a CPU, bf16 pays off
where it has bf16 units (AVX512_BF16 / AMX-BF16; :mod:`hvdllm.core.cpu`), else bf16 is emulated.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hvdllm.core.cpu import bf16_units, cpu_flags, read_cpuinfo  # noqa: E402


def run(framework: str, precision: str, steps: int, out: Path, threads: int) -> tuple[float, float]:
    """One training run; (median tokens/s after the first two logged steps, loss at the last step)."""
    args = [sys.executable, "-m", "hvdllm.cli", "train", "--framework", framework, "--preset", "small",
            "--max-steps", str(steps), "--out", str(out), "--set", "run.log_interval=1",
            "--set", f"run.eval_interval={steps}", "--set", "run.eval_sequences=32", "--set", "sample.tokens=0",
            "--set", "run.progress=false", "--set", "run.tensorboard=false", "--set", f"run.precision={precision}"]
    if threads:
        args += ["--set", f"run.threads={threads}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    p = subprocess.run(args, cwd=str(ROOT), env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{framework} {precision} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    with open(out / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["loss"]]
    speeds = [float(r["tokens_per_s"]) for r in rows[2:] if r["tokens_per_s"]]
    return statistics.median(speeds), float(rows[-1]["loss"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--frameworks", nargs="+", default=["torch", "tensorflow"], choices=["torch", "tensorflow"])
    ap.add_argument("--threads", type=int, default=0, help="threads per run (default: hvdllm's, all cores)")
    args = ap.parse_args()
    units = bf16_units(cpu_flags(read_cpuinfo()))
    print(f"CPU bf16 units: {', '.join(units) or 'none (bf16 is emulated)'}; os.cpu_count()={os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    configs = [(fw, prec) for fw in args.frameworks for prec in ("fp32", "bf16")]
    speed: dict[tuple[str, str], list[float]] = {c: [] for c in configs}
    loss: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory(prefix="hvdllm-precision-") as tmp:
        for r in range(args.rounds):
            for i, (fw, prec) in enumerate(configs[r % len(configs):] + configs[:r % len(configs)]):
                tps, last = run(fw, prec, args.steps, Path(tmp) / f"{fw}-{prec}-{r}", args.threads)
                speed[(fw, prec)].append(tps)
                loss[(fw, prec)] = last
                print(f"  round {r + 1}: {fw:<10} {prec}  {tps:8.0f} tokens/s  loss@{args.steps} {last:.4f}", flush=True)
    print(f"\nsmall preset, {args.steps} steps x 32 x 128 tokens, {args.rounds} interleaved round(s), "
          f"median tokens/s (load average {os.getloadavg()[0]:.2f} at the end)")
    print(f"  {'framework':<10} {'fp32 tok/s':>10} {'bf16 tok/s':>10} {'bf16/fp32':>9}   "
          f"{'fp32 loss':>9} {'bf16 loss':>9} {'rel. diff':>9}")
    for fw in args.frameworks:
        s32, s16 = statistics.median(speed[(fw, "fp32")]), statistics.median(speed[(fw, "bf16")])
        l32, l16 = loss[(fw, "fp32")], loss[(fw, "bf16")]
        print(f"  {fw:<10} {s32:10.0f} {s16:10.0f} {s16 / s32:8.2f}x   {l32:9.4f} {l16:9.4f} {l16 / l32 - 1:+9.2%}")


if __name__ == "__main__":
    main()
