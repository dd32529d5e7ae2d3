"""Every config key with its type, default and allowed values, in words (``hvdllm train --help``)."""
from __future__ import annotations

import textwrap
from typing import Mapping

from hvdllm.train.config.files import _toml_value
from hvdllm.train.config.layers import TRAIN_PRESETS
from hvdllm.train.config.schema import SECTIONS, SPECS


def describe_keys(flags: Mapping[str, str] | None = None, width: int = 100) -> str:
    """One entry per key, grouped by section, then the training defaults each preset sets; ``flags``
    maps a key to the command-line flag that also sets it."""
    lines = ["config keys (--set section.key=value, or [section] key = value in a --config file):"]
    for section, specs in SPECS.items():
        lines.append(f"  [{section}] {SECTIONS[section].__doc__}")
        for s in specs.values():
            default = "none" if s.default is None else _toml_value(s.default)
            flag = f"{flags[s.key]}; " if flags and s.key in flags else ""
            text = f"{s.key} ({flag}{s.base.__name__}, default {default}; allowed: {s.allowed()}): {s.knob.help}"
            lines.extend(textwrap.wrap(text, width, initial_indent="    ", subsequent_indent="        ",
                                       break_on_hyphens=False))
    lines.append("preset training defaults (applied before any file, --set or flag):")
    for preset, values in TRAIN_PRESETS.items():
        text = f"{preset}: " + ", ".join(f"{k}={_toml_value(v)}" for k, v in values.items())
        lines.extend(textwrap.wrap(text, width, initial_indent="  ", subsequent_indent="      "))
    return "\n".join(lines)
