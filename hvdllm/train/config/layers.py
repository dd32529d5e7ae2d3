"""Building a config from layers, later ones winning: field defaults < the preset's training defaults
(:data:`TRAIN_PRESETS`) < the saved config of the run being resumed < ``--config FILE`` <
``--set section.key=value`` < the named flags (``--max-steps`` ...)."""
from __future__ import annotations

from typing import Any, Mapping

from hvdllm.train.config.schema import ModelSection, TrainConfig, from_flat, spec

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
             "schedule.warmup_steps": 200, "run.eval_interval": 500, "run.checkpoint_interval": 1000},
}


def build(layers: list[Mapping[str, Any]]) -> TrainConfig:
    """A validated TrainConfig from dotted-key layers (later layers win); the preset's defaults go first."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    preset = spec("model.preset").coerce(merged.get("model.preset", ModelSection.preset))
    return from_flat({**TRAIN_PRESETS.get(preset, {}), **merged})
