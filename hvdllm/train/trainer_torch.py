"""`hvdllm train --framework torch`: the GPT training loop on hvdllm.torch.

One optimizer step: the learning rate of the step from the core's schedule; this rank's micro-batches
of the step (its slice of the global batch, hvdllm.data) through ``runner.forward_backward`` (each
micro-batch loss scaled by 1/accumulation); ``DistributedOptimizer.step()`` averages the gradients
over the data-parallel ranks (summed over the ``accum`` backward passes), clips the global norm and
applies AdamW. So the update is the gradient of the mean loss over the whole global batch, whatever
the number of ranks.

Model parallelism plugs in at :func:`build_runner`: a :class:`~hvdllm.train.runner_torch.StepRunner`
owns the module(s) this rank holds, the forward/backward over micro-batches and the evaluation forward.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import hvdllm.torch as hvd
from hvdllm.core.cpu import cpu_flags, precision_advice, read_cpuinfo
from hvdllm.core.evaluation import eval_batches
from hvdllm.core.preemption import EXIT_PREEMPTED
from hvdllm.models.gpt import GPTConfig
from hvdllm.train import checkpoint as ckpt
from hvdllm.train import elastic, replicas
from hvdllm.train.resume import OPTIMIZER_FORMATS
from hvdllm.train.metrics import LossLog
from hvdllm.train.progress import peak_flops
from hvdllm.train.run_setup import RunSetup, create_run_dir, rank_threads, setup_run
from hvdllm.train.config import ConfigError, TrainConfig
from hvdllm.train.loop import RunEnd, StepHooks, run_training
from hvdllm.train.model_parallel import grid_process_sets
from hvdllm.train.model_parallel_torch import tensor_parallel_runner
from hvdllm.train.pipeline_torch import pipeline_runner
from hvdllm.train.runner_torch import Precision, StepRunner, data_parallel_runner, make_precision


def build_runner(s: RunSetup, precision: Precision, device: torch.device) -> StepRunner:
    """The StepRunner for ``s.cfg.parallel``: the whole model, tensor parallel, or a pipeline stage."""
    if s.cfg.parallel.pp > 1:
        return pipeline_runner(s, precision, device)
    if s.cfg.parallel.tp > 1:
        return tensor_parallel_runner(s, precision, device)
    return data_parallel_runner(s.gpt, precision, device)


# -- optimizer ------------------------------------------------------------------------------------------
def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, accum: int, runner: StepRunner | None = None) -> Any:
    """AdamW (the core's math) with weight decay on matrices only, wrapped for data parallelism."""
    from hvdllm.torch.optim import AdamW

    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    inner = AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                  weight_decay=cfg.optim.weight_decay, fused=cfg.optim.fused)
    compression = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16,
                   "bf16": hvd.Compression.bf16}[cfg.run.compression]
    # fp16: the reduced gradients are still loss-scaled, so the loop clips after unscaling (apply_update).
    clip = None if cfg.run.precision == "fp16" else cfg.optim.max_grad_norm
    dp_group = runner.dp_group if runner is not None and runner.dp_group is not None else hvd.WORLD
    return hvd.DistributedOptimizer(inner, named_parameters=model.named_parameters(), compression=compression,
                                    backward_passes_per_step=accum, op=hvd.Average,
                                    bucket_cap_mb=cfg.run.bucket_cap_mb, max_grad_norm=clip, process_set=dp_group,
                                    grad_norm_fn=runner.grad_norm if runner is not None else None,
                                    zero_stage=cfg.parallel.zero, zero_inflight_mb=cfg.parallel.zero_inflight_mb)


def apply_update(optimizer: Any, scaler: Any, max_grad_norm: float | None) -> None:
    """The optimizer step after backward. fp16 (a loss ``scaler``): reduce, unscale once, clip once by the
    global norm (the optimizer's, so the unsplit model's under tensor parallelism), then the scaler's
    step (which skips it on inf/nan, alike on every rank since the gradients were reduced first)."""
    if scaler is None:
        optimizer.step()
        return
    optimizer.synchronize()
    scaler.unscale_(optimizer)
    if max_grad_norm is not None:
        optimizer.clip_grad_norm_(max_grad_norm)
    with optimizer.skip_synchronize():
        scaler.step(optimizer)
    scaler.update()


