"""horovod.keras.callbacks for Keras 3: the callbacks of :mod:`hvdllm.tensorflow.callbacks`, with
horovod.keras's ``BestModelCheckpoint`` signature (no ``save_weights_only``)."""
from __future__ import annotations

from typing import Any

from hvdllm.tensorflow import callbacks as _tf
from hvdllm.tensorflow.callbacks import (BroadcastGlobalVariablesCallback, LearningRateScheduleCallback,
                                         LearningRateWarmupCallback, MetricAverageCallback)


class BestModelCheckpoint(_tf.BestModelCheckpoint):
    """Keep only the best model (a ``.keras`` file): set ``callback.filepath`` or pass ``filepath=``."""

    def __init__(self, monitor: str = "val_loss", verbose: int = 0, mode: str = "auto", save_freq: Any = "epoch", *,
                 filepath: str | None = None) -> None:
        super().__init__(monitor, verbose, False, mode, save_freq, filepath=filepath)


__all__ = ["BroadcastGlobalVariablesCallback", "MetricAverageCallback", "LearningRateScheduleCallback",
           "LearningRateWarmupCallback", "BestModelCheckpoint"]
