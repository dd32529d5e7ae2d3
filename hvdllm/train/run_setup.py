"""Run set-up, shared by the torch and Keras trainers (framework-free): validation, data, tokenizer, the
checkpoint to resume, and the run directory.

Order of a run (both trainers): ``setup_run`` validates everything and loads the data (nothing is
written; every problem is a ConfigError -> exit 2), the trainer builds its model and step runner
(still nothing written), then ``create_run_dir`` writes the resolved config and tokenizer.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hvdllm.data import (TokenWindows, Tokenizer, check_source, load_windows, make_tokenizer, max_token,
                         save_tokenizer, tokenizer_from_dict)
from hvdllm.data.tokenizer import TOKENIZER_FILE
from hvdllm.core.elastic import launch_id
from hvdllm.core.grid import ProcessGrid
from hvdllm.models.config import GPTConfig
from hvdllm.train import checkpoint as ckpt
from hvdllm.train import resume
from hvdllm.train.config import SAVED_CONFIG, ConfigError, Plan, TrainConfig, plan, resolved, to_toml
from hvdllm.train.progress import say, warn


def rank_threads(hvd: Any, bind: bool, threads: int = 0) -> int:
    """Compute threads of this rank (``threads``, else its share of the host's cores), after pinning it to
    that share when ``bind`` (``run.bind_cores``); ``hvd`` an initialised hvdllm.torch/tensorflow."""
    share = hvd.bind_to_cores() if bind else None
    return threads or (len(share) if share else hvd.threads_per_rank())


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
    data: dict[str, Any]       # the token stream's fingerprint (TokenWindows.fingerprint), checked on resume
    init_from: Path | None = None                     # --init-from's checkpoint (fresh starts only)
    init_weights: dict[str, np.ndarray] | None = None  # its weights, PyTorch names and layouts

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

    def checkpoint_meta(self, step: int) -> dict[str, Any]:
        """What a checkpoint of ``step`` records about this run (checked by the next --resume)."""
        return resume.run_meta(self.cfg, self.gpt, self.data, step, len(self.windows.train_ids), self.size)

    def write_checkpoint(self, step: int, files: dict[str, dict[str, np.ndarray]], meta: dict[str, Any]) -> Path:
        """Write a checkpoint of ``step`` (rank 0) with the run's tokenizer, keeping run.keep_checkpoints."""
        tok = (self.run_dir / TOKENIZER_FILE).read_bytes()
        return ckpt.write_checkpoint(self.run_dir, step, files, meta, extra_files={TOKENIZER_FILE: tok},
                                     keep=self.cfg.run.keep_checkpoints)


ELASTIC_JOB_FILE = ".elastic_job"   # which elastic launch owns the run directory (see joins_running_job)


def joins_running_job(cfg: TrainConfig, run_dir: Path) -> bool:
    """--elastic: True when ``run_dir`` belongs to this very elastic launch (hvdllm.core.elastic.launch_id),
    so a worker added later finds the checkpoints its peers wrote and joins them instead of refusing."""
    mine = launch_id() if cfg.run.elastic else None
    try:
        return mine is not None and (run_dir / ELASTIC_JOB_FILE).read_text().strip() == mine
    except OSError:
        return False


def check_writable(run_dir: Path) -> None:
    """ConfigError unless ``run_dir`` is, or can be created as, a writable directory (the nearest existing
    ancestor must be a writable directory)."""
    for d in (run_dir, *run_dir.absolute().parents):
        if not d.exists():
            continue
        if not d.is_dir():
            where = "exists" if d == run_dir else f"{d} exists"
            raise ConfigError(f"--out {run_dir}: {where} and is not a directory; allowed: a directory path")
        if not os.access(d, os.W_OK | os.X_OK):
            raise ConfigError(f"--out {run_dir}: {d} is not writable by this user")
        return


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
    check_writable(run_dir)

    resume_from, meta = None, None
    if cfg.run.resume:          # the newest checkpoint that verifies (rank 0 checks and warns; all agree)
        resume_from, meta = resume.agree_on_checkpoint(run_dir, rank, size, warn, broadcast_object)
        resume.check_layout(meta, resume_from, cfg, p)
    elif ckpt.list_checkpoints(run_dir) and not joins_running_job(cfg, run_dir):
        raise ConfigError(f"--out {run_dir}: already holds checkpoints; pass --resume to continue that run "
                          "or choose another --out")

    init_from, init_meta = (None, None) if resume_from is not None else _init_checkpoint(cfg.run.init_from)

    # Tokenizer: the checkpoint's when resuming or starting from one (unless data.tokenizer_file names
    # another); otherwise built once (a BPE is trained on rank 0 only).
    try:
        given = resume_from or (init_from if not cfg.data.tokenizer_file else None)
        if given is not None and (given / TOKENIZER_FILE).is_file():
            import json
            tok: Tokenizer = tokenizer_from_dict(json.loads((given / TOKENIZER_FILE).read_text()))
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
        resume.check_framework_and_shape(meta, resume_from, cfg, gpt)
    init_weights = None
    if init_meta is not None:
        bad = resume.shape_mismatch(init_meta.get("model", {}), gpt)
        if bad:
            raise ConfigError(f"--init-from {cfg.run.init_from}: {bad}")
        init_weights = ckpt.read_checkpoint(init_from)[0][MODEL_FILE[: -len('.safetensors')]]

    try:
        windows = load_windows(cfg.data, tok, seq_len, cfg.run.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if check_source(cfg.data.path) == "tokens":
        top = max_token(windows)
        if top >= gpt.vocab_size:
            raise ConfigError(f"--data {cfg.data.path}: holds token id {top}, beyond model.vocab_size={gpt.vocab_size}")
    data = windows.fingerprint()
    if meta is not None:
        resume.check_run(meta, resume_from, cfg, data)

    return RunSetup(cfg=resolved(cfg, gpt.vocab_size), gpt=gpt, plan=p, tokenizer=tok, windows=windows,
                    run_dir=run_dir, resume_from=resume_from, start_step=int(meta["step"]) if meta else 0,
                    rank=rank, size=size, data=data, init_from=init_from, init_weights=init_weights)


MODEL_FILE = "model.safetensors"


def _init_checkpoint(path: str | None) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint ``--init-from`` names (a checkpoint folder, or a run folder's newest) and its meta."""
    if not path:
        return None, None
    if not Path(path).exists():
        raise ConfigError(f"--init-from {path}: no such file or directory; allowed: a run directory or a "
                          "checkpoints/step_N folder, of either framework")
    found = ckpt.resolve_checkpoint(path)
    if found is None or not (found / MODEL_FILE).is_file():
        raise ConfigError(f"--init-from {path}: no checkpoint there; allowed: a run directory or a "
                          "checkpoints/step_N folder, of either framework")
    return found, ckpt.read_meta(found)


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
    job = launch_id() if s.cfg.run.elastic else None
    if job is not None:
        (s.run_dir / ELASTIC_JOB_FILE).write_text(job + "\n")
    say(f"hvdllm train: {s.size} rank(s), data-parallel {s.plan.dp_size}, tp {s.cfg.parallel.tp}, "
        f"pp {s.cfg.parallel.pp}; {s.cfg.batch.global_batch} sequences x {s.windows.seq_len} tokens per step "
        f"(micro-batch {s.cfg.batch.micro_batch} x {s.plan.accum} accumulation x {s.plan.dp_size} ranks); "
        f"{s.gpt.num_params() / 1e6:.2f}M parameters; {s.windows.n_tokens} tokens "
        f"({len(s.windows.train_ids)} train / {len(s.windows.val_ids)} validation windows)")
    if s.resume_from is not None:
        say(f"resuming from {s.resume_from} (step {s.start_step})")
    elif s.init_from is not None:
        say(f"initial weights from {s.init_from}")
    say(f"resolved config (saved as {s.run_dir / SAVED_CONFIG}):\n{text}")
