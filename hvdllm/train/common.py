"""What the torch and Keras trainers share, framework-free: run set-up and validation, the run
directory, progress reporting, throughput and MFU.

Order of a run (both trainers): ``setup_run`` validates everything and loads the data (nothing is
written; every problem is a ConfigError -> exit 2), the trainer builds its model and step runner
(still nothing written), then ``create_run_dir`` writes the resolved config and tokenizer.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from hvdllm.data import (TokenWindows, Tokenizer, check_source, load_windows, make_tokenizer, max_token,
                         save_tokenizer, tokenizer_from_dict)
from hvdllm.data.tokenizer import TOKENIZER_FILE
from hvdllm.core.grid import ProcessGrid
from hvdllm.models.config import GPTConfig
from hvdllm.train import checkpoint as ckpt
from hvdllm.train.config import SAVED_CONFIG, ConfigError, Plan, TrainConfig, plan, resolved, to_toml


@dataclasses.dataclass
class RunSetup:
    """A validated run, before anything is written."""

    cfg: TrainConfig           # resolved: model shape and seq_len filled in
    gpt: GPTConfig
    plan: Plan
    tokenizer: Tokenizer
    windows: TokenWindows
    run_dir: Path
    resume_from: Path | None   # checkpoint to load, or None for a fresh start
    start_step: int
    rank: int
    size: int

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def grid(self) -> ProcessGrid:
        """The dp x tp x pp grid of this job (hvdllm.core.grid's rank layout)."""
        return self.plan.grid

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index: which slice of the global batch it reads."""
        return self.grid.coords(self.rank).dp


def _shape_mismatch(saved: dict[str, Any], gpt: GPTConfig) -> str | None:
    for f in dataclasses.fields(GPTConfig):
        if f.name in ("dropout",):
            continue
        if f.name in saved and saved[f.name] != getattr(gpt, f.name):
            return f"model.{f.name}={saved[f.name]} in the checkpoint, {getattr(gpt, f.name)} in this run"
    return None


def setup_run(cfg: TrainConfig, rank: int, size: int,
              broadcast_object: Callable[[Any, int], Any] | None = None) -> RunSetup:
    """Validate ``cfg`` for ``size`` ranks, pick the checkpoint to resume, build tokenizer and data.

    Every rank runs this and reaches the same verdict. ``broadcast_object(obj, root)`` shares rank 0's
    trained BPE (training it once). Raises ConfigError for bad input; writes nothing.
    """
    p = plan(cfg, size)
    run_dir = Path(cfg.run.out)
    try:
        check_source(cfg.data.path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir}: exists and is not a directory")

    resume_from, meta = None, None
    if cfg.run.resume:
        resume_from = ckpt.latest_checkpoint(run_dir)
        if resume_from is not None:
            meta = ckpt.read_meta(resume_from)
            if meta.get("framework", cfg.run.framework) != cfg.run.framework:
                raise ConfigError(f"--resume: {resume_from} was written by --framework {meta['framework']}, "
                                  f"this run uses --framework {cfg.run.framework}")
    elif ckpt.list_checkpoints(run_dir):
        raise ConfigError(f"--out {run_dir}: already holds checkpoints; pass --resume to continue that run "
                          "or choose another --out")

    # Tokenizer: the checkpoint's when resuming; otherwise built once (a BPE is trained on rank 0 only).
    try:
        if resume_from is not None and (resume_from / TOKENIZER_FILE).is_file():
            import json
            tok: Tokenizer = tokenizer_from_dict(json.loads((resume_from / TOKENIZER_FILE).read_text()))
        elif cfg.data.tokenizer == "bpe" and not cfg.data.tokenizer_file and broadcast_object is not None and size > 1:
            blob = make_tokenizer(cfg.data).to_dict() if rank == 0 else {}   # (same type on every rank)
            tok = tokenizer_from_dict(broadcast_object(blob, 0))
        else:
            tok = make_tokenizer(cfg.data)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    gpt = cfg.gpt_config(tok.vocab_size if tok.kind == "bpe" else None)
    if gpt.vocab_size < tok.vocab_size:
        raise ConfigError(f"model.vocab_size={gpt.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({tok.vocab_size}, data.tokenizer={tok.kind})")
    seq_len = cfg.data.seq_len or gpt.block_size
    if seq_len > gpt.block_size:
        raise ConfigError(f"data.seq_len={seq_len} is longer than the model's context (model.block_size={gpt.block_size})")
    if meta is not None:
        bad = _shape_mismatch(meta.get("model", {}), gpt)
        if bad:
            raise ConfigError(f"--resume from {resume_from}: {bad}")

    try:
        windows = load_windows(cfg.data, tok, seq_len, cfg.run.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if check_source(cfg.data.path) == "tokens":
        top = max_token(windows)
        if top >= gpt.vocab_size:
            raise ConfigError(f"--data {cfg.data.path}: holds token id {top}, beyond model.vocab_size={gpt.vocab_size}")

    return RunSetup(cfg=resolved(cfg, gpt.vocab_size), gpt=gpt, plan=p, tokenizer=tok, windows=windows,
                    run_dir=run_dir, resume_from=resume_from, start_step=int(meta["step"]) if meta else 0,
                    rank=rank, size=size)


def create_run_dir(s: RunSetup) -> None:
    """Rank 0 creates the run directory and saves the resolved config and tokenizer; it prints the config."""
    if not s.is_root:
        return
    s.run_dir.mkdir(parents=True, exist_ok=True)
    text = to_toml(s.cfg)
    tmp = s.run_dir / f".{SAVED_CONFIG}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, s.run_dir / SAVED_CONFIG)
    save_tokenizer(s.tokenizer, s.run_dir)
    say(f"hvdllm train: {s.size} rank(s), data-parallel {s.plan.dp_size}, tp {s.cfg.parallel.tp}, "
        f"pp {s.cfg.parallel.pp}; {s.cfg.batch.global_batch} sequences x {s.windows.seq_len} tokens per step "
        f"(micro-batch {s.cfg.batch.micro_batch} x {s.plan.accum} accumulation x {s.plan.dp_size} ranks); "
        f"{s.gpt.num_params() / 1e6:.2f}M parameters; {s.windows.n_tokens} tokens "
        f"({len(s.windows.train_ids)} train / {len(s.windows.val_ids)} validation windows)")
    if s.resume_from is not None:
        say(f"resuming from {s.resume_from} (step {s.start_step})")
    say(f"resolved config (saved as {s.run_dir / SAVED_CONFIG}):\n{text}")


def say(msg: str) -> None:
    print(msg, flush=True)


# -- throughput and MFU -------------------------------------------------------------------------------
# Dense bf16/fp16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' data sheets.
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
    "L40": 181e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
    "V100": 125e12, "T4": 65e12,
}


def cpu_peak_flops(threads: int) -> float:
    """A rough fp32 peak for ``threads`` cores: clock x FMA lanes (AVX-512: 64, AVX2: 32 FLOP/cycle)."""
    mhz, flags = 2500.0, ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz") and mhz == 2500.0:
                    mhz = float(line.split(":")[1])
                elif line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        pass
    per_cycle = 64 if "avx512f" in flags else 32 if "avx2" in flags else 16
    return threads * mhz * 1e6 * per_cycle


def peak_flops(configured: float, device_name: str | None, threads: int) -> tuple[float, str]:
    """Peak FLOP/s of one rank and where the number comes from: run.peak_flops, HVDLLM_PEAK_FLOPS,
    the GPU table above, or a CPU estimate."""
    if configured > 0:
        return configured, "run.peak_flops"
    env = os.environ.get("HVDLLM_PEAK_FLOPS")
    if env:
        try:
            return float(env), "HVDLLM_PEAK_FLOPS"
        except ValueError:
            pass
    if device_name:
        for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):
            if key in device_name:
                return GPU_PEAK_FLOPS[key], f"{key} data sheet"
        return 0.0, "unknown GPU (set run.peak_flops)"
    return cpu_peak_flops(threads), f"CPU estimate for {threads} thread(s)"


class Throughput:
    """Tokens/s and MFU between two log points."""

    def __init__(self, flops_per_token: float, peak_per_rank: float, ranks: int) -> None:
        self.fpt, self.peak, self.ranks = flops_per_token, peak_per_rank, ranks
        self._t, self._tokens = time.perf_counter(), 0
        self.start = self._t

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def read(self) -> tuple[float, float | None]:
        now = time.perf_counter()
        dt = max(now - self._t, 1e-9)
        tps = self._tokens / dt
        self._t, self._tokens = now, 0
        mfu = tps * self.fpt / (self.peak * self.ranks) if self.peak > 0 else None
        return tps, mfu

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class Progress:
    """A tqdm bar on rank 0 when stderr is a terminal, else one plain line per log step (readable under
    horovodrun/mpirun, which collect output line by line). Other ranks print nothing."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.enabled, self.total, self._bar = enabled, total, None
        force = os.environ.get("HVDLLM_PROGRESS", "")
        if enabled and (force == "tqdm" or (force != "lines" and sys.stderr.isatty())):
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
            except ImportError:
                self._bar = None

    def step(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def show(self, step: int, loss: float, tps: float, mfu: float | None, val: float | None = None,
             lr: float | None = None) -> None:
        if not self.enabled:
            return
        parts = {"loss": f"{loss:.4f}", "tok/s": f"{tps:,.0f}", "mfu": f"{100 * mfu:.2f}%" if mfu is not None else "n/a"}
        if val is not None:
            parts["val"] = f"{val:.4f}"
        if lr is not None:
            parts["lr"] = f"{lr:.2e}"
        if self._bar is not None:
            self._bar.set_postfix(parts, refresh=True)
        else:
            say(f"step {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in parts.items()))

    def note(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            say(msg)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def should_log(step: int, cfg: TrainConfig) -> bool:
    return step % cfg.run.log_interval == 0 or step == cfg.run.max_steps


def should_eval(step: int, cfg: TrainConfig) -> bool:
    return (cfg.run.eval_interval > 0 and step % cfg.run.eval_interval == 0) or step == cfg.run.max_steps


def should_checkpoint(step: int, cfg: TrainConfig) -> bool:
    return ((cfg.run.checkpoint_interval > 0 and step % cfg.run.checkpoint_interval == 0)
            or step == cfg.run.max_steps or step == cfg.run.exit_at_step)


class LossLog:
    """Per-step losses until the next metrics row: local values, averaged over the ranks in one
    collective per row (or at a checkpoint, which stores them so a resumed run logs the same means).

    ``average(vec)`` is the trainer's allreduce-mean of a float64 numpy vector over the ranks
    (called only when ``size`` > 1), so this bookkeeping is written once for torch and Keras.
    """

    def __init__(self, size: int, average: Callable[[Any], Any]) -> None:
        self.size, self._average, self._local, self._global = size, average, [], []

    def add(self, local_mean: Any) -> None:
        self._local.append(float(local_mean))

    def pending(self) -> list[float]:
        """Average the local values over ranks (a collective) and return all unlogged global values."""
        if self._local:
            import numpy as np

            vec = np.asarray(self._local, dtype=np.float64)
            if self.size > 1:
                vec = np.asarray(self._average(vec), dtype=np.float64)
            self._global.extend(float(v) for v in vec.tolist())
            self._local = []
        return list(self._global)

    def restore(self, values: list[float]) -> None:
        self._local, self._global = [], [float(v) for v in values]

    def mean(self) -> float:
        """The mean of the unlogged steps' global-batch losses; clears them."""
        values = self.pending()
        self._global = []
        return sum(values) / len(values) if values else float("nan")


SAMPLE_FILE = "sample.txt"


def write_sample(run_dir: Path, prompt: str, text: str) -> None:
    (run_dir / SAMPLE_FILE).write_text(text, encoding="utf-8")
    say(f"--- sample (prompt {prompt!r}) ---\n{text}\n--- end of sample ---")
