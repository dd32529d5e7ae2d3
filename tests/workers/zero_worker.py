"""ZeRO-1/2 (``hvd.DistributedOptimizer(..., zero_stage=s)``) on real ranks against plain data parallelism.

Per case, every rank trains two copies of one model on the same data (different on each rank): one
with the replicated DistributedOptimizer (zero_stage=0), one with ZeRO. It reports the largest
relative parameter difference after STEPS steps (per tensor, max |a-b| / max |b|; and over the
whole model, ||a-b|| / ||b||) (and whether it is exactly zero), a hash of the ZeRO
model's parameters (equal on every rank), the optimizer-state bytes this rank holds under both, the
largest difference between ZeRO's gathered state_dict() and the replicated one, and a resume check:
the ZeRO state saved halfway, loaded into a fresh optimizer of the other stage, continues to the
same parameters.

``mem`` (not a case: reported under "memory") trains a deeper model with one small bucket per layer and
reports, per stage and accumulation, the collectives the optimizer starts per step (by kind, outermost
calls only) and the peak gradient bytes per rank against the replicated buckets' bytes.
"""
from __future__ import annotations

import hashlib
import sys

from common import leave_together, start

import torch
import torch.nn as nn

import hvdllm.torch as hvd

R, N = start(hvd)
STEPS = 50


def model() -> nn.Module:
    torch.manual_seed(0)   # sizes chosen so that no bucket divides evenly by 2, 3 or 4 ranks
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 11), nn.Tanh(), nn.Linear(11, 5))


def groups(m: nn.Module) -> list[dict]:
    mats = [p for p in m.parameters() if p.dim() == 2]
    vecs = [p for p in m.parameters() if p.dim() == 1]
    return [{"params": mats, "weight_decay": 0.1}, {"params": vecs, "weight_decay": 0.0, "lr": 0.02}]


def make_opt(kind: str, m: nn.Module) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(groups(m), lr=0.01)
    if kind == "sgd":
        return torch.optim.SGD(groups(m), lr=0.05, momentum=0.9, nesterov=True)
    if kind == "hvd_adamw":
        return hvd.optim.AdamW(groups(m), lr=0.01)
    if kind == "hvd_adamw_fused":
        return hvd.optim.AdamW(groups(m), lr=0.01, fused=True)
    raise ValueError(kind)


def wrap(kind: str, m: nn.Module, stage: int, k: int, clip: float | None, compression: str) -> torch.optim.Optimizer:
    return hvd.DistributedOptimizer(make_opt(kind, m), named_parameters=m.named_parameters(), zero_stage=stage,
                                    backward_passes_per_step=k, max_grad_norm=clip, bucket_cap_mb=0.0006,
                                    compression=getattr(hvd.Compression, compression))


def train(m: nn.Module, opt: torch.optim.Optimizer, k: int, steps: range) -> None:
    for step in steps:
        for micro in range(k):
            g = torch.Generator().manual_seed(1000 * step + 10 * micro + R)
            x = torch.randn(4, 7, generator=g)
            y = torch.randn(4, 5, generator=g)
            ((m(x) - y) ** 2).mean().div(k).backward()
        opt.step()
        opt.zero_grad()


def rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) for x, y in zip(a, b))


