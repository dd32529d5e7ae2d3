"""The training configuration: frozen dataclass sections whose fields carry their help, allowed values
and bounds (:func:`~hvdllm.train.config.fields.knob`), shared by the torch and Keras trainers.

Every key is ``section.field``. Rules that involve one field live on it; the few that relate fields
(batch divisibility, context length, exit step, pipeline depth) are in :func:`validate`.
No framework imports here (stdlib + the models' shape config).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from hvdllm.models.config import PRESETS, GPTConfig
from hvdllm.train.config.fields import ConfigError, FieldSpec, field_specs, knob

MAX_VOCAB = 65536          # tokens are stored as uint16
MAX_SEED = 2**31 - 1       # TensorFlow's and NumPy's seeds are 32-bit


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The GPT's shape: a preset, with any field overridden (None = the preset's value)."""

    preset: str = knob("tiny", "model size (hvdllm.models.config.PRESETS) and its training defaults",
                       choices=tuple(PRESETS))
    vocab_size: int | None = knob(None, "vocabulary size", ge=1, le=MAX_VOCAB,
                                  none="the preset's, or the BPE's size with data.tokenizer=bpe")
    block_size: int | None = knob(None, "context length in tokens", ge=1, none="the preset's")
    n_layer: int | None = knob(None, "transformer blocks", ge=1, none="the preset's")
    n_head: int | None = knob(None, "attention heads (must divide model.n_embd)", ge=1, none="the preset's")
    n_embd: int | None = knob(None, "width of the residual stream", ge=1, none="the preset's")
    dropout: float | None = knob(None, "dropout probability", ge=0, lt=1, none="the preset's")
    bias: bool | None = knob(None, "biases in linear layers and LayerNorms", none="the preset's")
    tie_embeddings: bool | None = knob(None, "output layer shares the token embedding", none="the preset's")
    init_std: float | None = knob(None, "standard deviation of the initial weights", gt=0, none="the preset's")


@dataclasses.dataclass(frozen=True)
class DataSection:
    """What to train on and how it is tokenized and split."""

    path: str | None = knob(None, "a text file, a folder of text files, or uint16 .bin token file(s)",
                            none="the embedded corpus")
    tokenizer: str = knob("byte", "byte-level, or a BPE trained here on the training text (saved with the run)",
                          choices=("byte", "bpe"))
    bpe_vocab_size: int = knob(2048, "BPE vocabulary size with data.tokenizer=bpe", ge=257, le=MAX_VOCAB)
    tokenizer_file: str | None = knob(None, "a tokenizer.json (ours, or a `tokenizers` file) to use instead",
                                      none="data.tokenizer decides")
    seq_len: int | None = knob(None, "tokens per training sequence (<= model.block_size)", ge=1,
                               none="the model's context")
    val_fraction: float = knob(0.1, "share of windows held out for the validation loss", gt=0, lt=1)


@dataclasses.dataclass(frozen=True)
class OptimSection:
    """AdamW (hvdllm.torch.optim / hvdllm.tensorflow.optim: the core's math) and clipping."""

    lr: float = knob(1e-3, "peak learning rate (after warmup)", gt=0)
    beta1: float = knob(0.9, "AdamW first-moment decay", ge=0, lt=1)
    beta2: float = knob(0.95, "AdamW second-moment decay", ge=0, lt=1)
    eps: float = knob(1e-8, "AdamW denominator epsilon", gt=0)
    weight_decay: float = knob(0.1, "decoupled weight decay", ge=0)
    max_grad_norm: float | None = knob(1.0, "global-norm clipping after the cross-rank average", gt=0,
                                       none="no clipping")
    fused: bool = knob(True, "flat-buffer optimizer step with torch's fused kernels (false: per-tensor core rule)")


