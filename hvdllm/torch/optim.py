"""PyTorch optimizers whose math is :mod:`hvdllm.core.optim`'s, plus an optional fused flat-buffer mode.

``SGD``, ``Adam``, ``AdamW`` and ``LAMB`` are ``torch.optim.Optimizer`` subclasses (param groups,
``state_dict``/``load_state_dict``, closures). Their state uses ``torch.optim``'s names and layout
(``step`` as a float32 0-d tensor, ``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``), so a
state_dict can move between these and ``torch.optim``'s SGD/Adam/AdamW. Conventions (momentum form,
L2 vs decoupled weight decay, where Adam's epsilon sits) are the core's, which for these rules are
PyTorch's own: see :mod:`hvdllm.core.optim`.

``fused=True`` (the default; ``fused=False`` selects the per-tensor path): every param group keeps its
parameters of one dtype/device, their gradients and the optimizer state in flat contiguous buffers (:mod:`hvdllm.torch.buckets`, in the core's bucket order).
Parameters are re-pointed (``p.data``) at views of the flat parameter buffer and ``p.grad`` at views
of the flat gradient buffer, so autograd accumulates straight into the flat buffer and a step is a few
large ops over whole buffers, not thousands of small ones. The step reads the gradients wherever they
live, in runs that lie back to back in memory: under ``hvd.DistributedOptimizer`` those are its
buckets (same order), read in place. The elementwise pass runs torch's native fused multi-tensor
kernel where that kernel computes exactly the core's formula (SGD with momentum/Nesterov and L2
decay, Adam, AdamW; equality with the core rule is tested), and the core rule itself otherwise
(LAMB, and anything else). Consequences of fusing, as in apex / DeepSpeed flat buffers:

* ``zero_grad()`` zeroes the gradients in place (wherever they live) whatever ``set_to_none`` says,
  so a parameter that received no gradient gets a zero gradient (like ``set_to_none=False``) instead
  of being skipped. If some code sets a ``p.grad`` to ``None``, that step falls back to per-tensor
  updates for the group (correct, slower); a non-contiguous ``p.grad`` is copied back in.
* Best create the optimizer *after* moving the model to its device/dtype: ``model.to(...)`` afterwards
  re-points the parameters, which the next step notices and pays for once by rebuilding the buffers.
* Parameters with ``requires_grad=False`` at construction stay outside the flat buffers.

What the fused path cannot do falls back to the per-tensor core rule, with no error: a gradient set to
``None`` or a sparse one (densified: the dense rule with zero rows, as torch's dense step), a dtype
without a native kernel, a device without fused kernels (the core rule then runs over the flat
buffers). Parameters re-pointed after construction (``model.to(...)``, ``p.data = ...``) are noticed at
the next step and the group's flat buffers are rebuilt around them, carrying the optimizer state over.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from hvdllm.core import optim as core
from hvdllm.core.buckets import Bucket
from hvdllm.core.schedules import LRSchedule
from hvdllm.torch import buckets as flat_buffers

_NATIVE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_FUSED_DEVICES = frozenset(_get_fused_kernels_supported_devices())


@dataclass
class _Flat:
    """One group's parameters of one dtype/device (in the core's bucket order), with their flat buffers."""

    params: List[torch.nn.Parameter]
    plan: Bucket
    param: torch.Tensor
    grad: torch.Tensor
    state: Dict[str, torch.Tensor] = field(default_factory=dict)
    step: Optional[torch.Tensor] = None  # the group's count; each param's state['step'] mirrors it
    count: float = 0.0  # the same count as a python float (no device sync to read it)
    uniform: bool = True  # False once some params were stepped without the others
    scratch: Optional[torch.Tensor] = None  # a work buffer for rules without a native kernel (LAMB)

    def views(self, buffer: torch.Tensor) -> List[torch.Tensor]:
        return flat_buffers.views(buffer, self.plan, self.params)

    def attached(self) -> bool:
        """Whether every parameter still lives in the flat parameter buffer (``model.to(...)`` or
        ``p.data = ...`` after construction re-points a parameter elsewhere)."""
        base, size = self.param.data_ptr(), self.param.element_size()
        return all(p.data_ptr() == base + o * size for p, o in zip(self.params, self.plan.offsets))

    def native(self) -> bool:
        """Whether torch's fused kernels run on this buffer's dtype and device."""
        return self.param.dtype in _NATIVE_DTYPES and self.param.device.type in _FUSED_DEVICES

    def pieces(self) -> Optional[List["_Piece"]]:
        """The step's operands: one piece per run of gradients lying back to back in memory (one run
        for our own buffer, one per bucket under DistributedOptimizer); None if a grad is None."""
        grads = [p.grad for p in self.params]
        if any(g is None or g.is_sparse for g in grads):
            return None
        runs = flat_buffers.contiguous_runs(grads)
        if runs is None:  # a non-contiguous grad: back into our own buffer
            for p, gv in zip(self.params, self.views(self.grad)):
                if p.grad.data_ptr() != gv.data_ptr():
                    gv.copy_(p.grad)
                    p.grad = gv
            runs = [(0, len(self.params), self.grad)]
        out = []
        for start, stop, grad in runs:
            lo = self.plan.offsets[start]
            sl = slice(lo, lo + grad.numel())
            out.append(_Piece(self.params[start:stop], self.param[sl], grad, {k: v[sl] for k, v in self.state.items()}))
        return out


@dataclass
class _Piece:
    """Parameters whose flat parameter, gradient and state slices line up (the unit of a fused update)."""

    params: List[torch.nn.Parameter]
    param: torch.Tensor
    grad: torch.Tensor
    state: Dict[str, torch.Tensor]


def _new_step(device: Optional[torch.device] = None) -> torch.Tensor:
    """A step counter as ``torch.optim`` keeps it (float32 0-d; on the accelerator for fused kernels)."""
    on = device if device is not None and device.type != "cpu" else None
    return torch.tensor(0.0, dtype=torch.float32, device=on)


class _CoreOptimizer(torch.optim.Optimizer):
    """Shared machinery: per-tensor updates via the core rule, flat buffers when ``fused``."""

    _state_keys: Tuple[str, ...] = ()

    def __init__(self, params: Any, defaults: Dict[str, Any], fused: bool) -> None:
        if not isinstance(fused, bool):
            raise ValueError(f"fused={fused!r} is invalid; expected True or False")
        self.fused = fused
        self._flats: List[List[_Flat]] = []
        super().__init__(params, defaults)

    # ---------------------------------------------------------------- per-rule hooks
    def _check_group(self, group: Dict[str, Any]) -> None:
        raise NotImplementedError

    def _state_keys_for(self, group: Dict[str, Any]) -> Tuple[str, ...]:
        return self._state_keys

    def _tensor_update(self, group: Dict[str, Any], p: torch.Tensor, grad: torch.Tensor,
                       state: Dict[str, Any], step: float) -> None:
        raise NotImplementedError

    def _flat_update(self, group: Dict[str, Any], flat: _Flat, pieces: List[_Piece], step: float) -> None:
        # Default: the core rule over each piece's flat buffers (a few big ops per piece).
        for piece in pieces:
            self._tensor_update(group, piece.param, piece.grad, dict(piece.state), step)

    # ---------------------------------------------------------------- param groups, flat buffers
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check_group(group)
        if self.fused:
            self._flats.append(self._flatten(group))

    def _flatten(self, group: Dict[str, Any]) -> List[_Flat]:
        ps = [p for p in group["params"] if p.requires_grad and not p.is_sparse]
        flats = []
        with torch.no_grad():
            for bucket in flat_buffers.plan(ps, 0, [p.device for p in ps]):
                first = ps[bucket.indices[0]]
                own = Bucket(bucket.dtype, tuple(range(len(bucket.indices))), bucket.offsets, bucket.numel)
                f = _Flat([ps[i] for i in bucket.indices], own, flat_buffers.pack(bucket, ps),
                          torch.zeros(bucket.numel, dtype=first.dtype, device=first.device))
                for p, pv, gv in zip(f.params, f.views(f.param), f.views(f.grad)):
                    if p.grad is not None:
                        gv.copy_(p.grad)
                    p.data = pv
                    p.grad = gv
                flats.append(f)
        return flats

    def _init_flat_state(self, group: Dict[str, Any], flat: _Flat) -> None:
        """Allocate the flat state buffers; each param's state entries become views into them."""
        keys = self._state_keys_for(group)
        flat.state = {k: torch.zeros_like(flat.param) for k in keys}
        flat.step = _new_step(flat.param.device)
        flat.count = 0.0
        flat.uniform = True
        views = {k: flat.views(v) for k, v in flat.state.items()}
        for i, p in enumerate(flat.params):  # own step tensors: no aliasing across params
            self.state[p] = {"step": _new_step(flat.param.device), **{k: views[k][i] for k in keys}}

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One update of every parameter that has a gradient; ``closure`` re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            done = set()
            if self.fused:
                self._reattach(gi, group)
                for flat in self._flats[gi]:
                    if flat.step is None:
                        self._init_flat_state(group, flat)
                    pieces = flat.pieces() if flat.uniform else None
                    if pieces is not None:
                        flat.step.add_(1.0)
                        flat.count += 1.0
                        torch._foreach_add_([self.state[p]["step"] for p in flat.params], 1.0)
                        self._flat_update(group, flat, pieces, flat.count)
                        done.update(id(p) for p in flat.params)
                    elif flat.uniform and all(p.grad is not None for p in flat.params):
                        flat.step.add_(1.0)  # all of them step per tensor below (a sparse grad): still even
                        flat.count += 1.0
                    else:
                        flat.uniform = False
            for p in group["params"]:
                if id(p) in done or p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = _new_step()
                    for k in self._state_keys_for(group):
                        state[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1.0
                grad = p.grad.to_dense() if p.grad.is_sparse else p.grad
                self._tensor_update(group, p, grad, state, float(state["step"].item()))
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Unfused: as ``torch.optim``. Fused: zero the gradients in place, wherever they live (see module doc)."""
        if not self.fused:
            return super().zero_grad(set_to_none)
        for gi, group in enumerate(self.param_groups):
            self._reattach(gi, group)
        flat_ids = set()
        for flats in self._flats:
            for f in flats:
                for p, gv in zip(f.params, f.views(f.grad)):
                    if p.grad is None:  # back to its slot in our buffer
                        p.grad = gv
                    flat_ids.add(id(p))
                runs = flat_buffers.contiguous_runs([p.grad for p in f.params])
                for g in ([run for _, _, run in runs] if runs is not None else [p.grad for p in f.params]):
                    g.zero_()
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in flat_ids or p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_()
                    p.grad.requires_grad_(False)
                    p.grad.zero_()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """As ``torch.optim``; fused state is copied back into the flat buffers afterwards."""
        super().load_state_dict(state_dict)
        if not self.fused:
            return
        for group, flats in zip(self.param_groups, self._flats):
            for flat in flats:
                self._adopt_state(group, flat)

    def _adopt_state(self, group: Dict[str, Any], flat: _Flat) -> None:
        """Move the per-param state now in ``self.state`` (loaded, or views of old buffers) into ``flat``'s buffers."""
        loaded = [self.state.get(p, {}) for p in flat.params]
        if not any(loaded):
            flat.state, flat.step = {}, None
            return
        self._init_flat_state(group, flat)
        steps = set()
        with torch.no_grad():
            for p, old in zip(flat.params, loaded):
                new = self.state[p]
                for k in self._state_keys_for(group):
                    if k in old and old[k] is not None:
                        new[k].copy_(old[k])
                steps.add(float(old["step"]) if "step" in old else 0.0)
        for p, old in zip(flat.params, loaded):
            self.state[p]["step"].fill_(float(old.get("step", 0.0)))
        if len(steps) == 1:
            flat.count = steps.pop()
            flat.step.fill_(flat.count)
        else:  # params were stepped unevenly: keep per-param counts, per-tensor path
            flat.uniform = False

    def _reattach(self, gi: int, group: Dict[str, Any]) -> None:
        """Rebuild group ``gi``'s flat buffers if a parameter left them (moved, cast or re-pointed after
        construction), carrying its optimizer state over; a no-op otherwise (one pointer check per param)."""
        flats = self._flats[gi]
        if all(flat.attached() for flat in flats):
            return
        self._flats[gi] = self._flatten(group)
        for flat in self._flats[gi]:
            self._adopt_state(group, flat)


class SGD(_CoreOptimizer):
    """SGD with L2 weight decay and heavy-ball or Nesterov momentum (:func:`core.sgd_step`).

    ``buf <- mu*buf + (g + wd*p)``; ``p <- p - lr*buf`` (Nesterov: ``p <- p - lr*(g + wd*p + mu*buf)``);
    matches ``torch.optim.SGD`` with ``dampening=0``.
    """

    def __init__(self, params: Any, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, fused: bool = True) -> None:
        core.check_sgd(lr, momentum, nesterov, weight_decay)
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov,
                                      weight_decay=weight_decay), fused)

    def _check_group(self, group: Dict[str, Any]) -> None:
        core.check_sgd(group["lr"], group["momentum"], group["nesterov"], group["weight_decay"])

    def _state_keys_for(self, group: Dict[str, Any]) -> Tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] else ()

    def _tensor_update(self, group, p, grad, state, step):
        buf = state.get("momentum_buffer") if group["momentum"] else None
        new_p, new_buf = core.sgd_step(torch, p, grad, buf, lr=float(group["lr"]), momentum=group["momentum"],
                                       nesterov=group["nesterov"], weight_decay=group["weight_decay"])
        p.copy_(new_p)
        if buf is not None:
            buf.copy_(new_buf)

    def _flat_update(self, group, flat, pieces, step):
        if not flat.native():
            return super()._flat_update(group, flat, pieces, step)
        bufs = [pc.state["momentum_buffer"] for pc in pieces] if group["momentum"] else []
        torch._fused_sgd_([pc.param for pc in pieces], [pc.grad for pc in pieces], bufs, weight_decay=float(group["weight_decay"]),
                          momentum=float(group["momentum"]), lr=float(group["lr"]), dampening=0.0,
                          nesterov=bool(group["nesterov"]), maximize=False, is_first_step=False)