def norm_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all parameters together."""
    num = sum(float((x - y).double().pow(2).sum()) for x, y in zip(a, b))
    return (num / max(sum(float(y.double().pow(2).sum()) for y in b), 1e-300)) ** 0.5


def params(m: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def state_tensors(sd: dict) -> list[torch.Tensor]:
    return [v.float() for i in sorted(sd["state"]) for _, v in sorted(sd["state"][i].items()) if torch.is_tensor(v)]


def state_bytes(opt: torch.optim.Optimizer) -> int:
    inner = opt._inner  # (the replicated wrapper's state is its wrapped optimizer's)
    return sum(v.numel() * v.element_size() for st in inner.state.values() for v in st.values() if torch.is_tensor(v))


def case(kind: str, stage: int, k: int = 1, clip: float | None = None, compression: str = "none") -> dict:
    plain_m, zero_m = model(), model()
    plain = wrap(kind, plain_m, 0, k, clip, compression)
    zero = wrap(kind, zero_m, stage, k, clip, compression)
    train(plain_m, plain, k, range(STEPS))
    half = STEPS // 2
    train(zero_m, zero, k, range(half))
    saved, saved_params = zero.state_dict(), params(zero_m)
    train(zero_m, zero, k, range(half, STEPS))
    resumed_m = model()
    with torch.no_grad():
        for p, v in zip(resumed_m.parameters(), saved_params):
            p.copy_(v)
    other = wrap(kind, resumed_m, 3 - stage, k, clip, compression)   # resume on the other stage
    other.load_state_dict(saved)
    train(resumed_m, other, k, range(half, STEPS))
    got, want = params(zero_m), params(plain_m)
    state_diff = rel_diff(state_tensors(zero.state_dict()), state_tensors(plain.state_dict()))
    return {
        "rel_diff": rel_diff(got, want), "norm_rel": norm_rel(got, want),
        "bitwise": all(torch.equal(a, b) for a, b in zip(got, want)),
        "hash": hashlib.sha256(b"".join(p.numpy().tobytes() for p in got)).hexdigest(),
        "state_diff": state_diff, "zero_bytes": zero.state_bytes(), "plain_bytes": state_bytes(plain),
        "resume_diff": rel_diff(params(resumed_m), got), "grad_norm": [zero.grad_norm, plain.grad_norm],
    }


CASES = {
    "adamw_s1": ("adamw", 1), "adamw_s2": ("adamw", 2),
    "adamw_accum_clip_s1": ("adamw", 1, 2, 0.05), "adamw_accum_clip_s2": ("adamw", 2, 2, 0.05),
    "sgd_s1": ("sgd", 1), "sgd_accum_s2": ("sgd", 2, 3),
    "hvd_adamw_s2": ("hvd_adamw", 2), "hvd_adamw_fused_s1": ("hvd_adamw_fused", 1, 2, 0.05),
    "adamw_fp16_s2": ("adamw", 2, 1, None, "fp16"),
}
class Counting:
    """Counts the collectives started through the backend per kind; a collective that calls another
    (Horovod's allreduce -> start) counts once."""

    KINDS = ("start", "allreduce", "allreduce_async_", "allgather", "grouped_allgather", "reducescatter",
             "grouped_reducescatter", "grouped_allreduce")

    def __init__(self, rt: object) -> None:
        self.counts: dict[str, int] = {}
        self.depth = 0
        for kind in self.KINDS:
            original = getattr(rt, kind)
            setattr(rt, kind, self._wrap(kind, original))

    def _wrap(self, kind: str, original):  # noqa: ANN202
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if self.depth == 0:
                name = args[0] if kind == "start" else kind
                self.counts[name] = self.counts.get(name, 0) + 1
            self.depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.depth -= 1
        return call


def deep_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(24, 24) for _ in range(8)])


def train_deep(m: nn.Module, opt: torch.optim.Optimizer, k: int, steps: range) -> None:
    for step in steps:
        for micro in range(k):
            g = torch.Generator().manual_seed(1000 * step + 10 * micro + R)
            ((m(torch.randn(4, 24, generator=g)) - torch.randn(4, 24, generator=g)) ** 2).mean().div(k).backward()
        opt.step()
        opt.zero_grad()


def memory() -> dict:
    """Per (stage, k): collectives per step and peak gradient bytes; buckets of ~one layer each."""
    rt = hvd.collectives()
    counting = Counting(rt)
    out: dict = {}
    for stage, k in ((0, 1), (1, 1), (2, 1), (2, 2)):
        m = deep_model()
        opt = hvd.DistributedOptimizer(torch.optim.AdamW(m.parameters(), lr=0.01), named_parameters=m.named_parameters(),
                                       zero_stage=stage, backward_passes_per_step=k, bucket_cap_mb=0.0023,
                                       max_grad_norm=1.0)
        train_deep(m, opt, k, range(2))
        opt.peak_gradient_bytes(reset=True)
        counting.counts = {}
        train_deep(m, opt, k, range(2, 5))
        buffers = [b.numel * 4 for b in opt._buckets]
        shards = [s.plan.shard_numel * 4 for s in getattr(opt, "_shards", [])]
        out[f"s{stage}_k{k}"] = {"collectives": {kind: n / 3 for kind, n in counting.counts.items()},
                                 "peak": opt.peak_gradient_bytes(), "held": opt.gradient_bytes(),
                                 "bucket_bytes": buffers, "shard_bytes": shards, "buckets": len(opt._buckets)}
    return out


wanted = sys.argv[1].split(",") if len(sys.argv) > 1 else list(CASES)
results = {name: case(*CASES[name]) for name in wanted if name != "mem"}
mem = memory() if "mem" in wanted else None
leave_together(hvd, R, {"rank": R, "size": N, "backend": hvd.backend(), "cases": results, "memory": mem})
