"""Learning-rate schedules, written once for every framework.

An :class:`LRSchedule` maps the 0-based index of an optimizer update to the learning rate used by
that update. The formula is evaluated over an array namespace (``math``-like module: numpy, torch,
tensorflow), so the torch scheduler (:func:`hvdllm.torch.optim.lr_scheduler`) and the Keras
``LearningRateSchedule`` (:class:`hvdllm.tensorflow.optim.Schedule`) compute the same numbers.

With ``W = warmup_steps``, ``T = total_steps``, ``b = base_lr``, ``m = min_lr`` and step ``s``:

* warmup (``s < W``):      ``lr = b * (s + 1) / W``   (update 0 already moves, update ``W-1`` uses ``b``)
* decay progress:          ``q = clip((s - W) / (T - W), 0, 1)``   (``q = 1`` when ``T == W``)
* ``"cosine"``:            ``lr = m + (b - m) * (1 + cos(pi * q)) / 2``
* ``"linear"``:            ``lr = m + (b - m) * (1 - q)``
* ``"constant"``:          ``lr = b`` after warmup (``total_steps`` may be ``None``)

Steps past ``T`` keep ``min_lr``. :func:`linear_scaling` is Goyal et al. (2017)'s rule
``lr = base_lr * global_batch / base_batch`` for scaling a recipe to a larger data-parallel batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

DECAYS = ("cosine", "linear", "constant")


def _finite_nonneg(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name}={value!r} is not a number; expected a finite float >= 0")
    if not math.isfinite(float(value)) or value < 0:
        raise ValueError(f"{name}={value!r} is invalid; expected a finite float >= 0")
    return float(value)


def _int_nonneg(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name}={value!r} is invalid; expected an integer >= 0")
    return int(value)


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup then cosine / linear / constant decay (formulas in the module docstring)."""

    base_lr: float
    warmup_steps: int = 0
    total_steps: Optional[int] = None
    decay: str = "cosine"
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        _finite_nonneg("base_lr", self.base_lr)
        _int_nonneg("warmup_steps", self.warmup_steps)
        _finite_nonneg("min_lr", self.min_lr)
        if self.decay not in DECAYS:
            raise ValueError(f"decay={self.decay!r} is unknown; expected one of {', '.join(DECAYS)}")
        if self.min_lr > self.base_lr:
            raise ValueError(f"min_lr={self.min_lr!r} is invalid; expected 0 <= min_lr <= base_lr={self.base_lr!r}")
        if self.total_steps is None:
            if self.decay != "constant":
                raise ValueError(f"total_steps=None is invalid for decay={self.decay!r}; "
                                 f"expected an integer >= warmup_steps={self.warmup_steps}")
        else:
            _int_nonneg("total_steps", self.total_steps)
            if self.total_steps < self.warmup_steps or self.total_steps == 0:
                raise ValueError(f"total_steps={self.total_steps!r} is invalid; expected an integer "
                                 f">= max(1, warmup_steps={self.warmup_steps})")

    def evaluate(self, step: Any, xp: Any) -> Any:
        """The schedule over an array namespace ``xp`` (needs ``minimum``, ``maximum``, ``cos``,
        ``where``); ``step`` is a float array/tensor of 0-based update indices."""
        base, low = self.base_lr, self.min_lr
        if self.warmup_steps > 0:
            warm = base * (step + 1.0) / float(self.warmup_steps)
        else:
            warm = base + 0.0 * step
        if self.decay == "constant" or self.total_steps is None:
            after = base + 0.0 * step
        else:
            span = float(self.total_steps - self.warmup_steps)
            if span > 0:
                q = xp.minimum(xp.maximum((step - float(self.warmup_steps)) / span, 0.0), 1.0)
            else:
                q = 1.0 + 0.0 * step
            if self.decay == "cosine":
                after = low + (base - low) * 0.5 * (1.0 + xp.cos(math.pi * q))
            else:
                after = low + (base - low) * (1.0 - q)
        return xp.where(step < float(self.warmup_steps), warm, after)

    def __call__(self, step: int) -> float:
        """Learning rate for the update numbered ``step`` (0-based)."""
        _int_nonneg("step", step)
        return float(self.evaluate(np.asarray(float(step), dtype=np.float64), np))


def linear_scaling(base_lr: float, global_batch: int, base_batch: int) -> float:
    """Linear scaling rule (Goyal et al., 2017): ``base_lr * global_batch / base_batch``."""
    _finite_nonneg("base_lr", base_lr)
    for name, value in (("global_batch", global_batch), ("base_batch", base_batch)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name}={value!r} is invalid; expected an integer >= 1")
    return float(base_lr) * float(global_batch) / float(base_batch)


__all__ = ["LRSchedule", "linear_scaling", "DECAYS"]
