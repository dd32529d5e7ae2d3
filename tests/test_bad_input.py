"""The bad-input catalogue: every row is one bad input to the command line or the public API, and the
one test asserts the one clear line (CLI: exit 2, ``hvdllm: error: ...`` naming the value; API: a
ValueError or TypeError whose message names it) and that nothing was written.

The config keys' own rules (unknown keys, wrong types, inf/nan/negative values, impossible layouts,
config files) have their table in tests/test_train_cli.py (BAD_TRAIN, BAD_SAMPLE); this table adds the
other kinds: corrupt data files, run directories that cannot be written, a wrong launcher environment,
resume mismatches and corrupt checkpoints, and the libraries' APIs.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from hvdllm.cli import main
from hvdllm.data.dataset import write_token_file
from hvdllm.train import checkpoint as ckpt
from tests.test_train_torch import QUIET, SMALLER

RUN = ["--max-steps", "2", "--global-batch", "4", "--micro-batch", "4", "--set", "run.eval_interval=0",
       "--set", "run.checkpoint_interval=1", "--set", "sample.tokens=2", *SMALLER, *QUIET]


def _lin() -> Any:
    import torch
    return torch.nn.Linear(2, 2)


def _sgd() -> Any:
    import torch
    return torch.optim.SGD(_lin().parameters(), lr=0.1)


def _hvd() -> Any:
    import hvdllm.torch as hvd
    hvd.init()
    return hvd


def _ones() -> Any:
    import torch
    return torch.ones(2)


def _torch_optim(name: str, **kw: Any) -> Callable[[], Any]:
    def make() -> Any:
        from hvdllm.torch import optim
        return getattr(optim, name)(_lin().parameters(), **kw)
    return make


def _keras_optim(name: str, **kw: Any) -> Callable[[], Any]:
    def make() -> Any:
        from hvdllm.tensorflow import optim
        return getattr(optim, name)(**kw)
    return make


def _grid(*args: Any, **kw: Any) -> Callable[[], Any]:
    def make() -> Any:
        from hvdllm.core.grid import ProcessGrid
        return ProcessGrid.infer(*args, **kw) if not kw.get("dp") else ProcessGrid(*args, **kw)
    return make


def _call(fn: Callable[..., Any], *args: Any, **kw: Any) -> Callable[[], Any]:
    return lambda: fn(*args, **kw)


def _read_corrupt(d: Path) -> Any:
    return ckpt.read_checkpoint(d / "corrupt" / "checkpoints" / "step_00000002")


# (id, kind, what, needle): kind "cli" -> ``what`` is the argv (with {tmp}, {done}, {corrupt}) and an
# optional environment; kind "api" -> ``what`` is (callable, its folder -> call, exception type).
CATALOGUE: list[tuple[str, str, Any, str]] = [
    # -- corrupt or unusable data files -------------------------------------------------------------------
    ("odd .bin", "cli", (["--data", "{tmp}/odd.bin"], {}), "an even number of bytes"),
    ("empty .bin", "cli", (["--data", "{tmp}/zero.bin"], {}), "zero.bin: is empty"),
    ("token beyond vocab", "cli", (["--data", "{tmp}/big.bin"], {}), "holds token id 60000"),
    ("too few tokens", "cli", (["--data", "{tmp}/short.bin"], {}), "short.bin: 20 tokens make"),
    ("folder of no text", "cli", (["--data", "{tmp}/images"], {}), "images: the folder holds no text files"),
    ("broken tokenizer file", "cli", (["--set", "data.tokenizer_file={tmp}/broken_tok.json"], {}), "broken_tok.json"),
    ("missing tokenizer file", "cli", (["--set", "data.tokenizer_file={tmp}/no_tok.json"], {}), "no_tok.json"),
    # -- run directories that cannot be written ------------------------------------------------------------
    ("--out is a file", "cli", (["--out", "{tmp}/afile"], {}), "afile: exists and is not a directory"),
    ("--out under a file", "cli", (["--out", "{tmp}/afile/run"], {}), "afile exists and is not a directory"),
    ("--out holds a run", "cli", (["--out", "{done}"], {}), "already holds checkpoints; pass --resume"),
    # -- wrong launcher ---------------------------------------------------------------------------------------
    ("unknown backend", "cli", ([], {"HVDLLM_BACKEND": "nccl"}), "HVDLLM_BACKEND='nccl' is not a backend"),
    ("tp on one rank", "cli", (["--tp", "2", "--global-batch", "8"], {}), "does not divide the world size 1"),
    # -- resume mismatches and checkpoints ---------------------------------------------------------------------
    ("resume nothing", "cli", (["--out", "{tmp}/emptydir", "--resume"], {}), "holds no checkpoint to resume"),
    ("resume all corrupt", "cli", (["--out", "{corrupt}", "--resume"], {}), "verifies (2 corrupt"),
    ("resume global batch", "cli", (["--out", "{done}", "--resume", "--global-batch", "8"], {}),
     "batch.global_batch=4 in the checkpoint, 8 in this run"),
    ("resume seed", "cli", (["--out", "{done}", "--resume", "--set", "run.seed=7"], {}),
     "run.seed=1337 in the checkpoint, 7 in this run"),
    ("resume data", "cli", (["--out", "{done}", "--resume", "--data", "{tmp}/other.txt"], {}),
     "in the checkpoint, 22000 tokens in 1 file(s)"),
    ("resume shape", "cli", (["--out", "{done}", "--resume", "--set", "model.n_embd=32"], {}),
     "model.n_embd=64 in the checkpoint, 32 in this run"),
    ("resume framework", "cli", (["--out", "{done}", "--resume", "--framework", "tensorflow"], {}),
     "written by --framework torch, this run uses --framework tensorflow"),
    ("sample corrupt", "cli", (["sample", "--checkpoint", "{corrupt}/checkpoints/step_00000002"], {}),
     "model.safetensors has 100 bytes"),
    ("sample no meta sums", "cli", (["sample", "--checkpoint", "{tmp}/legacy"], {}), "records no file checksums"),
    # -- the torch adapter's Horovod API ------------------------------------------------------------------------
    ("DistributedOptimizer backward_passes_per_step=0", "api",
     (lambda: _hvd().DistributedOptimizer(_sgd(), backward_passes_per_step=0), ValueError), "backward_passes_per_step=0"),
    ("DistributedOptimizer backward_passes_per_step='2'", "api",
     (lambda: _hvd().DistributedOptimizer(_sgd(), backward_passes_per_step="2"), ValueError), "'2'"),
    ("DistributedOptimizer op=42", "api", (lambda: _hvd().DistributedOptimizer(_sgd(), op=42), ValueError),
     "unsupported reduce op 42"),
    ("DistributedOptimizer of a string", "api", (lambda: _hvd().DistributedOptimizer("sgd"), ValueError), "got str"),
    ("DistributedOptimizer compression", "api",
     (lambda: _hvd().DistributedOptimizer(_sgd(), compression="zip"), ValueError), "'zip'"),
    ("allreduce op=99", "api", (lambda: _hvd().allreduce(_ones(), op=99), ValueError), "unsupported reduce op 99"),
    ("allreduce op='median'", "api", (lambda: _hvd().allreduce(_ones(), op="median"), ValueError), "'median'"),
    ("allreduce of a list", "api", (lambda: _hvd().allreduce([1, 2]), TypeError), "got list [1, 2]"),
    ("allgather of a float", "api", (lambda: _hvd().allgather(1.5), TypeError), "got float 1.5"),
    ("broadcast root_rank=5", "api", (lambda: _hvd().broadcast(_ones(), root_rank=5), ValueError), "rank 5"),
    ("broadcast root_rank=-1", "api", (lambda: _hvd().broadcast(_ones(), root_rank=-1), ValueError), "rank -1"),
    # -- optimizers (torch and Keras) ------------------------------------------------------------------------------
    ("torch AdamW lr=nan", "api", (_torch_optim("AdamW", lr=math.nan), ValueError), "lr=nan"),
    ("torch AdamW lr=-1", "api", (_torch_optim("AdamW", lr=-1.0), ValueError), "lr=-1.0"),
    ("torch Adam lr=inf", "api", (_torch_optim("Adam", lr=math.inf), ValueError), "lr=inf"),
    ("torch AdamW betas", "api", (_torch_optim("AdamW", betas=(1.5, 0.9)), ValueError), "beta1=1.5"),
    ("torch AdamW eps<0", "api", (_torch_optim("AdamW", eps=-1e-8), ValueError), "eps=-1e-08"),
    ("torch AdamW weight_decay=inf", "api", (_torch_optim("AdamW", weight_decay=math.inf), ValueError),
     "weight_decay=inf"),
    ("torch SGD momentum<0", "api", (_torch_optim("SGD", lr=0.1, momentum=-0.5), ValueError), "momentum=-0.5"),
    ("torch SGD lr='fast'", "api", (_torch_optim("SGD", lr="fast"), TypeError), "lr='fast'"),
    ("torch LAMB lr=nan", "api", (_torch_optim("LAMB", lr=math.nan), ValueError), "lr=nan"),
    ("keras AdamW lr=nan", "api", (_keras_optim("AdamW", learning_rate=math.nan), ValueError), "nan"),
    ("keras SGD lr=-1", "api", (_keras_optim("SGD", learning_rate=-1.0), ValueError), "-1.0"),
    # -- core: grids, schedules, model shapes, data windows ---------------------------------------------------------
    ("ProcessGrid tp=0", "api", (_grid(dp=1, tp=0, pp=1, world_size=1), ValueError), "tp=0"),
    ("ProcessGrid 2x2 on 3", "api", (_grid(dp=2, tp=2, pp=1, world_size=3), ValueError), "world size 3"),
    ("ProcessGrid.infer tp=3 on 4", "api", (_grid(4, tp=3), ValueError), "tp=3 x pp=1 = 3 does not divide"),
    ("ProcessGrid.infer world -1", "api", (_grid(-1), ValueError), "world_size=-1"),
    ("ProcessGrid.infer tp=2.0", "api", (_grid(4, tp=2.0), ValueError), "tp=2.0"),
    ("LRSchedule warmup -1", "api", (lambda: __import__("hvdllm.core.schedules", fromlist=["x"]).LRSchedule(
        1e-3, -1, 10), ValueError), "warmup_steps=-1"),
    ("LRSchedule decay='step'", "api", (lambda: __import__("hvdllm.core.schedules", fromlist=["x"]).LRSchedule(
        1e-3, 1, 10, decay="step"), ValueError), "decay='step'"),
    ("GPTConfig n_head=3", "api", (lambda: __import__("hvdllm.models.config", fromlist=["x"]).GPTConfig(
        n_head=3, n_embd=128), ValueError), "n_head=3"),
    ("TokenWindows seq_len=0", "api", (lambda: __import__("hvdllm.data.dataset", fromlist=["x"]).TokenWindows(
        [np.zeros(100, np.uint16)], 0), ValueError), "data.seq_len=0"),
    ("read_checkpoint corrupt", "api", (_read_corrupt, ValueError), "model.safetensors has 100 bytes"),
]


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the bad files, a finished 2-step run (``done``) and a copy with every checkpoint
    corrupt (``corrupt``)."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "odd.bin").write_bytes(b"\x01\x00\x02")
    (tmp / "zero.bin").write_bytes(b"")
    write_token_file(tmp / "big.bin", np.full(5000, 60000, np.uint16))
    write_token_file(tmp / "short.bin", np.arange(20, dtype=np.uint16))
    (tmp / "images").mkdir()
    (tmp / "images" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (tmp / "broken_tok.json").write_text("{not json")
    (tmp / "afile").write_text("a file where the run directory should be")
    (tmp / "emptydir").mkdir()
    (tmp / "other.txt").write_text("other data " * 2000)
    done = tmp / "done"
    assert main(["train", "--out", str(done), *RUN]) == 0
    shutil.copytree(done, tmp / "corrupt")
    for _, d in ckpt.list_checkpoints(tmp / "corrupt"):
        (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100])
    legacy = tmp / "legacy"
    shutil.copytree(ckpt.latest_checkpoint(done), legacy)
    meta = (legacy / ckpt.META).read_text()
    (legacy / ckpt.META).write_text(meta.replace('"files"', '"no_files"'))
    return tmp


def _tree(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("row", CATALOGUE, ids=[r[0] for r in CATALOGUE])
def test_bad_input_is_one_clear_error_and_writes_nothing(row: tuple[str, str, Any, str], place: Path,
                                                         capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _, kind, what, needle = row
    before = _tree(place)
    if kind == "cli":
        argv, env = what
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        argv = [a.format(tmp=place, done=place / "done", corrupt=place / "corrupt") for a in argv]
        full = argv if argv[:1] == ["sample"] else ["train", "--out", str(place / "new"), *RUN, *argv]
        capsys.readouterr()
        code = main(full)
        err = capsys.readouterr().err
        assert code == 2, (full, err)
        lines = [line for line in err.splitlines() if not line.startswith("hvdllm: warning: ")]
        assert len(lines) == 1 and lines[0].startswith("hvdllm: error: ") and needle in lines[0], (full, err)
    else:
        fn, exc = what
        with pytest.raises(exc) as info:
            fn(place) if fn is _read_corrupt else fn()
        assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert _tree(place) == before
    assert len(CATALOGUE) >= 40
