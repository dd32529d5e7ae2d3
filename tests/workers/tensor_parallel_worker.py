"""Tensor parallelism on real ranks: TP layers and the TP GPT against the unsplit model (computed here).

Run as `<launcher> python tensor_parallel_worker.py`; every rank of the world is one TP group.
"""
from __future__ import annotations

import copy

from common import leave_together, start

import torch
import torch.nn as nn
from torch.nn import functional as F

import hvdllm.torch as hvd
from hvdllm.core.grid import ProcessGrid
from hvdllm.models.gpt import GPT, GPTConfig
from hvdllm.torch.parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                   parallelize_gpt, vocab_parallel_cross_entropy)

rank, size = start(hvd, threads=None)
grid = ProcessGrid(1, size, 1, world_size=size)
group = grid.group("tp", rank)
out: dict = {"rank": rank, "backend": hvd.backend()}


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# -- layers: column(gather) and column->row against nn.Linear, vocab embedding + CE ---------------
torch.manual_seed(1)
lin1, lin2 = nn.Linear(8, 12), nn.Linear(12, 6)
x = torch.randn(3, 5, 8, requires_grad=True)
ref = lin2(F.gelu(lin1(x)))
ref.pow(2).sum().backward()
col = ColumnParallelLinear.from_linear(lin1, group)
row = RowParallelLinear.from_linear(lin2, group)
xt = x.detach().clone().requires_grad_()
y = row(F.gelu(col(xt)))
y.pow(2).sum().backward()
out["layers_out"] = maxdiff(y, ref)
out["layers_dx"] = maxdiff(xt.grad, x.grad)
out["row_bias_grad"] = maxdiff(row.bias.grad, lin2.bias.grad)
colg = ColumnParallelLinear.from_linear(lin1, group, gather_output=True)
xg = x.detach().clone().requires_grad_()
yg = colg(xg)
(yg * torch.arange(12.0)).sum().backward()
x2 = x.detach().clone().requires_grad_()
(lin1(x2) * torch.arange(12.0)).sum().backward()
out["col_gather_out"] = maxdiff(yg, lin1(x))
out["col_gather_dx"] = maxdiff(xg.grad, x2.grad)
rown = RowParallelLinear.from_linear(lin2, group, input_is_parallel=False)
h = torch.randn(4, 12, requires_grad=True)
rown(h).sum().backward()
h2 = h.detach().clone().requires_grad_()
lin2(h2).sum().backward()
out["row_scatter_dx"] = maxdiff(h.grad, h2.grad)

emb = nn.Embedding(16, 4)
vemb = VocabParallelEmbedding.from_embedding(emb, group)
ids = torch.randint(0, 16, (3, 7))
out["vocab_emb"] = maxdiff(vemb(ids), emb(ids))
logits = torch.randn(21, 16, requires_grad=True)
tgt = torch.randint(0, 16, (21,))
F.cross_entropy(logits, tgt).backward()
local = logits.detach().chunk(size, dim=-1)[group.index].clone().requires_grad_()
vce = vocab_parallel_cross_entropy(local, tgt, group)
vce.backward()
out["vocab_ce"] = abs(vce.item() - F.cross_entropy(logits, tgt).item())
out["vocab_ce_grad"] = maxdiff(local.grad, logits.grad.chunk(size, dim=-1)[group.index])

# -- GPT: forward logits, loss and every gradient against the unsplit model -----------------------
for label, cfg in {
    "tied": GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32),
    "untied_nobias": GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32,
                               tie_embeddings=False, bias=False),
}.items():
    torch.manual_seed(0)
    model = GPT(cfg)
    reference = copy.deepcopy(model)
    idx = torch.randint(0, cfg.vocab_size, (4, 16))
    targets = torch.randint(0, cfg.vocab_size, (4, 16))
    ref_logits, ref_loss = reference(idx, targets)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    tp = parallelize_gpt(model, group)
    logits, loss = tp(idx, targets)
    loss.backward()
    grads = {n: tp.full_tensor(n, p.grad) for n, p in tp.named_parameters()}
    out[f"{label}_logits"] = maxdiff(logits, ref_logits)
    out[f"{label}_loss"] = abs(loss.item() - ref_loss.item())
    out[f"{label}_grad_names_equal"] = sorted(grads) == sorted(ref_grads)
    out[f"{label}_grads"] = max(maxdiff(grads[n], ref_grads[n]) for n in ref_grads)
    out[f"{label}_local_params"] = sum(p.numel() for p in tp.parameters())
    out[f"{label}_full_params"] = sum(p.numel() for p in reference.parameters())
    full = tp.full_state_dict()
    out[f"{label}_state_dict"] = max(maxdiff(full[k], v) for k, v in reference.state_dict().items())
    out[f"{label}_state_keys_equal"] = sorted(full) == sorted(reference.state_dict())

try:
    parallelize_gpt(GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=3, n_embd=24)), group)
    out["bad_heads"] = "no error"
except ValueError as e:
    out["bad_heads"] = str(e)
leave_together(hvd, rank, out)