# -- checkpoint state <-> torch ----------------------------------------------------------------------------
def _to_numpy_tree(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
    if isinstance(x, dict):
        return {k: _to_numpy_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_numpy_tree(v) for v in x)
    return x


def model_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Parameters (tied ones once) and buffers as numpy, keyed by their module names."""
    out = {n: p.detach().cpu().numpy().copy() for n, p in model.named_parameters()}
    out.update({n: b.detach().cpu().numpy().copy() for n, b in model.named_buffers()})
    return out


def load_model_arrays(model: torch.nn.Module, arrays: dict[str, np.ndarray], where: str) -> None:
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    if set(named) != set(arrays):
        missing, extra = sorted(set(named) - set(arrays)), sorted(set(arrays) - set(named))
        raise ConfigError(f"{where}: weights do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for n, t in named.items():
            a = arrays[n]
            if tuple(a.shape) != tuple(t.shape):
                raise ConfigError(f"{where}: {n} has shape {list(a.shape)}, the model wants {list(t.shape)}")
            t.copy_(torch.from_numpy(a))


def load_weights(runner: StepRunner, arrays: dict[str, np.ndarray], where: str) -> None:
    """Unsplit weights (PyTorch names, from either framework's checkpoint) into this rank's model or shards."""
    if runner.shards is None:
        load_model_arrays(runner.model, arrays, where)
        return
    try:
        runner.shards.load_full_state(arrays, where)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def gather_rows(t: torch.Tensor, s: RunSetup, runner: StepRunner) -> torch.Tensor:
    """Every rank's 1-d ``t`` stacked by rank (an allgather, named where the runner names its collectives)."""
    return hvd.allgather(t.unsqueeze(0), name=runner.op_name("gather")) if s.size > 1 else t.unsqueeze(0)


# -- replica check ---------------------------------------------------------------------------------------
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bit_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t``'s elements read as integers of their width (floats by their bits), in int64:
    exact, so independent of summation order, threads and device."""
    t = t.detach()
    if t.is_floating_point():
        t = t.contiguous().view(_BITS[t.element_size()])
    return t.sum(dtype=torch.int64)


def state_checksums(model: torch.nn.Module, optimizer: Any) -> np.ndarray:
    """One :func:`bit_sum` per tensor of the model's state and the optimizer's state (replicas agree;
    an optimizer that shards its state over the data-parallel ranks, ``zero_stage`` > 0, counts only
    with its parameters)."""
    tensors = list(model.state_dict().values())
    for per_param in optimizer.state_dict()["state"].values() if not getattr(optimizer, "zero_stage", 0) else ():
        tensors += [v for _, v in sorted(per_param.items()) if torch.is_tensor(v)]
    return np.array([int(bit_sum(t)) for t in tensors], dtype=np.int64)


def check_replicas(s: RunSetup, runner: StepRunner, optimizer: Any, step: int) -> None:
    """Compare this rank's state digest with its data-parallel peers' (a collective on every rank);
    raises replicas.ReplicaMismatch naming the step and the ranks that differ."""
    mine = torch.from_numpy(replicas.digest(state_checksums(runner.model, optimizer)))
    replicas.check(step, gather_rows(mine, s, runner).numpy(), s.grid.all_members("dp"))


def save(s: RunSetup, runner: StepRunner, optimizer: Any, step: int, device: torch.device, precision: Precision,
         losses: LossLog) -> Path | None:
    """Write a checkpoint of ``step`` (a collective: every rank contributes its RNG state; rank 0 writes)."""
    pending = losses.pending()
    weights = model_arrays(runner.full_model()) if runner.full_model is not None else None   # (a collective)
    sharded = runner.shards is not None
    opt_state = runner.shards.optimizer_state(optimizer) if sharded else None               # (a collective)
    if opt_state is None and getattr(optimizer, "zero_stage", 0):
        opt_state = optimizer.state_dict()      # ZeRO gathers its shards into the unsplit state (a collective)
    rng = torch.get_rng_state()
    all_rng = gather_rows(rng, s, runner)
    cuda_rng = None
    if device.type == "cuda":
        cuda_rng = gather_rows(torch.cuda.get_rng_state(device), s, runner)
    if not s.is_root:
        return None
    opt_arrays, opt_skeleton = ckpt.flatten_state(_to_numpy_tree(opt_state if opt_state is not None
                                                                 else optimizer.state_dict()))
    rng_arrays = {"torch_cpu": all_rng.numpy()}
    if cuda_rng is not None:
        rng_arrays["torch_cuda"] = cuda_rng.cpu().numpy()
    precision_state = {}
    if precision.scaler is not None:
        precision_state = {k: v for k, v in precision.scaler.state_dict().items() if isinstance(v, (int, float))}
    meta = {
        **s.checkpoint_meta(step),
        "framework": "torch",
        "optimizer": opt_skeleton,
        "optimizer_format": OPTIMIZER_FORMATS[sharded],
        "scaler": precision_state,
        "pending_losses": pending,
    }
    if weights is None:
        weights = model_arrays(runner.model)
    return s.write_checkpoint(step, {"model": weights, "optimizer": opt_arrays, "rng": rng_arrays}, meta)


def restore(s: RunSetup, runner: StepRunner, optimizer: Any, precision: Precision, device: torch.device,
            losses: LossLog) -> None:
    """Load weights, optimizer state, RNG states, loss-scaler state and unlogged losses from ``s.resume_from``."""
    files, meta = ckpt.read_checkpoint(s.resume_from)
    losses.restore(meta.get("pending_losses", []))
    state = ckpt.unflatten_state(files["optimizer"], meta["optimizer"], to_tensor=lambda a: torch.from_numpy(a.copy()))
    load_weights(runner, files["model"], str(s.resume_from))
    if runner.shards is not None:           # this rank's shards of the unsplit moments
        try:
            runner.shards.load_optimizer_state(optimizer, state, str(s.resume_from))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    else:
        optimizer.load_state_dict(state)
    rng = files.get("rng", {})
    if "torch_cpu" in rng:
        states = rng["torch_cpu"]
        torch.set_rng_state(torch.from_numpy(states[s.rank % len(states)].copy()))
    if "torch_cuda" in rng and device.type == "cuda":
        states = rng["torch_cuda"]
        torch.cuda.set_rng_state(torch.from_numpy(states[s.rank % len(states)].copy()), device)
    if precision.scaler is not None and meta.get("scaler"):
        precision.scaler.load_state_dict({**precision.scaler.state_dict(), **meta["scaler"]})


# -- the loop --------------------------------------------------------------------------------------------
def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.run.device == "cpu" or (cfg.run.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but torch sees no GPU; use run.device=cpu or auto")
    return torch.device("cuda", hvd.local_rank() % torch.cuda.device_count())


def evaluate(s: RunSetup, runner: StepRunner, device: torch.device) -> float:
    """Mean validation loss over run.eval_sequences fixed windows, split over the data-parallel ranks."""
    windows = s.windows.val_windows(s.cfg.run.eval_sequences)
    runner.model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for ids, counted in eval_batches(windows, s.dp_rank, s.plan.dp_size, s.cfg.batch.micro_batch):
        x, y = s.windows.batch(ids)
        part, n = runner.eval_loss_sum(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
        if counted:                 # (padding batches keep model-parallel collectives paired across dp ranks)
            total += part.double().cpu()
            count += n
    runner.model.train()
    both = torch.tensor([total.item(), float(count)], dtype=torch.float64)
    if s.size > 1:          # (ranks holding the same data slice add the same sum and count: the ratio holds)
        both = hvd.allreduce(both, op=hvd.Sum, name=runner.op_name("eval"))
    return float(both[0] / both[1])


def sample_text(runner: StepRunner, tokenizer: Any, prompt: str, tokens: int, temperature: float, top_k: int,
                seed: int, device: torch.device) -> str:
    ids = [int(i) for i in tokenizer.encode(prompt)] or [0]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    runner.model.eval()
    out = runner.generate(idx, tokens, temperature=temperature, top_k=top_k or None, generator=gen)
    runner.model.train()
    return tokenizer.decode(out[0].tolist())


def train(cfg: TrainConfig) -> int:
    """Run (or resume) training as configured; returns the exit status (0, or EXIT_PREEMPTED after an
    agreed early stop). ConfigError -> the CLI's 2."""
    hvd.init(process_sets=grid_process_sets(cfg.parallel.tp, cfg.parallel.pp))
    rank, size = hvd.rank(), hvd.size()
    if cfg.run.elastic:
        elastic.check_backend(hvd.backend(), size)
    threads = rank_threads(hvd, cfg.run.bind_cores, cfg.run.threads)
    torch.set_num_threads(threads)
    device = pick_device(cfg)
    if cfg.run.precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"run.precision=fp16 needs a GPU (dynamic loss scaling); this run is on {device.type}: "
                          "allowed there: run.precision=fp32 or bf16")

    # --elastic: no collective before hvd.elastic.run (a worker joining later syncs there, not here)
    s = setup_run(cfg, rank, size, None if cfg.run.elastic else hvd.broadcast_object)
    cfg = s.cfg
    precision = make_precision(cfg.run.precision, device)
    torch.manual_seed(cfg.run.seed)                      # identical initial weights on every rank ...
    runner = build_runner(s, precision, device)
    optimizer = make_optimizer(runner.model, cfg, s.plan.accum, runner)
    if precision.scaler is not None and not (hasattr(optimizer, "synchronize") and hasattr(optimizer, "skip_synchronize")):
        raise ConfigError("run.precision=fp16 needs DistributedOptimizer.synchronize/skip_synchronize; use bf16")
    losses = LossLog(size, lambda vec: hvd.allreduce(torch.from_numpy(vec), name=runner.op_name("loss")).numpy())

    if s.resume_from is None and s.init_weights is not None:   # --init-from: its weights, a fresh optimizer
        load_weights(runner, s.init_weights, f"--init-from {s.init_from}")
    # Nothing has been written so far; from here on, the run directory exists.
    create_run_dir(s)
    if s.resume_from is not None:
        restore(s, runner, optimizer, precision, device, losses)
    elif not cfg.run.elastic:                            # (--elastic: the elastic state's sync does it)
        if runner.dp_group is None:
            hvd.broadcast_parameters(runner.model.state_dict(), root_rank=0)   # ... and, to be sure, rank 0's
            hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        elif len(runner.dp_group.members(size)) > 1:   # model parallel: each shard from its dp group's first rank
            root = runner.dp_group.members(size)[0]
            hvd.broadcast_parameters(runner.model.state_dict(), root_rank=root, process_set=runner.dp_group)
            hvd.broadcast_optimizer_state(optimizer, root_rank=root, process_set=runner.dp_group)
    if s.resume_from is None:
        torch.manual_seed(cfg.run.seed + 1 + rank)       # dropout differs per rank, reproducibly
    if size > 1 and not cfg.run.elastic:
        hvd.barrier()

    peak, peak_src = peak_flops(cfg.run.peak_flops,
                                torch.cuda.get_device_name(device) if device.type == "cuda" else None, threads)
    note = (f"device {device}, {threads} thread(s) per rank, precision {cfg.run.precision}; "
            f"MFU against {peak / 1e12:.3g} TFLOP/s per rank ({peak_src})")
    advice = precision_advice(cfg.run.precision, device.type, cpu_flags(read_cpuinfo()))
    note += f"\n{advice}" if advice else ""
    g = cfg.batch.global_batch

    def step(i: int, lr: float) -> float:
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
                 for x, y in s.windows.micro_batches(i, g, s.dp_rank, s.plan.dp_size, cfg.batch.micro_batch)]
        loss = runner.forward_backward(micro)
        apply_update(optimizer, precision.scaler, cfg.optim.max_grad_norm)
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    def grad_norm() -> float | None:
        gn = getattr(optimizer, "grad_norm", None)
        return float(gn) if gn is not None else None

    def sample(prompt: str, tokens: int, temperature: float, top_k: int, seed: int) -> str | None:
        sampler = runner
        if runner.full_model is not None:                # model parallel: sample from the gathered model
            full = runner.full_model()
            sampler = dataclasses.replace(runner, model=full, generate=full.generate)
        if not s.is_root:
            return None
        return sample_text(sampler, s.tokenizer, prompt, tokens, temperature, top_k, seed, device)

    runner.model.train()

    def start_sum_over_ranks(vec: np.ndarray) -> Callable[[], np.ndarray]:
        h = hvd.collectives().start("allreduce", torch.from_numpy(vec), hvd.Sum, name=runner.op_name("stop"))
        return lambda: h.wait().numpy()

    def rebind(new: RunSetup) -> None:                  # --elastic: the hooks above see the re-planned run
        nonlocal s
        s = new

    hooks = StepHooks(step=step, evaluate=lambda: evaluate(s, runner, device),
                      save=lambda i, ls: save(s, runner, optimizer, i, device, precision, ls),
                      grad_norm=grad_norm, sample=sample, start_sum_over_ranks=start_sum_over_ranks,
                      check_replicas=lambda i: check_replicas(s, runner, optimizer, i))
    if cfg.run.elastic:
        end = train_elastic(s, runner, optimizer, losses, hooks, peak, note, rebind)
    else:
        end = run_training(s, hooks, losses, s.gpt.flops_per_token(), peak, size, note)
    if hvd.size() > 1:
        hvd.barrier()              # (rank 0 has finished writing before any rank exits)
    return EXIT_PREEMPTED if end.stopped else 0


