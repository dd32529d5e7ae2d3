"""The training configuration: one documented dataclass tree, shared by the torch and Keras trainers.

Layers, later ones win: field defaults < the preset's training defaults (``TRAIN_PRESETS``) < the
saved config of the run being resumed (``--resume``) < ``--config FILE.toml|.yaml`` <
``--set section.key=value`` < the named flags (``--max-steps`` ...). Every key is ``section.field``;
an unknown key, a value of the wrong type or out of range raises :class:`ConfigError` with a one-line
message naming it (the CLI turns that into exit status 2 before anything is written).

No framework imports here (stdlib + the models' shape config).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Mapping

from hvdllm.models.config import PRESETS, GPTConfig


class ConfigError(ValueError):
    """Bad user input (config, flags, data path, checkpoint mismatch): the CLI exits with status 2."""


@dataclasses.dataclass
class ModelSection:
    """The GPT's shape: a preset, with any field overridden (None = the preset's value)."""

    preset: str = "tiny"                 # tiny | small | 124m (hvdllm.models.config.PRESETS)
    vocab_size: int | None = None        # None: the preset's, or the BPE's size with data.tokenizer=bpe
    block_size: int | None = None        # context length
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    dropout: float | None = None
    bias: bool | None = None
    tie_embeddings: bool | None = None
    init_std: float | None = None


@dataclasses.dataclass
class DataSection:
    """What to train on and how it is tokenized and split."""

    path: str | None = None              # None: the embedded corpus; else a text file, a folder, or uint16 .bin files
    tokenizer: str = "byte"              # byte | bpe (trained here on the training text, saved with the run)
    bpe_vocab_size: int = 2048           # with tokenizer=bpe
    tokenizer_file: str | None = None    # a tokenizer.json (ours, or a `tokenizers` file) to use instead
    seq_len: int | None = None           # tokens per training sequence; None: the model's context
    val_fraction: float = 0.1            # share of windows held out for the validation loss


@dataclasses.dataclass
class OptimSection:
    """AdamW (hvdllm.torch.optim / hvdllm.tensorflow.optim: the core's math) and clipping."""

    lr: float = 1e-3                     # peak learning rate (after warmup)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    max_grad_norm: float | None = 1.0    # global-norm clipping after the cross-rank average; None: off
    fused: bool = False                  # torch's fused kernel where the optimizer supports it


@dataclasses.dataclass
class ScheduleSection:
    """Learning rate per step: linear warmup then decay to min_lr_ratio * lr over run.max_steps."""

    warmup_steps: int = 20               # linear warmup (cut to run.max_steps when longer)
    decay: str = "cosine"                # cosine | linear | constant
    min_lr_ratio: float = 0.1


@dataclasses.dataclass
class BatchSection:
    """Sequences per optimizer step; accumulation = global_batch / (micro_batch x data-parallel size)."""

    global_batch: int = 32
    micro_batch: int = 16


@dataclasses.dataclass
class ParallelSection:
    """Model parallelism degrees; data parallelism takes the remaining ranks."""

    tp: int = 1
    pp: int = 1
    schedule: str = "1f1b"               # pipeline schedule over the micro-batches (--pp > 1): 1f1b | gpipe


@dataclasses.dataclass
class RunSection:
    """The run: where, how long, how often, on what."""

    framework: str = "torch"             # torch | tensorflow
    out: str = "runs/default"            # run directory: config, metrics.csv, loss.png, checkpoints/, sample.txt
    max_steps: int = 300                 # optimizer steps of the run and of the LR schedule
    exit_at_step: int | None = None      # checkpoint and exit after this step (schedule unchanged)
    resume: bool = False                 # continue from the newest checkpoint in `out`
    seed: int = 1337                     # weights, data order (and dropout: seed + rank)
    log_interval: int = 10               # steps between metrics.csv rows (the last step is always logged)
    eval_interval: int = 50              # steps between validation losses (0: only at the end)
    eval_sequences: int = 64             # validation sequences per evaluation, split over the ranks
    checkpoint_interval: int = 100       # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2            # newest checkpoints kept
    precision: str = "fp32"              # fp32 | bf16 (autocast; CPU or GPU) | fp16 (autocast + loss scaling; GPU)
    device: str = "auto"                 # auto | cpu | cuda  (auto: cuda:local_rank when available)
    threads: int = 0                     # CPU threads per rank; 0: the host's cores / ranks on the host
    peak_flops: float = 0.0              # peak FLOP/s of one rank's device for MFU; 0: known GPUs, CPU estimate
    compression: str = "none"            # gradient compression on the wire: none | fp16 | bf16
    bucket_cap_mb: float = 25.0          # gradient bucket size for the fused allreduce
    tensorboard: bool = True             # also write TensorBoard events when a writer is importable
    progress: bool = True                # tqdm bar on rank 0


@dataclasses.dataclass
class SampleSection:
    """The text sample written at the end of training (and the defaults of `hvdllm sample`)."""

    prompt: str = "The "
    tokens: int = 200
    temperature: float = 0.8
    top_k: int = 40
    seed: int = 0


@dataclasses.dataclass
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
        for f in dataclasses.fields(GPTConfig):
            v = getattr(self.model, f.name, None)
            if v is not None:
                base[f.name] = v
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

# Training defaults per model preset (dotted keys), applied before any file, --set or flag.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # The README demo: 1000 x 16 sequences x 128 bytes (2M tokens, ~2 passes over the corpus); at equal
    # tokens, more smaller steps train this model further than fewer large ones.
    "tiny": {"batch.global_batch": 16, "batch.micro_batch": 8, "optim.lr": 2e-3, "run.max_steps": 1000,
             "schedule.warmup_steps": 30, "run.log_interval": 20, "run.eval_interval": 100,
             "run.checkpoint_interval": 200},
    "small": {"batch.global_batch": 32, "batch.micro_batch": 8, "optim.lr": 1e-3, "run.max_steps": 2000,
              "schedule.warmup_steps": 100, "run.eval_interval": 200, "run.checkpoint_interval": 500},
    "124m": {"batch.global_batch": 64, "batch.micro_batch": 8, "optim.lr": 6e-4, "run.max_steps": 5000,
             "schedule.warmup_steps": 200, "run.eval_interval": 500, "run.checkpoint_interval": 1000,
             "optim.fused": True},
}

