"""A plain PyTorch training script made data-parallel with hvdllm: the lines marked ``# hvd`` are all
that changed from the one-process version.

    python examples/torch_train.py                       # one process
    horovodrun -np 2 python examples/torch_train.py      # two ranks (Gloo or MPI), same result
    mpirun -np 2 python examples/torch_train.py          # also without Horovod: HVDLLM_BACKEND=mpi

The global batch (``--batch``) stays the same at any rank count: each rank takes its share of every
batch (DistributedSampler), and the DistributedOptimizer averages the gradients, so np=1 and np=2
train the same model.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import hvdllm.torch as hvd


def make_data(n: int = 2048, seed: int = 0) -> TensorDataset:
    """Two interleaved spirals: a small task a 2-layer MLP learns in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 2 * torch.pi
    label = torch.randint(0, 2, (n,), generator=g)
    r = 0.2 + t / (2 * torch.pi)
    angle = t + label * torch.pi
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], 1) + 0.02 * torch.randn(n, 2, generator=g)
    return TensorDataset(x, label)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64, help="global batch (all ranks together)")
    ap.add_argument("--lr", type=float, default=0.02)
    args = ap.parse_args()

    hvd.init()                                                                   # hvd
    torch.set_num_threads(hvd.threads_per_rank())
    torch.manual_seed(0)
    data = make_data()
    sampler = DistributedSampler(data, num_replicas=hvd.size(), rank=hvd.rank(), shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=args.batch // hvd.size(), sampler=sampler, drop_last=True)
    model = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())  # hvd
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)                    # hvd
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)                        # hvd

    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        total, batches = 0.0, 0
        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        mean_loss = hvd.allreduce(torch.tensor(total / batches)).item()  # averaged over ranks, for the log
        if hvd.rank() == 0:
            print(f"epoch {epoch} loss {mean_loss:.6f}")
    checksum = sum(p.double().sum().item() for p in model.parameters())
    if hvd.rank() == 0:
        print(f"done size {hvd.size()} backend {hvd.backend()} checksum {checksum:.10f}")


if __name__ == "__main__":
    main()
