"""ZeRO: optimizer-state and gradient bytes per rank, step time, collectives per step and tokens/s,
hvdllm --zero 0/1/2 vs torch ZeroRedundancyOptimizer + DDP.

    python bench/zero.py [--nps 2,4] [--rounds 2] [--steps 10] [--bucket-mb 1] [--modes z0,z1,z2,torch_zero]

The same GPT (hvdllm.models.gpt, ~3.2M parameters), data and torch AdamW, trained by:
  z0          horovodrun --gloo, hvd.DistributedOptimizer (replicated optimizer state)
  z1, z2      the same with zero_stage=1 / 2
  torch_zero  torchrun (gloo), DistributedDataParallel(gradient_as_bucket_view=True) +
              torch.distributed.optim.ZeroRedundancyOptimizer
All use gradient buckets of ``--bucket-mb`` (default 1 MB, ~13 buckets: ZeRO-2's peak is the buckets
alive at once plus the shards, so one bucket holding everything would show nothing). Each rank reports:
- the bytes of the optimizer-state tensors it holds after the last step (Adam's state keeps its size);
- the peak gradient bytes during the timed steps (hvdllm: ``peak_gradient_bytes()``, its buckets, wire
  buffers and shard gradients; DDP: the parameters' .grad, views into its buckets, after backward) and
  the gradient bytes held between steps;
- the step time split into forward+backward (with the reductions started in the backward hooks),
  ``synchronize()`` (waiting for them; the clipping norm) and the update (``step()``: ZeRO's shard step
  and allgather), and per step the collectives the optimizer started (by kind, on Horovod every one goes
  through the backend's ``start``) and the time spent waiting for each kind.
The largest value over the ranks is shown. Runs are interleaved over rounds (medians of global tokens/s).
On a 2-core machine shared with other work the speeds are noisy and ranks oversubscribe the cores at
np=4: compare within one run only. To compare with an older tree, copy this file into its bench/
(it falls back to gradient_bytes() where peak_gradient_bytes() is missing).

Measured: see README "Memory and precision" (figures and the before/after of the collectives).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODES = ("z0", "z1", "z2", "torch_zero")


def _state_bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for st in state.values() for v in st.values() if hasattr(v, "numel"))


class CollectiveLog:
    """Counts the collectives an optimizer starts (every hvdllm collective on Horovod goes through the
    backend's ``start``) and the time spent waiting for each kind."""

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


def worker(mode: str, steps: int, warmup: int, batch: int, bucket_mb: float) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from hvdllm.core.world import available_cores
    from hvdllm.models.gpt import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=256)
    if mode == "torch_zero":
        import torch.distributed as dist
        from torch.distributed.optim import ZeroRedundancyOptimizer

        dist.init_process_group("gloo")
        rank, size, local = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_WORLD_SIZE"])
    else:
        import hvdllm.torch as hvd

        hvd.init()
        rank, size, local = hvd.rank(), hvd.size(), hvd.local_size()
    torch.set_num_threads(max(1, available_cores() // local))
    torch.manual_seed(0)
    model = GPT(cfg)
    log = None
    if mode == "torch_zero":
        # gradient_as_bucket_view: the parameters' .grad are views into DDP's buckets (one copy, as hvdllm's)
        model = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_mb, gradient_as_bucket_view=True)
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=3e-4,
                                      weight_decay=0.1)
        state = lambda: _state_bytes(opt.optim.state)  # noqa: E731  (this rank's partition)
        grads = lambda: sum(p.grad.numel() * p.grad.element_size()  # noqa: E731  (views into DDP's buckets)
                            for p in model.parameters() if p.grad is not None)
        peak = grads   # DDP keeps every bucket from backward to the next zero_grad: read after backward
        synchronize, update = (lambda: None), opt.step
    else:
        opt = hvd.DistributedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1),
                                       named_parameters=model.named_parameters(), zero_stage=int(mode[1]),
                                       bucket_cap_mb=bucket_mb)
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
    g = torch.Generator().manual_seed(1 + rank)
    data = torch.randint(0, cfg.vocab_size, (8, batch, cfg.block_size + 1), generator=g)
    phases = {"fwd_bwd": 0.0, "synchronize": 0.0, "update": 0.0}
    peak_seen = 0

    def step(i: int, timed: bool) -> float:
        nonlocal peak_seen
        xy = data[i % len(data)]
        opt.zero_grad()
        t0 = time.perf_counter()
        _, loss = model(xy[:, :-1], xy[:, 1:])
        loss.backward()
        t1 = time.perf_counter()
        synchronize()
        t2 = time.perf_counter()
        peak_seen = max(peak_seen, peak())
        update()
        t3 = time.perf_counter()
        if timed:
            for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
                phases[k] += v
        return loss.item()

    for i in range(warmup):
        step(i, False)
    if log is not None:
        log.on = True
        if hasattr(opt, "peak_gradient_bytes"):
            opt.peak_gradient_bytes(reset=True)
    peak_seen = 0
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(warmup + i, True)
    elapsed = time.perf_counter() - t0
    tokens = steps * batch * cfg.block_size * size
    result = {"mode": mode, "rank": rank, "size": size, "tokens_per_s": tokens / elapsed, "loss": loss,
              "step_ms": 1e3 * elapsed / steps, "phases_ms": {k: 1e3 * v / steps for k, v in phases.items()},
              "collectives": {k: v / steps for k, v in sorted(log.counts.items())} if log else None,
              "wait_ms": {k: 1e3 * v / steps for k, v in sorted(log.waited.items())} if log else None,
              "state_bytes": state(), "grad_bytes": grads(), "peak_grad_bytes": max(peak_seen, peak()),
              "params": sum(p.numel() for p in model.parameters())}
    # one file per rank: the launchers interleave the ranks' stdout
    Path(os.environ["ZERO_BENCH_OUT"], f"rank{rank}.json").write_text(json.dumps(result))


