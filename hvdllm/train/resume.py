"""What ``--resume`` checks before anything is written, for the torch and Keras trainers alike.

A checkpoint records what it was trained on (:func:`run_meta`); a resume refuses, with one line naming
both values (exit 2), a checkpoint of another framework, model shape or layout that cannot load, and --
unless the user allows it with ``run.allow_batch_change`` / ``run.allow_seed_change`` /
``run.allow_data_change`` -- another global batch, seed or data (token count and sha256 of the tokens).
The allowances are not inherited by later resumes (config.files.NOT_INHERITED).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from hvdllm.models.config import GPTConfig
from hvdllm.train import checkpoint as ckpt
from hvdllm.train.config import ConfigError, Plan, TrainConfig

# How the optimizer state is stored: "index" = the framework's state of the whole model (data parallel);
# "unsplit" = keyed by parameter name, moments of the unsplit model (any tp x pp layout loads it).
OPTIMIZER_FORMATS = {False: "index", True: "unsplit"}


def layout_text(dp: int, tp: int, pp: int) -> str:
    return f"dp={dp} x tp={tp} x pp={pp}"


def pick_checkpoint(run_dir: Path, warn: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint in ``run_dir`` that verifies, and its meta; ConfigError when there is none."""
    found, bad = ckpt.newest_verified(run_dir, warn)
    if found is None:
        if bad:
            raise ConfigError(f"--resume: no checkpoint in {run_dir / ckpt.CHECKPOINTS} verifies "
                              f"({len(bad)} corrupt, newest {bad[0].name}); run without --resume into another --out")
        raise ConfigError(f"--resume: {run_dir} holds no checkpoint to resume; run without --resume to start fresh")
    return found, ckpt.read_meta(found)


def agree_on_checkpoint(run_dir: Path, rank: int, size: int, warn: Callable[[str], None],
                        broadcast_object: Callable[[Any, int], Any] | None) -> tuple[Path, dict[str, Any]]:
    """:func:`pick_checkpoint` on rank 0 only (one rank reads and hashes the files; it warns), its verdict
    -- the checkpoint or the error -- shared with every rank, so all ranks resume the same step or all
    stop with the same line. Each rank still verifies the files it loads (checkpoint.read_checkpoint)."""
    if size == 1 or broadcast_object is None:
        return pick_checkpoint(run_dir, warn)
    verdict = ("", "")
    if rank == 0:
        try:
            verdict = ("ok", str(pick_checkpoint(run_dir, warn)[0]))
        except ConfigError as e:
            verdict = ("error", str(e))
    kind, value = broadcast_object(verdict, 0)
    if kind == "error":
        raise ConfigError(value)
    return Path(value), ckpt.read_meta(value)


def run_meta(cfg: TrainConfig, gpt: GPTConfig, data: dict[str, Any], step: int, n_train: int,
             world_size: int) -> dict[str, Any]:
    """What every checkpoint records about its run (the trainers add framework-specific state)."""
    g = cfg.batch.global_batch
    return {"model": dataclasses.asdict(gpt), "config": cfg.to_dict(), "data": data, "world_size": world_size,
            "data_position": {"step": step, "samples": step * g, "epoch": step * g / n_train,
                              "n_tokens": data["tokens"]}}


def _data_text(d: dict[str, Any]) -> str:
    return f"{d['tokens']} tokens in {d['files']} file(s), sha256 {str(d['sha256'])[:12]}"


def shape_mismatch(saved: dict[str, Any], gpt: GPTConfig) -> str | None:
    for f in dataclasses.fields(GPTConfig):
        if f.name in ("dropout",):
            continue
        if f.name in saved and saved[f.name] != getattr(gpt, f.name):
            return f"model.{f.name}={saved[f.name]} in the checkpoint, {getattr(gpt, f.name)} in this run"
    return None


def check_framework_and_shape(meta: dict[str, Any], where: Path, cfg: TrainConfig, gpt: GPTConfig) -> None:
    """Refuse a checkpoint of the other framework or of another model shape (its weights cannot load)."""
    if meta.get("framework", cfg.run.framework) != cfg.run.framework:
        raise ConfigError(f"--resume: {where} was written by --framework {meta['framework']}, "
                          f"this run uses --framework {cfg.run.framework}")
    bad = shape_mismatch(meta.get("model", {}), gpt)
    if bad:
        raise ConfigError(f"--resume from {where}: {bad}")


def check_layout(meta: dict[str, Any], where: Path, cfg: TrainConfig, p: Plan) -> None:
    """Refuse a checkpoint whose optimizer state this layout cannot load: data-parallel checkpoints
    resume data-parallel runs (any world size), model-parallel ones any tp x pp run."""
    par = meta.get("config", {}).get("parallel", {})
    tp, pp = int(par.get("tp", 1)), int(par.get("pp", 1))
    theirs = layout_text(int(meta.get("world_size", tp * pp)) // (tp * pp), tp, pp)
    ours = layout_text(p.dp_size, cfg.parallel.tp, cfg.parallel.pp)
    saved = meta.get("optimizer_format") or ("index" if tp == pp == 1 else None)
    if saved is None:      # written before model-parallel checkpoints held the whole optimizer state
        raise ConfigError(f"--resume from {where}: written by layout {theirs} with only rank 0's "
                          f"optimizer shard; it cannot be resumed (this run is {ours})")
    if saved != OPTIMIZER_FORMATS[cfg.parallel.tp * cfg.parallel.pp > 1]:
        raise ConfigError(f"--resume from {where}: written by layout {theirs}, this run is {ours}; "
                          f"allowed: resume with --tp {tp} --pp {pp}")


def check_run(meta: dict[str, Any], where: Path, cfg: TrainConfig, data: dict[str, Any]) -> None:
    """Refuse another global batch, seed or data than the checkpoint's, unless run.allow_* says so."""
    saved = meta.get("config", {})
    r = cfg.run
    batch = saved.get("batch", {}).get("global_batch")
    if batch is not None and batch != cfg.batch.global_batch and not r.allow_batch_change:
        raise ConfigError(f"--resume from {where}: batch.global_batch={batch} in the checkpoint, "
                          f"{cfg.batch.global_batch} in this run; allowed: --global-batch {batch}, "
                          "or --set run.allow_batch_change=true")
    seed = saved.get("run", {}).get("seed")
    if seed is not None and seed != r.seed and not r.allow_seed_change:
        raise ConfigError(f"--resume from {where}: run.seed={seed} in the checkpoint, {r.seed} in this run; "
                          f"allowed: --set run.seed={seed}, or --set run.allow_seed_change=true")
    theirs = meta.get("data")
    if theirs is not None and theirs != data and not r.allow_data_change:
        raise ConfigError(f"--resume from {where}: data {_data_text(theirs)} in the checkpoint, {_data_text(data)} "
                          f"in this run (--data {cfg.data.path or '(embedded corpus)'}); allowed: the same data, "
                          "or --set run.allow_data_change=true")
