"""Keras vs PyTorch throughput of `hvdllm train --pp 2` on the same machine, config and data.

    python bench/keras_pipeline.py [--steps 30] [--schedule 1f1b] [--np 2] [--set KEY=VALUE ...]

Runs ``horovodrun -np 2 --gloo hvdllm train --pp 2`` once per framework (the tiny preset, fp32, one thread
per rank, no evaluation or checkpoints inside the timed steps) and reports the median tokens/s of the
logged steps after the first ``--warmup`` (tracing and start-up excluded), and the ratio Keras / torch.
Both trainers run the core's schedule with the same stage partition, exchanges (named broadcasts in
two-rank process sets) and micro-batch count; the difference is the per-micro-batch framework cost:
a torch autograd graph vs a ``tf.function`` forward under an eager ``GradientTape`` (the backward then
runs the function's gradient graph).

Measured on the 2-core machine while other jobs ran on it (2026-12-01, load average ~11; tiny preset:
4 layers x 128, global batch 16 = 8 micro-batches of 2 x 128 tokens, 1F1B, ``--steps 25``, median of
steps 6-25):
  hvdllm train --pp 2 (1f1b, -np 2): torch 5905 tokens/s, Keras 2519 tokens/s, Keras/torch = 0.43
The absolute figures depend on the load; the ratio is the comparison. Keras pays per micro-batch for
the eager tape around the ``tf.function`` call (its backward runs the function's gradient graph) and
for the eager broadcasts' conversions, where torch's autograd runs its small kernels directly.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hvdllm.train.metrics import read_metrics  # noqa: E402

FRAMEWORKS = ("torch", "tensorflow")


def run(framework: str, out: Path, args: argparse.Namespace) -> float:
    """Median tokens/s of one `hvdllm train --pp 2` run after the warm-up steps."""
    hvdllm = str(Path(sys.executable).with_name("hvdllm"))
    cmd = [str(Path(sys.executable).with_name("horovodrun")), "-np", str(args.np), "--gloo", hvdllm, "train",
           "--framework", framework, "--preset", "tiny", "--pp", "2", "--max-steps", str(args.steps),
           "--global-batch", "16", "--micro-batch", "2", "--out", str(out),
           "--set", f"parallel.schedule={args.schedule}", "--set", "run.threads=1", "--set", "run.log_interval=1",
           "--set", "run.eval_interval=0", "--set", "run.eval_sequences=2", "--set", "sample.tokens=1",
           "--set", "run.tensorboard=false", "--set", "run.progress=false",
           "--set", f"run.checkpoint_interval={args.steps}"]
    for kv in args.set:
        cmd += ["--set", kv]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    subprocess.run(cmd, env=env, check=True, cwd=str(ROOT), stdout=subprocess.DEVNULL)
    rows = [r for r in read_metrics(out / "metrics.csv") if r["tokens_per_s"]]
    return statistics.median(float(r["tokens_per_s"]) for r in rows[args.warmup:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="logged steps left out of the median")
    p.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe"])
    p.add_argument("--np", type=int, default=2, help="ranks (2: pp=2 alone; 4: 2 data-parallel pipelines)")
    p.add_argument("--set", action="append", default=[], help="extra config KEY=VALUE for both runs")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hvdllm-bench-"))
    try:
        tps = {fw: run(fw, tmp / fw, args) for fw in FRAMEWORKS}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"hvdllm train --pp 2 ({args.schedule}, -np {args.np}): torch {tps['torch']:.0f} tokens/s, "
          f"Keras {tps['tensorflow']:.0f} tokens/s, Keras/torch = {tps['tensorflow'] / tps['torch']:.2f}")


if __name__ == "__main__":
    main()
