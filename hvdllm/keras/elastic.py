"""horovod.keras.elastic for Keras 3: the state and callbacks of :mod:`hvdllm.tensorflow.keras.elastic`."""
from hvdllm.tensorflow.keras.elastic import (CommitStateCallback, KerasState, UpdateBatchStateCallback,
                                             UpdateEpochStateCallback, run)

__all__ = ["KerasState", "CommitStateCallback", "UpdateBatchStateCallback", "UpdateEpochStateCallback", "run"]
