"""Keras 3 GPT data parallelism: tokens/s of np=2 (hvdllm on Horovod-Gloo, Horovod-MPI, mpi4py) vs one process.

    .venv/bin/python bench/keras_dp.py [--rounds 2] [--steps 12] [--preset small] [--batch 8]

Each round launches every configuration once, in the same order (pairs interleaved, so machine noise
hits all of them alike); each launch trains ``model.fit`` with ``hvd.DistributedOptimizer(Adam)`` for
``--steps`` timed steps after ``--warmup`` untimed ones and reports global tokens/s (all ranks). On a
2-core machine two ranks share the cores, so np=2 cannot be faster than one process: the ratio
measures the data-parallel overhead. Prints each run, the medians and the ratios to one process.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {  # name -> (launcher, np, extra env)
    "1 process": ("python", 1, {}),
    "np=2 horovod-gloo": ("gloo", 2, {}),
    "np=2 horovod-mpi": ("horovod-mpi", 2, {}),
    "np=2 mpirun+mpi4py": ("mpirun", 2, {}),
}


def worker(args: argparse.Namespace) -> None:
    import keras
    import numpy as np
    import tensorflow as tf

    import hvdllm.tensorflow as hvd
    from hvdllm.models.config import PRESETS
    from hvdllm.models.gpt_keras import GPT, cross_entropy

    hvd.init()
    tf.config.threading.set_intra_op_parallelism_threads(hvd.threads_per_rank())
    cfg = PRESETS[args.preset]
    model = GPT(cfg, seed=0)
    opt = hvd.DistributedOptimizer(keras.optimizers.Adam(3e-4))
    model.compile(optimizer=opt, loss=lambda targets, logits: cross_entropy(logits, targets), jit_compile=False)
    rs = np.random.RandomState(hvd.rank())
    total = args.warmup + args.steps
    toks = rs.randint(0, cfg.vocab_size, size=(total * args.batch, cfg.block_size + 1)).astype("int32")
    x, y = toks[:, :-1], toks[:, 1:]

    class Timer(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            if batch == args.warmup - 1:
                hvd.barrier()
                self.t0 = time.perf_counter()
            if batch == total - 1:
                hvd.barrier()
                self.t1 = time.perf_counter()

    timer = Timer()
    model.fit(x, y, batch_size=args.batch, epochs=1, shuffle=False, verbose=0,
              callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0), timer])
    dt = timer.t1 - timer.t0
    tokens = args.steps * args.batch * cfg.block_size * hvd.size()
    if hvd.rank() == 0:
        print("RESULT " + json.dumps({"tokens_per_s": tokens / dt, "step_ms": 1000 * dt / args.steps,
                                      "backend": hvd.backend(), "size": hvd.size(),
                                      "params": int(sum(np.prod(v.shape) for v in model.trainable_variables))}))


def launch(name: str, args: argparse.Namespace) -> dict | None:
    from tests.multirank import base_env, command

    launcher, np_, env = CONFIGS[name]
    argv = [str(Path(__file__).resolve()), "--worker", "--preset", args.preset, "--batch", str(args.batch),
            "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd, extra = command(launcher, np_, argv)
    full_env = base_env({**extra, **env})
    full_env.pop("HVDLLM_TEST_OUT", None)
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=args.timeout, cwd=str(ROOT))
    for line in proc.stdout.splitlines():
        if "RESULT " in line:
            return json.loads(line.split("RESULT ", 1)[1])
    print(f"{name}: failed (exit {proc.returncode})\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", default="small", help="GPT preset (hvdllm.models.PRESETS)")
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--steps", type=int, default=12, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (tracing, first allocations)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in names if c not in CONFIGS]
    if bad:
        raise SystemExit(f"unknown config {bad[0]!r}; allowed: {', '.join(CONFIGS)}")
    results: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(args.rounds):
        for name in names:
            res = launch(name, args)
            if res:
                results[name].append(res["tokens_per_s"])
                print(f"round {rnd + 1} {name:22s} {res['tokens_per_s']:9.0f} tokens/s  "
                      f"({res['step_ms']:.0f} ms/step, {res['params'] / 1e6:.2f}M params, backend {res['backend']})",
                      flush=True)
    base = statistics.median(results["1 process"]) if results.get("1 process") else None
    print(f"\nmedian tokens/s over {args.rounds} interleaved rounds (preset {args.preset}, batch {args.batch} per rank):")
    for name, vals in results.items():
        if vals:
            med = statistics.median(vals)
            ratio = f"  x{med / base:.2f} of one process" if base else ""
            print(f"  {name:22s} {med:9.0f}{ratio}")


if __name__ == "__main__":
    main()
