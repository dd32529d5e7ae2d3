"""Config files: reading ``.toml``/``.yaml`` and ``--set`` items as dotted-key layers, writing the
resolved config as TOML (``config.toml`` in the run directory, a valid ``--config`` file)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from hvdllm.train.config.fields import ConfigError
from hvdllm.train.config.layers import build
from hvdllm.train.config.schema import TrainConfig, spec

SAVED_CONFIG = "config.toml"
NOT_INHERITED = ("run.resume", "run.exit_at_step", "run.out", "run.allow_data_change", "run.allow_batch_change",
                 "run.allow_seed_change", "run.elastic")


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
        spec(key, where)
    return out


def read_tree(p: Path, path: str, flag: str = "--config") -> Any:
    """The parsed tree of a ``.toml`` or ``.yaml``/``.yml`` file (ConfigError naming ``flag`` if unreadable)."""
    if p.suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{flag} {path}: not valid TOML ({str(e).splitlines()[0]})") from None
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{flag} {path}: reading YAML needs PyYAML (pip install pyyaml)") from None
        try:
            return yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{flag} {path}: not valid YAML ({' '.join(str(e).split())})") from None
    raise ConfigError(f"{flag} {path}: unknown format; allowed: .toml, .yaml, .yml")


def load_file(path: str) -> dict[str, Any]:
    """Read a ``.toml`` or ``.yaml``/``.yml`` config file as dotted keys (ConfigError if unreadable)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    tree = read_tree(p, path)
    if not isinstance(tree, Mapping):
        raise ConfigError(f"--config {path}: the top level must be a mapping of sections")
    return flatten(tree, f" in {path}")


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``--set section.key=value`` items as dotted keys (values stay strings until coerced)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        spec(key.strip(), " (--set)")
        out[key.strip()] = value
    return out


def _toml_string(s: str) -> str:
    """A TOML basic string: quote, backslash and control characters escaped, everything else verbatim."""
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return _toml_string(str(v))


def to_toml(cfg: TrainConfig) -> str:
    """The config as TOML that ``--config`` reads back. TOML has no null: a None that is the default is
    left out, one that is not (``optim.max_grad_norm``: no clipping) is written as "none"."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            if v is not None or spec(f"{section}.{k}").default is not None:
                lines.append(f"{k} = {_toml_value('none' if v is None else v)}")
        lines.append("")
    return "\n".join(lines)


def from_dict(tree: Mapping[str, Any]) -> TrainConfig:
    """Inverse of ``to_dict`` (checkpoint metadata); unknown keys are errors, as in files."""
    return build([flatten(tree, " (saved config)")])


def saved_layer(out_dir: str) -> dict[str, Any]:
    """The resolved config saved in a run directory, minus per-invocation keys, as a layer for --resume."""
    p = Path(out_dir) / SAVED_CONFIG
    if not p.is_file():
        return {}
    return {k: v for k, v in load_file(str(p)).items() if k not in NOT_INHERITED}