class _AdamFamily(_CoreOptimizer):
    """Shared by Adam and LAMB: their checks, the two moment buffers and the call into the core's step."""

    _state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Any, lr: float, betas: Tuple[float, float], eps: float, weight_decay: float,
                 fused: bool) -> None:
        core.check_adam(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay), fused)

    def _check_group(self, group: Dict[str, Any]) -> None:
        core.check_adam(group["lr"], group["betas"], group["eps"], group["weight_decay"])

    def _moments_update(self, step_fn: Any, group: Dict[str, Any], p: Any, grad: Any, state: Dict[str, Any],
                        step: int, **extra: Any) -> None:
        """``step_fn`` (core.adam_step or core.lamb_step) on one tensor; copies the results in place."""
        beta1, beta2 = group["betas"]
        new_p, m, v = step_fn(torch, p, grad, state["exp_avg"], state["exp_avg_sq"], step=step,
                              lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                              weight_decay=group["weight_decay"], **extra)
        p.copy_(new_p)
        state["exp_avg"].copy_(m)
        state["exp_avg_sq"].copy_(v)


class Adam(_AdamFamily):
    """Adam with L2 weight decay (:func:`core.adam_step`, ``decoupled=False``); matches ``torch.optim.Adam``.

    ``m <- b1*m + (1-b1)*g``, ``v <- b2*v + (1-b2)*g^2``,
    ``p <- p - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)``, with ``g <- g + wd*p`` first.
    """

    _decoupled = False

    def __init__(self, params: Any, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, fused: bool = True) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, fused)

    def _tensor_update(self, group, p, grad, state, step):
        self._moments_update(core.adam_step, group, p, grad, state, step, decoupled=self._decoupled)

    def _flat_update(self, group, flat, pieces, step):
        if not flat.native():
            return super()._flat_update(group, flat, pieces, step)
        kernel = torch._fused_adamw_ if self._decoupled else torch._fused_adam_
        beta1, beta2 = group["betas"]
        kernel([pc.param for pc in pieces], [pc.grad for pc in pieces], [pc.state["exp_avg"] for pc in pieces],
               [pc.state["exp_avg_sq"] for pc in pieces], [], [flat.step] * len(pieces), lr=float(group["lr"]),
               beta1=float(beta1), beta2=float(beta2), weight_decay=float(group["weight_decay"]), eps=float(group["eps"]), amsgrad=False,
               maximize=False)


