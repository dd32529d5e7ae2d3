"""Training data for hvdllm: corpora, tokenizers, and a deterministic sharded batch order.

Framework-free (numpy only): the torch and Keras trainers both use it.

    tok = make_tokenizer(data_cfg)            # bytes, a BPE trained here, or one from a file
    windows = load_windows(data_cfg, tok, seq_len, seed)
    for x, y in windows.micro_batches(step, global_batch, dp_rank, dp_size, micro_batch): ...
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from hvdllm.data.corpus import embedded_text, list_sources, read_text_files
from hvdllm.data.dataset import TokenWindows, read_token_files, write_token_file
from hvdllm.data.tokenizer import (TOKENIZER_FILE, TOKENIZERS, BPETokenizer, ByteTokenizer, Tokenizer,
                                   load_tokenizer, save_tokenizer, tokenizer_from_dict)

__all__ = [
    "TokenWindows", "ByteTokenizer", "BPETokenizer", "Tokenizer", "TOKENIZERS", "TOKENIZER_FILE",
    "embedded_text", "list_sources", "read_text_files", "read_token_files", "write_token_file",
    "load_tokenizer", "save_tokenizer", "tokenizer_from_dict", "check_source", "source_text",
    "make_tokenizer", "load_windows",
]


def check_source(path: str | None) -> str:
    """Validate ``--data`` without reading it all: returns "embedded", "text" or "tokens" (ValueError if bad)."""
    if path is None or path == "":
        return "embedded"
    return list_sources(path)[1]


def source_text(path: str | None) -> str:
    """The training text behind ``path`` (the embedded corpus for None)."""
    if path is None or path == "":
        return embedded_text()
    files, kind = list_sources(path)
    if kind != "text":
        raise ValueError(f"--data {path}: holds token files; there is no text to train a tokenizer on")
    return read_text_files(files)


def _tokenizer_file(path: str) -> Tokenizer:
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise ValueError(f"data.tokenizer_file={path}: no such file")
    try:
        blob = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(blob, dict) and "kind" in blob:
            return tokenizer_from_dict(blob)
        return BPETokenizer.from_json(json.dumps(blob))       # a plain `tokenizers` JSON file
    except Exception as e:  # noqa: BLE001 - json's, ours and `tokenizers`' errors alike: one line
        raise ValueError(f"data.tokenizer_file={path}: not a tokenizer file ({' '.join(str(e).split())[:120]}); "
                         "allowed: an hvdllm tokenizer.json or a `tokenizers` JSON file") from None


def make_tokenizer(data_cfg: Any) -> Tokenizer:
    """The tokenizer ``data_cfg`` asks for (``tokenizer_file`` first, then ``tokenizer``: byte|bpe).

    A BPE is trained here on the training text; the caller saves it with the run (``save_tokenizer``).
    """
    if getattr(data_cfg, "tokenizer_file", None):
        return _tokenizer_file(data_cfg.tokenizer_file)
    if data_cfg.tokenizer == "byte":
        return ByteTokenizer()
    if data_cfg.tokenizer == "bpe":
        return BPETokenizer.train(source_text(data_cfg.path), data_cfg.bpe_vocab_size)
    raise ValueError(f"data.tokenizer={data_cfg.tokenizer!r} is unknown; allowed: {', '.join(TOKENIZERS)}")


def load_windows(data_cfg: Any, tokenizer: Tokenizer, seq_len: int, seed: int) -> TokenWindows:
    """Token windows of the configured source, encoded with ``tokenizer`` (``.bin`` files are memory-mapped)."""
    path = data_cfg.path or None
    kind = check_source(path)
    if kind == "tokens":
        arrays = read_token_files(list_sources(path)[0])
    else:
        arrays = [tokenizer.encode(source_text(path))]
    return TokenWindows(arrays, seq_len, data_cfg.val_fraction, seed, name=f"--data {path or '(embedded corpus)'}")


def max_token(windows: TokenWindows) -> int:
    """Largest token id in the stream (scans memmaps in chunks)."""
    best = 0
    for a in windows.arrays:
        for k in range(0, len(a), 1 << 24):
            chunk = np.asarray(a[k: k + (1 << 24)])
            if chunk.size:
                best = max(best, int(chunk.max()))
    return best
