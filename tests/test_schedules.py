"""LR schedules in the core and their torch scheduler (the Keras Schedule is in test_optim_keras.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hvdllm.core.schedules import LRSchedule, linear_scaling
from hvdllm.torch import optim as hopt


def test_warmup_then_cosine():
    s = LRSchedule(base_lr=1.0, warmup_steps=4, total_steps=12, decay="cosine", min_lr=0.1)
    assert [s(i) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert s(4) == pytest.approx(1.0)
    assert s(8) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert s(12) == pytest.approx(0.1) and s(1000) == pytest.approx(0.1)
    for i in range(5, 12):
        q = (i - 4) / 8
        assert s(i) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * q)), rel=1e-12)


def test_linear_and_constant():
    s = LRSchedule(base_lr=2.0, warmup_steps=0, total_steps=10, decay="linear")
    assert [s(i) for i in (0, 5, 10, 11)] == pytest.approx([2.0, 1.0, 0.0, 0.0])
    c = LRSchedule(base_lr=0.5, warmup_steps=2, decay="constant")
    assert [c(i) for i in (0, 1, 2, 10_000)] == pytest.approx([0.25, 0.5, 0.5, 0.5])
    w = LRSchedule(base_lr=1.0, warmup_steps=3, total_steps=3)  # no decay phase left
    assert [w(i) for i in (0, 2, 3)] == pytest.approx([1 / 3, 1.0, 0.0])


def test_evaluate_vectorised_matches_call():
    s = LRSchedule(base_lr=3e-4, warmup_steps=10, total_steps=100, min_lr=3e-5)
    steps = np.arange(120, dtype=np.float64)
    np.testing.assert_allclose(s.evaluate(steps, np), [s(int(i)) for i in steps], rtol=1e-15)


def test_linear_scaling_rule():
    assert linear_scaling(0.1, 1024, 256) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="global_batch=0"):
        linear_scaling(0.1, 0, 256)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(base_lr=-1.0, total_steps=10), "base_lr=-1.0"),
    (dict(base_lr=1.0, total_steps=10, decay="exponential"), "decay='exponential'"),
    (dict(base_lr=1.0, decay="cosine"), "total_steps=None"),
    (dict(base_lr=1.0, warmup_steps=5, total_steps=3), "total_steps=3"),
    (dict(base_lr=1.0, warmup_steps=-1, total_steps=3), "warmup_steps=-1"),
    (dict(base_lr=1.0, total_steps=3, min_lr=2.0), "min_lr=2.0"),
])
def test_bad_schedules_raise(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        LRSchedule(**kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="step=-1"):
        LRSchedule(1.0, total_steps=3)(-1)


def test_torch_scheduler_drives_groups_with_their_ratios():
    w1, w2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = hopt.SGD([{"params": [w1]}, {"params": [w2], "lr": 0.5}], lr=1.0)
    sched = LRSchedule(base_lr=1.0, warmup_steps=2, total_steps=6, decay="linear")
    scheduler = hopt.lr_scheduler(opt, sched)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    seen = []
    for step in range(8):
        seen.append([g["lr"] for g in opt.param_groups])
        w1.grad, w2.grad = torch.ones(2), torch.ones(2)
        opt.step()
        scheduler.step()
    for step, (lr1, lr2) in enumerate(seen):
        assert lr1 == pytest.approx(sched(step)) and lr2 == pytest.approx(0.5 * sched(step))
    # the parameter moved by exactly the sum of the scheduled lrs
    assert float(w1.detach()[0]) == pytest.approx(-sum(sched(i) for i in range(8)))
    state = scheduler.state_dict()
    again = hopt.lr_scheduler(hopt.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), sched)
    again.load_state_dict(state)
    assert again.last_epoch == scheduler.last_epoch
