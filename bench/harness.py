"""Scaffolding the benches share, so that each bench holds only what it compares.

- Interleaved rounds: round r runs every variant once, the order rotated by r, so that drifting machine
  load hits all variants alike (the benches print medians and their ratios side by side).
- In-process timing of step functions in such rounds (the optimizer benches).
- Launching a bench's own worker on N ranks (horovodrun --gloo, torchrun, mpirun or one process), each
  rank writing its result to one JSON file (the launchers interleave the ranks' stdout).
- The data-parallel benches' GPT, rank start-up and timed training loop.

A bench imports it as ``from harness import ...`` (a script's folder leads ``sys.path``); importing it
puts this checkout first on ``sys.path``, so the bench measures this checkout's hvdllm, not an installed one.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

# The data-parallel benches' GPT (hvdllm.models.gpt): ~3.2M parameters, 128-token sequences.
GPT_DIMS = dict(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=256)
LAUNCHERS = ("gloo", "torchrun", "mpirun", "python")


def interleaved(names: Sequence[str], rounds: int) -> Iterator[tuple[int, str]]:
    """(round, name) for ``rounds`` rounds of every name, round r's order rotated by r."""
    for r in range(rounds):
        k = r % len(names)
        for name in [*names[k:], *names[:k]]:
            yield r, name