class AdamW(Adam):
    """Adam with decoupled weight decay ``p <- p*(1 - lr*wd)`` (Loshchilov & Hutter); matches ``torch.optim.AdamW``."""

    _decoupled = True

    def __init__(self, params: Any, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, fused: bool = True) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


class LAMB(_AdamFamily):
    """LAMB (You et al., 2019): Adam direction plus ``wd*p``, scaled per tensor by ``||p||/||u||``.

    See :func:`core.lamb_step`. In fused mode the direction is one pass over the flat buffers and the
    per-tensor norms are taken over views of them.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, fused: bool = True) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, fused)

    def _tensor_update(self, group, p, grad, state, step):
        self._moments_update(core.lamb_step, group, p, grad, state, step)

    def _flat_update(self, group, flat, pieces, step):
        """:func:`core.lamb_step` in place over the flat buffers. The direction goes into one scratch buffer
        kept between steps (fresh large temporaries cost page faults every step); where torch's fused Adam
        kernel runs, it computes the direction in one pass (Adam's update with lr=-1 on a zeroed buffer is
        ``m_hat / (sqrt(v_hat) + eps)``, the core's LAMB direction); then ``+ wd*p``, the per-tensor
        trust ratios from norms of views, and ``p -= lr * ratio * u``."""
        beta1, beta2 = group["betas"]
        bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        if flat.scratch is None or flat.scratch.shape != flat.param.shape:
            flat.scratch = torch.empty_like(flat.param)
        for pc in pieces:
            u = flat.scratch[:pc.param.numel()]
            if flat.native():  # torch's Adam kernel on a zeroed buffer with lr=-1 writes the direction
                u.zero_()
                torch._fused_adam_([u], [pc.grad], [pc.state["exp_avg"]], [pc.state["exp_avg_sq"]], [], [flat.step],
                                   lr=-1.0, beta1=float(beta1), beta2=float(beta2), weight_decay=0.0,
                                   eps=float(group["eps"]), amsgrad=False, maximize=False)
            else:
                m, v = pc.state["exp_avg"], pc.state["exp_avg_sq"]
                m.add_(torch.sub(pc.grad, m, out=u), alpha=1 - beta1)        # m + (1-b1)*(g - m)
                v.mul_(beta2).addcmul_(pc.grad, pc.grad, value=1 - beta2)   # b2*v + (1-b2)*g*g
                torch.div(v, bc2, out=u).sqrt_().add_(group["eps"])         # sqrt(v/bc2) + eps
                torch.div(m, u, out=u).div_(bc1)                            # (m/bc1) / (sqrt(v/bc2) + eps)
            if group["weight_decay"]:
                u.add_(pc.param, alpha=group["weight_decay"])
            sizes = [p.numel() for p in pc.params]
            us = torch.split(u, sizes)
            ratios = core.lamb_trust_ratio(torch, torch.stack(torch._foreach_norm(torch.split(pc.param, sizes))),
                                           torch.stack(torch._foreach_norm(us)))
            torch._foreach_mul_(us, list((ratios * float(group["lr"])).unbind()))
            pc.param.sub_(u)


class _ScheduleLR(torch.optim.lr_scheduler.LRScheduler):
    """Sets each group's lr to ``schedule(step) * initial_lr_g / initial_lr_0`` (group 0 follows the schedule)."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: LRSchedule, last_epoch: int = -1) -> None:
        if not isinstance(schedule, LRSchedule):
            raise ValueError(f"schedule={schedule!r} is invalid; expected an hvdllm.core.schedules.LRSchedule")
        self.schedule = schedule
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> List[float]:
        lr = self.schedule(max(self.last_epoch, 0))
        ref = float(self.optimizer.param_groups[0]["initial_lr"])
        return [lr * (float(g["initial_lr"]) / ref if ref > 0 else 1.0) for g in self.optimizer.param_groups]


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> torch.optim.lr_scheduler.LRScheduler:
    """A torch LR scheduler driven by a core :class:`LRSchedule`.

    Right after construction the groups hold the lr of update 0; call ``scheduler.step()`` after each
    ``optimizer.step()`` so update ``k`` uses ``schedule(k)``. With several param groups, group 0
    gets exactly ``schedule(k)`` and group ``g`` gets ``schedule(k) * lr_g / lr_0`` (ratios of the
    lrs the groups had when the scheduler was created), so per-group lr multipliers survive.
    """
    return _ScheduleLR(optimizer, schedule)


__all__ = ["SGD", "Adam", "AdamW", "LAMB", "lr_scheduler"]
