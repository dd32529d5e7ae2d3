"""DistributedOptimizer's Horovod arguments (groups, num_groups, sparse_as_dense, sparse gradients) and
hvd.sparse_allreduce_async against one-process references. Every rank rebuilds every rank's data from
seeds, trains a reference on the combined batch in one process, and reports mismatches."""
from __future__ import annotations

import traceback
import warnings

from common import leave_together, start

import torch

import hvdllm.torch as hvd

r, n = start(hvd)
checked: list[str] = []
failures: list[str] = []
B, VOCAB, DIM = 4, 12, 3


class Net(torch.nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, DIM, sparse=sparse)
        self.l1 = torch.nn.Linear(DIM, 5)
        self.l2 = torch.nn.Linear(5, 2)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(self.emb(idx).mean(1))))


def data(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randint(0, VOCAB, (B, 3), generator=g), torch.randn(B, 2, generator=g)


def loss_of(model: Net, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(idx) - y) ** 2).mean()


def close(case: str, what: str, got: torch.Tensor, want: torch.Tensor, tol: float = 1e-6) -> None:
    got = got.to_dense() if got.is_sparse else got
    err = float((got - want).abs().max())
    if not err <= tol:
        failures.append(f"{case}: {what} differs by {err:.3g}")


def train(case: str, sparse: bool, steps: int = 3, skip_rank: int | None = None, **kw) -> Net:
    """Train on the ranks and a one-process reference on the combined batch; compare after each step."""
    model, ref = Net(sparse), Net(sparse)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5),
                                   named_parameters=model.named_parameters(), **kw)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for step in range(steps):
        opt.zero_grad()
        idx, y = data(step, r)
        if step == 1 and skip_rank == r:          # this rank's loss does not touch the embedding this step
            loss = ((model.l2(torch.tanh(model.l1(torch.zeros(B, DIM)))) - y) ** 2).mean()
        else:
            loss = loss_of(model, idx, y)
        loss.backward()
        opt.step()
        ref_opt.zero_grad()
        total = 0
        for q in range(n):
            qi, qy = data(step, q)
            if step == 1 and skip_rank == q:
                total = total + ((ref.l2(torch.tanh(ref.l1(torch.zeros(B, DIM)))) - qy) ** 2).mean()
            else:
                total = total + loss_of(ref, qi, qy)
        (total / n).backward()
        ref_opt.step()
        if sparse and model.emb.weight.grad is not None and not model.emb.weight.grad.is_sparse:
            failures.append(f"{case}: step {step} embedding gradient is not sparse for the update")
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            if q.grad is not None and p.grad is not None:
                close(case, f"step {step} grad {name}", p.grad, q.grad)
            close(case, f"step {step} weight {name}", p.detach(), q.detach())
    checked.append(case)
    return opt


def bucket_members(opt) -> list[list[str]]:
    return sorted(sorted(opt._param_names[i] for i in bk.positions) for bk in opt._buckets)


def run(case: str, fn) -> None:
    try:
        fn()
    except Exception:
        failures.append(f"{case}: {traceback.format_exc()}")


def groups_int() -> None:
    opt = train("groups_int", sparse=False, groups=2)
    want = [["emb.weight", "l1.bias", "l1.weight"], ["l2.bias", "l2.weight"]]   # split_list of 5 in order
    if bucket_members(opt) != want:
        failures.append(f"groups_int: buckets {bucket_members(opt)}")


def groups_lists() -> None:
    model = Net(False)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(),
                                   groups=[[model.l1.weight, model.l2.weight], [model.emb.weight]])
    want = [["emb.weight"], ["l1.bias"], ["l1.weight", "l2.weight"], ["l2.bias"]]
    if bucket_members(opt) != want:
        failures.append(f"groups_lists: buckets {bucket_members(opt)}")
    train("groups_lists", sparse=False, groups=[[Net(False).l1.weight]])   # unknown tensors are ignored
    try:
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                 groups=[[model.l1.weight], [model.l1.weight]])
        failures.append("groups_lists: a parameter in two groups was accepted")
    except ValueError:
        pass
    try:
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), groups=0)
        failures.append("groups_lists: groups=0 accepted")
    except ValueError:
        pass


def num_groups() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = train("num_groups", sparse=False, num_groups=2)
    if not any(issubclass(w.category, DeprecationWarning) for w in caught):
        failures.append("num_groups: no DeprecationWarning")
    if len(opt._buckets) != 2:
        failures.append(f"num_groups: {len(opt._buckets)} buckets")


def sparse_cases() -> None:
    train("sparse_grads", sparse=True)
    train("sparse_as_dense", sparse=True, sparse_as_dense=True)
    train("sparse_missing_on_a_rank", sparse=True, skip_rank=n - 1)
    train("sparse_sum_predivide", sparse=True, op=hvd.Average, gradient_predivide_factor=2.0)


def sparse_allreduce() -> None:
    for op, name in ((hvd.Sum, "sum"), (hvd.Average, "average")):
        dense = []
        for q in range(n):
            g = torch.Generator().manual_seed(50 + q)
            d = torch.zeros(6, 2)
            rows = torch.randperm(6, generator=g)[:q + 1] if q != 1 else torch.tensor([], dtype=torch.long)
            d[rows] = torch.randn(len(rows), 2, generator=g)
            dense.append(d)
        handle = hvd.sparse_allreduce_async(dense[r].to_sparse(), name=f"sar.{name}", op=op)
        out = hvd.synchronize(handle)
        want = sum(dense) / (n if op is hvd.Average else 1)
        if not out.is_sparse:
            failures.append(f"sparse_allreduce_{name}: result not sparse")
        close(f"sparse_allreduce_{name}", "result", out.coalesce(), want)
        close(f"sparse_allreduce_{name}", "callable handle", handle(), want)
        checked.append(f"sparse_allreduce_{name}")


for case, fn in [("groups_int", groups_int), ("groups_lists", groups_lists), ("num_groups", num_groups),
                 ("sparse", sparse_cases), ("sparse_allreduce", sparse_allreduce)]:
    run(case, fn)
leave_together(hvd, r, {"rank": r, "size": n, "backend": hvd.backend(), "checked": checked, "failures": failures})
