"""Keras 3 optimizers whose math is :mod:`hvdllm.core.optim`'s, and a Keras LR schedule from the core.

``SGD``, ``Adam``, ``AdamW`` and ``LAMB`` subclass ``keras.optimizers.Optimizer`` and take Keras's
constructor arguments (``learning_rate=``, ``momentum``, ``nesterov``, ``beta_1``, ``beta_2``,
``epsilon``, ``weight_decay``, plus the base ones: ``clipnorm``, ``global_clipnorm``, ``use_ema``,
...). They work in ``model.compile/fit`` and with ``apply_gradients`` in custom loops (eager or
``tf.function``), and ``exclude_from_weight_decay`` is honoured.

Conventions: the core's, shared with :mod:`hvdllm.torch.optim`, so one recipe steps identically
in both frameworks (see :mod:`hvdllm.core.optim`):

* Momentum is kept as ``buf <- mu*buf + g`` and applied as ``p -= lr*buf`` (PyTorch's form; Keras's
  ``velocity`` is ``-lr*buf``). At constant learning rate this equals ``keras.optimizers.SGD``.
* ``weight_decay`` means L2 (added to the gradient) for ``SGD`` and ``Adam``, decoupled for
  ``AdamW`` (``p *= 1 - lr*wd``, as ``keras.optimizers.AdamW``), inside the update for ``LAMB``.
  Keras's own ``SGD``/``Adam`` decay decoupled; the core keeps the classic L2 meaning so that
  ``Adam`` and ``AdamW`` differ as their names say, in both frameworks.
* Adam's ``epsilon`` is added to the bias-corrected ``sqrt(v_hat)`` (torch, paper's Algorithm 1);
  ``epsilon_hat=True`` adds it to the uncorrected ``sqrt(v)`` as ``keras.optimizers.Adam`` does.
* Scalars (bias corrections, step sizes) are computed in float64 and cast to the variable dtype,
  as torch computes them in python floats.

Defaults follow Keras (``Adam``/``AdamW`` ``epsilon=1e-7``, ``AdamW`` ``weight_decay=0.004``).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, Optional

import keras
import tensorflow as tf

from hvdllm.core import optim as core
from hvdllm.core.schedules import LRSchedule

# The array namespace the core rules need, spelled in TensorFlow.
tf_namespace = SimpleNamespace(sqrt=tf.sqrt, sum=tf.reduce_sum, where=tf.where, cos=tf.cos,
                               minimum=tf.minimum, maximum=tf.maximum)


def _check_lr(learning_rate: Any) -> None:
    if isinstance(learning_rate, (int, float)):
        core.check_nonneg("learning_rate", learning_rate)


class _CoreKerasOptimizer(keras.optimizers.Optimizer):
    """Shared glue: weight decay handled by the core rule (not Keras's decoupled pre-step), and eager
    ``apply_gradients`` run as one traced function."""

    def _backend_update_step(self, grads: Any, trainable_variables: Any, learning_rate: Any) -> None:
        """Keras's per-variable update loop; called eagerly, it runs as one ``tf.function`` per set of
        variables (traced once, then reused). Eagerly every small op of every variable's update (the
        core rule's scalars, the moments, the assigns) pays python dispatch: at 25M parameters in 148
        variables that made an eager step 2x slower than Keras's own; traced, it is faster than Keras's
        eager step (bench/optimizer_step_keras.py). Same ops, so the same results."""
        if not tf.executing_eagerly():
            return self._update_all(grads, trainable_variables, learning_rate)
        key = tuple(self._var_key(v) for v in trainable_variables)
        traced = self._traced_updates.get(key)
        if traced is None:
            variables = list(trainable_variables)

            def update(grads: Any, learning_rate: Any) -> None:
                self._update_all(grads, variables, learning_rate)

            traced = self._traced_updates[key] = tf.function(update)
        traced(list(grads), tf.convert_to_tensor(learning_rate))

    def _update_all(self, grads: Any, trainable_variables: Any, learning_rate: Any) -> None:
        """Keras's per-variable loop, with the step count and learning rate read once for all variables:
        every variable's scalar math then hangs off the same two tensors, so the graph optimizer (grappler,
        XLA) computes it once instead of once per variable (a fresh read of ``iterations`` per variable
        kept ~150 copies apart)."""
        shared = (tf.cast(self.iterations + 1, tf.float64), tf.cast(learning_rate, tf.float64))
        object.__setattr__(self, "_hvdllm_scalars", shared)
        try:
            super()._backend_update_step(grads, trainable_variables, learning_rate)
        finally:
            object.__setattr__(self, "_hvdllm_scalars", None)

    @property
    def _traced_updates(self) -> Dict[Any, Any]:
        cache = self.__dict__.get("_hvdllm_traced")
        if cache is None:
            cache = {}
            object.__setattr__(self, "_hvdllm_traced", cache)  # not a tracked attribute (no checkpoint entry)
        return cache

    def _apply_weight_decay(self, variables: Any) -> None:
        return  # each rule applies its own weight decay, see the module docstring

    def _decay(self, variable: Any) -> float:
        if not self.weight_decay or not self._use_weight_decay(variable):
            return 0.0
        return float(self.weight_decay)

    def _scalars(self, variable: Any, learning_rate: Any):
        """(step, lr, cast): float64 scalars for the core, and a cast to the variable's dtype."""
        shared = self.__dict__.get("_hvdllm_scalars")
        if shared is not None:  # inside _update_all: read once for every variable
            step, lr = shared
        else:
            step, lr = tf.cast(self.iterations + 1, tf.float64), tf.cast(learning_rate, tf.float64)
        dtype = variable.dtype

        def cast(x: Any) -> Any:
            return tf.cast(x, dtype)

        return step, lr, cast


