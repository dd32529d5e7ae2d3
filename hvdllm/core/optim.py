"""Optimizer update rules, written once for every framework.

Each rule is a pure function over an *array namespace* ``xp`` (``numpy``, ``torch``, or a small
namespace of ``tf`` functions): it takes the parameter, its gradient and its state, and returns the
new parameter and state, never mutating its inputs. Only ``+ - * /`` and ``xp.sqrt`` / ``xp.sum`` /
``xp.where`` are used, so the same function runs on numpy arrays (the tests' reference), torch
tensors and TensorFlow tensors. Adapters decide where the results are stored (``copy_`` into torch
state, ``assign`` into Keras variables, or a fused flat-buffer kernel) and never re-derive the math.

Scalars (learning rate, bias corrections) are computed from ``step`` and ``lr`` in *their* type
(python floats are float64), then passed through ``cast`` before they meet an array; adapters whose
arrays refuse float64 scalars (TensorFlow) pass a ``cast`` to the array dtype, so the scalar math
keeps float64 precision in both frameworks.

Conventions (they matter only when hyperparameters change between steps; at constant learning rate
the frameworks' conventions give the same trajectory):

* **Momentum** (PyTorch's convention, used by *both* adapters): ``buf <- mu*buf + g``,
  ``p <- p - lr*buf``. Keras's ``SGD`` keeps ``velocity <- mu*velocity - lr*g``, ``p <- p + velocity``,
  i.e. ``velocity = -lr*buf`` when ``lr`` is constant. With PyTorch's form a learning-rate change
  rescales the whole step at once, so warmup and decay schedules need no "momentum correction"
  (Goyal et al., 2017, sec. 2.1); one form in both adapters makes a torch run and a Keras run of the
  same recipe step identically. Nesterov: ``p <- p - lr*(g + mu*buf)`` (equal to Keras's nesterov at
  constant ``lr``).
* **Weight decay** in ``SGD`` and ``Adam`` is the L2 penalty added to the gradient
  (``g <- g + wd*p``, PyTorch and the classic definition); ``AdamW`` decays decoupled,
  ``p <- p*(1 - lr*wd)`` (Loshchilov & Hutter, 2019, as ``torch.optim.AdamW``; Keras's base
  optimizer applies ``weight_decay`` this decoupled way for every optimizer). ``LAMB`` adds ``wd*p``
  to the update direction before the trust ratio (You et al., 2019).
* **Adam's epsilon** is outside the square root. By default it is added to the bias-corrected
  ``sqrt(v_hat)`` (Kingma & Ba, Algorithm 1; ``torch.optim.Adam``). ``eps_hat=True`` adds it to the
  uncorrected ``sqrt(v)`` with the corrections folded into the step size (the paper's "efficient
  version", which ``keras.optimizers.Adam`` uses).

State names follow ``torch.optim``: ``momentum_buffer`` (SGD), ``exp_avg`` / ``exp_avg_sq``
(Adam, AdamW, LAMB); ``step`` counts completed updates, so an update uses ``step = previous + 1``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence, Tuple

import numpy as np


def _identity(x: Any) -> Any:
    return x


# --------------------------------------------------------------------------------- validation

def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def check_nonneg(name: str, value: Any) -> float:
    """``value`` as a float if it is finite and >= 0, else ValueError naming it."""
    if not _is_number(value) or not math.isfinite(float(value)) or value < 0:
        raise ValueError(f"{name}={value!r} is invalid; expected a finite float >= 0")
    return float(value)


def check_unit(name: str, value: Any) -> float:
    """``value`` as a float if it lies in [0, 1), else ValueError naming it."""
    if not _is_number(value) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name}={value!r} is invalid; expected a float in [0, 1)")
    return float(value)


def check_positive(name: str, value: Any) -> float:
    """``value`` as a float if it is finite and > 0, else ValueError naming it."""
    if not _is_number(value) or not math.isfinite(float(value)) or value <= 0:
        raise ValueError(f"{name}={value!r} is invalid; expected a finite float > 0")
    return float(value)


def check_lr(lr: Any) -> None:
    """A number must be finite and >= 0; a string is a TypeError; anything else (a tensor, a Keras
    schedule) is the framework's to check."""
    if isinstance(lr, (str, bytes)):
        raise TypeError(f"lr={lr!r} is invalid; expected a finite float >= 0 (or a schedule)")
    if _is_number(lr) or isinstance(lr, bool):
        check_nonneg("lr", lr)


def check_sgd(lr: Any, momentum: Any, nesterov: Any, weight_decay: Any) -> None:
    """Validate SGD hyperparameters (``lr`` may be non-numeric, e.g. a schedule, and is then skipped)."""
    check_lr(lr)
    check_unit("momentum", momentum)
    check_nonneg("weight_decay", weight_decay)
    if not isinstance(nesterov, (bool, np.bool_)):
        raise ValueError(f"nesterov={nesterov!r} is invalid; expected True or False")
    if nesterov and momentum == 0:
        raise ValueError(f"nesterov=True with momentum={momentum!r} is invalid; expected momentum in (0, 1)")


def check_adam(lr: Any, betas: Sequence[Any], eps: Any, weight_decay: Any) -> None:
    """Validate Adam/AdamW/LAMB hyperparameters (non-numeric ``lr`` is skipped)."""
    check_lr(lr)
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"betas={betas!r} is invalid; expected a pair (beta1, beta2) in [0, 1)") from None
    check_unit("beta1", beta1)
    check_unit("beta2", beta2)
    check_positive("eps", eps)
    check_nonneg("weight_decay", weight_decay)


# ------------------------------------------------------------------------------- update rules

