"""A Horovod-style elastic PyTorch script on hvdllm (the documented pattern, import swapped).

Tiny linear regression, SGD with momentum, ElasticSampler, commit every 3 steps; the global batch is
kept (local batch = GLOBAL // size), so any number of workers walks the same trajectory. Options:
``--kill-at N MARKER``: the rank 1 of the first attempt SIGKILLs itself before step N (MARKER makes it
once); ``--grow ALONE``: on one worker, write ALONE (the discovery script then offers a host again) and
commit until a worker has joined.
"""
from __future__ import annotations

import argparse
import time

from common import elastic_checkpoint, report, start

import torch

import hvdllm.torch as hvd

GLOBAL, N, EPOCHS, COMMIT_EVERY = 16, 192, 3, 3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kill-at", nargs=2, metavar=("STEP", "MARKER"))
    p.add_argument("--grow", metavar="ALONE")
    p.add_argument("--expect-refusal", action="store_true", help="mpi backend, several ranks: report run's error")
    a = p.parse_args()
    start(hvd)
    if a.expect_refusal:
        try:
            hvd.elastic.run(lambda state: None)(hvd.elastic.ObjectState(epoch=0))
            error = ""
        except ValueError as e:
            error = str(e)
        hvd.barrier()
        report(hvd.rank(), {"error": error})
        return
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(N, 1, generator=g)
    dataset = torch.utils.data.TensorDataset(x, y)
    torch.manual_seed(1)
    model = torch.nn.Linear(8, 1)
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                         named_parameters=model.named_parameters())
    sampler = hvd.elastic.ElasticSampler(dataset, shuffle=True, seed=3)
    state = hvd.elastic.TorchState(model=model, optimizer=optimizer, sampler=sampler, epoch=0, step=0)
    sizes: list[list[int]] = []  # [step, size] whenever the size seen changes
    resets: list[int] = []
    state.register_reset_callbacks([lambda: resets.append(hvd.size())])

    @hvd.elastic.run
    def train(state: hvd.elastic.TorchState) -> None:
        local = GLOBAL // hvd.size()
        loader = torch.utils.data.DataLoader(dataset, batch_size=local, sampler=state.sampler)
        for state.epoch in range(state.epoch, EPOCHS):
            for batch_idx, (xb, yb) in enumerate(loader):
                elastic_checkpoint(sizes, state.step, hvd.size(), hvd.rank(), a.kill_at)
                if a.grow and hvd.size() == 1:
                    open(a.grow, "w").close()
                    deadline = time.monotonic() + 120
                    while time.monotonic() < deadline:  # ends by HostsUpdatedInterrupt when a worker joins
                        state.commit()
                        time.sleep(0.5)
                    raise RuntimeError("no worker joined within 120 s")
                optimizer.zero_grad()
                loss = torch.nn.functional.mse_loss(state.model(xb), yb)
                loss.backward()
                optimizer.step()
                state.sampler.record_batch(batch_idx, local)
                state.step += 1
                if state.step % COMMIT_EVERY == 0:
                    state.commit()
            state.sampler.set_epoch(state.epoch + 1)
            state.commit()

    train(state)
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(model(x), y).item()
    hvd.barrier()
    report(hvd.rank(), {"rank": hvd.rank(), "size": hvd.size(), "backend": hvd.backend(), "steps": state.step,
                        "final_loss": final, "sizes": sizes, "resets": resets,
                        "weight": model.weight.flatten().tolist()})


if __name__ == "__main__":
    main()
