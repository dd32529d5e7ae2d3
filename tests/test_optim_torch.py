"""hvdllm.torch.optim against torch.optim and the LAMB paper, fused and unfused."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import hvdllm.torch as hvd
from hvdllm.torch import optim as hopt
from tests.threads import one_torch_thread  # noqa: F401  (autouse fixture)

STEPS = 200


TOL = 2e-6  # ||x - ref|| / ||ref|| in float32; torch's own fused vs foreach AdamW differ by ~5e-7 here


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                               torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)


def _groups(model):
    """Three param groups with different lrs (and no weight decay on biases)."""
    return [
        {"params": [model[0].weight, model[2].weight]},
        {"params": [model[0].bias, model[2].bias], "lr_scale": 0.5, "weight_decay": 0.0},
        {"params": list(model[4].parameters()), "lr_scale": 2.0},
    ]


def _scaled(groups, lr):
    out = []
    for g in groups:
        g = dict(g)
        g["lr"] = lr * g.pop("lr_scale", 1.0)
        out.append(g)
    return out


def _train(make, steps=STEPS, start=None, on_step=None):
    model = _model() if start is None else start
    x, y = _data()
    opt = make(_scaled(_groups(model), 1.0))
    for i in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(i, model, opt)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), model, opt


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _with_lr(cls, lr, **kw):
    def make(groups):
        for g in groups:
            g["lr"] *= lr
        return cls(groups, lr=lr, **kw)
    return make


CASES = {
    "sgd": (torch.optim.SGD, hopt.SGD, 0.05, dict(weight_decay=0.01)),
    "momentum": (torch.optim.SGD, hopt.SGD, 0.05, dict(momentum=0.9, weight_decay=0.01)),
    "nesterov": (torch.optim.SGD, hopt.SGD, 0.05, dict(momentum=0.9, nesterov=True, weight_decay=0.01)),
    "adam": (torch.optim.Adam, hopt.Adam, 3e-3, dict(betas=(0.8, 0.99), weight_decay=0.01)),
    "adamw": (torch.optim.AdamW, hopt.AdamW, 3e-3, dict(weight_decay=0.1)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_trajectory_matches_torch_optim(name):
    ref_cls, cls, lr, kw = CASES[name]
    ref, _, _ = _train(_with_lr(ref_cls, lr, **kw))
    for fused in (False, True):
        got, _, opt = _train(_with_lr(cls, lr, fused=fused, **kw))
        assert _rel(got, ref) < TOL, (name, fused, _rel(got, ref))
        assert len({g["lr"] for g in opt.param_groups}) == 3


def _lamb_reference(lr, betas, eps, wd, steps):
    """LAMB written from You et al. (2019), Algorithm 2, applied per tensor with numpy float32."""
    model = _model()
    x, y = _data()
    b1, b2 = betas
    params = list(model.parameters())
    m = [np.zeros(p.shape, np.float32) for p in params]
    v = [np.zeros(p.shape, np.float32) for p in params]
    for t in range(1, steps + 1):
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        with torch.no_grad():
            for i, p in enumerate(params):
                w, g = p.numpy(), p.grad.numpy()
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                r = (m[i] / (1 - b1 ** t)) / (np.sqrt(v[i] / (1 - b2 ** t)) + eps)
                u = r + wd * w
                wn, un = np.linalg.norm(w), np.linalg.norm(u)
                ratio = wn / un if wn > 0 and un > 0 else 1.0
                p.copy_(torch.from_numpy(w - lr * ratio * u))
    return torch.cat([p.detach().reshape(-1) for p in params])


def test_lamb_matches_paper_reference():
    ref = _lamb_reference(0.01, (0.9, 0.999), 1e-6, 0.01, 100)
    for fused in (False, True):
        got, _, _ = _train(lambda groups: hopt.LAMB([p for g in groups for p in g["params"]],
                                                   lr=0.01, fused=fused), steps=100)
        assert _rel(got, ref) < TOL, (fused, _rel(got, ref))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("name", ["nesterov", "adamw"])
def test_state_dict_mid_run_resumes_identically(name, fused):
    _, cls, lr, kw = CASES[name]
    make = _with_lr(cls, lr, fused=fused, **kw)
    saved = {}

    def snapshot(i, model, opt):
        if i == 49:
            saved["model"] = copy.deepcopy(model.state_dict())
            saved["opt"] = copy.deepcopy(opt.state_dict())

    straight, _, _ = _train(make, steps=100, on_step=snapshot)
    model = _model()
    model.load_state_dict(saved["model"])
    x, y = _data()
    opt = make(_scaled(_groups(model), 1.0))
    opt.load_state_dict(saved["opt"])
    for _ in range(50):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    resumed = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(resumed, straight)


def test_fused_state_dict_is_interchangeable_with_torch_adamw():
    """A fused run's state_dict loads into torch.optim.AdamW (and back) and continues alike."""
    saved = {}

    def snap(i, model, opt):
        if i == 29:
            saved["model"], saved["opt"] = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())

    ours, _, _ = _train(_with_lr(hopt.AdamW, 3e-3, fused=True), steps=60, on_step=snap)
    model = _model()
    model.load_state_dict(saved["model"])
    opt = _with_lr(torch.optim.AdamW, 3e-3)(_scaled(_groups(model), 1.0))
    opt.load_state_dict(saved["opt"])
    x, y = _data()
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    theirs = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert _rel(theirs, ours) < TOL