def sgd_step(xp: Any, param: Any, grad: Any, buf: Any, *, lr: Any, momentum: float = 0.0,
             nesterov: bool = False, weight_decay: float = 0.0,
             cast: Callable[[Any], Any] = _identity) -> Tuple[Any, Any]:
    """SGD with optional L2 weight decay, heavy-ball or Nesterov momentum (PyTorch convention).

    ``d = g + wd*p``; with momentum ``buf <- mu*buf + d`` and ``d <- buf`` (heavy ball) or
    ``d <- d + mu*buf`` (Nesterov); then ``p <- p - lr*d``. ``buf`` starts at zero (so the first
    step's ``buf`` equals ``d``, as ``torch.optim.SGD``); pass ``buf=None`` when ``momentum == 0``.
    Returns ``(param, buf)``.
    """
    d = grad + cast(weight_decay) * param if weight_decay else grad
    if momentum:
        buf = cast(momentum) * buf + d
        d = d + cast(momentum) * buf if nesterov else buf
    return param - cast(lr) * d, buf


def adam_step(xp: Any, param: Any, grad: Any, exp_avg: Any, exp_avg_sq: Any, *, step: Any, lr: Any,
              beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
              decoupled: bool = False, eps_hat: bool = False,
              cast: Callable[[Any], Any] = _identity) -> Tuple[Any, Any, Any]:
    """Adam (Kingma & Ba, 2015) with L2 (``decoupled=False``) or decoupled (AdamW) weight decay.

    ``step`` is this update's 1-based count ``t``.
    L2: ``g <- g + wd*p``.  Decoupled: ``p <- p*(1 - lr*wd)`` (before the Adam update).
    ``m <- m + (1-b1)*(g - m)``  (= ``b1*m + (1-b1)*g``),  ``v <- b2*v + (1-b2)*g^2``,
    ``bc1 = 1 - b1^t``, ``bc2 = 1 - b2^t``;
    default:        ``p <- p - (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)``
    ``eps_hat``:    ``p <- p - (lr*sqrt(bc2)/bc1) * m / (sqrt(v) + eps)``.
    Returns ``(param, exp_avg, exp_avg_sq)``.
    """
    if weight_decay and not decoupled:
        grad = grad + cast(weight_decay) * param
    if weight_decay and decoupled:
        param = param * cast(1 - lr * weight_decay)
    exp_avg = exp_avg + cast(1 - beta1) * (grad - exp_avg)
    exp_avg_sq = cast(beta2) * exp_avg_sq + cast(1 - beta2) * grad * grad
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    if eps_hat:
        denom = xp.sqrt(exp_avg_sq) + cast(eps)
        return param - cast(lr * bc2 ** 0.5 / bc1) * (exp_avg / denom), exp_avg, exp_avg_sq
    denom = xp.sqrt(exp_avg_sq) / cast(bc2 ** 0.5) + cast(eps)
    return param - cast(lr / bc1) * (exp_avg / denom), exp_avg, exp_avg_sq


def lamb_direction(xp: Any, param: Any, grad: Any, exp_avg: Any, exp_avg_sq: Any, *, step: Any,
                   beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6,
                   weight_decay: float = 0.0,
                   cast: Callable[[Any], Any] = _identity) -> Tuple[Any, Any, Any]:
    """LAMB's per-element update direction (You et al., 2019, Algorithm 2).

    ``m <- b1*m + (1-b1)*g``, ``v <- b2*v + (1-b2)*g^2``, ``m_hat = m/(1-b1^t)``,
    ``v_hat = v/(1-b2^t)``, ``u = m_hat/(sqrt(v_hat) + eps) + wd*p``. Returns ``(u, exp_avg, exp_avg_sq)``.
    """
    exp_avg = exp_avg + cast(1 - beta1) * (grad - exp_avg)
    exp_avg_sq = cast(beta2) * exp_avg_sq + cast(1 - beta2) * grad * grad
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    update = (exp_avg / cast(bc1)) / (xp.sqrt(exp_avg_sq / cast(bc2)) + cast(eps))
    if weight_decay:
        update = update + cast(weight_decay) * param
    return update, exp_avg, exp_avg_sq


def lamb_trust_ratio(xp: Any, param_norm: Any, update_norm: Any) -> Any:
    """Layer-wise trust ratio ``||p|| / ||u||`` (phi = identity); 1 where either norm is 0."""
    ok = (param_norm > 0) & (update_norm > 0)
    safe = xp.where(ok, update_norm, 1.0 + 0.0 * update_norm)
    return xp.where(ok, param_norm / safe, 1.0 + 0.0 * param_norm)


def lamb_step(xp: Any, param: Any, grad: Any, exp_avg: Any, exp_avg_sq: Any, *, step: Any, lr: Any,
              beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6, weight_decay: float = 0.0,
              cast: Callable[[Any], Any] = _identity) -> Tuple[Any, Any, Any]:
    """One LAMB update of one layer (tensor): ``p <- p - lr * (||p||/||u||) * u``.

    ``u`` from :func:`lamb_direction`, ratio from :func:`lamb_trust_ratio`; norms are Euclidean
    over the whole tensor. Returns ``(param, exp_avg, exp_avg_sq)``.
    """
    update, exp_avg, exp_avg_sq = lamb_direction(
        xp, param, grad, exp_avg, exp_avg_sq, step=step, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, cast=cast)
    ratio = lamb_trust_ratio(xp, xp.sqrt(xp.sum(param * param)), xp.sqrt(xp.sum(update * update)))
    return param - cast(lr) * ratio * update, exp_avg, exp_avg_sq


__all__ = [
    "sgd_step", "adam_step", "lamb_direction", "lamb_trust_ratio", "lamb_step",
    "check_sgd", "check_adam", "check_nonneg", "check_unit", "check_positive",
]
