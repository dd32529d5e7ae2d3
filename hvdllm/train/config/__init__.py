"""The training configuration of ``hvdllm train``: one documented tree of frozen dataclasses, shared by
the torch and Keras trainers.

- :mod:`.fields`: the field spec (help, choices, bounds) and the one coercion/check that walks it;
- :mod:`.schema`: the sections, :class:`TrainConfig` and the rules that relate fields;
- :mod:`.layers`: preset training defaults and merging the layers (later ones win: field defaults <
  the preset's < the resumed run's saved config < ``--config FILE`` < ``--set`` < the named flags);
- :mod:`.files`: TOML/YAML files, ``--set`` items, TOML output; :mod:`.keys`: the key listing for help;
- :mod:`.layout`: the global batch on a dp x tp x pp grid of ranks.

Every problem is a :class:`ConfigError` whose one-line message names the key, the bad value and what
is allowed; the CLI turns it into exit status 2 before anything is written.
"""
from hvdllm.train.config.fields import ConfigError, FieldSpec, Knob, knob
from hvdllm.train.config.files import (NOT_INHERITED, SAVED_CONFIG, flatten, from_dict, load_file, parse_sets,
                                       saved_layer, to_toml)
from hvdllm.train.config.keys import describe_keys
from hvdllm.train.config.layers import TRAIN_PRESETS, build
from hvdllm.train.config.layout import Plan, plan
from hvdllm.train.config.schema import (SECTIONS, SPECS, BatchSection, DataSection, ModelSection, OptimSection,
                                        ParallelSection, RunSection, SampleSection, ScheduleSection, TrainConfig,
                                        from_flat, resolved, spec, validate)

__all__ = [
    "ConfigError", "FieldSpec", "Knob", "knob", "NOT_INHERITED", "SAVED_CONFIG", "flatten", "from_dict", "load_file",
    "parse_sets", "saved_layer", "to_toml", "describe_keys", "TRAIN_PRESETS", "build", "Plan", "plan", "SECTIONS",
    "SPECS", "BatchSection", "DataSection", "ModelSection", "OptimSection", "ParallelSection", "RunSection",
    "SampleSection", "ScheduleSection", "TrainConfig", "from_flat", "resolved", "spec", "validate",
]