def test_fused_uses_flat_buffers_and_autograd_accumulates_into_them():
    model = _model()
    opt = hopt.AdamW(model.parameters(), lr=1e-3, fused=True)
    params = list(model.parameters())
    base = params[0].untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == base for p in params)
    grad_ptrs = [p.grad.data_ptr() for p in params]
    x, y = _data()
    torch.nn.functional.mse_loss(model(x), y).backward()
    assert [p.grad.data_ptr() for p in params] == grad_ptrs  # accumulated in place
    opt.step()
    opt.zero_grad()  # set_to_none is ignored: the flat buffer is zeroed in place
    assert all(p.grad is not None and not p.grad.any() for p in params)
    state = opt.state[params[0]]["exp_avg"]
    assert state.untyped_storage().data_ptr() == opt.state[params[-1]]["exp_avg"].untyped_storage().data_ptr()


def test_fused_falls_back_when_a_grad_is_none_and_matches_torch():
    """A param whose grad was set to None is skipped, like torch.optim; replaced grads are copied in."""
    def run(make):
        model = _model()
        x, y = _data()
        opt = make(model.parameters())
        for i in range(20):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            if i % 3 == 0:
                model[0].bias.grad = None
            if i % 4 == 0:
                model[2].weight.grad = model[2].weight.grad.clone() * 0.5
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    ref = run(lambda ps: torch.optim.Adam(ps, lr=1e-2))
    assert _rel(run(lambda ps: hopt.Adam(ps, lr=1e-2, fused=True)), ref) < TOL
    assert _rel(run(lambda ps: hopt.Adam(ps, lr=1e-2)), ref) < TOL


def test_closure_and_frozen_params_and_hvd_namespace():
    model = _model()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    opt = hvd.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    x, y = _data()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(10)]
    assert losses[-1] < losses[0]
    assert torch.equal(model[0].weight, frozen)


@pytest.mark.parametrize("make, fragment", [
    (lambda ps: hopt.SGD(ps, lr=-0.1), "lr=-0.1"),
    (lambda ps: hopt.SGD(ps, lr=0.1, momentum=-0.5), "momentum=-0.5"),
    (lambda ps: hopt.SGD(ps, lr=0.1, nesterov=True), "nesterov=True"),
    (lambda ps: hopt.Adam(ps, betas=(0.9, 1.0)), "beta2=1.0"),
    (lambda ps: hopt.AdamW(ps, eps=0.0), "eps=0.0"),
    (lambda ps: hopt.LAMB(ps, weight_decay=-1.0), "weight_decay=-1.0"),
    (lambda ps: hopt.Adam([{"params": ps, "betas": (1.5, 0.9)}]), "beta1=1.5"),
    (lambda ps: hopt.Adam(ps, fused="yes"), "fused='yes'"),
])
def test_bad_hyperparameters_raise_value_error(make, fragment):
    with pytest.raises(ValueError) as info:
        make([torch.nn.Parameter(torch.zeros(2))])
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("cls, kw", [
    (hopt.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (hopt.Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01)),
    (hopt.AdamW, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    (hopt.LAMB, dict(lr=0.01, weight_decay=0.01)),
])
def test_fused_kernel_equals_core_rule_in_float64(cls, kw):
    """The fused path (native kernel on flat buffers) computes the core rule: float64, 5 steps."""
    g = torch.Generator().manual_seed(3)
    shapes = [(5, 3), (7,), (2, 2, 2)]
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(5)]
    out = []
    for fused in (False, True):
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        opt = cls(ps, fused=fused, **kw)
        for step_grads in grads:
            opt.zero_grad()
            for p, gr in zip(ps, step_grads):
                p.grad.copy_(gr) if p.grad is not None else setattr(p, "grad", gr.clone())
            opt.step()
        out.append(torch.cat([p.detach().reshape(-1) for p in ps]))
    assert _rel(out[1], out[0]) < 1e-13


@pytest.mark.parametrize("fused", [False, True])
def test_step_counts_and_stateless_sgd(fused):
    ps = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    opt = hopt.SGD(ps, lr=0.5, fused=fused)
    for _ in range(3):
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
    assert all(torch.allclose(p, torch.full_like(p, -0.5)) for p in ps)
    if fused:
        assert [float(opt.state[p]["step"]) for p in ps] == [3.0, 3.0]
