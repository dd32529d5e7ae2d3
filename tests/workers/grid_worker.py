"""dp x tp x pp on 4 real ranks: a few training steps of each layout against the single-process run of the
same global batch, computed here on every rank.

Layouts (run in this order in one launch; the process sets of all of them are registered at init):
  dp2 x tp2 (10 AdamW steps), tp2 x pp2 (1F1B, 2 steps), dp2 x pp2 (GPipe, 2 steps).
Data-parallel gradients are averaged inside each dp group only, by hvdllm's DistributedOptimizer with
process_set=the dp group (for pipelines with backward_passes_per_step = micro-batches: every micro-batch's
backward is one pass; the tied embedding's gradient is complete inside the last one).
"""
from __future__ import annotations

from common import leave_together, start

import torch

import hvdllm.torch as hvd
from hvdllm.core.grid import ProcessGrid
from hvdllm.models.gpt import GPT, GPTConfig
from hvdllm.torch.parallel import GPTStage, PipelineExecutor, parallelize_gpt

WORLD = 4
LAYOUTS = [("dp2_tp2", ProcessGrid(2, 2, 1, WORLD), 10, None, 1),
           ("tp2_pp2", ProcessGrid(1, 2, 2, WORLD), 2, "1f1b", 2),
           ("dp2_pp2", ProcessGrid(2, 1, 2, WORLD), 2, "gpipe", 2)]
sets = []
for _, g, *_ in LAYOUTS:
    sets += [ps for ps in g.process_sets() if ps not in sets]
rank, _ = start(hvd, sets, threads=None)
assert hvd.size() == WORLD
CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)
BATCH, LR = 8, 1e-2
out: dict = {"rank": rank, "backend": hvd.backend()}


def make_optimizer(params: list) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.1)


def distributed(module: torch.nn.Module, group, passes: int) -> torch.optim.Optimizer:
    opt = make_optimizer(list(module.parameters()))
    if group.size == 1:
        return opt
    return hvd.DistributedOptimizer(opt, named_parameters=module.named_parameters(), process_set=group.process_set,
                                    backward_passes_per_step=passes)


def reference(steps: int, data: list) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = make_optimizer(list(model.parameters()))
    losses = []
    for idx, tgt in data[:steps]:
        _, loss = model(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {n: p.detach() for n, p in model.named_parameters()}


torch.manual_seed(123)
_ids = [torch.randint(0, CFG.vocab_size, (BATCH, 16)) for _ in range(10)]
DATA = [(i, (3 * i + 1) % CFG.vocab_size) for i in _ids]     # a learnable map, so the loss falls
ref_losses, ref_params = reference(10, DATA)

for label, grid, steps, schedule, m in LAYOUTS:
    c = grid.coords(rank)
    dp, tp = grid.group("dp", rank), grid.group("tp", rank)
    torch.manual_seed(0)
    tp_model = parallelize_gpt(GPT(CFG), tp)
    per = BATCH // grid.dp
    losses = []
    if schedule is None:
        module = tp_model
        opt = distributed(module, dp, 1)
        for idx, tgt in DATA[:steps]:
            _, loss = module(idx[c.dp * per:(c.dp + 1) * per], tgt[c.dp * per:(c.dp + 1) * per], gather_logits=False)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mean = hvd.allreduce(loss.detach(), op=hvd.Average, process_set=dp.process_set) if dp.size > 1 else loss
            losses.append(mean.item())
        full = {n: tp_model.full_tensor(n, p) for n, p in module.named_parameters()}
    else:
        module = GPTStage(tp_model, c.pp, grid.pp)
        pipeline = PipelineExecutor(module, grid, rank, schedule=schedule)
        opt = distributed(module, dp, m)
        for idx, tgt in DATA[:steps]:
            x, y = idx[c.dp * per:(c.dp + 1) * per], tgt[c.dp * per:(c.dp + 1) * per]
            loss = pipeline.step(list(x.chunk(m)), list(y.chunk(m)))
            opt.step()
            opt.zero_grad(set_to_none=True)
            t = torch.tensor([loss], dtype=torch.float64)
            losses.append((hvd.allreduce(t, op=hvd.Average, process_set=dp.process_set) if dp.size > 1 else t).item())
        full = {n: tp_model.full_tensor(n, p) for n, p in module.named_parameters()}
    out[label + "_losses"] = losses
    out[label + "_ref_losses"] = ref_losses[:steps]
    out[label + "_loss_diff"] = max(abs(a - b) for a, b in zip(losses, ref_losses))
    # weights after `steps` steps, against a reference run of the same length
    _, ref_w = reference(steps, DATA) if steps != 10 else (None, ref_params)
    names = {n: ("wte.weight" if n == "lm_head.weight" and CFG.tie_embeddings else n) for n in full}
    out[label + "_weight_diff"] = max((full[n] - ref_w[names[n]]).abs().max().item() for n in full)
    out[label + "_n_params"] = len(full)
leave_together(hvd, rank, out)
