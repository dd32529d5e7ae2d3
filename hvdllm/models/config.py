"""GPT shape, shared by the PyTorch and Keras models (no framework imports)."""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """A decoder-only transformer (GPT-2 layout: pre-LayerNorm blocks, GELU MLP of width 4*n_embd)."""

    vocab_size: int = 256
    block_size: int = 128      # context length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1")
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def residual_init_std(self) -> float:
        """GPT-2's scaled init for the projections that write into the residual stream."""
        return self.init_std / math.sqrt(2 * self.n_layer)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count (position embeddings excluded when ``include_embeddings`` is False, as nanoGPT)."""
        d, v, L = self.n_embd, self.vocab_size, self.n_layer
        b = 1 if self.bias else 0
        per_layer = 2 * (1 + b) * d + (3 * d * d + 3 * d * b) + (d * d + d * b) + (4 * d * d + 4 * d * b) + (4 * d * d + d * b)
        n = v * d + self.block_size * d + L * per_layer + (1 + b) * d + (0 if self.tie_embeddings else v * d)
        return n if include_embeddings else n - self.block_size * d

    def flops_per_token(self) -> float:
        """Training FLOPs per token (6N + attention), as in the PaLM appendix; used for MFU."""
        return 6 * self.num_params(False) + 12 * self.n_layer * self.n_embd * self.block_size


PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128),   # the 2-CPU README demo
    "small": GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=256),
    "124m": GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),
}
