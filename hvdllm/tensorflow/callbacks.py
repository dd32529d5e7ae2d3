"""Keras 3 callbacks for data-parallel ``model.fit``, with horovod.tensorflow.keras.callbacks' names,
signatures and semantics (Horovod's own crash on Keras 3). ``hvdllm.tensorflow.keras.callbacks`` and
``hvdllm.keras.callbacks`` are this module.

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
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from hvdllm.core.gradients import warmup_multiplier
from hvdllm.tensorflow.basics import allreduce, rank, size
from hvdllm.tensorflow.distributed import broadcast_variables, is_distributed
from hvdllm.tensorflow.util import device_scope, ref


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """Broadcast the model's and the optimizer's variables from ``root_rank`` when training begins.

    Keras 3 builds the optimizer before ``on_train_begin``, so the broadcast happens before the first
    step and every rank starts from root's weights and optimizer state (Horovod broadcasts after the
    first batch). ``local_variables`` (or ``register_local_var``) are left alone; ``device`` places the
    broadcast. It also turns XLA off (``model.jit_compile = False``, with a warning) when the model's
    optimizer is distributed, because the collectives have no XLA kernels.
    """

    def __init__(self, root_rank: int, device: str = "", local_variables: Any = None) -> None:
        super().__init__()
        if isinstance(root_rank, bool) or not isinstance(root_rank, int) or root_rank < 0:
            raise ValueError(f"root_rank={root_rank!r} must be an integer >= 0")
        self.root_rank = root_rank
        self.device = device
        self.broadcast_done = False
        self._local_vars: set[Any] = set()
        if local_variables is not None:
            for var in ([local_variables] if hasattr(local_variables, "assign") else local_variables):
                if not hasattr(var, "assign"):
                    raise ValueError(f"local_variables must be variables, got {type(var).__name__}")
                self.register_local_var(var)

    def register_local_var(self, var: Any) -> None:
        """Leave ``var`` out of the broadcast (a worker-local variable)."""
        self._local_vars.add(ref(var))

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
        with device_scope(self.device):
            broadcast_variables([v for v in variables if ref(v) not in self._local_vars], root_rank=self.root_rank)
        self.broadcast_done = True


class MetricAverageCallback(keras.callbacks.Callback):
    """Replace each epoch's metrics (training and validation) with their mean over the ranks.

    One allreduce per epoch of all numeric log values, in sorted key order (the same on every rank).
    """

    def __init__(self, device: str = "") -> None:
        super().__init__()
        self.device = device

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        keys = sorted(k for k, v in logs.items() if isinstance(v, (int, float, np.floating, np.integer))
                      or (hasattr(v, "shape") and tuple(v.shape) == ()))
        if not keys:
            return
        values = tf.constant([float(logs[k]) for k in keys], dtype=tf.float64)
        with device_scope(self.device):
            mean = allreduce(values).numpy()
        for k, v in zip(keys, mean):
            logs[k] = float(v)


class _LiveValue:
    """A hyper-parameter the optimizer reads as a constant (SGD's ``momentum``) made live: it compares as
    its initial float (Keras's ``momentum != 0`` / ``> 0`` branches), and converts to a tensor reading a variable,
    so a compiled train step sees every change without retracing."""

    def __init__(self, value: float) -> None:
        self.initial = float(value)
        with tf.init_scope():
            self.var = tf.Variable(self.initial, trainable=False, dtype=tf.float64, name="hvdllm_live_hyper")

    def __eq__(self, other: object) -> bool:
        return self.initial == other

    def __ne__(self, other: object) -> bool:
        return self.initial != other

    def __lt__(self, other: Any) -> bool:
        return self.initial < other

    def __gt__(self, other: Any) -> bool:
        return self.initial > other

    def __le__(self, other: Any) -> bool:
        return self.initial <= other

    def __ge__(self, other: Any) -> bool:
        return self.initial >= other

    def __bool__(self) -> bool:
        return bool(self.initial)

    def __hash__(self) -> int:
        return hash(self.initial)

    def __float__(self) -> float:
        return float(self.var.numpy())


def _live_to_tensor(value: _LiveValue, dtype: Any = None, name: Any = None, as_ref: bool = False) -> tf.Tensor:
    read = value.var.read_value()
    return tf.cast(read, dtype) if dtype is not None else read


tf.register_tensor_conversion_function(_LiveValue, _live_to_tensor)


def _lr(opt: Any) -> float:
    if isinstance(opt._learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        raise ValueError("learning-rate callbacks need a numeric learning_rate, got a "
                         f"{type(opt._learning_rate).__name__}; allowed: a float")
    return float(opt.learning_rate.numpy() if hasattr(opt.learning_rate, "numpy") else opt.learning_rate)


class LearningRateScheduleCallback(keras.callbacks.Callback):
    """Horovod's learning-rate schedule: ``lr = initial_lr * multiplier(epoch)`` within
    [``start_epoch``, ``end_epoch``).

    ``multiplier`` is a function of the epoch or a number m (then ``m ** (epoch - start_epoch)``).
    ``staircase=True`` sets the rate on each epoch's first batch with the integer epoch; ``False`` on every
    batch with the fractional epoch ``epoch + batch / steps_per_epoch`` (``steps_per_epoch`` is taken from
    ``model.fit`` when not given). ``momentum_correction`` (optimizers with ``momentum``) scales the
    momentum by new_lr / old_lr for the batch whose rate changed, then restores it (Goyal et al., 2017);
    it works inside compiled train steps too. Each epoch's logs get ``lr``.
    """

    def __init__(self, initial_lr: float, multiplier: float | Callable[[float], float], start_epoch: int = 0,
                 end_epoch: int | None = None, staircase: bool = True, momentum_correction: bool = True,
                 steps_per_epoch: int | None = None) -> None:
        super().__init__()
        if initial_lr is None or isinstance(initial_lr, bool) or not isinstance(initial_lr, (int, float)) \
                or not math.isfinite(initial_lr) or initial_lr <= 0:
            raise ValueError(f"initial_lr={initial_lr!r} must be a finite number > 0")
        if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
            raise ValueError(f"steps_per_epoch={steps_per_epoch!r} must be an integer >= 1 or None")
        if not callable(multiplier):
            if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)):
                raise ValueError(f"multiplier={multiplier!r} must be a number or a function of the epoch")
            factor = float(multiplier)
            multiplier = lambda epoch: factor ** (epoch - start_epoch)  # noqa: E731
        self.initial_lr = float(initial_lr)
        self.multiplier = multiplier
        self.start_epoch, self.end_epoch, self.staircase = start_epoch, end_epoch, staircase
        self.momentum_correction = momentum_correction
        self.steps_per_epoch = steps_per_epoch
        self.current_epoch = 0
        self.restore_momentum: float | None = None
        self._live: _LiveValue | None = None
        self._plain_momentum: Any = None

    def _autodetect_steps_per_epoch(self) -> int:
        params = self.params or {}
        if params.get("steps"):
            return int(params["steps"])
        if params.get("samples") and params.get("batch_size"):
            return int(params["samples"]) // int(params["batch_size"])
        raise ValueError(f"steps_per_epoch=None and model.fit does not know the epoch length; allowed: pass "
                         f"steps_per_epoch=N to {type(self).__name__}()")

    def on_train_begin(self, logs: dict | None = None) -> None:
        if not self.staircase and not self.steps_per_epoch:
            self.steps_per_epoch = self._autodetect_steps_per_epoch()
        opt = self.model.optimizer
        momentum = getattr(opt, "momentum", None)
        if self.momentum_correction and isinstance(momentum, (int, float)) and momentum:
            self._plain_momentum, self._live = momentum, _LiveValue(momentum)
            object.__setattr__(opt, "momentum", self._live)   # outside Keras's tracking: not saved, not broadcast
            self.model.make_train_function(force=True)        # trace the step again with the live value

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._live is not None:
            object.__setattr__(self.model.optimizer, "momentum", self._plain_momentum)
            self.model.train_function = None
            self._live = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.current_epoch = epoch

    def _momentum(self) -> float | None:
        return float(self._live.var.numpy()) if self._live is not None else None

    def _adjust_learning_rate(self, epoch: float) -> None:
        opt = self.model.optimizer
        old_lr = _lr(opt)
        new_lr = self.initial_lr * self.multiplier(epoch)
        opt.learning_rate = new_lr
        if self._live is not None and old_lr > 0:
            self.restore_momentum = self._momentum()
            self._live.var.assign(self.restore_momentum * new_lr / old_lr)

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if self.current_epoch < self.start_epoch or (self.end_epoch is not None
                                                     and self.current_epoch >= self.end_epoch):
            return
        if self.staircase and batch == 0:
            self._adjust_learning_rate(self.current_epoch)
        elif not self.staircase:
            self._adjust_learning_rate(self.current_epoch + float(batch) / self.steps_per_epoch)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.restore_momentum is not None and self._live is not None:
            self._live.var.assign(self.restore_momentum)
            self.restore_momentum = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["lr"] = _lr(self.model.optimizer)


class LearningRateWarmupCallback(LearningRateScheduleCallback):
    """Gradual warmup (Goyal et al., 2017), Horovod's: lr grows from ``initial_lr / size`` to
    ``initial_lr`` batch by batch over ``warmup_epochs``, then stays (see
    :func:`hvdllm.core.gradients.warmup_multiplier`). ``initial_lr`` is the scaled rate (single-rank lr x
    number of ranks); the optimizer's learning rate must be a number, not a ``LearningRateSchedule``.
    """

    def __init__(self, initial_lr: float, warmup_epochs: float = 5, momentum_correction: bool = True,
                 steps_per_epoch: int | None = None, verbose: int = 0) -> None:
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, (int, float)) or warmup_epochs <= 0:
            raise ValueError(f"warmup_epochs={warmup_epochs!r} must be > 0")

        def multiplier(epoch: float) -> float:
            return warmup_multiplier(epoch + 1.0 / self.steps_per_epoch, size(), warmup_epochs)

        super().__init__(initial_lr, multiplier, start_epoch=0, end_epoch=math.ceil(warmup_epochs),
                         staircase=False, momentum_correction=momentum_correction, steps_per_epoch=steps_per_epoch)
        self.warmup_epochs = warmup_epochs
        self.verbose = verbose

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        super().on_epoch_end(epoch, logs)
        if epoch == self.end_epoch - 1 and self.verbose > 0 and rank() == 0:
            print(f"\nEpoch {epoch + 1}: finished gradual learning rate warmup to {_lr(self.model.optimizer):g}.")


class BestModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """Horovod's ``ModelCheckpoint`` that keeps only the best model (``save_best_only=True``).

    As in Horovod the path is not an argument of Horovod's signature: set ``callback.filepath`` (a
    ``.keras`` file, or ``.weights.h5`` with ``save_weights_only``) before training, or pass hvdllm's
    keyword ``filepath=``. Add it on rank 0 only, as Horovod's examples do with checkpoints.
    """

    def __init__(self, monitor: str = "val_loss", verbose: int = 0, save_weights_only: bool = False,
                 mode: str = "auto", save_freq: Any = "epoch", *, filepath: str | None = None) -> None:
        placeholder = "best.weights.h5" if save_weights_only else "best.keras"
        super().__init__(filepath=placeholder, monitor=monitor, verbose=verbose, save_best_only=True,
                         save_weights_only=save_weights_only, mode=mode, save_freq=save_freq)
        self.filepath = filepath

    def on_train_begin(self, logs: dict | None = None) -> None:
        if not self.filepath:
            raise ValueError("BestModelCheckpoint.filepath=None: set callback.filepath to a .keras file "
                             "(a .weights.h5 file with save_weights_only=True) before model.fit")
        self.filepath = str(self.filepath)
        super().on_train_begin(logs)


__all__ = ["BroadcastGlobalVariablesCallback", "MetricAverageCallback", "LearningRateScheduleCallback",
           "LearningRateWarmupCallback", "BestModelCheckpoint"]
