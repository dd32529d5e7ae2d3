"""hvdllm GPT weights in other tools' layouts: Hugging Face GPT-2 and nanoGPT (numpy only).

Input: a state dict in hvdllm's names and PyTorch layouts (what every hvdllm checkpoint holds, torch
or Keras: ``wte.weight``, ``h.{i}.attn.c_attn.weight`` (out, in), ...) and its :class:`GPTConfig`.

What maps exactly, and what does not:

- **Hugging Face GPT-2** (``GPT2LMHeadModel``): the same architecture (pre-LayerNorm blocks, eps 1e-5,
  fused q/k/v, tanh GELU = ``gelu_new``, causal softmax attention scaled by 1/sqrt(head_dim), learned
  positions). Its ``Conv1D`` stores weights (in, out), so every block matrix is transposed. GPT-2 always
  has biases: a ``model.bias=false`` model is written with zero biases (the same function). An untied
  head is written as ``lm_head.weight`` with ``tie_word_embeddings: false``.
- **nanoGPT** (``ckpt.pt``: ``model``, ``model_args``, ``iter_num``): the same names under
  ``transformer.``, PyTorch layouts, ``bias`` as hvdllm's. nanoGPT always ties its head, so untied
  models are refused. nanoGPT's MLP uses ``nn.GELU()`` (exact erf) since 2023 while hvdllm and GPT-2
  use the tanh approximation (nanoGPT's earlier ``new_gelu``): the weights load exactly, and with the erf
  GELU the logits move slightly (the test measures it; see README "Export").
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from hvdllm.models.config import GPTConfig

FORMATS = ("hf", "nanogpt")
_BLOCK_MATRICES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def check_exportable(cfg: GPTConfig, fmt: str) -> None:
    """ValueError naming the reason when format ``fmt`` cannot hold this model exactly."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt}: unknown; allowed: {', '.join(FORMATS)}")
    if fmt == "nanogpt" and not cfg.tie_embeddings:
        raise ValueError("--format nanogpt: nanoGPT ties lm_head to wte, this model has model.tie_embeddings=false; "
                         "allowed: --format hf")


def _check_names(state: Mapping[str, Any], cfg: GPTConfig) -> None:
    want = set(param_shapes(cfg))
    missing, extra = sorted(want - set(state)), sorted(set(state) - want - {"lm_head.weight"})
    if missing or extra:
        raise ValueError(f"weights do not match model {cfg}: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, shape in param_shapes(cfg).items():
        if tuple(np.shape(state[name])) != shape:
            raise ValueError(f"{name} has shape {list(np.shape(state[name]))}, model {cfg} needs {list(shape)}")


def param_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """hvdllm's parameter names and PyTorch shapes (a tied head appears once, as ``wte.weight``)."""
    d, b = cfg.n_embd, cfg.bias
    out = {"wte.weight": (cfg.vocab_size, d), "wpe.weight": (cfg.block_size, d)}
    dims = {"attn.c_attn": (3 * d, d), "attn.c_proj": (d, d), "mlp.c_fc": (4 * d, d), "mlp.c_proj": (d, 4 * d)}
    for i in range(cfg.n_layer):
        for ln in ("ln_1", "ln_2"):
            out[f"h.{i}.{ln}.weight"] = (d,)
            if b:
                out[f"h.{i}.{ln}.bias"] = (d,)
        for name, shape in dims.items():
            out[f"h.{i}.{name}.weight"] = shape
            if b:
                out[f"h.{i}.{name}.bias"] = (shape[0],)
    out["ln_f.weight"] = (d,)
    if b:
        out["ln_f.bias"] = (d,)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, d)
    return out


def _f32(a: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def hf_gpt2_tensors(state: Mapping[str, Any], cfg: GPTConfig) -> dict[str, np.ndarray]:
    """The weights under ``GPT2LMHeadModel``'s names and layouts (Conv1D (in, out); zero biases if none)."""
    check_exportable(cfg, "hf")
    _check_names(state, cfg)
    out = {}
    for name, shape in param_shapes(cfg).items():
        a = _f32(state[name])
        if name == "lm_head.weight":
            out[name] = a
            continue
        if any(name.endswith(f"{m}.weight") for m in _BLOCK_MATRICES):
            a = np.ascontiguousarray(a.T)
        out[f"transformer.{name}"] = a
    if not cfg.bias:                   # GPT-2 always has biases: zeros compute the same function
        d = cfg.n_embd
        widths = {"ln_1": d, "ln_2": d, "attn.c_attn": 3 * d, "attn.c_proj": d, "mlp.c_fc": 4 * d, "mlp.c_proj": d}
        for i in range(cfg.n_layer):
            for name, width in widths.items():
                out[f"transformer.h.{i}.{name}.bias"] = np.zeros(width, np.float32)
        out["transformer.ln_f.bias"] = np.zeros(d, np.float32)
    return out


def hf_gpt2_config(cfg: GPTConfig) -> dict[str, Any]:
    """``config.json`` of a ``GPT2LMHeadModel`` with this shape."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "initializer_range": cfg.init_std, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
        "bos_token_id": None, "eos_token_id": None, "torch_dtype": "float32",
    }


def nanogpt_state_dict(state: Mapping[str, Any], cfg: GPTConfig) -> dict[str, np.ndarray]:
    """The weights under nanoGPT's ``GPT`` names (``transformer.*`` plus the tied ``lm_head.weight``)."""
    check_exportable(cfg, "nanogpt")
    _check_names(state, cfg)
    out = {f"transformer.{name}": _f32(state[name]) for name in param_shapes(cfg)}
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def nanogpt_model_args(cfg: GPTConfig) -> dict[str, Any]:
    """nanoGPT's ``GPTConfig`` keyword arguments (its ``model_args``) for this shape."""
    return {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "block_size": cfg.block_size,
            "bias": cfg.bias, "vocab_size": cfg.vocab_size, "dropout": cfg.dropout}