@keras.saving.register_keras_serializable(package="hvdllm")
class SGD(_CoreKerasOptimizer):
    """SGD with L2 weight decay, heavy-ball or Nesterov momentum (:func:`hvdllm.core.optim.sgd_step`)."""

    def __init__(self, learning_rate: Any = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: Optional[float] = None, name: str = "SGD", **kwargs: Any) -> None:
        _check_lr(learning_rate)
        core.check_sgd(0.0, momentum, nesterov, weight_decay or 0.0)
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, name=name, **kwargs)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)

    def build(self, variables: Any) -> None:
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum") if self.momentum else []

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        _, lr, cast = self._scalars(variable, learning_rate)
        gradient = tf.cast(gradient, variable.dtype)
        buf = self.momentums[self._get_variable_index(variable)] if self.momentum else None
        new_p, new_buf = core.sgd_step(
            tf_namespace, tf.convert_to_tensor(variable), gradient,
            None if buf is None else tf.convert_to_tensor(buf), lr=lr, momentum=self.momentum,
            nesterov=self.nesterov, weight_decay=self._decay(variable), cast=cast)
        if buf is not None:
            self.assign(buf, new_buf)
        self.assign(variable, new_p)

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(momentum=self.momentum, nesterov=self.nesterov)
        return config


class _AdamFamily(_CoreKerasOptimizer):
    """Shared by Adam and LAMB: their checks, the two moment slots and the call into the core's step."""

    def __init__(self, learning_rate: Any, beta_1: float, beta_2: float, epsilon: float,
                 weight_decay: Optional[float], name: str, **kwargs: Any) -> None:
        _check_lr(learning_rate)
        core.check_adam(0.0, (beta_1, beta_2), epsilon, weight_decay or 0.0)
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, name=name, **kwargs)
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)

    def build(self, variables: Any) -> None:
        if self.built:
            return
        super().build(variables)
        self._momentums = self.add_optimizer_variables(variables, "momentum")
        self._velocities = self.add_optimizer_variables(variables, "velocity")

    def _moments_step(self, step_fn: Any, gradient: Any, variable: Any, learning_rate: Any,
                      **extra: Any) -> None:
        """``step_fn`` (core.adam_step or core.lamb_step) on this variable's slots; assigns the results."""
        step, lr, cast = self._scalars(variable, learning_rate)
        i = self._get_variable_index(variable)
        m, v = self._momentums[i], self._velocities[i]
        new_p, new_m, new_v = step_fn(
            tf_namespace, tf.convert_to_tensor(variable), tf.cast(gradient, variable.dtype),
            tf.convert_to_tensor(m), tf.convert_to_tensor(v), step=step, lr=lr, beta1=self.beta_1,
            beta2=self.beta_2, eps=self.epsilon, weight_decay=self._decay(variable), cast=cast, **extra)
        self.assign(m, new_m)
        self.assign(v, new_v)
        self.assign(variable, new_p)

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon)
        return config


