"""Pipeline parallelism on real ranks: each rank is one stage; GPipe and 1F1B against the unsplit model.

Run as `<launcher> python pipeline_worker.py`; the world is one pipeline (pp = world size).
"""
from __future__ import annotations

import copy

from common import launched_size, leave_together, start

import torch

import hvdllm.torch as hvd
from hvdllm.core.grid import ProcessGrid
from hvdllm.models.gpt import GPT, GPTConfig
from hvdllm.torch.parallel import GPTStage, PipelineExecutor

world = launched_size()
grid = ProcessGrid(1, 1, world, world_size=world)
rank, _ = start(hvd, grid.process_sets(), threads=None)
out: dict = {"rank": rank, "backend": hvd.backend(), "stage": grid.coords(rank).pp}

CASES = {
    "tied_l2_m4": (GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32), 4),
    "untied_l3_m3": (GPTConfig(vocab_size=64, block_size=16, n_layer=3, n_head=2, n_embd=32,
                               tie_embeddings=False), 3),
}
for label, (cfg, m) in CASES.items():
    for kind in ("gpipe", "1f1b"):
        torch.manual_seed(0)
        model = GPT(cfg)
        reference = copy.deepcopy(model)
        idx = torch.randint(0, cfg.vocab_size, (2 * m, 16))
        targets = torch.randint(0, cfg.vocab_size, (2 * m, 16))
        _, ref_loss = reference(idx, targets)
        ref_loss.backward()
        ref_grads = {n: p.grad for n, p in reference.named_parameters()}
        stage = GPTStage(model, grid.coords(rank).pp, grid.pp)
        pipeline = PipelineExecutor(stage, grid, rank, schedule=kind)
        losses = []
        for step in range(2):          # twice: the second step reuses the schedule and accumulates grads
            losses.append(pipeline.step(list(idx.chunk(m)), list(targets.chunk(m))))
        key = f"{label}_{kind}"
        out[key + "_loss"] = abs(losses[0] - ref_loss.item())
        out[key + "_loss2"] = abs(losses[1] - ref_loss.item())
        diffs = {}
        for n, p in stage.named_parameters():
            ref_name = "wte.weight" if (n == "lm_head.weight" and cfg.tie_embeddings) else n
            diffs[n] = (p.grad / 2 - ref_grads[ref_name]).abs().max().item()
        out[key + "_grads"] = max(diffs.values())
        out[key + "_diffs"] = diffs
        out[key + "_names"] = sorted(diffs)
        out[key + "_blocks"] = [stage.start, stage.end]
leave_together(hvd, rank, out)
