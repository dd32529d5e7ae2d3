"""hvd.DistributedOptimizer on real ranks against a one-process reference on the concatenated batch.

Every rank trains its own slice of each global batch with the DistributedOptimizer and, in the same
process, a plain copy of the model with the plain optimizer on the whole global batch (what np=1
would do). It reports, per case, the largest parameter difference to that reference and a hash of its
parameters after every step (the test checks the hashes are equal on all ranks).
"""
from __future__ import annotations

import hashlib
import sys
import warnings

from common import report, start

import torch
import torch.nn as nn

import hvdllm.torch as hvd

R, N = start(hvd, threads=None)
B = 4  # per-rank batch


class Net(nn.Module):
    """An MLP with an optional branch (used on some ranks only) and a branch no rank ever uses."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)
        self.branch = nn.Linear(16, 3)
        self.dead = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, use_branch: bool = True) -> torch.Tensor:
        h = torch.tanh(self.fc2(torch.tanh(self.fc1(x))))
        out = self.head(h)
        return out + self.branch(h) if use_branch else out


def make_opt(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    if kind == "sgd_nesterov":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
    if kind == "adam":
        return torch.optim.Adam(params, lr=0.01)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
    if kind == "sgd_tiny":
        return torch.optim.SGD(params, lr=1e-7)
    raise ValueError(kind)


def batch(step: int, micro: int, rank: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randn(B, 6, generator=g).to(dtype), torch.randn(B, 3, generator=g).to(dtype)


def uses_branch(case: dict, rank: int) -> bool:
    return rank not in case.get("branch_off", ())


def digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()[:16]


def run_case(case: dict) -> dict:
    torch.manual_seed(7)
    model, ref = Net(), Net()
    ref.load_state_dict(model.state_dict())
    dtype = case.get("dtype", torch.float32)
    model, ref = model.to(dtype), ref.to(dtype)
    for m in (model, ref):
        if "freeze" in case:  # frozen when the optimizer is wrapped, unfrozen at step case["freeze"][1]
            getattr(m, case["freeze"][0]).requires_grad_(False)
    scale = case.get("loss_scale", 1.0)
    data_rank = (lambda r: 0) if case.get("same_data") else (lambda r: r)
    k = case.get("k", 1)
    op = case.get("op", hvd.Average)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = hvd.DistributedOptimizer(make_opt(case["opt"], model.parameters()),
                                       named_parameters=model.named_parameters(),
                                       compression=case.get("compression", hvd.Compression.none),
                                       backward_passes_per_step=k, op=op,
                                       bucket_cap_mb=case.get("cap", 0.0005),
                                       max_grad_norm=case.get("clip"),
                                       gradient_predivide_factor=case.get("predivide", 1.0))
    ref_opt = make_opt(case["opt"], ref.parameters())
    hashes, diffs, norms = [], [], []
    for step in range(case.get("steps", 8)):
        if "freeze" in case and step == case["freeze"][1]:
            for m in (model, ref):
                getattr(m, case["freeze"][0]).requires_grad_(True)
        # --- distributed: this rank's slice of each micro-batch, k local backward passes.
        opt.zero_grad(set_to_none=case.get("set_to_none", True))
        for j in range(k):
            x, y = batch(step, j, data_rank(R), dtype)
            loss = ((model(x, uses_branch(case, R)).float() - y.float()) ** 2).mean() * scale / k
            loss.backward()
        if case.get("manual_sync"):
            opt.synchronize()
            with opt.skip_synchronize():
                opt.step()
        else:
            opt.step()
        # --- reference: one process, the whole global batch of every micro-batch.
        ref_opt.zero_grad()
        for j in range(k):
            parts = []
            for r in range(N):
                x, y = batch(step, j, data_rank(r), dtype)
                parts.append(((ref(x, uses_branch(case, r)).float() - y.float()) ** 2).sum())
            ref_loss = sum(parts) / (N * B * 3) * scale / k
            if op == hvd.Sum:
                ref_loss = ref_loss * N
            ref_loss.backward()
        ref_norm = None
        if case.get("clip"):
            ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), case["clip"]))
        ref_opt.step()
        hashes.append(digest(model))
        diffs.append(max((a.float() - b.float()).abs().max().item() for a, b in zip(model.parameters(), ref.parameters())))
        if ref_norm is not None:
            norms.append([opt.grad_norm, ref_norm])
    dead_untouched = bool(torch.equal(model.dead.weight, ref.dead.weight)) and model.dead.weight.grad is None
    return {"hashes": hashes, "max_diff": max(diffs), "norms": norms, "dead_untouched": dead_untouched,
            "warnings": [str(w.message) for w in caught], "buckets": len(opt._buckets)}


CASES = {
    "sgd_momentum": {"opt": "sgd", "set_to_none": False, "steps": 20},
    "sgd_nesterov_one_bucket": {"opt": "sgd_nesterov", "cap": 25},
    "adam": {"opt": "adam", "steps": 20},
    "adamw": {"opt": "adamw", "steps": 20},
    "adamw_accum_clip": {"opt": "adamw", "k": 3, "clip": 0.05},
    "sgd_accum_clip_manual_sync": {"opt": "sgd", "k": 2, "clip": 0.02, "manual_sync": True},
    "adam_branch_unused_on_rank1": {"opt": "adam", "branch_off": (1,)},
    "sgd_sum": {"opt": "sgd", "op": hvd.Sum},
    "sgd_fp16": {"opt": "sgd", "compression": hvd.Compression.fp16},
    "adamw_bf16": {"opt": "adamw", "compression": hvd.Compression.bf16},
    "sgd_predivide": {"opt": "sgd", "predivide": 2.0},
    # fp16 parameters, the same data on every rank and gradients near 45000: their sum over 2 ranks
    # overflows fp16 unless divided first (Horovod), or is summed in fp32 (MPI cannot sum fp16).
    "fp16_params_large_grads": {"opt": "sgd_tiny", "dtype": torch.float16, "same_data": True, "loss_scale": None,
                                "steps": 4},
    # fc2 frozen when the optimizer is wrapped, unfrozen at step 2: averaged like the others from then on.
    "sgd_unfrozen_later": {"opt": "sgd", "freeze": ("fc2", 2)},
}


def large_grad_scale() -> float:
    """A loss scale that makes the largest fp16 gradient about 45000 (rank 0's data, the first step)."""
    torch.manual_seed(7)
    probe = Net()
    x, y = batch(0, 0, 0)
    ((probe(x) - y) ** 2).mean().backward()
    return 45000.0 / max(float(p.grad.abs().max()) for p in probe.parameters() if p.grad is not None)


CASES["fp16_params_large_grads"]["loss_scale"] = large_grad_scale()

out: dict = {"rank": R, "size": N, "backend": hvd.backend(), "cases": {}}
only = sys.argv[1:]
for name, case in CASES.items():
    if not only or name in only:
        out["cases"][name] = run_case(case)
        print(f"rank {R}: {name} done", file=sys.stderr, flush=True)

print(f"rank {R}: broadcast_parameters", file=sys.stderr, flush=True)
# --- broadcast_parameters: ranks start different, end as root (the last rank).
torch.manual_seed(100 + R)
model = Net()
model.fc1.weight.data += R
root = N - 1
hvd.broadcast_parameters(model.state_dict(), root_rank=root)
out["bcast_params"] = digest(model)
torch.manual_seed(100 + root)
want = Net()
want.fc1.weight.data += root
out["bcast_params_want"] = digest(want)

print(f"rank {R}: broadcast_optimizer_state", file=sys.stderr, flush=True)
# --- broadcast_optimizer_state: different Adam states (and lr) become rank 0's.
torch.manual_seed(5)
model = Net()
opt = torch.optim.Adam(model.parameters(), lr=0.01 * (R + 1))
for step in range(R + 1):  # different step counts and moments on each rank
    opt.zero_grad()
    x, y = batch(step, 0, R)
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
hvd.broadcast_optimizer_state(opt, root_rank=0)
sd = opt.state_dict()
h = hashlib.sha256()
for i in sorted(sd["state"]):
    for key in sorted(sd["state"][i]):
        h.update(key.encode() + sd["state"][i][key].detach().float().numpy().tobytes())
out["bcast_state"] = [h.hexdigest()[:16], sd["param_groups"][0]["lr"], len(sd["state"])]

print(f"rank {R}: broadcast_optimizer_state of mixed dtypes", file=sys.stderr, flush=True)
# Root: Adam state (float32 step on the CPU, moments) plus int64 and float64 entries; rank 1: empty state.
torch.manual_seed(5)
model = Net()
opt = torch.optim.Adam(model.parameters(), lr=0.01)
if R == 0:
    x, y = batch(0, 0, R)
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    first = next(iter(model.parameters()))
    opt.state[first]["count"] = torch.tensor(7, dtype=torch.int64)
    opt.state[first]["ema64"] = torch.arange(3, dtype=torch.float64) + 0.5
hvd.broadcast_optimizer_state(opt, root_rank=0)
sd = opt.state_dict()
# (torch.optim's load_state_dict casts every entry but 'step' to the parameter's dtype: compare values)
out["bcast_mixed"] = {f"{i}.{key}": [str(v.dtype) if key == "step" else "", v.double().reshape(-1).tolist()]
                      for i in sorted(sd["state"]) for key, v in sorted(sd["state"][i].items())}

print(f"rank {R}: broadcast_optimizer_state before the first step", file=sys.stderr, flush=True)
# Before the first step: rank 0's empty state wins, parameters are untouched, training then matches.
torch.manual_seed(5)
model = Net()
before = digest(model)
dopt = hvd.DistributedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01), named_parameters=model.named_parameters())
if R != 0:  # give the other ranks some state that must disappear
    other = Net()
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.5)
    x, y = batch(0, 0, R)
    ((other(x) - y) ** 2).mean().backward()
    other_opt.step()
    dopt.load_state_dict(other_opt.state_dict())
hvd.broadcast_optimizer_state(dopt, root_rank=0)
out["bcast_empty_state"] = [len(dopt.state_dict()["state"]), dopt.param_groups[0]["lr"], digest(model) == before]

print(f"rank {R}: report", file=sys.stderr, flush=True)
hvd.barrier()
report(R, out)