def time_interleaved(variants: dict[str, Callable[[], None]], rounds: int, sync: Callable[[], None] = lambda: None,
                     warmup: int = 2) -> dict[str, list[float]]:
    """Milliseconds per call of each variant, one call per round in :func:`interleaved` order, after
    ``warmup`` untimed calls each (tracing, compilation, state allocation, first touches). ``sync``
    waits for queued device work (a GPU's) before and after each timed call."""
    for step in variants.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _, k in interleaved(list(variants), rounds):
        sync()
        t0 = time.perf_counter()
        variants[k]()
        sync()
        times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def gpt_shapes(target_params: int) -> list[tuple[int, ...]]:
    """Shapes of a GPT-2-style model with about ``target_params`` parameters (embeddings, per-layer
    LayerNorms, qkv/proj/fc weights and biases: many tensors of mixed sizes)."""
    d, vocab, ctx = (384, 8192, 512) if target_params < 30e6 else (768, 32768, 1024)
    per_layer = 12 * d * d + 13 * d
    layers = max(1, round((target_params - (vocab + ctx) * d) / per_layer))
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def step_parser(description: str, optimizers: Sequence[str], rounds: int, rounds_help: str) -> argparse.ArgumentParser:
    """The options of the optimizer-step benches: model sizes, optimizers, interleaved rounds."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--sizes", type=int, nargs="+", default=[25], help="millions of parameters")
    ap.add_argument("--optimizers", nargs="+", default=list(optimizers), choices=list(optimizers))
    ap.add_argument("--rounds", type=int, default=rounds, help=rounds_help)
    return ap


def comma_list(ap: argparse.ArgumentParser, value: str, allowed: Sequence[str], flag: str) -> list[str]:
    """``value``'s comma-separated names, each one of ``allowed`` (else the parser's usage error)."""
    names = [m.strip() for m in value.split(",") if m.strip()]
    bad = [m for m in names if m not in allowed]
    if bad:
        ap.error(f"{flag} has {bad}; allowed: {', '.join(allowed)}")
    return names


def launch_parser(description: str, modes: Sequence[str], default_modes: Sequence[str], rounds: int, steps: int,
                  warmup: int, timeout: float) -> argparse.ArgumentParser:
    """The options every launching bench takes (its worker's mode, rounds, steps, batch, modes, timeout)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--worker", choices=modes, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--batch", type=int, default=8, help="sequences of 128 tokens per rank and step")
    ap.add_argument("--modes", default=",".join(default_modes), help="comma list of " + ",".join(modes))
    ap.add_argument("--timeout", type=float, default=timeout)
    return ap


def worker_argv(script: str, mode: str, args: argparse.Namespace, *extra: str) -> list[str]:
    """``script``'s own command line as the worker of ``mode`` (the options of :func:`launch_parser`)."""
    return [str(Path(script).resolve()), "--worker", mode, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--batch", str(args.batch), *extra]


def launch(launcher: str, np_: int, argv: Sequence[str], timeout: float) -> list[dict] | None:
    """Run ``python argv`` on ``np_`` ranks: ``launcher`` "gloo" (horovodrun --gloo), "torchrun"
    (--standalone; gloo), "mpirun" (hvdllm's mpi4py backend) or "python" (one process). Returns every
    rank's :func:`report` by rank, or None, with the output on stderr, when a rank did not report."""
    with tempfile.TemporaryDirectory(prefix="hvdllm-bench-") as out:
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", BENCH_OUT=out,
                   OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", TF_CPP_MIN_LOG_LEVEL="2")
        env.pop("HVDLLM_BACKEND", None)
        py = [sys.executable, *argv]
        if launcher == "gloo":
            cmd = [str(BIN / "horovodrun"), "-np", str(np_), "--gloo", *py]
        elif launcher == "torchrun":
            cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(np_), *argv]
        elif launcher == "mpirun":
            cmd = ["mpirun", "-np", str(np_), "--oversubscribe", "--bind-to", "none", *py]
            env["HVDLLM_BACKEND"] = "mpi"
        elif launcher == "python" and np_ == 1:
            cmd = py
        else:
            raise ValueError(f"launcher {launcher!r} with np={np_}; allowed: {', '.join(LAUNCHERS)} (python: np=1)")
        proc = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout)
        results = {r["rank"]: r for r in (json.loads(f.read_text()) for f in Path(out).glob("rank*.json"))}
    if sorted(results) != list(range(np_)):
        print(f"{launcher} np={np_} {' '.join(argv[1:])} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
              f"{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return [results[r] for r in range(np_)]


def report(result: dict[str, Any]) -> None:
    """A worker rank's result (it holds its "rank"): one JSON file in the launching bench's folder."""
    Path(os.environ["BENCH_OUT"], f"rank{result['rank']}.json").write_text(json.dumps(result))


def start_ranks(kind: str) -> tuple[Any, int, int]:
    """Start this rank as ``kind``: "hvdllm" (hvdllm.torch), "horovod" (horovod.torch), "ddp"
    (torch.distributed on gloo) or "single" (one process), with torch on cores / local ranks threads.
    Returns (the hvd module, None for ddp and single; rank; size)."""
    import torch

    from hvdllm.core.world import available_cores

    hvd = None
    if kind in ("hvdllm", "horovod"):
        hvd = importlib.import_module("hvdllm.torch" if kind == "hvdllm" else "horovod.torch")
        hvd.init()
        rank, size, local = hvd.rank(), hvd.size(), hvd.local_size()
    elif kind == "ddp":
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, size, local = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_WORLD_SIZE"])
    elif kind == "single":
        rank, size, local = 0, 1, 1
    else:
        raise ValueError(f"kind={kind!r}; allowed: hvdllm, horovod, ddp, single")
    torch.set_num_threads(max(1, available_cores() // local))
    return hvd, rank, size


def bench_gpt() -> Any:
    """The benches' GPT (:data:`GPT_DIMS`) with seeded weights: every run starts from the same ones."""
    import torch

    from hvdllm.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(**GPT_DIMS))


def train_timed(model: Any, opt: Any, rank: int, batch: int, steps: int, warmup: int) -> tuple[float, float, int]:
    """``warmup`` untimed and ``steps`` timed training steps on random tokens (8 batches of ``batch``
    sequences, seeded by rank); returns (seconds of the timed steps, the last loss, this rank's tokens in
    them)."""
    import torch

    vocab, block = GPT_DIMS["vocab_size"], GPT_DIMS["block_size"]
    data = torch.randint(0, vocab, (8, batch, block + 1), generator=torch.Generator().manual_seed(1 + rank))

    def step(i: int) -> float:
        xy = data[i % len(data)]
        opt.zero_grad()  # horovod 0.28.1's wrapper rejects set_to_none=; True is torch's default
        _, loss = model(xy[:, :-1], xy[:, 1:])
        loss.backward()
        opt.step()
        return loss.item()

    for i in range(warmup):
        step(i)
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(warmup + i)
    return time.perf_counter() - t0, loss, steps * batch * block