def train_elastic(s: RunSetup, runner: StepRunner, optimizer: Any, losses: LossLog, hooks: StepHooks, peak: float,
                  note: str, rebind: Callable[[RunSetup], None]) -> RunEnd:
    """The loop inside ``hvd.elastic.run`` (hvdllm.train.elastic): model, optimizer, step and unlogged
    losses in a TorchState committed every run.elastic_commit_every steps."""
    state = hvd.elastic.TorchState(model=runner.model, optimizer=optimizer, step=s.start_step,
                                   losses=losses.pending(), fresh=True)
    hooks = dataclasses.replace(hooks, commit=elastic.commit_hook(state, losses))

    def enter(here: RunSetup, rejoin: bool) -> None:
        rebind(here)
        runner.collective_name = elastic.op_names()
        optimizer.set_backward_passes_per_step(here.plan.accum)
        losses.size = here.size
        losses.restore(state.losses)
        if rejoin:
            torch.manual_seed(elastic.reseed(here.cfg.run.seed, here.rank, here.start_step))

    def world() -> tuple[int, int]:
        return hvd.rank(), hvd.size()

    return elastic.run_elastic(s, state, hvd.elastic.run, world, enter,
                               lambda here, rejoin: run_training(here, hooks, losses, here.gpt.flops_per_token(),
                                                                 peak, here.size, note, rejoin=rejoin))


def sample_checkpoint(path: str, prompt: str | None, tokens: int | None, temperature: float | None = None,
                      top_k: int | None = None, seed: int | None = None) -> str:
    """Text generated by the model of a torch checkpoint (a checkpoint folder, or a run folder's newest)."""
    from hvdllm.data.tokenizer import load_tokenizer
    from hvdllm.train.config import from_dict

    ck = ckpt.resolve_checkpoint(path)
    if ck is None:
        raise ConfigError(f"--checkpoint {path}: no checkpoint there")
    files, meta = ckpt.read_checkpoint(ck)
    cfg = from_dict(meta["config"])
    gpt = GPTConfig(**meta["model"])
    torch.set_num_threads(1)           # one sequence, token by token: more threads only add overhead
    device = torch.device("cpu")
    precision = make_precision("fp32", device)
    runner = data_parallel_runner(gpt, precision, device)
    load_model_arrays(runner.model, files["model"], str(ck))
    tok = load_tokenizer(ck)
    sp = cfg.sample
    return sample_text(runner, tok, sp.prompt if prompt is None else prompt, sp.tokens if tokens is None else tokens,
                       sp.temperature if temperature is None else temperature, sp.top_k if top_k is None else top_k,
                       sp.seed if seed is None else seed, device)
