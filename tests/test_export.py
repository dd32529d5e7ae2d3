"""`hvdllm export`: the exported model, loaded by its own tool's code, reproduces hvdllm's logits.

Hugging Face: ``transformers.GPT2LMHeadModel.from_pretrained``. nanoGPT: its ``GPT`` module, written
below as in nanoGPT's model.py (the reference), loading ``ckpt.pt`` as nanoGPT's sample.py does.
Checkpoints are written by the trainer's checkpoint code from a torch GPT with random (not initial)
weights, so every bias and LayerNorm parameter matters.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

from hvdllm.cli import main  # noqa: E402
from hvdllm.models.config import GPTConfig  # noqa: E402
from hvdllm.models.gpt import GPT  # noqa: E402
from hvdllm.train import checkpoint as ckpt  # noqa: E402
from hvdllm.train.trainer_torch import model_arrays  # noqa: E402

SHAPES = {"tied_bias": GPTConfig(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32),
          "untied_nobias": GPTConfig(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False,
                                     tie_embeddings=False),
          "tied_nobias": GPTConfig(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False)}


def checkpoint(tmp: Path, cfg: GPTConfig) -> tuple[Path, GPT]:
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0) * torch.rand(()))
    path = ckpt.write_checkpoint(tmp / "run", 7, {"model": model_arrays(model)},
                                 {"framework": "torch", "model": dataclasses.asdict(cfg)},
                                 extra_files={"tokenizer.json": b'{"kind": "byte"}'})
    return path, model


def tokens(cfg: GPTConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (3, cfg.block_size), generator=torch.Generator().manual_seed(1))


# -- nanoGPT's GPT (model.py), the reference: same modules and names; GELU as a parameter -----------------
@dataclasses.dataclass
class NanoConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class LayerNorm(nn.Module):
    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoAttention(nn.Module):
    def __init__(self, c: NanoConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.n_head, self.n_embd = c.n_head, c.n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))   # nanoGPT's slow path, spelled out
        att = att.masked_fill(torch.tril(torch.ones(T, T, dtype=torch.bool)).logical_not(), float("-inf"))
        y = (F.softmax(att, dim=-1) @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class NanoMLP(nn.Module):
    def __init__(self, c: NanoConfig, gelu: str) -> None:
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.gelu = nn.GELU(approximate=gelu)
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class NanoBlock(nn.Module):
    def __init__(self, c: NanoConfig, gelu: str) -> None:
        super().__init__()
        self.ln_1, self.attn = LayerNorm(c.n_embd, c.bias), NanoAttention(c)
        self.ln_2, self.mlp = LayerNorm(c.n_embd, c.bias), NanoMLP(c, gelu)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, c: NanoConfig, gelu: str) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd), wpe=nn.Embedding(c.block_size, c.n_embd),
            drop=nn.Dropout(c.dropout), h=nn.ModuleList([NanoBlock(c, gelu) for _ in range(c.n_layer)]),
            ln_f=LayerNorm(c.n_embd, c.bias)))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx):
        pos = torch.arange(idx.size(1))
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def load_nanogpt(ckpt_pt: Path, gelu: str) -> NanoGPT:
    """As nanoGPT's sample.py: model_args -> GPTConfig -> GPT, then load_state_dict (strict)."""
    blob = torch.load(ckpt_pt, map_location="cpu", weights_only=True)
    model = NanoGPT(NanoConfig(**blob["model_args"]), gelu)
    model.load_state_dict(blob["model"])
    return model.eval()


def export(path: Path, fmt: str, out: Path) -> None:
    assert main(["export", "--checkpoint", str(path), "--format", fmt, "--out", str(out)]) == 0


# -- tests --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["tied_bias", "tied_nobias"])
def test_nanogpt_state_dict_reproduces_the_logits(shape: str, tmp_path: Path) -> None:
    cfg = SHAPES[shape]
    path, model = checkpoint(tmp_path, cfg)
    export(tmp_path / "run", "nanogpt", tmp_path / "nano")             # a run folder: its newest checkpoint
    assert sorted(p.name for p in (tmp_path / "nano").iterdir()) == ["ckpt.pt", "hvdllm_tokenizer.json"]
    x = tokens(cfg)
    with torch.no_grad():
        want = model(x)[0]
        got = load_nanogpt(tmp_path / "nano" / "ckpt.pt", "tanh")(x)
        erf = load_nanogpt(tmp_path / "nano" / "ckpt.pt", "none")(x)   # today's nanoGPT: nn.GELU() (erf)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    gap = float((erf - want).abs().max() / want.abs().max())
    print(f"{shape}: nanoGPT with erf GELU: max |dlogit| / max |logit| = {gap:.2g}")
    assert 0 < gap < 0.05
    assert torch.load(tmp_path / "nano" / "ckpt.pt", weights_only=True)["iter_num"] == 7


@pytest.mark.parametrize("shape", ["tied_bias", "untied_nobias"])
def test_hf_gpt2_folder_reproduces_the_logits(shape: str, tmp_path: Path) -> None:
    import transformers            # launch/requirements.txt
    cfg = SHAPES[shape]
    path, model = checkpoint(tmp_path, cfg)
    export(path, "hf", tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "hvdllm_tokenizer.json",
                                                                   "model.safetensors"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager").eval()
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings
    x = tokens(cfg)
    with torch.no_grad():
        want = model(x)[0]
        got = hf(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["activation_function"] == "gelu_new"


def test_bad_export_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, _ = checkpoint(tmp_path, SHAPES["untied_nobias"])
    (tmp_path / "taken").mkdir()
    cases = [(["--checkpoint", str(tmp_path / "nothing"), "--format", "hf"], "no checkpoint there"),
             (["--checkpoint", str(path), "--format", "nanogpt"], "model.tie_embeddings=false"),
             (["--checkpoint", str(path), "--format", "onnx"], "invalid choice"),
             (["--checkpoint", str(path), "--format", "hf", "--out", str(tmp_path / "taken")], "already exists")]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for args, needle in cases:
        if "--out" not in args:
            args = [*args, "--out", str(tmp_path / "new")]
        assert main(["export", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, (args, err)
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before, args
