"""hvd.SyncBatchNorm on uneven per-rank batches against one-process torch.nn.BatchNorm{1,2}d on the
concatenated batch: outputs, input gradients, rank-summed weight/bias gradients, running statistics
(over three training steps) and eval outputs. Every rank rebuilds every rank's inputs from seeds and
checks its own slice; it reports the cases checked and any mismatch."""
from __future__ import annotations

import traceback

from common import leave_together, start

import torch

import hvdllm.torch as hvd

r, n = start(hvd)
checked: list[str] = []
failures: list[str] = []
TOL = 1e-5


def close(case: str, what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    err = float((got - want).abs().max()) if got.numel() else 0.0
    if not err <= TOL * max(1.0, float(want.abs().max()) if want.numel() else 1.0):
        failures.append(f"{case}: {what} differs by {err:.3g}")


# (case, reference class, per-sample shape after N, kwargs)
CASES = [
    ("bn1d_2d", torch.nn.BatchNorm1d, (4,), {}),
    ("bn1d_3d", torch.nn.BatchNorm1d, (3, 5), {"momentum": 0.3}),
    ("bn2d", torch.nn.BatchNorm2d, (3, 4, 2), {}),
    ("bn2d_cumulative", torch.nn.BatchNorm2d, (2, 3, 3), {"momentum": None}),
    ("bn1d_no_affine", torch.nn.BatchNorm1d, (4,), {"affine": False}),
    ("bn1d_no_running", torch.nn.BatchNorm1d, (3, 2), {"track_running_stats": False}),
]


def batch(step: int, rank: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Rank q's batch: q + 2 samples (uneven), shifted and scaled per channel so statistics matter."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn((rank + 2, *shape), generator=g) * 3.0 + 1.5


def run(case: str, ref_cls: type, shape: tuple[int, ...], kw: dict) -> None:
    c = shape[0]
    ref = ref_cls(c, **kw)
    sync = hvd.SyncBatchNorm(c, **kw)
    if ref.affine:
        with torch.no_grad():
            for p in (ref.weight, ref.bias):
                p.copy_(torch.linspace(0.5, 1.5, c))
        sync.load_state_dict(ref.state_dict())
    for step in range(3):
        xs = [batch(step, q, shape) for q in range(n)]
        full = torch.cat(xs).requires_grad_(True)
        mine = xs[r].clone().requires_grad_(True)
        g = torch.Generator().manual_seed(7 + step)
        dy = torch.randn(full.shape, generator=g)
        lo = sum(x.shape[0] for x in xs[:r])
        want = ref(full)
        (want * dy).sum().backward()
        got = sync(mine)
        (got * dy[lo:lo + mine.shape[0]]).sum().backward()
        close(case, f"step {step} output", got.detach(), want.detach()[lo:lo + mine.shape[0]])
        close(case, f"step {step} input grad", mine.grad, full.grad[lo:lo + mine.shape[0]])
        if ref.affine:
            for name in ("weight", "bias"):
                p_ref, p = getattr(ref, name), getattr(sync, name)
                close(case, f"step {step} {name} grad (summed over ranks)",
                      hvd.allreduce(p.grad, op=hvd.Sum, name=f"sbn.{case}.{name}.{step}"), p_ref.grad)
                p_ref.grad, p.grad = None, None
        if ref.track_running_stats:
            close(case, f"step {step} running_mean", sync.running_mean, ref.running_mean)
            close(case, f"step {step} running_var", sync.running_var, ref.running_var)
            if int(sync.num_batches_tracked) != int(ref.num_batches_tracked):
                failures.append(f"{case}: num_batches_tracked {int(sync.num_batches_tracked)}")
    ref.eval(), sync.eval()
    x = batch(9, r, shape)
    with torch.no_grad():
        if ref.track_running_stats:       # eval: running statistics, no communication
            close(case, "eval output", sync(x), ref(x))
        else:                             # eval without running statistics: combined batch statistics
            xs = [batch(9, q, shape) for q in range(n)]
            lo = sum(v.shape[0] for v in xs[:r])
            close(case, "eval output", sync(x), ref(torch.cat(xs))[lo:lo + x.shape[0]])
    checked.append(case)


for case in CASES:
    try:
        run(*case)
    except Exception:
        failures.append(f"{case[0]}: {traceback.format_exc()}")
try:
    hvd.SyncBatchNorm(3)(torch.ones(4))
    failures.append("bad_input: 1D input accepted")
except ValueError as e:
    if "2D" in str(e):
        checked.append("bad_input")
    else:
        failures.append(f"bad_input: {e}")
leave_together(hvd, r, {"rank": r, "size": n, "backend": hvd.backend(), "checked": checked, "failures": failures})
