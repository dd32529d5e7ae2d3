"""horovod.tensorflow.keras.callbacks for Keras 3: the callbacks of :mod:`hvdllm.tensorflow.callbacks`."""
from hvdllm.core.horovod_util import is_version_greater_equal_than
from hvdllm.tensorflow.callbacks import (BestModelCheckpoint, BroadcastGlobalVariablesCallback,
                                         LearningRateScheduleCallback, LearningRateWarmupCallback,
                                         MetricAverageCallback)

__all__ = ["BroadcastGlobalVariablesCallback", "MetricAverageCallback", "LearningRateScheduleCallback",
           "LearningRateWarmupCallback", "BestModelCheckpoint", "is_version_greater_equal_than"]
