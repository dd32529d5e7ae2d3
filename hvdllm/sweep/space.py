"""The search space of ``hvdllm sweep``: a TOML or YAML file of config keys and what to try for each.

Forms (``key`` is any ``hvdllm train`` config key, ``section.field``)::

    optim.lr = {log_uniform = [1e-4, 3e-3]}      # float, log-uniform in [low, high]   (low > 0)
    optim.beta2 = {uniform = [0.9, 0.99]}         # float, uniform in [low, high]
    schedule.warmup_steps = {int_uniform = [0, 50]}   # integer in [low, high] (both included)
    optim.weight_decay = [0.0, 0.1]              # a list: categorical; the grid sampler's values

Keys may also be nested (``[optim]`` tables, YAML maps). Every problem is a ConfigError naming the bad
key or value, raised before anything is written.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from typing import Any, Mapping

from hvdllm.train import config as C
from hvdllm.train.config import ConfigError
from hvdllm.train.config.files import read_tree

RANGE_KINDS = ("log_uniform", "uniform", "int_uniform")
# Keys the sweep sets itself, for every trial.
RESERVED_KEYS = ("run.out", "run.resume", "run.exit_at_step")


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched key: a range (``kind`` in RANGE_KINDS, ``low``..``high``) or ``choices``."""

    key: str
    kind: str                        # "categorical" | "log_uniform" | "uniform" | "int_uniform"
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()

    @property
    def continuous(self) -> bool:
        return self.kind in ("log_uniform", "uniform")

    def grid_values(self) -> tuple[Any, ...]:
        """The values a grid sweep tries (categorical: the list; int_uniform: every integer)."""
        if self.kind == "categorical":
            return self.choices
        if self.kind == "int_uniform":
            return tuple(range(int(self.low), int(self.high) + 1))
        raise ConfigError(f"--sampler grid needs lists (or int_uniform); {self.key} is {self.kind}: "
                          "use --sampler random or tpe, or give a list of values")

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {self.key: list(self.choices)}
        return {self.key: {self.kind: [self.low, self.high]}}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _param(key: str, spec: Any, where: str) -> Param:
    if key in RESERVED_KEYS:
        raise ConfigError(f"{key}{where} cannot be searched: the sweep sets it for every trial")
    C.parse_sets([f"{key}=0"])                      # unknown key -> ConfigError naming the allowed keys
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{key}{where}: empty list; give at least one value")
        if any(isinstance(v, (list, dict)) for v in spec):
            raise ConfigError(f"{key}{where}: list values must be numbers, strings or booleans")
        if len(set(map(repr, spec))) != len(spec):
            raise ConfigError(f"{key}{where}: repeated values in {spec}")
        return Param(key, "categorical", choices=tuple(spec))
    if isinstance(spec, Mapping) and len(spec) == 1 and next(iter(spec)) in RANGE_KINDS:
        kind, bounds = next(iter(spec.items()))
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(_is_number(b) for b in bounds)):
            raise ConfigError(f"{key}{where}: {kind} needs [low, high] numbers, got {bounds!r}")
        low, high = bounds
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise ConfigError(f"{key}{where}: {kind} = [{low}, {high}] needs low < high")
        if kind == "log_uniform" and low <= 0:
            raise ConfigError(f"{key}{where}: log_uniform = [{low}, {high}] needs low > 0")
        if kind == "int_uniform" and not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"{key}{where}: int_uniform = [{low}, {high}] needs integers")
        return Param(key, kind, low=low, high=high)
    raise ConfigError(f"{key}{where}: expected a list of values or {{log_uniform|uniform|int_uniform = [low, high]}}, "
                      f"got {spec!r}")


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and not (len(v) == 1 and next(iter(v)) in RANGE_KINDS):
            out.extend(_leaves(v, key + "."))
        else:
            out.append((key, v))
    return out


def parse_space(tree: Mapping[str, Any], where: str = "") -> list[Param]:
    """The Params of a parsed space file (nested or dotted keys), in file order."""
    params = [_param(k, v, where) for k, v in _leaves(tree)]
    if not params:
        raise ConfigError(f"the search space{where} is empty; give at least one key")
    return params


def load_space(path: str) -> list[Param]:
    """Read a ``.toml`` or ``.yaml``/``.yml`` search space (ConfigError if missing, unreadable or bad)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--space {path}: no such file")
    where = f" in {path}"
    tree = read_tree(p, path, "--space")
    if not isinstance(tree, Mapping):
        raise ConfigError(f"--space {path}: the top level must be a mapping of keys")
    return parse_space(tree, where)


def grid(params: list[Param]) -> list[dict[str, Any]]:
    """Every combination of the params' grid values, the last key varying fastest."""
    values = [p.grid_values() for p in params]
    return [dict(zip([p.key for p in params], combo)) for combo in itertools.product(*values)]
