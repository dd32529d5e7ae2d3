"""Measure the machine for the cost model: FLOP/s at the model's shapes, optimizer speed, collectives, memory.

Run by ``hvdllm plan`` on every rank of its job (from one process planning for N ranks: two jobs, a plain
data-parallel one that measures only the compute rates of the plain data-parallel layouts, at
Horovod's data-parallel cycle, then the model-parallel one below). Under ``horovodrun -np N hvdllm plan`` every rank
measures at once (so the ranks share the cores as in training) and the collectives run over the real
backend (hvdllm.torch: Horovod, mpi4py), initialised as a model-parallel job (Horovod's 1 ms cycle, the
latency tensor- and pipeline-parallel collectives see). On one process planning for ``--ranks N``, each rank's
compute is measured with cores / N threads and scaled by 1 / max(1, N / cores) when the ranks would
oversubscribe the cores; the collectives are *assumed*: a shared-memory link whose bandwidth is the
measured memory-copy bandwidth / 2 (a send and a receive copy) and a latency of ASSUMED_LATENCY_S
(Gloo on one host, order of magnitude). The profile says which figures were assumed. Under a launch it
also measures kappa, the in-situ cost of one collective inside a model-parallel step, on the world and
(4+ ranks) on two-rank sets: see hvdllm.core.costmodel.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from hvdllm.core.costmodel import Machine
from hvdllm.core.world import allowed_cores
from hvdllm.models.config import GPTConfig

ASSUMED_LATENCY_S = 1e-4
PROFILE_VERSION = 1
SMALL, LARGE = 4 * 1024, 4 * 2**20        # message sizes (bytes) for the latency / bandwidth fit


def median_time(fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn`` over ``reps`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


PROBE_LAYERS = 4


# a timed round lasts at least this long: with more ranks than cores the kernel sometimes leaves one rank
# sharing a core with two others for a while (rounds of 0.3 s then took 1x-3x the median)
ROUND_S = 1.0


def group_time(fn: Callable[[], Any], reps: int, hvd: Any | None, warmup: int = 2, rounds: int = 3) -> float:
    """Wall seconds per call of ``fn`` with every rank calling it at once, as in a training step: each
    round is at least ``reps`` calls (more for fast calls: ROUND_S per round; the ranks agree on the
    count) between two barriers, so the slowest rank and the ranks' contention for shared cores count;
    the mean of ``rounds`` rounds (training pays the slow rounds too). Without ``hvd``: one process, no
    barriers."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    each = (time.perf_counter() - t0) / max(1, warmup)
    reps = max(reps, math.ceil(ROUND_S / max(each, 1e-6)))
    if hvd is not None:
        import torch

        reps = int(hvd.allreduce(torch.tensor([float(reps)]), op=hvd.Max).item())
    per_call = []
    for _ in range(rounds):
        if hvd is not None:
            hvd.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        if hvd is not None:
            hvd.barrier()
        per_call.append((time.perf_counter() - t0) / reps)
    return statistics.fmean(per_call)


def _probe_model(gpt: GPTConfig) -> GPTConfig:
    """The model with at most PROBE_LAYERS blocks: the same shapes per block at a fraction of the cost.
    (With 2 blocks the rate at large micro-batches came out 1.6x the full 4-block model's: half the
    weights and activations fit the caches better.)"""
    return dataclasses.replace(gpt, n_layer=min(gpt.n_layer, PROBE_LAYERS), dropout=0.0)


def _train_call(model: Any, idx: Any, **forward: Any) -> Callable[[], None]:
    """One forward+backward of ``model`` on the token ids ``idx`` (their own targets), as a training step;
    ``forward``: more arguments of the model's forward."""
    def step() -> None:
        model.zero_grad(set_to_none=True)
        _, loss = model(idx, idx, **forward)
        loss.backward()
    return step


def compute_rates(gpt: GPTConfig, seq_len: int, micro_batches: list[int], hvd: Any | None = None,
                  reps: int = 3) -> dict[int, float]:
    """Training FLOP/s (6N + attention per token, as MFU counts them) of a forward+backward per micro-batch,
    every rank of ``hvd``'s job computing at once."""
    import torch

    from hvdllm.models.gpt import GPT

    cfg = _probe_model(gpt)
    torch.manual_seed(0)
    model = GPT(cfg)
    flops_per_token = 6 * cfg.num_params(False) + 12 * cfg.n_layer * cfg.n_embd * seq_len
    out = {}
    for b in sorted(set(micro_batches)):
        step = _train_call(model, torch.randint(0, cfg.vocab_size, (b, seq_len)))
        out[b] = flops_per_token * b * seq_len / group_time(step, reps, hvd)
    return out