@dataclasses.dataclass(frozen=True)
class ScheduleSection:
    """Learning rate per step: linear warmup then decay to min_lr_ratio * lr over run.max_steps."""

    warmup_steps: int = knob(20, "linear warmup steps (cut to run.max_steps when longer)", ge=0)
    decay: str = knob("cosine", "decay after warmup", choices=("cosine", "linear", "constant"))
    min_lr_ratio: float = knob(0.1, "final learning rate as a fraction of optim.lr", ge=0, le=1)


@dataclasses.dataclass(frozen=True)
class BatchSection:
    """Sequences per optimizer step; accumulation = global_batch / (micro_batch x data-parallel size)."""

    global_batch: int = knob(32, "sequences per optimizer step, all ranks together", ge=1)
    micro_batch: int = knob(16, "sequences per forward/backward on one rank", ge=1)


@dataclasses.dataclass(frozen=True)
class ParallelSection:
    """Model parallelism degrees; data parallelism takes the remaining ranks."""

    tp: int = knob(1, "tensor-parallel degree", ge=1)
    pp: int = knob(1, "pipeline-parallel degree (<= model.n_layer)", ge=1)
    schedule: str = knob("1f1b", "pipeline schedule over the micro-batches (parallel.pp > 1)", choices=("1f1b", "gpipe"))
    zero: int = knob(0, "ZeRO stage: 0 replicated optimizer state, 1 optimizer state sharded over the "
                        "data-parallel ranks, 2 gradients sharded too (torch)", ge=0, le=2)
    zero_inflight_mb: float | None = knob(None, "ZeRO-2 (torch): the most MiB of full-size gradient buffers alive "
                                                "at once (buckets filling and reduce-scatters in flight); a "
                                                "bucket past it first waits for the oldest (0: one at a time)",
                                          ge=0, none="twice the largest gradient bucket")


