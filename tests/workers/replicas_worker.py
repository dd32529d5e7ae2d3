"""The replica check on real ranks: identical replicas pass; one element changed by one ulp on rank 1 --
in a parameter, then in an Adam moment -- stops with the step and rank 1 named. Reports per case."""
from __future__ import annotations

from common import leave_together, start

import numpy as np
import torch

import hvdllm.torch as hvd
from hvdllm.models.config import GPTConfig
from hvdllm.models.gpt import GPT
from hvdllm.train import replicas
from hvdllm.train.trainer_torch import state_checksums

rank, _ = start(hvd)
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
_, loss = model(x, x)
loss.backward()
opt.step()


def check(step: int) -> str | None:
    mine = torch.from_numpy(replicas.digest(state_checksums(model, opt)))
    rows = hvd.allgather(mine.unsqueeze(0), name=f"replicas.{step}").numpy()
    try:
        replicas.check(step, rows, [list(range(hvd.size()))])
    except replicas.ReplicaMismatch as e:
        return str(e)
    return None


def nudge(t: torch.Tensor, index: int) -> float:
    """Move one element of ``t`` to the next float32 up, on rank 1 only; returns the old value."""
    flat = t.data.view(-1)
    old = float(flat[index])
    if rank == 1:
        flat[index] = float(np.nextafter(np.float32(old), np.float32(np.inf)))
    return old


out = {"same": check(1)}
w = model.lm_head.weight if hasattr(model, "lm_head") else next(model.parameters())
old = nudge(w, 37)
out["param"] = check(7)
w.data.view(-1)[37] = old
out["restored"] = check(8)
moment = opt.state[w]["exp_avg_sq"]
old = nudge(moment, 5)
out["moment"] = check(9)
leave_together(hvd, rank, out)