def tp_probe_s(gpt: GPTConfig, seq_len: int, micro_batches: list[int], hvd: Any, sets: dict[int, Any],
               reps: int = 2) -> dict[int, dict[int, float]]:
    """t -> micro-batch -> wall seconds of one forward+backward of the probe model's tensor-parallel shard
    (hvdllm.torch.parallel.parallelize_gpt) on a t-rank group, every rank of the job doing the same at
    once: the split compute, the replicated work and the tensor-parallel collectives as training runs
    them (the cost model attributes what exceeds the split compute to the collectives). ``sets``: group
    size -> this rank's process set of that size (None: the world); sizes that do not divide the heads
    and the vocabulary are skipped."""
    import torch

    from hvdllm.core.grid import Group
    from hvdllm.models.gpt import GPT
    from hvdllm.torch.parallel import parallelize_gpt

    cfg = _probe_model(gpt)
    out: dict[int, dict[int, float]] = {}
    for t, ps in sorted(sets.items()):
        if t < 2 or cfg.n_head % t or cfg.vocab_size % t:
            continue
        members = list(range(hvd.size())) if ps is None else list(ps.ranks)
        torch.manual_seed(0)
        model = parallelize_gpt(GPT(cfg), Group.of(members, hvd.rank(), hvd.size()))
        out[t] = {}
        for b in sorted(set(micro_batches)):
            step = _train_call(model, torch.randint(0, cfg.vocab_size, (b, seq_len)), gather_logits=False)
            out[t][b] = group_time(step, reps, hvd)
    return out


def optimizer_s_per_param(gpt: GPTConfig, reps: int = 3) -> float:
    """Seconds per parameter of one AdamW step (hvdllm.torch.optim, as the trainer uses it)."""
    import torch

    from hvdllm.models.gpt import GPT
    from hvdllm.torch.optim import AdamW

    model = GPT(_probe_model(gpt))
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = AdamW(params, lr=1e-4)
    return median_time(opt.step, reps) / sum(p.numel() for p in params)


def copy_bandwidth(nbytes: int = 16 * 2**20, reps: int = 3) -> float:
    import torch

    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    return nbytes / median_time(lambda: dst.copy_(src), reps)