@dataclasses.dataclass(frozen=True)
class RunSection:
    """The run: where, how long, how often, on what."""

    framework: str = knob("torch", "PyTorch or Keras 3 on TensorFlow", choices=("torch", "tensorflow"))
    out: str = knob("runs/default", "run directory: config.toml, metrics.csv, loss.png, checkpoints/, "
                                    "sample.txt")
    max_steps: int = knob(300, "optimizer steps of the run and of the LR schedule", ge=1)
    exit_at_step: int | None = knob(None, "checkpoint and exit after this step, schedule unchanged "
                                          "(<= run.max_steps)", ge=1, none="run to the end")
    max_minutes: float | None = knob(None, "wall-clock budget of this invocation: past it every rank finishes "
                                           "the step, checkpoints and exits 75 (leave a margin for the "
                                           "checkpoint)", gt=0, none="no budget")
    stop_check_interval: int = knob(1, "steps between the ranks' agreement on stopping (SIGTERM/SIGUSR1 on "
                                       "any rank, run.max_minutes): one tiny allreduce", ge=1)
    stop_check_overlap: bool = knob(False, "start the stop agreement before the step and finish it after, so it "
                                           "waits for no round of its own (torch; on CPU hosts a Horovod cycle); "
                                           "a stop asked during step k then ends the run after step k + 1, not k")
    resume: bool = knob(False, "continue from the newest checkpoint in run.out that verifies (an error when "
                               "run.out holds none)")
    init_from: str | None = knob(None, "start from the weights (and tokenizer) of a run directory or checkpoint "
                                       "folder of either framework: step 0, fresh optimizer (ignored when "
                                       "--resume finds a checkpoint)", none="the seeded initialisation")
    allow_data_change: bool = knob(False, "let --resume continue on other data than the checkpoint's (token count "
                                          "and sha256 differ); not inherited by later resumes")
    allow_batch_change: bool = knob(False, "let --resume continue with another batch.global_batch; not inherited")
    allow_seed_change: bool = knob(False, "let --resume continue with another run.seed; not inherited")
    elastic: bool = knob(False, "Horovod elastic training (horovodrun --min-np/--max-np --host-discovery-script, "
                                "Gloo; data parallel only): a lost worker rolls the survivors back to the last "
                                "commit, a new one joins; the global batch is kept (more accumulation per rank). "
                                "Outside an elastic launch the job runs as a normal one")
    elastic_commit_every: int = knob(10, "steps between elastic commits (the state kept in host memory that a lost "
                                         "worker rolls back to; also at every checkpoint): a copy of the model and "
                                         "optimizer state plus one tiny broadcast", ge=1)
    check_replicas_every: int = knob(1000, "steps between checks that every data-parallel replica holds the same "
                                           "parameters and optimizer state (also at every checkpoint; 0: never)",
                                     ge=0)
    seed: int = knob(1337, "weights, data order (and dropout: seed + rank)", ge=0, le=MAX_SEED)
    log_interval: int = knob(10, "steps between metrics.csv rows (the last step is always logged)", ge=1)
    eval_interval: int = knob(50, "steps between validation losses (0: only at the end)", ge=0)
    eval_sequences: int = knob(64, "validation sequences per evaluation, split over the ranks", ge=1)
    checkpoint_interval: int = knob(100, "steps between checkpoints (0: only at the end)", ge=0)
    keep_checkpoints: int = knob(2, "newest checkpoints kept", ge=1)
    precision: str = knob("fp32", "bf16: autocast (CPU or GPU); fp16: autocast + loss scaling (GPU)",
                          choices=("fp32", "bf16", "fp16"))
    device: str = knob("auto", "auto: cuda:local_rank when available", choices=("auto", "cpu", "cuda"))
    threads: int = knob(0, "CPU threads per rank (0: the host's cores / ranks on the host)", ge=0)
    bind_cores: bool = knob(False, "pin each rank to its share of the host's cores (local rank r: cores r*t .. "
                                   "r*t+t-1, t the threads per rank; more ranks than cores: core r % cores), as "
                                   "mpirun --bind-to core; steadier and faster on CPU hosts; leave off when the "
                                   "launcher already binds each rank")
    peak_flops: float = knob(0.0, "peak FLOP/s of one rank's device for MFU (0: known GPUs, CPU estimate)", ge=0)
    compression: str = knob("none", "gradient compression on the wire", choices=("none", "fp16", "bf16"))
    bucket_cap_mb: float = knob(25.0, "gradient bucket size for the fused allreduce (0: one bucket per dtype)",
                                ge=0)
    tensorboard: bool = knob(True, "also write TensorBoard events when a writer is importable")
    progress: bool = knob(True, "tqdm bar on rank 0")


@dataclasses.dataclass(frozen=True)
class SampleSection:
    """The text sample written at the end of training (and the defaults of `hvdllm sample`)."""

    prompt: str = knob("The ", "text to continue")
    tokens: int = knob(200, "tokens to generate", ge=0)
    temperature: float = knob(0.8, "softmax temperature", gt=0)
    top_k: int = knob(40, "sample among the k likeliest tokens (0: all)", ge=0)
    seed: int = knob(0, "sampling seed", ge=0, le=MAX_SEED)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything `hvdllm train` needs; see each section's fields for meaning and defaults."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    schedule: ScheduleSection = dataclasses.field(default_factory=ScheduleSection)
    batch: BatchSection = dataclasses.field(default_factory=BatchSection)
    parallel: ParallelSection = dataclasses.field(default_factory=ParallelSection)
    run: RunSection = dataclasses.field(default_factory=RunSection)
    sample: SampleSection = dataclasses.field(default_factory=SampleSection)

    def gpt_config(self, vocab_size: int | None = None) -> GPTConfig:
        """The model's shape: the preset with this config's overrides (``vocab_size`` fills a None)."""
        base = dataclasses.asdict(PRESETS[self.model.preset])
        base.update({k: v for k, v in dataclasses.asdict(self.model).items() if k in base and v is not None})
        if self.model.vocab_size is None and vocab_size is not None:
            base["vocab_size"] = vocab_size
        try:
            return GPTConfig(**base)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @property
    def seq_len(self) -> int:
        return self.data.seq_len or self.gpt_config().block_size

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}  # type: ignore[misc]
SPECS: dict[str, dict[str, FieldSpec]] = {name: field_specs(cls, name) for name, cls in SECTIONS.items()}


