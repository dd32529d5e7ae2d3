"""ZeRO: optimizer-state and gradient bytes per rank, step phases, collectives per step and tokens/s,
hvdllm --zero 0/1/2 (Horovod Gloo and mpi4py, with and without accumulation) vs torch
ZeroRedundancyOptimizer + DDP.

    python bench/zero.py [--nps 2,4] [--launchers gloo,mpirun] [--accums 1,2] [--rounds 1] [--steps 6]
                         [--bucket-mb 1] [--inflight-mb MB] [--modes z0,z1,z2,torch_zero]

The benches' GPT (bench/harness.py: ~3.2M parameters), data and torch AdamW, trained by:
  z0          hvd.DistributedOptimizer (replicated optimizer state)
  z1, z2      the same with zero_stage=1 / 2 (z2: ``zero_inflight_mb`` from --inflight-mb, default None:
              two of the largest bucket)
  z2u         (optional) zero_stage=2 with no in-flight bound (``zero_inflight_mb=math.inf``)
  torch_zero  torchrun (gloo), DistributedDataParallel(gradient_as_bucket_view=True) +
              torch.distributed.optim.ZeroRedundancyOptimizer (Gloo, no accumulation only)
each hvdllm mode under ``horovodrun --gloo`` (Horovod) and ``mpirun`` (hvdllm's mpi4py backend), with
``backward_passes_per_step`` k from --accums (k micro-batches of --batch sequences per step). All use
gradient buckets of ``--bucket-mb`` (default 1 MB, ~13 buckets: ZeRO-2's peak is the buckets alive at
once plus the shards, so one bucket holding everything would show nothing). Each rank reports:
- the bytes of the optimizer-state tensors it holds after the last step (Adam's state keeps its size);
- the peak gradient bytes during the timed steps (hvdllm: ``peak_gradient_bytes()``, its buckets, wire
  buffers, shard gradients and accumulators; DDP: the parameters' .grad, views into its buckets, after
  backward) and the gradient bytes held between steps;
- the step time split into forward+backward (with the reductions started in the backward hooks),
  ``synchronize()`` (waiting for them; the clipping norm) and the update (``step()``: ZeRO's shard step
  and allgather), and per step the collectives the optimizer started (by kind: every hvdllm collective
  goes through the backend's ``start``) and the time spent waiting for each kind.
The largest value over the ranks is shown. Runs are interleaved over rounds (bench/harness.py; medians
of global tokens/s); ratios are against z0 of the same launcher, ranks and k. On a 2-core machine
shared with other work the speeds are noisy and ranks oversubscribe the cores at np=4: compare within
one run only. To compare with an older tree, copy this file and harness.py into its bench/ (it falls
back to gradient_bytes() where peak_gradient_bytes() is missing, and leaves out --inflight-mb there).

Measured: see README "Memory and precision". 2026-12-02, 2-core machine under other test runs
(--steps 3 --warmup 1, one round: tokens/s noisy), ZeRO-2 peak gradient bytes per rank vs z0
(12.43 MiB): np=2 Gloo 0.58x (k=2: 0.64x), mpi4py 0.56x (k=2: 0.58x); np=4 Gloo 0.34x (k=2: 0.39x),
mpi4py 0.32x (k=2: 0.33x); before the bound 0.94x (np=2) and >= 1x with accumulation. The bound's
waits cost tokens/s on Horovod at np=4: z2 0.43x of z0, z2u (no bound: peak 1.02x) 0.67x, same run.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time
from typing import Any

from harness import bench_gpt, comma_list, interleaved, launch, launch_parser, report, start_ranks, worker_argv

MODES = ("z0", "z1", "z2", "z2u", "torch_zero")
DEFAULT_MODES = ("z0", "z1", "z2", "torch_zero")


def _state_bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for st in state.values() for v in st.values() if hasattr(v, "numel"))


class CollectiveLog:
    """Counts the collectives an optimizer starts (every hvdllm collective goes through the backend's
    ``start``) and the time spent waiting for each kind."""

    def __init__(self, rt: Any) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.waited: collections.Counter = collections.Counter()
        self.on = False
        original = rt.start

        def start(kind: str, *args: Any, **kwargs: Any) -> Any:
            handle = original(kind, *args, **kwargs)
            if not self.on:
                return handle
            self.counts[kind] += 1
            wait = handle.wait

            def timed_wait() -> Any:
                t = time.perf_counter()
                try:
                    return wait()
                finally:
                    self.waited[kind] += time.perf_counter() - t

            handle.wait = timed_wait
            return handle

        rt.start = start


def worker(mode: str, args: Any) -> None:
    import torch

    from harness import GPT_DIMS

    k = args.accum
    hvd, rank, size = start_ranks("ddp" if mode == "torch_zero" else "hvdllm")
    model = bench_gpt()
    log = None
    if mode == "torch_zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        # gradient_as_bucket_view: the parameters' .grad are views into DDP's buckets (one copy, as hvdllm's)
        model = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=args.bucket_mb,
                                                          gradient_as_bucket_view=True)
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=3e-4,
                                      weight_decay=0.1)
        state = lambda: _state_bytes(opt.optim.state)  # noqa: E731  (this rank's partition)
        grads = lambda: sum(p.grad.numel() * p.grad.element_size()  # noqa: E731  (views into DDP's buckets)
                            for p in model.parameters() if p.grad is not None)
        peak = grads   # DDP keeps every bucket from backward to the next zero_grad: read after backward
        synchronize, update = (lambda: None), opt.step
    else:
        extra = {"zero_inflight_mb": float("inf")} if mode == "z2u" else \
            {} if args.inflight_mb is None or mode != "z2" else {"zero_inflight_mb": args.inflight_mb}
        opt = hvd.DistributedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1),
                                       named_parameters=model.named_parameters(), zero_stage=int(mode[1]),
                                       bucket_cap_mb=args.bucket_mb, backward_passes_per_step=k, **extra)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        state = lambda: opt.state_bytes() if opt.zero_stage else _state_bytes(opt.state)  # noqa: E731
        grads = lambda: opt.gradient_bytes()  # noqa: E731
        has_peak = hasattr(opt, "peak_gradient_bytes")   # (absent before it was added: bench an old tree)
        peak = (lambda: opt.peak_gradient_bytes()) if has_peak else grads  # noqa: E731
        log = CollectiveLog(opt._rt)
        synchronize = opt.synchronize

        def update() -> None:
            with opt.skip_synchronize():
                opt.step()
    vocab, block = GPT_DIMS["vocab_size"], GPT_DIMS["block_size"]
    data = torch.randint(0, vocab, (8, args.batch, block + 1), generator=torch.Generator().manual_seed(1 + rank))
    phases = {"fwd_bwd": 0.0, "synchronize": 0.0, "update": 0.0}
    peak_seen = 0

    def step(i: int, timed: bool) -> float:
        nonlocal peak_seen
        opt.zero_grad()
        t0 = time.perf_counter()
        for micro in range(k):
            xy = data[(i * k + micro) % len(data)]
            _, loss = model(xy[:, :-1], xy[:, 1:])
            (loss / k).backward()
        t1 = time.perf_counter()
        synchronize()
        t2 = time.perf_counter()
        peak_seen = max(peak_seen, peak())
        update()
        t3 = time.perf_counter()
        if timed:
            for key, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
                phases[key] += v
        return loss.item()

    for i in range(args.warmup):
        step(i, False)
    if log is not None:
        log.on = True
        if hasattr(opt, "peak_gradient_bytes"):
            opt.peak_gradient_bytes(reset=True)
    peak_seen = 0
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(args.warmup + i, True)
    elapsed = time.perf_counter() - t0
    tokens = args.steps * k * args.batch * block * size
    steps = args.steps
    report({"mode": mode, "rank": rank, "size": size, "tokens_per_s": tokens / elapsed, "loss": loss,
            "step_ms": 1e3 * elapsed / steps, "phases_ms": {key: 1e3 * v / steps for key, v in phases.items()},
            "collectives": {key: v / steps for key, v in sorted(log.counts.items())} if log else None,
            "wait_ms": {key: 1e3 * v / steps for key, v in sorted(log.waited.items())} if log else None,
            "state_bytes": state(), "grad_bytes": grads(), "peak_grad_bytes": max(peak_seen, peak()),
            "params": sum(p.numel() for p in model.parameters())})


def main() -> None:
    ap = launch_parser("ZeRO memory and speed: hvdllm --zero 0/1/2 (Gloo, mpi4py; accumulation) vs torch ZeRO + DDP",
                       MODES, DEFAULT_MODES, rounds=1, steps=6, warmup=2, timeout=900)
    ap.add_argument("--nps", default="2,4", help="comma list of rank counts")
    ap.add_argument("--launchers", default="gloo,mpirun", help="comma list of gloo (horovodrun), mpirun (mpi4py)")
    ap.add_argument("--accums", default="1,2", help="comma list of backward_passes_per_step")
    ap.add_argument("--accum", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--bucket-mb", type=float, default=1.0,
                    help="gradient bucket cap in MB (hvdllm and DDP alike); ZeRO-2's peak is about the buckets in "
                         "flight at once plus the shards, so it needs more than one bucket to show")
    ap.add_argument("--inflight-mb", type=float, default=None, help="z2's zero_inflight_mb (default: None)")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args)
        return
    modes = comma_list(ap, args.modes, MODES, "--modes")
    launchers = comma_list(ap, args.launchers, ("gloo", "mpirun"), "--launchers")
    nps, accums = [int(v) for v in args.nps.split(",")], [int(v) for v in args.accums.split(",")]
    # one variant per (launcher, k, mode); torch_zero only once (Gloo, no accumulation)
    variants = [(lc, k, m) for lc in launchers for k in accums for m in modes
                if m != "torch_zero" or (lc == launchers[0] and k == accums[0])]
    runs: dict[tuple[int, str, int, str], list[dict]] = {}
    for np_ in nps:
        for r, (lc, k, m) in interleaved(variants, args.rounds):
            extra = ["--bucket-mb", str(args.bucket_mb), "--accum", str(k)]
            if args.inflight_mb is not None:
                extra += ["--inflight-mb", str(args.inflight_mb)]
            ranks = launch("torchrun" if m == "torch_zero" else lc, np_, worker_argv(__file__, m, args, *extra),
                           args.timeout)
            if not ranks:
                continue
            res = {**ranks[0], **{key: max(x[key] for x in ranks) for key in ("state_bytes", "grad_bytes",
                                                                                "peak_grad_bytes")}}
            runs.setdefault((np_, lc, k, m), []).append(res)
            ph = " ".join(f"{key} {v:5.0f}" for key, v in res["phases_ms"].items())
            coll = ", ".join(f"{key} {v:g}" for key, v in (res["collectives"] or {}).items()) or "-"
            wait = ", ".join(f"{key} {v:.0f}" for key, v in (res["wait_ms"] or {}).items()) or "-"
            print(f"np={np_} round {r} {lc:6s} k={k} {m:10s} {res['tokens_per_s']:8.0f} tokens/s  step "
                  f"{res['step_ms']:5.0f} ms ({ph} ms)  loss {res['loss']:.4f}  collectives/step: {coll}  waited "
                  f"ms/step: {wait}  state {res['state_bytes'] / 2**20:.2f} MiB  grads peak "
                  f"{res['peak_grad_bytes'] / 2**20:.2f} held {res['grad_bytes'] / 2**20:.2f} MiB  "
                  f"({res['params'] / 1e6:.2f}M params)", flush=True)
    print("\nnp  launcher  k  mode        tokens/s  vs z0   step ms  collectives/step  state MiB/rank  vs z0   "
          "grad peak MiB/rank  vs z0   grads held MiB")
    for (np_, lc, k, m), rs in runs.items():
        base = runs.get((np_, lc, k, "z0"))
        base_s = statistics.median(r["tokens_per_s"] for r in base) if base else None
        s = statistics.median(r["tokens_per_s"] for r in rs)
        ms = statistics.median(r["step_ms"] for r in rs)
        last = rs[-1]
        coll = sum((last["collectives"] or {}).values()) if last["collectives"] is not None else None
        ratio = lambda key: f"{last[key] / base[-1][key]:5.3f}x" if base and base[-1][key] else "   -  "  # noqa: E731
        shown_lc = "torchrun" if m == "torch_zero" else lc
        print(f"{np_:<3d} {shown_lc:8s} {k:2d}  {m:10s}  {s:8.0f}  {s / base_s if base_s else float('nan'):5.2f}x  "
              f"{ms:7.0f}  {'-' if coll is None else f'{coll:g}':>16s}  {last['state_bytes'] / 2**20:14.2f}  "
              f"{ratio('state_bytes')}  {last['peak_grad_bytes'] / 2**20:18.2f}  {ratio('peak_grad_bytes')}  "
              f"{last['grad_bytes'] / 2**20:14.2f}")


if __name__ == "__main__":
    main()
