"""Fast defaults of hvdllm.torch.optim: default-constructed optimizers take the flat-buffer path, match
torch.optim there, and fall back to per-tensor updates (still matching) where the fused path cannot work."""
from __future__ import annotations

import pytest
import torch

from hvdllm.torch import optim as hopt
from tests.test_optim_torch import TOL, _data, _model, _rel
from tests.threads import one_torch_thread  # noqa: F401  (autouse fixture)

# (hvdllm class, its reference, hyperparameters both take); LAMB's reference is hvdllm's per-tensor path,
# itself checked against the paper in tests/test_optim_torch.py.
DEFAULTS = {
    "SGD": (hopt.SGD, lambda ps: torch.optim.SGD(ps, lr=0.05), dict(lr=0.05)),
    "Momentum": (hopt.SGD, lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.9)),
    "Adam": (hopt.Adam, lambda ps: torch.optim.Adam(ps, lr=3e-3), dict(lr=3e-3)),
    "AdamW": (hopt.AdamW, lambda ps: torch.optim.AdamW(ps, lr=3e-3), dict(lr=3e-3)),
    "LAMB": (hopt.LAMB, lambda ps: hopt.LAMB(ps, lr=3e-3, fused=False), dict(lr=3e-3)),
}


def _run(make, steps=60, model=None, hook=None):
    model = model if model is not None else _model()
    x, y = _data()
    opt = make(model.parameters())
    for i in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if hook is not None:
            hook(i, model, opt)
        opt.step()
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()]), opt


def _count_tensor_updates(monkeypatch, cls):
    calls = []
    original = cls._tensor_update

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "_tensor_update", spy)
    return calls


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_default_constructed_optimizer_takes_the_flat_path_and_matches(name, monkeypatch):
    cls, ref_make, kw = DEFAULTS[name]
    ref, _ = _run(ref_make)
    calls = _count_tensor_updates(monkeypatch, cls)
    got, opt = _run(lambda ps: cls(ps, **kw))
    assert opt.fused is True
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len({p.untyped_storage().data_ptr() for p in params}) == 1     # one flat parameter buffer
    assert calls == [], f"{name}: per-tensor updates at the default"   # kernels (LAMB: core rule) on flat buffers
    assert _rel(got, ref) < TOL, (name, _rel(got, ref))
    calls.clear()
    _run(lambda ps: cls(ps, fused=False, **kw), steps=2)
    assert len(calls) == 2 * len(params)                                   # the per-tensor path stays selectable


@pytest.mark.parametrize("name", ["Momentum", "AdamW", "LAMB"])
def test_sparse_gradients_fall_back_per_tensor_and_match_the_dense_rule(name, monkeypatch):
    """A sparse gradient (set by user code) steps per tensor, densified: the same as the dense gradient."""
    cls, ref_make, kw = DEFAULTS[name]

    def sparsify(i, model, opt):  # every other step, the last layer's weight gets a sparse gradient
        if i % 2 == 0:
            model[4].weight.grad = model[4].weight.grad.to_sparse()

    ref, _ = _run(ref_make)
    calls = _count_tensor_updates(monkeypatch, cls)
    got, opt = _run(lambda ps: cls(ps, **kw), hook=sparsify)
    assert calls, "no per-tensor fallback"
    assert _rel(got, ref) < TOL, (name, _rel(got, ref))
    # after the fallback steps the fused path resumes with the right step count
    assert all(float(opt.state[p]["step"]) == 60.0 for p in opt.param_groups[0]["params"])


def test_params_moved_after_construction_are_reflattened_with_their_state():
    """model.to(dtype) before the first step, and p.data re-pointed mid-run: the optimizer notices,
    rebuilds its flat buffers (state carried over) and matches torch.optim."""
    def moved(make):
        model = _model()
        opt = make(model.parameters())
        model.double()
        x, y = _data()
        for i in range(40):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x.double()), y.double()).backward()
            opt.step()
            if i == 20:
                for p in model.parameters():
                    p.data = p.data.clone()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), opt

    ref, _ = moved(lambda ps: torch.optim.AdamW(ps, lr=3e-3))
    got, opt = moved(lambda ps: hopt.AdamW(ps, lr=3e-3))
    params = list(opt.param_groups[0]["params"])
    assert all(p.dtype == torch.float64 for p in params)
    assert len({p.untyped_storage().data_ptr() for p in params}) == 1
    assert opt.state[params[0]]["exp_avg"].dtype == torch.float64
    assert _rel(got, ref) < 1e-12


@pytest.mark.parametrize("name", ["AdamW", "LAMB"])
def test_device_without_fused_kernels_runs_the_core_rule_on_the_flat_buffers(name, monkeypatch):
    cls, ref_make, kw = DEFAULTS[name]
    monkeypatch.setattr(hopt, "_FUSED_DEVICES", frozenset())
    kernels = []
    for kernel in ("_fused_adamw_", "_fused_adam_"):
        monkeypatch.setattr(torch, kernel, lambda *a, **k: kernels.append(1))
    ref, _ = _run(ref_make)
    got, opt = _run(lambda ps: cls(ps, **kw))
    assert kernels == [] and opt.fused
    assert _rel(got, ref) < TOL, (name, _rel(got, ref))
