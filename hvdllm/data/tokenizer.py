"""Tokenizers: bytes (the default, vocabulary 256) or a byte-level BPE trained locally with `tokenizers`.

Both map text <-> lists of ints and serialise to a small JSON-able dict, so a run directory (and
every checkpoint in it) carries what is needed to decode samples.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

TOKENIZERS = ("byte", "bpe")
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(Protocol):
    kind: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...
    def decode(self, ids: Any) -> str: ...
    def to_dict(self) -> dict[str, Any]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: no training, no unknown tokens, vocabulary 256."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Any) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "byte"}


class BPETokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenisation) from the `tokenizers` library."""

    kind = "bpe"

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self.vocab_size = int(tok.get_vocab_size())

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
        """Learn merges on ``text`` (deterministic for a given text and vocabulary size)."""
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 257 or vocab_size > 65536:
            raise ValueError(f"data.bpe_vocab_size={vocab_size} must be in [257, 65536] (tokens are uint16)")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        chunks = text.split("\n\n")
        tok.train_from_iterator(chunks, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, blob: str) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(blob))

    def encode(self, text: str) -> np.ndarray:
        # Encode document by document: one huge string is slow in `tokenizers`' pre-tokeniser.
        parts = text.split("\n\n")
        encs = self._tok.encode_batch([p + ("\n\n" if i < len(parts) - 1 else "") for i, p in enumerate(parts)])
        ids = [i for e in encs for i in e.ids]
        return np.asarray(ids, dtype=np.uint16)

    def decode(self, ids: Any) -> str:
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "bpe", "tokenizer": self._tok.to_str()}


def tokenizer_from_dict(d: dict[str, Any]) -> ByteTokenizer | BPETokenizer:
    """Inverse of ``to_dict``."""
    kind = d.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.from_json(d["tokenizer"])
    raise ValueError(f"tokenizer kind {kind!r} is unknown; allowed: {', '.join(TOKENIZERS)}")


def save_tokenizer(tok: Tokenizer, directory: str | Path) -> Path:
    """Write ``tokenizer.json`` into ``directory``."""
    path = Path(directory) / TOKENIZER_FILE
    path.write_text(json.dumps(tok.to_dict()), encoding="utf-8")
    return path


def load_tokenizer(directory: str | Path) -> ByteTokenizer | BPETokenizer:
    """Read ``tokenizer.json`` from ``directory`` (bytes when there is none)."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        return ByteTokenizer()
    return tokenizer_from_dict(json.loads(path.read_text(encoding="utf-8")))
