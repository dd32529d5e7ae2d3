"""Data-parallel PyTorch throughput: hvdllm vs horovod.torch vs torch DDP vs one process.

    python bench/torch_dp.py [--rounds 3] [--steps 15] [--modes hvdllm,horovod,ddp,single]

The same GPT (hvdllm.models.gpt, ~3.2M parameters), the same data and the same torch AdamW are
trained by:
  hvdllm   horovodrun -np 2 --gloo, hvdllm.torch.DistributedOptimizer (Horovod backend)
  horovod  horovodrun -np 2 --gloo, horovod.torch.DistributedOptimizer
  ddp      torchrun --nproc-per-node 2, DistributedDataParallel on the gloo process group
  mpi      mpirun -np 2, hvdllm.torch.DistributedOptimizer on the mpi4py backend (optional mode)
  single   python, one process (the same per-process batch)
Runs are interleaved (round 1: every mode, round 2: every mode in a rotated order, ...; bench/harness.py)
so that drifting machine load hits all modes alike; the medians of the global tokens/s and their ratios
are printed. Each rank uses cores/ranks threads. This measures speed only; correctness is in tests/test_torch_dp.py.

Measured on the quiet 2-core machine (2026-11-29; batch 8x128 per rank, 3 interleaved rounds of 15
steps, medians of global tokens/s): hvdllm 3664, horovod.torch 2859, DDP 3646, one process 3430, i.e.
hvdllm/horovod 1.28x, hvdllm/DDP 1.005x (an earlier run the same hour: 3372/2869/3701/4209, 1.18x and
0.91x; single runs vary by about 10%). All np=2 modes reach the same loss (5.1924). The lead over
Horovod's wrapper comes from hvdllm's CPU defaults (HOROVOD_CYCLE_TIME=20 and sleeping instead of
spinning while waiting): with HOROVOD_CYCLE_TIME=20 exported for both, the wrapper matched or beat
hvdllm (hvdllm/horovod 0.90x with one 25 MB bucket, 0.97x with --bucket-cap-mb 4). Horovod's idle
background thread: HOROVOD_CYCLE_TIME=20 (hvdllm's CPU default, hvdllm.core.backends) cut its CPU per
step from ~110 ms to ~25 ms on this benchmark.

Before/after the one-library restructuring (issue 11), quiet machine, 2026-12-01, 3 rounds x 15 steps
each, the same hour: before (2140e38) hvdllm 6340, horovod 6036, DDP 7482 tokens/s (hvdllm/horovod
1.050x, hvdllm/DDP 0.847x); after (0fe3300) hvdllm 6085, horovod 5603, DDP 6897 (1.086x, 0.882x).
"""
from __future__ import annotations

import statistics

from harness import (bench_gpt, comma_list, interleaved, launch, launch_parser, report, start_ranks, train_timed,
                     worker_argv)

MODES = ("hvdllm", "horovod", "ddp", "single")
ALL_MODES = MODES + ("mpi",)
# mode -> (how its ranks start (harness.start_ranks), launcher)
RUNS = {"hvdllm": ("hvdllm", "gloo"), "horovod": ("horovod", "gloo"), "ddp": ("ddp", "torchrun"),
        "mpi": ("hvdllm", "mpirun"), "single": ("single", "python")}


def worker(mode: str, steps: int, warmup: int, batch: int, cap: float) -> None:
    import torch

    hvd, rank, size = start_ranks(RUNS[mode][0])
    model = bench_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    if mode in ("hvdllm", "mpi"):
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), bucket_cap_mb=cap)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    elif mode == "horovod":
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    elif mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elapsed, loss, tokens = train_timed(model, opt, rank, batch, steps, warmup)
    report({"mode": mode, "rank": rank, "size": size, "tokens_per_s": tokens * size / elapsed,
            "step_s": elapsed / steps, "loss": loss, "params": sum(p.numel() for p in model.parameters())})


def main() -> None:
    ap = launch_parser("hvdllm vs horovod.torch vs DDP vs one process (tokens/s)", ALL_MODES, MODES, rounds=3,
                       steps=15, warmup=3, timeout=600)
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--bucket-cap-mb", type=float, default=25, help="hvdllm's bucket_cap_mb")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.warmup, args.batch, args.bucket_cap_mb)
        return
    modes = comma_list(ap, args.modes, ALL_MODES, "--modes")
    results: dict[str, list[float]] = {m: [] for m in modes}
    for r, m in interleaved(modes, args.rounds):
        launcher = RUNS[m][1]
        ranks = launch(launcher, 1 if launcher == "python" else args.np,
                       worker_argv(__file__, m, args, "--bucket-cap-mb", str(args.bucket_cap_mb)), args.timeout)
        if ranks:
            res = ranks[0]
            results[m].append(res["tokens_per_s"])
            print(f"round {r} {m:8s} {res['tokens_per_s']:9.0f} tokens/s  step {res['step_s'] * 1e3:7.1f} ms  "
                  f"loss {res['loss']:.4f}  ({res['params'] / 1e6:.2f}M params, np={res['size']})", flush=True)
    med = {m: statistics.median(v) for m, v in results.items() if v}
    print("\nmedian tokens/s: " + ", ".join(f"{m} {v:.0f}" for m, v in med.items()))
    if "hvdllm" in med:
        for other in med:
            if other != "hvdllm":
                print(f"hvdllm / {other}: {med['hvdllm'] / med[other]:.3f}x")


if __name__ == "__main__":
    main()
