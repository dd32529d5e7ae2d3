"""Keras 3 callbacks for data-parallel ``model.fit`` (Horovod's names; Horovod's own crash on Keras 3).

    callbacks = [
        hvd.callbacks.BroadcastGlobalVariablesCallback(0),     # same start on every rank
        hvd.callbacks.MetricAverageCallback(),                 # epoch metrics averaged over ranks
        hvd.callbacks.LearningRateWarmupCallback(initial_lr=lr * hvd.size(), warmup_epochs=3),
    ]

Put them before other callbacks that read the logs (checkpointing, early stopping, TensorBoard).
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from hvdllm.core.gradients import gradual_warmup_lr
from hvdllm.tensorflow.basics import allreduce, rank, size
from hvdllm.tensorflow.distributed import broadcast_variables, is_distributed


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """Broadcast the model's and the optimizer's variables from ``root_rank`` when training begins.

    Keras 3 builds the optimizer before ``on_train_begin``, so the broadcast happens before the first
    step and every rank starts from root's weights and optimizer state. It also turns XLA off
    (``model.jit_compile = False``, with a warning) when the model's optimizer is distributed, because
    the collectives have no XLA kernels.
    """

    def __init__(self, root_rank: int = 0) -> None:
        super().__init__()
        if isinstance(root_rank, bool) or not isinstance(root_rank, int) or root_rank < 0:
            raise ValueError(f"root_rank={root_rank!r} must be an integer >= 0")
        self.root_rank = root_rank
        self.broadcast_done = False

    def set_model(self, model: Any) -> None:
        super().set_model(model)
        if is_distributed(getattr(model, "optimizer", None)) and getattr(model, "jit_compile", False):
            warnings.warn("hvdllm: turning jit_compile off, the distributed optimizer's collectives cannot be "
                          "XLA-compiled", stacklevel=2)
            model.jit_compile = False
            model.train_function = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self.broadcast_done:
            return
        if self.root_rank >= size():
            raise ValueError(f"root_rank={self.root_rank} must be < the number of ranks {size()}")
        opt = self.model.optimizer
        if opt is not None and not opt.built:
            opt.build(self.model.trainable_variables)
        variables = list(self.model.variables) + (list(opt.variables) if opt is not None else [])
        broadcast_variables(variables, root_rank=self.root_rank)
        self.broadcast_done = True


class MetricAverageCallback(keras.callbacks.Callback):
    """Replace each epoch's metrics (training and validation) with their mean over the ranks.

    One allreduce per epoch of all numeric log values, in sorted key order (the same on every rank).
    """

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        keys = sorted(k for k, v in logs.items() if isinstance(v, (int, float, np.floating, np.integer))
                      or (hasattr(v, "shape") and tuple(v.shape) == ()))
        if not keys:
            return
        values = tf.constant([float(logs[k]) for k in keys], dtype=tf.float64)
        mean = allreduce(values).numpy()
        for k, v in zip(keys, mean):
            logs[k] = float(v)


class LearningRateWarmupCallback(keras.callbacks.Callback):
    """Gradual warmup (Goyal et al., 2017): lr grows from ``initial_lr / size`` to ``initial_lr``.

    Set per batch over the first ``warmup_epochs`` epochs (see
    :func:`hvdllm.core.gradients.gradual_warmup_lr`), then left at ``initial_lr``. ``initial_lr`` is the
    scaled rate (single-rank lr x number of ranks). The optimizer's learning rate must be a number (a
    Keras variable), not a ``LearningRateSchedule``.
    """

    def __init__(self, initial_lr: float, warmup_epochs: float = 5, steps_per_epoch: int | None = None,
                 verbose: int = 0) -> None:
        super().__init__()
        if isinstance(initial_lr, bool) or not isinstance(initial_lr, (int, float)) \
                or not math.isfinite(initial_lr) or initial_lr <= 0:
            raise ValueError(f"initial_lr={initial_lr!r} must be a finite number > 0")
        if not isinstance(warmup_epochs, (int, float)) or warmup_epochs <= 0:
            raise ValueError(f"warmup_epochs={warmup_epochs!r} must be > 0")
        if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
            raise ValueError(f"steps_per_epoch={steps_per_epoch!r} must be an integer >= 1 or None")
        self.initial_lr = float(initial_lr)
        self.warmup_epochs = warmup_epochs
        self.steps_per_epoch = steps_per_epoch
        self.verbose = verbose
        self._epoch = 0

    def _steps(self) -> int:
        steps = self.steps_per_epoch or (self.params or {}).get("steps")
        if not steps:
            raise ValueError("steps_per_epoch=None and model.fit does not know the epoch length; "
                             "allowed: pass steps_per_epoch=N")
        return int(steps)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if self._epoch >= self.warmup_epochs:
            return
        opt = self.model.optimizer
        if isinstance(opt._learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            raise ValueError("LearningRateWarmupCallback needs a numeric learning_rate, got a "
                             f"{type(opt._learning_rate).__name__}; allowed: a float")
        opt.learning_rate = gradual_warmup_lr(self.initial_lr, size(), self.warmup_epochs,
                                              self._epoch, batch, self._steps())

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.verbose and epoch < self.warmup_epochs + 1 and rank() == 0:
            print(f"\nEpoch {epoch + 1}: learning rate {float(self.model.optimizer.learning_rate):.6g} (warmup)")
        if logs is not None:
            logs["lr"] = float(self.model.optimizer.learning_rate)
