"""horovod.keras.callbacks for Keras 3: the callbacks of :mod:`hvdllm.tensorflow.callbacks`."""
from hvdllm.tensorflow.callbacks import (BestModelCheckpoint, BroadcastGlobalVariablesCallback,
                                         LearningRateScheduleCallback, LearningRateWarmupCallback,
                                         MetricAverageCallback)

__all__ = ["BroadcastGlobalVariablesCallback", "MetricAverageCallback", "LearningRateScheduleCallback",
           "LearningRateWarmupCallback", "BestModelCheckpoint"]