def launch(mode: str, np_: int, args: argparse.Namespace) -> dict | None:
    """Run ``mode`` on ``np_`` ranks; rank 0's result with the largest per-rank state bytes."""
    me = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--steps", str(args.steps),
          "--warmup", str(args.warmup), "--batch", str(args.batch), "--bucket-mb", str(args.bucket_mb)]
    with tempfile.TemporaryDirectory(prefix="zero-bench-") as out:
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", ZERO_BENCH_OUT=out)
        env.pop("HVDLLM_BACKEND", None)
        if mode == "torch_zero":
            cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(np_), *me[1:]]
        else:
            cmd = [str(BIN / "horovodrun"), "-np", str(np_), "--gloo", *me]
        proc = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=args.timeout)
        results = [json.loads(f.read_text()) for f in sorted(Path(out).glob("rank*.json"))]
    if len(results) != np_:
        print(f"{mode} np={np_} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}",
              file=sys.stderr)
        return None
    first = next(r for r in results if r["rank"] == 0)
    return {**first, **{k: max(r[k] for r in results) for k in ("state_bytes", "grad_bytes", "peak_grad_bytes")}}


def main() -> None:
    ap = argparse.ArgumentParser(description="ZeRO memory and speed: hvdllm --zero 0/1/2 vs torch ZeRO + DDP")
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--nps", default="2,4", help="comma list of rank counts")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="sequences of 128 tokens per rank and step")
    ap.add_argument("--bucket-mb", type=float, default=1.0,
                    help="gradient bucket cap in MB (hvdllm and DDP alike); ZeRO-2's peak is about the buckets in "
                         "flight at once plus the shards, so it needs more than one bucket to show")
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of " + ",".join(MODES))
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.warmup, args.batch, args.bucket_mb)
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"--modes has {bad}; allowed: {', '.join(MODES)}")
    nps = [int(v) for v in args.nps.split(",")]
    runs: dict[tuple[str, int], list[dict]] = {}
    for np_ in nps:
        for r in range(args.rounds):
            for m in (modes if r % 2 == 0 else modes[::-1]):
                res = launch(m, np_, args)
                if res:
                    runs.setdefault((m, np_), []).append(res)
                    ph = " ".join(f"{k} {v:5.0f}" for k, v in res["phases_ms"].items())
                    coll = ", ".join(f"{k} {v:g}" for k, v in (res["collectives"] or {}).items()) or "-"
                    wait = ", ".join(f"{k} {v:.0f}" for k, v in (res["wait_ms"] or {}).items()) or "-"
                    print(f"np={np_} round {r} {m:10s} {res['tokens_per_s']:8.0f} tokens/s  step {res['step_ms']:5.0f} ms "
                          f"({ph} ms)  loss {res['loss']:.4f}  collectives/step: {coll}  waited ms/step: {wait}  "
                          f"state {res['state_bytes'] / 2**20:.2f} MiB  grads peak {res['peak_grad_bytes'] / 2**20:.2f} "
                          f"held {res['grad_bytes'] / 2**20:.2f} MiB  ({res['params'] / 1e6:.2f}M params)", flush=True)
    print("\nnp  mode        tokens/s  vs z0   step ms  collectives/step  state MiB/rank  vs z0   "
          "grad peak MiB/rank  vs z0   grads held MiB")
    for np_ in nps:
        base = runs.get(("z0", np_))
        base_s = statistics.median(r["tokens_per_s"] for r in base) if base else None
        for m in modes:
            if (m, np_) not in runs:
                continue
            rs = runs[(m, np_)]
            s = statistics.median(r["tokens_per_s"] for r in rs)
            ms = statistics.median(r["step_ms"] for r in rs)
            last = rs[-1]
            coll = sum((last["collectives"] or {}).values()) if last["collectives"] is not None else None
            ratio = lambda k: f"{last[k] / base[-1][k]:5.3f}x" if base and base[-1][k] else "   -  "  # noqa: E731
            print(f"{np_:<3d} {m:10s}  {s:8.0f}  {s / base_s if base_s else float('nan'):5.2f}x  {ms:7.0f}  "
                  f"{'-' if coll is None else f'{coll:g}':>16s}  {last['state_bytes'] / 2**20:14.2f}  {ratio('state_bytes')}  "
                  f"{last['peak_grad_bytes'] / 2**20:18.2f}  {ratio('peak_grad_bytes')}  {last['grad_bytes'] / 2**20:14.2f}")


if __name__ == "__main__":
    main()
