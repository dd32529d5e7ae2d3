"""Optimizer step time: every hvdllm.torch.optim optimizer *at its defaults* vs torch.optim's fused and
foreach implementations of the same rule, on the same GPT-like parameters.

GPT-2-style parameter shapes (embeddings, per-layer LayerNorms, qkv/proj/fc weights and biases), so the
step touches many tensors of mixed sizes. Variants are timed in interleaved rounds (the order rotates
each round; bench/harness.py) so machine noise hits all of them alike; the script prints the median ms
per step and the ratio ``reference time / this time`` against torch's fused kernel for the same rule
(LAMB, which torch lacks, against torch's fused AdamW: the fastest built-in step on these parameters).

    python bench/optimizer_step.py                          # ~25M parameters, every optimizer
    python bench/optimizer_step.py --sizes 10 100 --optimizers AdamW --rounds 20 --unfused
    python bench/optimizer_step.py --device cuda            # on a GPU machine
"""
from __future__ import annotations

import statistics
from typing import Callable, Dict, List, Tuple

from harness import gpt_shapes, step_parser, time_interleaved

import torch

from hvdllm.torch import optim as hopt

# name -> (hvdllm class, torch class (None: none in torch), hyperparameters both take, reference variant)
OPTIMIZERS: Dict[str, Tuple[type, type | None, dict]] = {
    "SGD": (hopt.SGD, torch.optim.SGD, dict(lr=1e-3)),
    "Momentum": (hopt.SGD, torch.optim.SGD, dict(lr=1e-3, momentum=0.9)),
    "Adam": (hopt.Adam, torch.optim.Adam, dict(lr=1e-4)),
    "AdamW": (hopt.AdamW, torch.optim.AdamW, dict(lr=1e-4)),
    "LAMB": (hopt.LAMB, None, dict(lr=1e-4)),
}


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


def variants_for(name: str, shapes: List[Tuple[int, ...]], device: str, unfused: bool) -> Dict[str, Callable[[], None]]:
    """The step functions to time for one optimizer; the first is the reference."""
    ours, theirs, hp = OPTIMIZERS[name]
    out: Dict[str, Callable[[], None]] = {}
    if theirs is not None:
        shared = make_params(shapes, device)  # one set for both torch variants (values don't matter)
        out[f"torch {name} fused"] = theirs(shared, fused=True, **hp).step
        out[f"torch {name} foreach"] = theirs(shared, foreach=True, **hp).step
    else:
        out["torch AdamW fused"] = torch.optim.AdamW(make_params(shapes, device), fused=True, lr=1e-4).step
    out[f"hvdllm {name}()"] = ours(make_params(shapes, device, seed=1), **hp).step
    if unfused:
        out[f"hvdllm {name}(fused=False)"] = ours(make_params(shapes, device, seed=2), fused=False, **hp).step
    return out


def bench(name: str, size_m: int, rounds: int, device: str, unfused: bool) -> Dict[str, float]:
    shapes = gpt_shapes(size_m * 1_000_000)
    n = sum(torch.Size(s).numel() for s in shapes)
    variants = variants_for(name, shapes, device, unfused)
    times = time_interleaved(variants, rounds, sync=lambda: sync(device))
    names = list(variants)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med[names[0]]
    print(f"\n{name}: {n / 1e6:.1f}M parameters in {len(shapes)} tensors, {device}, "
          f"{torch.get_num_threads()} threads, {rounds} interleaved rounds (median ms/step)")
    for k in names:
        print(f"  {k:<28} {med[k]:9.2f} ms   {names[0]} / this = {ref / med[k]:5.2f}x"
              f"   (min {min(times[k]):.2f}, max {max(times[k]):.2f})")
    return med


def main() -> None:
    ap = step_parser(__doc__.splitlines()[0], list(OPTIMIZERS), 0,
                     "interleaved rounds (default: 20 up to 30M, 8 above)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--unfused", action="store_true", help="also time hvdllm's per-tensor path (fused=False)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = []
    for size in args.sizes:
        rounds = args.rounds or (20 if size <= 30 else 8)
        for name in args.optimizers:
            med = bench(name, size, rounds, args.device, args.unfused)
            ref_name, ours = next(iter(med)), f"hvdllm {name}()"
            summary.append((size, name, ref_name, med[ref_name] / med[ours]))
    print("\nsummary (reference time / hvdllm default time; >= 1.0: hvdllm's default is at least as fast)")
    for size, name, ref_name, ratio in summary:
        print(f"  {size:>4}M  {name:<9} vs {ref_name:<22} {ratio:5.2f}x")


if __name__ == "__main__":
    main()
