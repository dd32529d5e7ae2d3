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
reports, per stage, accumulation and ZeRO-2 in-flight bound, the collectives the optimizer starts per
step (by kind, outermost calls only), the peak gradient bytes per rank and the most held between two
backward passes of one step, against the replicated buckets' bytes. ``held_back`` (reported under
"held_back") trains ZeRO-2 with accumulation where each rank skips a branch of the model in one of
the two passes (the rank decides which), so buckets miss gradients in some passes, against
``zero_stage=0``.
"""
from __future__ import annotations

import hashlib
import sys

from common import leave_together, start

import torch
import torch.nn as nn

import hvdllm.torch as hvd
from hvdllm.core.zero import ShardPlan

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


def wrap(kind: str, m: nn.Module, stage: int, k: int, clip: float | None, compression: str,
         inflight: float | None = None) -> torch.optim.Optimizer:
    return hvd.DistributedOptimizer(make_opt(kind, m), named_parameters=m.named_parameters(), zero_stage=stage,
                                    backward_passes_per_step=k, max_grad_norm=clip, bucket_cap_mb=0.0006,
                                    compression=getattr(hvd.Compression, compression),
                                    zero_inflight_mb=inflight if stage == 2 else None)


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


def case(kind: str, stage: int, k: int = 1, clip: float | None = None, compression: str = "none",
         inflight: float | None = None) -> dict:
    plain_m, zero_m = model(), model()
    plain = wrap(kind, plain_m, 0, k, clip, compression)
    zero = wrap(kind, zero_m, stage, k, clip, compression, inflight)
    train(plain_m, plain, k, range(STEPS))
    half = STEPS // 2
    train(zero_m, zero, k, range(half))
    saved, saved_params = zero.state_dict(), params(zero_m)
    train(zero_m, zero, k, range(half, STEPS))
    resumed_m = model()
    with torch.no_grad():
        for p, v in zip(resumed_m.parameters(), saved_params):
            p.copy_(v)
    other = wrap(kind, resumed_m, 3 - stage, k, clip, compression, inflight)   # resume on the other stage
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
    # ZeRO-2 with every reduce-scatter waited for before the next bucket is allocated (the tightest bound)
    "adamw_accum_tight_s2": ("adamw", 2, 2, None, "none", 0.0),
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


def train_deep(m: nn.Module, opt: torch.optim.Optimizer, k: int, steps: range) -> int:
    """Train; returns the most gradient bytes held right after a backward pass that is not a step's last."""
    between = 0
    for step in steps:
        for micro in range(k):
            g = torch.Generator().manual_seed(1000 * step + 10 * micro + R)
            ((m(torch.randn(4, 24, generator=g)) - torch.randn(4, 24, generator=g)) ** 2).mean().div(k).backward()
            if micro < k - 1:
                between = max(between, opt.gradient_bytes())
        opt.step()
        opt.zero_grad()
    return between


MEMORY_RUNS = {"s0_k1": (0, 1, None), "s1_k1": (1, 1, None), "s2_k1": (2, 1, None), "s0_k2": (0, 2, None),
               "s2_k2": (2, 2, None), "s2_k1_b0": (2, 1, 0.0), "s2_k3_b0": (2, 3, 0.0)}


def memory() -> dict:
    """Per (stage, k, in-flight bound; b0: 0 MiB): collectives per step and gradient bytes; buckets of one
    layer each."""
    rt = hvd.collectives()
    counting = Counting(rt)
    out: dict = {}
    for key, (stage, k, inflight) in MEMORY_RUNS.items():
        m = deep_model()
        opt = hvd.DistributedOptimizer(torch.optim.AdamW(m.parameters(), lr=0.01),
                                       named_parameters=m.named_parameters(),
                                       zero_stage=stage, backward_passes_per_step=k, bucket_cap_mb=0.0023,
                                       max_grad_norm=1.0, zero_inflight_mb=inflight)
        train_deep(m, opt, k, range(2))
        opt.peak_gradient_bytes(reset=True)
        counting.counts = {}
        between = train_deep(m, opt, k, range(2, 5))
        buffers = [b.numel * 4 for b in opt._buckets]
        # a bucket's full-size buffer: gradients and presence flags, or ZeRO-2's padded length
        full = [max(b.numel + len(b.params), ShardPlan(b.numel, N).padded_numel) * 4 for b in opt._buckets]
        shards = [s.plan.shard_numel * 4 for s in getattr(opt, "_shards", [])]
        out[key] = {"collectives": {kind: n / 3 for kind, n in counting.counts.items()},
                    "peak": opt.peak_gradient_bytes(), "held": opt.gradient_bytes(), "between": between,
                    "bucket_bytes": buffers, "full_bytes": full, "shard_bytes": shards, "buckets": len(opt._buckets)}
    return out


class Branchy(nn.Module):
    """Two branches into one head: a rank-dependent choice of branch per backward pass."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(7, 5), nn.Linear(7, 5), nn.Linear(5, 5)

    def forward(self, x: torch.Tensor, branch: int) -> torch.Tensor:
        return self.head(torch.tanh((self.a if branch == 0 else self.b)(x)))


def held_back() -> dict:
    """ZeRO-2, 2 passes per step, rank r using branch (pass + r) % 2: a bucket of the branch not used in
    pass 0 is held back (it reduces pass 0 in pass 1, then zeros at step()). Against zero_stage=0."""
    final = []
    for stage in (0, 2):
        m = Branchy()
        opt = hvd.DistributedOptimizer(torch.optim.AdamW(m.parameters(), lr=0.01),
                                       named_parameters=m.named_parameters(),
                                       zero_stage=stage, backward_passes_per_step=2, bucket_cap_mb=0.0001)
        for step in range(STEPS):
            for micro in range(2):
                g = torch.Generator().manual_seed(1000 * step + 10 * micro + R)
                x, y = torch.randn(4, 7, generator=g), torch.randn(4, 5, generator=g)
                ((m(x, (micro + R) % 2) - y) ** 2).mean().div(2).backward()
            opt.step()
            opt.zero_grad()
        final.append(params(m))
    # bound_off: the bound's wait timed out (each rank waited for a bucket the other sends a pass later)
    return {"norm_rel": norm_rel(final[1], final[0]), "buckets": len(opt._buckets),
            "bound_off": opt._inflight_bytes == float("inf")}


wanted = sys.argv[1].split(",") if len(sys.argv) > 1 else [*CASES, "held_back"]
results = {name: case(*CASES[name]) for name in wanted if name not in ("mem", "held_back")}
mem = memory() if "mem" in wanted else None
held = held_back() if "held_back" in wanted else None
leave_together(hvd, R, {"rank": R, "size": N, "backend": hvd.backend(), "cases": results, "memory": mem,
                        "held_back": held})