FRAMEWORKS = ("torch", "tensorflow")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
DECAYS = ("cosine", "linear", "constant")
PIPELINE_SCHEDULES = ("1f1b", "gpipe")
COMPRESSIONS = ("none", "fp16", "bf16")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` (from TOML/YAML, or a --set string) as the field's type; ConfigError if it is not one."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if isinstance(value, str):
        s = value.strip()
        if optional and s.lower() in ("none", "null", ""):
            return None
        if base is bool:
            if s.lower() in ("true", "1", "yes", "on"):
                return True
            if s.lower() in ("false", "0", "no", "off"):
                return False
        elif base is int:
            try:
                return int(s)
            except ValueError:
                pass
        elif base is float:
            try:
                return float(s)
            except ValueError:
                pass
        elif base is str:
            return value
        raise ConfigError(f"{key}={value!r} is not a {base.__name__}")
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}=None is not allowed; give a {base.__name__}")
    if base is bool and isinstance(value, bool):
        return value
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}={value!r} is not a {base.__name__}")


def _check_key(key: str, where: str) -> tuple[str, str]:
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name:
        raise ConfigError(f"unknown config key {key!r}{where}; sections: {', '.join(SECTIONS)} (keys are section.field)")
    fields = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if name not in fields:
        raise ConfigError(f"unknown config key {key!r}{where}; {section}.* keys: {', '.join(fields)}")
    return section, name


def flatten(tree: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """A nested mapping (TOML tables, YAML maps) as ``{"section.field": value}``; dotted keys pass through."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            for k2, v2 in v.items():
                if isinstance(v2, Mapping):
                    raise ConfigError(f"config key {k}.{k2}{where} nests too deep: use [section] field = value")
                out[f"{k}.{k2}"] = v2
        else:
            out[str(k)] = v
    for key in out:
        _check_key(key, where)
    return out


def load_file(path: str) -> dict[str, Any]:
    """Read a ``.toml`` or ``.yaml``/``.yml`` config file as dotted keys (ConfigError if unreadable)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    where = f" in {path}"
    if p.suffix == ".toml":
        import tomllib

        try:
            tree = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config {path}: not valid TOML ({str(e).splitlines()[0]})") from None
    elif p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml)") from None
        try:
            tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(tree, Mapping):
            raise ConfigError(f"--config {path}: the top level must be a mapping of sections")
    else:
        raise ConfigError(f"--config {path}: unknown format; allowed: .toml, .yaml, .yml")
    return flatten(tree, where)


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``--set section.key=value`` items as dotted keys (values stay strings until coerced)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _check_key(key.strip(), " (--set)")
        out[key.strip()] = value
    return out


def build(layers: list[Mapping[str, Any]]) -> TrainConfig:
    """A validated TrainConfig from dotted-key layers (later layers win); the preset's defaults go first."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    preset = merged.get("model.preset", ModelSection.preset)
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    final = {**TRAIN_PRESETS.get(preset, {}), **merged}
    cfg = TrainConfig()
    for key, value in final.items():
        section, name = _check_key(key, "")
        sec = getattr(cfg, section)
        setattr(sec, name, _coerce(key, value, _hints(type(sec))[name]))
    validate(cfg)
    return cfg


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    _need(value in allowed, f"{key}={value!r} is not allowed; allowed: {', '.join(allowed)}")


def validate(cfg: TrainConfig) -> None:
    """Range checks that need no data and no world size (see :func:`plan` for those)."""
    m, d, o, s, b, p, r = cfg.model, cfg.data, cfg.optim, cfg.schedule, cfg.batch, cfg.parallel, cfg.run
    _choice("run.framework", r.framework, FRAMEWORKS)
    _choice("run.precision", r.precision, PRECISIONS)
    _choice("run.device", r.device, DEVICES)
    _choice("run.compression", r.compression, COMPRESSIONS)
    _choice("schedule.decay", s.decay, DECAYS)
    _choice("parallel.schedule", p.schedule, PIPELINE_SCHEDULES)
    _choice("data.tokenizer", d.tokenizer, ("byte", "bpe"))
    gpt = cfg.gpt_config()
    for key, v in (("batch.global_batch", b.global_batch), ("batch.micro_batch", b.micro_batch),
                   ("run.max_steps", r.max_steps), ("parallel.tp", p.tp), ("parallel.pp", p.pp),
                   ("run.log_interval", r.log_interval), ("run.eval_sequences", r.eval_sequences),
                   ("run.keep_checkpoints", r.keep_checkpoints)):
        _need(v >= 1, f"{key}={v} must be >= 1")
    for key, v in (("run.eval_interval", r.eval_interval), ("run.checkpoint_interval", r.checkpoint_interval),
                   ("schedule.warmup_steps", s.warmup_steps), ("run.threads", r.threads),
                   ("sample.tokens", cfg.sample.tokens), ("sample.top_k", cfg.sample.top_k),
                   ("optim.weight_decay", o.weight_decay), ("run.peak_flops", r.peak_flops)):
        _need(v >= 0, f"{key}={v} must be >= 0")
    _need(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    _need(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"optim.beta1={o.beta1}, optim.beta2={o.beta2} must be in [0, 1)")
    _need(o.eps > 0, f"optim.eps={o.eps} must be > 0")
    _need(o.max_grad_norm is None or o.max_grad_norm > 0, f"optim.max_grad_norm={o.max_grad_norm} must be > 0 (or none)")
    _need(0 <= s.min_lr_ratio <= 1, f"schedule.min_lr_ratio={s.min_lr_ratio} must be in [0, 1]")
    _need(0 < d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be in (0, 1)")
    _need(257 <= d.bpe_vocab_size <= 65536, f"data.bpe_vocab_size={d.bpe_vocab_size} must be in [257, 65536]")
    _need(gpt.vocab_size <= 65536, f"model.vocab_size={gpt.vocab_size} must be <= 65536 (tokens are uint16)")
    _need(cfg.sample.temperature > 0, f"sample.temperature={cfg.sample.temperature} must be > 0")
    _need(b.global_batch % b.micro_batch == 0,
          f"--global-batch {b.global_batch} is not divisible by --micro-batch {b.micro_batch}")
    if d.seq_len is not None:
        _need(d.seq_len >= 1, f"data.seq_len={d.seq_len} must be >= 1")
        _need(d.seq_len <= gpt.block_size,
              f"data.seq_len={d.seq_len} is longer than the model's context (model.block_size={gpt.block_size})")
    if r.exit_at_step is not None:
        _need(1 <= r.exit_at_step <= r.max_steps,
              f"--exit-at-step {r.exit_at_step} must be in [1, --max-steps {r.max_steps}]")
    _need(bool(r.out), "run.out must name a directory")
    _need(p.pp <= gpt.n_layer, f"--pp {p.pp} is more pipeline stages than model.n_layer={gpt.n_layer} layers; "
                               f"allowed: 1..{gpt.n_layer}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How the global batch maps onto this job's ranks."""

    world_size: int
    dp_size: int
    accum: int               # micro-batches per rank per optimizer step
    per_rank: int            # sequences per rank per optimizer step

    @property
    def tokens_per_step(self) -> int:
        return self.per_rank * self.dp_size


def plan(cfg: TrainConfig, world_size: int, seq_len: int | None = None) -> Plan:
    """Data-parallel size and gradient accumulation for ``world_size`` ranks (ConfigError if it does not divide)."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    _need(world_size % (tp * pp) == 0,
          f"{world_size} ranks cannot be split into --tp {tp} x --pp {pp} groups")
    dp = world_size // (tp * pp)
    g, mb = cfg.batch.global_batch, cfg.batch.micro_batch
    _need(g % (mb * dp) == 0,
          f"--global-batch {g} is not divisible by --micro-batch {mb} x {dp} data-parallel ranks")
    return Plan(world_size=world_size, dp_size=dp, accum=g // (mb * dp), per_rank=g // dp)


# -- saving -----------------------------------------------------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def to_toml(cfg: TrainConfig) -> str:
    """The config as TOML that ``--config`` reads back (None fields are left out: they mean "default")."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None)
        lines.append("")
    return "\n".join(lines)


def resolved(cfg: TrainConfig, vocab_size: int) -> TrainConfig:
    """A copy with the model shape and sequence length filled in (what the run directory records)."""
    out = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model), data=dataclasses.replace(cfg.data))
    gpt = cfg.gpt_config(vocab_size)
    for f in dataclasses.fields(GPTConfig):
        setattr(out.model, f.name, getattr(gpt, f.name))
    out.data.seq_len = cfg.data.seq_len or gpt.block_size
    return out


def from_dict(tree: Mapping[str, Any]) -> TrainConfig:
    """Inverse of ``to_dict`` (checkpoint metadata); unknown keys are errors, as in files."""
    return build([flatten(tree, " (saved config)")])


SAVED_CONFIG = "config.toml"
NOT_INHERITED = ("run.resume", "run.exit_at_step", "run.out")


def saved_layer(out_dir: str) -> dict[str, Any]:
    """The resolved config saved in a run directory, minus per-invocation keys, as a layer for --resume."""
    p = Path(out_dir) / SAVED_CONFIG
    if not p.is_file():
        return {}
    layer = load_file(str(p))
    return {k: v for k, v in layer.items() if k not in NOT_INHERITED}