@keras.saving.register_keras_serializable(package="hvdllm")
class Adam(_AdamFamily):
    """Adam with L2 weight decay (:func:`hvdllm.core.optim.adam_step`)."""

    _decoupled = False

    def __init__(self, learning_rate: Any = 0.001, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-7, weight_decay: Optional[float] = None, epsilon_hat: bool = False,
                 name: str = "Adam", **kwargs: Any) -> None:
        super().__init__(learning_rate, beta_1, beta_2, epsilon, weight_decay, name, **kwargs)
        self.epsilon_hat = bool(epsilon_hat)

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        self._moments_step(core.adam_step, gradient, variable, learning_rate, decoupled=self._decoupled,
                           eps_hat=self.epsilon_hat)

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(epsilon_hat=self.epsilon_hat)
        return config


@keras.saving.register_keras_serializable(package="hvdllm")
class AdamW(Adam):
    """Adam with decoupled weight decay ``p *= 1 - lr*wd`` (as ``keras.optimizers.AdamW``)."""

    _decoupled = True

    def __init__(self, learning_rate: Any = 0.001, weight_decay: float = 0.004, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-7, epsilon_hat: bool = False,
                 name: str = "AdamW", **kwargs: Any) -> None:
        if weight_decay is None:
            raise ValueError("weight_decay=None is invalid for AdamW; expected a finite float >= 0")
        super().__init__(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                         weight_decay=weight_decay, epsilon_hat=epsilon_hat, name=name, **kwargs)


@keras.saving.register_keras_serializable(package="hvdllm")
class LAMB(_AdamFamily):
    """LAMB (You et al., 2019): per-variable trust ratio over the Adam direction plus ``wd*p``."""

    def __init__(self, learning_rate: Any = 0.001, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-6, weight_decay: Optional[float] = 0.01, name: str = "LAMB",
                 **kwargs: Any) -> None:
        super().__init__(learning_rate, beta_1, beta_2, epsilon, weight_decay, name, **kwargs)

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        self._moments_step(core.lamb_step, gradient, variable, learning_rate)


@keras.saving.register_keras_serializable(package="hvdllm")
class Schedule(keras.optimizers.schedules.LearningRateSchedule):
    """A Keras ``LearningRateSchedule`` evaluating a core :class:`LRSchedule` (float64 math, float32 out).

    Keras calls it with ``optimizer.iterations``, the 0-based index of the update about to run, so
    update ``k`` uses ``schedule(k)`` exactly as with :func:`hvdllm.torch.optim.lr_scheduler`.
    """

    def __init__(self, schedule: LRSchedule) -> None:
        if not isinstance(schedule, LRSchedule):
            raise ValueError(f"schedule={schedule!r} is invalid; expected an hvdllm.core.schedules.LRSchedule")
        self.schedule = schedule

    def __call__(self, step: Any) -> Any:
        value = self.schedule.evaluate(tf.cast(step, tf.float64), tf_namespace)
        return tf.cast(value, tf.float32)

    def get_config(self) -> Dict[str, Any]:
        s = self.schedule
        return dict(base_lr=s.base_lr, warmup_steps=s.warmup_steps, total_steps=s.total_steps,
                    decay=s.decay, min_lr=s.min_lr)

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "Schedule":
        return cls(LRSchedule(**config))


__all__ = ["SGD", "Adam", "AdamW", "LAMB", "Schedule", "tf_namespace"]
