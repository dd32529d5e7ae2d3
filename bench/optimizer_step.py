"""Optimizer step time: hvdllm fused AdamW (flat buffers) vs torch.optim.AdamW foreach / fused.

GPT-like parameter shapes (embeddings, per-layer LayerNorms, qkv/proj/fc weights and biases), so
the step touches many tensors of mixed sizes. Variants are timed in interleaved rounds (the order
rotates each round) so machine noise hits all of them alike; the script prints the median ms per
step and ratios against ``torch.optim.AdamW(fused=True)``.

    python bench/optimizer_step.py                 # ~10M and ~100M parameters
    python bench/optimizer_step.py --sizes 10 --rounds 20 --unfused --threads 2
    python bench/optimizer_step.py --device cuda   # on a GPU machine
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch

from hvdllm.torch import optim as hopt


def gpt_shapes(target_params: int) -> List[Tuple[int, ...]]:
    """Shapes of a GPT-2-style model with about ``target_params`` parameters."""
    d, vocab, ctx = (384, 8192, 512) if target_params < 30e6 else (768, 32768, 1024)
    per_layer = 12 * d * d + 13 * d
    layers = max(1, round((target_params - (vocab + ctx) * d) / per_layer))
    shapes: List[Tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def make_params(shapes: List[Tuple[int, ...]], device: str, seed: int = 0) -> List[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device))
        p.grad = (torch.randn(s, generator=g) * 1e-3).to(device)
        params.append(p)
    return params


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(size_m: int, rounds: int, device: str, unfused: bool) -> Dict[str, float]:
    shapes = gpt_shapes(size_m * 1_000_000)
    n = sum(torch.Size(s).numel() for s in shapes)
    torch_params = make_params(shapes, device)  # shared by both torch variants (values don't matter)
    ours_params = make_params(shapes, device)
    hp = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    variants: Dict[str, Callable[[], None]] = {
        "torch foreach": torch.optim.AdamW(torch_params, foreach=True, **hp).step,
        "torch fused": torch.optim.AdamW(torch_params, fused=True, **hp).step,
        "hvdllm fused": hopt.AdamW(ours_params, fused=True, **hp).step,
    }
    if unfused:
        variants["hvdllm unfused"] = hopt.AdamW(make_params(shapes, device, seed=1), **hp).step
    for step in variants.values():  # warm up: state allocation, first touches
        step()
        step()
    times: Dict[str, List[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            variants[name]()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["torch fused"]
    print(f"\n{n / 1e6:.1f}M parameters in {len(shapes)} tensors, {device}, "
          f"{torch.get_num_threads()} threads, {rounds} interleaved rounds (median ms/step)")
    for k in names:
        print(f"  {k:<15} {med[k]:9.2f} ms   torch fused / this = {ref / med[k]:5.2f}x"
              f"   (min {min(times[k]):.2f}, max {max(times[k]):.2f})")
    print(f"  ratio hvdllm fused / torch fused time = {med['hvdllm fused'] / ref:.3f}; "
          f"/ torch foreach = {med['hvdllm fused'] / med['torch foreach']:.3f}")
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100], help="millions of parameters")
    ap.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default: 20 at 10M, 8 at 100M)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--unfused", action="store_true", help="also time hvdllm's per-tensor path")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for size in args.sizes:
        rounds = args.rounds or (20 if size <= 30 else 8)
        bench(size, rounds, args.device, args.unfused)


if __name__ == "__main__":
    main()
