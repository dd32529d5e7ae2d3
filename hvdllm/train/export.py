"""`hvdllm export`: a checkpoint (either framework) as a Hugging Face GPT-2 folder or a nanoGPT ckpt.pt.

``--format hf`` writes ``config.json`` + ``model.safetensors`` (``GPT2LMHeadModel.from_pretrained(DIR)``);
``--format nanogpt`` writes ``ckpt.pt`` (nanoGPT's ``out_dir`` layout: ``model``, ``model_args``,
``iter_num``). Both also get ``hvdllm_tokenizer.json`` (hvdllm's tokenizer; the byte tokenizer's ids are
the UTF-8 bytes). The folder is written aside and renamed into place; an existing ``--out`` is refused.
Name and layout mapping: :mod:`hvdllm.models.export`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from hvdllm.data.tokenizer import TOKENIZER_FILE
from hvdllm.models.config import GPTConfig
from hvdllm.models.export import (check_exportable, hf_gpt2_config, hf_gpt2_tensors, nanogpt_model_args,
                                  nanogpt_state_dict)
from hvdllm.train import checkpoint as ckpt
from hvdllm.train.config import ConfigError


def export_checkpoint(checkpoint: str, fmt: str, out: str) -> Path:
    """Write the model of ``checkpoint`` (a checkpoint folder, or a run folder's newest) in ``fmt`` to ``out``."""
    found = ckpt.resolve_checkpoint(checkpoint)
    if found is None:
        raise ConfigError(f"--checkpoint {checkpoint}: no checkpoint there (expected a checkpoints/step_N folder "
                          "or a run folder holding one)")
    dest = Path(out)
    if dest.exists():
        raise ConfigError(f"--out {out}: already exists; allowed: a path that does not exist yet")
    meta = ckpt.read_meta(found)
    try:
        cfg = GPTConfig(**meta["model"])
        check_exportable(cfg, fmt)
        state = ckpt.load_arrays(found / "model.safetensors")
        files = _hf(state, cfg) if fmt == "hf" else _nanogpt(state, cfg, int(meta.get("step", 0)))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"--checkpoint {found}: {e}") from None
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, write in files.items():
        write(tmp / name)
    if (found / TOKENIZER_FILE).is_file():
        shutil.copyfile(found / TOKENIZER_FILE, tmp / "hvdllm_tokenizer.json")
    os.replace(tmp, dest)
    return dest


def _hf(state: dict, cfg: GPTConfig) -> dict:
    tensors, config = hf_gpt2_tensors(state, cfg), hf_gpt2_config(cfg)
    return {"config.json": lambda p: p.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8"),
            "model.safetensors": lambda p: ckpt.save_arrays(p, tensors, {"format": "pt"})}


def _nanogpt(state: dict, cfg: GPTConfig, step: int) -> dict:
    import torch

    sd = {k: torch.from_numpy(v.copy()) for k, v in nanogpt_state_dict(state, cfg).items()}
    sd["lm_head.weight"] = sd["transformer.wte.weight"]          # tied, as nanoGPT's state_dict has it
    blob = {"model": sd, "model_args": nanogpt_model_args(cfg), "iter_num": step,
            "config": {"exported_by": "hvdllm", "activation": "gelu_tanh"}}
    return {"ckpt.pt": lambda p: torch.save(blob, p)}