def collective_fit(hvd: Any, kind: str, cap_bw: float, reps: int = 5) -> tuple[float, float]:
    """(latency per ring hop, link bytes/s) from the timed ``kind`` ("allreduce"|"broadcast") of two sizes.

    An all-reduce of S bytes on n ranks takes 2 (n-1) alpha + 2 (n-1)/n S / beta; a broadcast (the
    pipeline's point-to-point on a two-rank set) alpha + S / beta, fitted here on the world. Noise can
    make the fitted bandwidth absurd: it is capped at ``cap_bw`` (the host's copy bandwidth / 2).
    """
    import torch

    n = hvd.size()

    def run(nbytes: int) -> float:
        x = torch.ones(nbytes // 4)
        fn = (lambda: hvd.allreduce(x, op=hvd.Sum)) if kind == "allreduce" else (lambda: hvd.broadcast(x, 0))
        hvd.barrier()
        return median_time(fn, reps, warmup=2)

    t_small, t_large = run(SMALL), run(LARGE)
    dt = max(t_large - t_small, 1e-9)
    if kind == "allreduce":
        hops = 2 * (n - 1)
        return t_small / hops, min(cap_bw, 2 * (n - 1) / n * (LARGE - SMALL) / dt)
    return t_small, min(cap_bw, (LARGE - SMALL) / dt)


INSITU_LARGE = 2**20      # bytes of the larger in-situ all-reduce (a tensor-parallel activation's order)


def insitu_collective_s(hvd: Any, sets: dict[int, Any], cap_bw: float, reps: int = 15) -> dict[int, tuple[float, float]]:
    """(kappa(g), beta(g)): what an all-reduce adds after ~5 ms of matmuls on a set of g ranks, every
    rank doing the same at once - the cost a tensor- or pipeline-parallel collective has inside a step
    (the background thread's cycle, the peer's arrival, copies on shared cores) - fitted as a latency
    (SMALL bytes) and a bandwidth (INSITU_LARGE bytes, at most ``cap_bw``: noise can make the difference
    of the two vanish). ``sets``: group size -> this rank's process set of that size (None: the world)."""
    import torch

    a = torch.randn(320, 320)

    def compute() -> None:          # ~5 ms: a tensor-parallel block's share of compute between collectives
        for _ in range(4):
            a @ a

    base = group_time(compute, reps, hvd)
    out = {}
    for size, ps in sorted(sets.items()):
        kw = {} if ps is None else {"process_set": ps}
        cost = {}
        for nbytes in (SMALL, INSITU_LARGE):
            x = torch.ones(nbytes // 4)

            def step() -> None:
                compute()
                hvd.allreduce(x, op=hvd.Sum, **kw)

            cost[nbytes] = max(0.0, group_time(step, reps, hvd) - base)
        dt = max(cost[INSITU_LARGE] - cost[SMALL], 1e-9)
        out[size] = (cost[SMALL], min(cap_bw, (INSITU_LARGE - SMALL) / dt))
    return out


def idle_speedup(gpt: GPTConfig, seq_len: int, micro_batch: int, hvd: Any, reps: int = 3) -> dict[int, float]:
    """k -> how many times faster ranks 0..k-1 run a forward+backward of the probe model while the other
    ranks wait in a collective for them (as a pipeline's idle stages wait for an activation: polling, their
    Horovod threads cycling) than with every rank computing, for k = 1 .. size - 1. Ranks that share a
    core gain at most the core they leave; measured, the waiting ranks take part of it back (4 ranks
    pinned to 2 cores, small preset: 1.3-1.4x, 1.7x with the waiting ranks asleep)."""
    import torch

    from hvdllm.models.gpt import GPT

    cfg = _probe_model(gpt)
    torch.manual_seed(0)
    model = GPT(cfg)
    step = _train_call(model, torch.randint(0, cfg.vocab_size, (micro_batch, seq_len)))
    flag = torch.zeros(1)

    def phase(k: int) -> Callable[[], None]:
        def run() -> None:
            if hvd.rank() < k:
                step()
            hvd.allreduce(flag, op=hvd.Sum, name=f"plan.idle.{k}")
        return run

    busy = group_time(phase(hvd.size()), reps, hvd)
    return {k: busy / group_time(phase(k), reps, hvd) for k in range(1, hvd.size())}


def pp_exchange_fit(hvd: Any, pair: Any | None, cap_bw: float, reps: int = 10) -> tuple[float, float]:
    """(latency s, bandwidth B/s) of one pipeline exchange: a broadcast in a two-rank set whose receiver
    is already waiting (a ping-pong of SMALL and INSITU_LARGE bytes, every pair of the job at once).
    The in-situ kappa, where both ranks compute before the collective, also holds the ranks' skew,
    which a pipeline's slots already count (it priced 2-rank pipelines' exchanges ~2x high). The
    bandwidth is at most ``cap_bw`` (noise can make the two sizes' difference vanish)."""
    import torch

    members = sorted(pair.ranks) if pair is not None else [0, 1]
    kw = {} if pair is None else {"process_set": pair}

    def run(nbytes: int) -> float:
        x = torch.ones(nbytes // 4)

        def pingpong() -> None:
            for root in members:
                hvd.broadcast(x, root, name=f"plan.pingpong.{nbytes}.{root % 2}", **kw)
        return group_time(pingpong, reps, hvd) / 2

    t_small, t_large = run(SMALL), run(INSITU_LARGE)
    return t_small, min(cap_bw, (INSITU_LARGE - SMALL) / max(t_large - t_small, 1e-9))


def pair_members(ranks: int) -> list[tuple[int, ...]]:
    """The two-rank sets (0, 1), (2, 3), ... registered to measure kappa(2) when the world is larger (and
    even: every rank then has one, so all run the same collectives)."""
    return [(r, r + 1) for r in range(0, ranks, 2)] if ranks >= 4 and ranks % 2 == 0 else []


def dp_cycle_s(has_accelerator: bool) -> float:
    """Horovod's cycle time in a data-parallel job: the user's HOROVOD_CYCLE_TIME, else hvdllm's default."""
    from hvdllm.core.backends import horovod_env_defaults

    ms = os.environ.get("HOROVOD_CYCLE_TIME") or horovod_env_defaults(has_accelerator, False).get(
        "HOROVOD_CYCLE_TIME", "1")
    return float(ms) / 1000


def available_memory() -> float:
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _cores_by_rank(hvd: Any | None) -> list[list[int]]:
    """The cores each rank may run on (its affinity), by rank: what ``bind_cores`` pinned."""
    mine = allowed_cores()
    return hvd.allgather_object(mine) if hvd is not None and hvd.size() > 1 else [mine]


def measure(gpt: GPTConfig, seq_len: int, micro_batches: list[int], ranks: int, hvd: Any | None,
            note: Callable[[str], None] = lambda s: None, pair_set: Any | None = None,
            tp_micro_batches: list[int] | None = None, pp_micro_batches: list[int] | None = None,
            threads: int | None = None,
            bound: bool = False) -> dict[str, Any]:
    """The profile (a JSON-able dict) of this machine for ``ranks`` ranks; ``hvd`` an initialised
    hvdllm.torch module when running under a multi-rank launch, else None (assumed collectives);
    ``pair_set`` this rank's two-rank process set (:func:`pair_members`) when the world has 4+ ranks;
    ``threads`` per rank (default: the cores over the ranks on this host), ``bound`` when each rank is
    pinned to its share of the cores (``run.bind_cores``)."""
    import torch

    cores = os.cpu_count() or 1
    local = hvd.local_size() if hvd is not None else min(ranks, cores)
    threads = threads or max(1, cores // max(1, local))
    torch.set_num_threads(threads)
    assumed = []
    note(f"measuring FLOP/s at micro-batches {sorted(set(micro_batches))} ({threads} thread(s) per rank)")
    # every rank computes at once, as in training (Horovod's threads running): measured alone, two ranks
    # on two cores came out 1.3x faster than they train
    rates = compute_rates(gpt, seq_len, micro_batches, hvd if hvd is not None and hvd.size() > 1 else None)
    if hvd is None and ranks > cores:
        rates = {b: r * cores / ranks for b, r in rates.items()}
        assumed.append(f"flops_per_s scaled by {cores}/{ranks}: {ranks} ranks share {cores} cores")
    s_param = optimizer_s_per_param(gpt)
    bw = copy_bandwidth() / 2
    if hvd is not None and hvd.size() > 1:
        note(f"measuring allreduce and broadcast over {hvd.size()} ranks ({hvd.backend()})")
        ar_lat, ar_bw = collective_fit(hvd, "allreduce", bw)
        p2p_lat, p2p_bw = collective_fit(hvd, "broadcast", bw)
        sets = {hvd.size(): None, **({2: pair_set} if pair_set is not None else {})}
        insitu = insitu_collective_s(hvd, sets, cap_bw=ar_bw)
        note(f"measuring tensor-parallel shards on groups of {sorted(t for t in sets if t > 1)} ranks")
        tp = tp_probe_s(gpt, seq_len, micro_batches if tp_micro_batches is None else tp_micro_batches, hvd, sets)
        exchange = pp_exchange_fit(hvd, pair_set, cap_bw=bw) if hvd.size() == 2 or pair_set is not None else None
        idle = {}
        if pp_micro_batches:
            b_idle = sorted(pp_micro_batches)[len(pp_micro_batches) // 2]
            note(f"measuring the compute of ranks whose core-mates wait (micro-batch {b_idle})")
            idle = idle_speedup(gpt, seq_len, b_idle, hvd)
        backend = hvd.backend()
    else:
        ar_lat = p2p_lat = ASSUMED_LATENCY_S
        ar_bw = p2p_bw = bw
        insitu, tp, idle, exchange = {}, {}, {}, None
        backend = "assumed"
        if ranks > 1:
            assumed.append(f"collectives not measured (one process): latency {ASSUMED_LATENCY_S} s, bandwidth = "
                           "memory-copy bandwidth / 2; run under horovodrun -np N to measure them")
    mem = available_memory() / max(1, local if hvd is not None else ranks)
    accel = torch.cuda.device_count() > 0
    return {"version": PROFILE_VERSION, "host": platform.node(), "cpu_count": cores, "ranks": ranks,
            "backend": backend, "threads_per_rank": threads, "bind_cores": bound, "seq_len": seq_len,
            "model": dataclasses.asdict(gpt),
            "flops_per_s": {str(b): r for b, r in rates.items()}, "optimizer_s_per_param": s_param,
            "allreduce_latency_s": ar_lat, "allreduce_bw": ar_bw, "p2p_latency_s": p2p_lat, "p2p_bw": p2p_bw,
            "memory_bytes": mem, "overlap": 0.5 if accel else 0.0, "dp_cycle_s": dp_cycle_s(accel),
            "insitu_s": {str(g): v[0] for g, v in insitu.items()},
            "insitu_bw": {str(g): v[1] for g, v in insitu.items()},
            "tp_probe_s": {str(t): {str(b): v for b, v in by_b.items()} for t, by_b in tp.items()},
            "probe_layers": _probe_model(gpt).n_layer,
            "cores_by_rank": _cores_by_rank(hvd),
            "idle_speedup": {str(k): v for k, v in idle.items()},
            **({"pp_exchange_latency_s": exchange[0], "pp_exchange_bw": exchange[1]} if exchange else {}),
            "assumed": assumed}


def machine(profile: dict[str, Any]) -> Machine:
    """The cost model's Machine from a profile dict."""
    return Machine(flops_per_s={int(k): float(v) for k, v in profile["flops_per_s"].items()},
                   allreduce_latency_s=float(profile["allreduce_latency_s"]), allreduce_bw=float(profile["allreduce_bw"]),
                   p2p_latency_s=float(profile["p2p_latency_s"]), p2p_bw=float(profile["p2p_bw"]),
                   optimizer_s_per_param=float(profile["optimizer_s_per_param"]),
                   memory_bytes=float(profile["memory_bytes"]), overlap=float(profile.get("overlap", 0.0)),
                   dp_cycle_s=float(profile.get("dp_cycle_s", 0.0)),
                   insitu_s={int(k): float(v) for k, v in profile.get("insitu_s", {}).items()},
                   insitu_bw={int(k): float(v) for k, v in profile.get("insitu_bw", {}).items()},
                   cores=int(profile.get("cpu_count", 0)), threads_per_rank=int(profile.get("threads_per_rank", 1)),
                   measured_ranks=int(profile.get("ranks", 0)),
                   bound=bool(profile.get("bind_cores", False)),
                   tp_probe_s={int(t): {int(b): float(v) for b, v in by_b.items()}
                               for t, by_b in profile.get("tp_probe_s", {}).items()},
                   probe_layers=int(profile.get("probe_layers", 0)),
                   dp_flops_per_s={int(k): float(v) for k, v in profile.get("dp_flops_per_s", {}).items()},
                   idle_speedup={int(k): float(v) for k, v in profile.get("idle_speedup", {}).items()},
                   pp_exchange_latency_s=float(profile.get("pp_exchange_latency_s", 0.0)),
                   pp_exchange_bw=float(profile.get("pp_exchange_bw", 0.0)))


REQUIRED = ("flops_per_s", "allreduce_latency_s", "allreduce_bw", "p2p_latency_s", "p2p_bw",
            "optimizer_s_per_param", "memory_bytes")


def load_profile(path: str) -> dict[str, Any]:
    """A profile JSON written by ``hvdllm plan --profile`` (ValueError naming what is wrong)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--profile {path}: not a readable JSON profile ({e})") from None
    missing = [k for k in REQUIRED if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"--profile {path}: missing {', '.join(missing)}")
    try:
        m = machine(data)
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"--profile {path}: bad value ({e})") from None
    if not m.flops_per_s or min(m.flops_per_s.values()) <= 0 or m.allreduce_bw <= 0 or m.p2p_bw <= 0:
        raise ValueError(f"--profile {path}: flops_per_s and bandwidths must be > 0")
    return data


def save_profile(profile: dict[str, Any], path: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(profile, indent=1), encoding="utf-8")
    os.replace(tmp, p)