def spec(key: str, where: str = "") -> FieldSpec:
    """The FieldSpec of ``section.field`` (ConfigError naming the key and the valid ones if unknown)."""
    section, _, name = key.partition(".")
    if section not in SPECS or not name:
        raise ConfigError(f"unknown config key {key!r}{where}; sections: {', '.join(SECTIONS)} (keys are section.field)")
    if name not in SPECS[section]:
        raise ConfigError(f"unknown config key {key!r}{where}; {section}.* keys: {', '.join(SPECS[section])}")
    return SPECS[section][name]


def from_flat(values: dict[str, Any]) -> TrainConfig:
    """A validated TrainConfig from ``{"section.field": value}`` (values coerced; the rest default)."""
    per_section: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in values.items():
        section, _, name = key.partition(".")
        per_section[section][name] = spec(key).coerce(value)
    cfg = TrainConfig(**{name: SECTIONS[name](**kw) for name, kw in per_section.items()})
    validate(cfg)
    return cfg


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: TrainConfig) -> None:
    """The rules that relate fields (each field's own rules are checked when it is coerced)."""
    b, d, r, p = cfg.batch, cfg.data, cfg.run, cfg.parallel
    gpt = cfg.gpt_config()
    _need(b.global_batch % b.micro_batch == 0,
          f"--global-batch {b.global_batch} is not divisible by --micro-batch {b.micro_batch}; "
          f"allowed: a multiple of batch.micro_batch")
    _need(d.seq_len is None or d.seq_len <= gpt.block_size,
          f"data.seq_len={d.seq_len} is longer than the model's context (model.block_size={gpt.block_size})")
    _need(r.exit_at_step is None or r.exit_at_step <= r.max_steps,
          f"--exit-at-step {r.exit_at_step} must be in [1, --max-steps {r.max_steps}]")
    _need(bool(r.out), "run.out='' must name a directory")
    _need(not r.elastic or r.framework == "torch",
          f"--elastic with --framework {r.framework}: elastic training runs the torch trainer only for now; "
          f"allowed with --elastic: --framework torch")
    _need(not r.elastic or (p.tp == 1 and p.pp == 1),
          f"--elastic is data parallel only (--tp {p.tp} --pp {p.pp}); allowed with --elastic: --tp 1 --pp 1")
    _need(not r.elastic or p.zero == 0,
          f"--elastic with --zero {p.zero}: elastic training replicates the optimizer state; allowed with --elastic: --zero 0")
    _need(p.zero_inflight_mb is None or (p.zero == 2 and r.framework == "torch"),
          f"parallel.zero_inflight_mb={p.zero_inflight_mb} bounds torch ZeRO-2's gradient buffers (here --zero "
          f"{p.zero}, --framework {r.framework}); allowed: with --zero 2 --framework torch, else unset")
    _need(p.pp <= gpt.n_layer, f"--pp {p.pp} is more pipeline stages than model.n_layer={gpt.n_layer} layers; "
                               f"allowed: 1..{gpt.n_layer}")


def resolved(cfg: TrainConfig, vocab_size: int) -> TrainConfig:
    """A copy with the model shape and sequence length filled in (what the run directory records)."""
    gpt = cfg.gpt_config(vocab_size)
    model = dataclasses.replace(cfg.model, **{f.name: getattr(gpt, f.name) for f in dataclasses.fields(GPTConfig)})
    data = dataclasses.replace(cfg.data, seq_len=cfg.data.seq_len or gpt.block_size)
    return dataclasses.replace(cfg, model=model, data=data)
