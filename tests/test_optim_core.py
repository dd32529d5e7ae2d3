"""numpy-level checks of the core update rules (hvdllm.core.optim) against textbook formulas."""
from __future__ import annotations

import numpy as np
import pytest

from hvdllm.core import optim as core


def _arrays(seed: int = 0, shape=(5, 7)):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(4)]


def test_sgd_plain_momentum_nesterov_match_hand_loops():
    p0, _, _, _ = _arrays()
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(p0.shape) for _ in range(5)]
    lr, mu, wd = 0.1, 0.9, 0.01
    for nesterov in (False, True):
        p, buf = p0.copy(), np.zeros_like(p0)
        q, b = p0.copy(), np.zeros_like(p0)
        for g in grads:
            p, buf = core.sgd_step(np, p, g, buf, lr=lr, momentum=mu, nesterov=nesterov, weight_decay=wd)
            d = g + wd * q
            b = mu * b + d
            q = q - lr * ((d + mu * b) if nesterov else b)
        np.testing.assert_allclose(p, q, rtol=1e-12)
    p, none = core.sgd_step(np, p0, grads[0], None, lr=lr)
    assert none is None
    np.testing.assert_allclose(p, p0 - lr * grads[0], rtol=1e-12)


def _adam_textbook(p, g, m, v, t, lr, b1, b2, eps, wd, decoupled):
    """Kingma & Ba Algorithm 1 (plus L2 or decoupled decay), written independently."""
    if decoupled:
        p = p - lr * wd * p
    else:
        g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g ** 2
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


def _two_copies_from_zero_moments(seed: int):
    """(p, m, v) with zero moments, an independent copy for the reference, and a gradient rng."""
    p, _, _, _ = _arrays()
    m, v = np.zeros_like(p), np.zeros_like(p)
    return p, m, v, p.copy(), m.copy(), v.copy(), np.random.default_rng(seed)


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_matches_algorithm_1(decoupled):
    p, m, v, q, mq, vq, rng = _two_copies_from_zero_moments(3)
    for t in range(1, 8):
        g = rng.standard_normal(p.shape)
        p, m, v = core.adam_step(np, p, g, m, v, step=t, lr=0.01, beta1=0.8, beta2=0.99, eps=1e-8,
                                 weight_decay=0.1, decoupled=decoupled)
        q, mq, vq = _adam_textbook(q, g, mq, vq, t, 0.01, 0.8, 0.99, 1e-8, 0.1, decoupled)
    np.testing.assert_allclose(p, q, rtol=1e-12)
    np.testing.assert_allclose(m, mq, rtol=1e-12)
    np.testing.assert_allclose(v, vq, rtol=1e-12)


def test_adam_eps_hat_is_the_efficient_version():
    """eps_hat=True with eps_hat = eps*sqrt(1-b2^t) equals Algorithm 1 with eps (one step)."""
    p, g, m, v = _arrays()
    v = np.abs(v)
    t, b2, eps = 3, 0.999, 1e-3
    a = core.adam_step(np, p, g, m, v, step=t, lr=0.1, beta2=b2, eps=eps)[0]
    b = core.adam_step(np, p, g, m, v, step=t, lr=0.1, beta2=b2, eps=eps * np.sqrt(1 - b2 ** t), eps_hat=True)[0]
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_rules_do_not_mutate_inputs_and_keep_float32():
    p, g, m, v = [a.astype(np.float32) for a in _arrays()]
    v = np.abs(v)
    before = [a.copy() for a in (p, g, m, v)]
    outs = [core.sgd_step(np, p, g, m, lr=0.1, momentum=0.9, weight_decay=0.1),
            core.adam_step(np, p, g, m, v, step=2, lr=0.1, weight_decay=0.1),
            core.lamb_step(np, p, g, m, v, step=2, lr=0.1, weight_decay=0.1)]
    for a, b in zip((p, g, m, v), before):
        np.testing.assert_array_equal(a, b)
    for out in outs:
        for arr in out:
            assert arr.dtype == np.float32


def _lamb_paper(x, g, m, v, t, lr, b1, b2, eps, lam):
    """You et al. (2019), Algorithm 2, one layer, phi = identity."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    r = m_hat / (np.sqrt(v_hat) + eps)
    u = r + lam * x
    x_norm, u_norm = np.linalg.norm(x), np.linalg.norm(u)
    ratio = x_norm / u_norm if x_norm > 0 and u_norm > 0 else 1.0
    return x - lr * ratio * u, m, v


def test_lamb_matches_paper():
    x, m, v, y, my, vy, rng = _two_copies_from_zero_moments(5)
    for t in range(1, 6):
        g = rng.standard_normal(x.shape)
        x, m, v = core.lamb_step(np, x, g, m, v, step=t, lr=0.05, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01)
        y, my, vy = _lamb_paper(y, g, my, vy, t, 0.05, 0.9, 0.999, 1e-6, 0.01)
    np.testing.assert_allclose(x, y, rtol=1e-12)


def test_lamb_trust_ratio_guards_zero_norms():
    r = core.lamb_trust_ratio(np, np.array([2.0, 0.0, 3.0, 0.0]), np.array([4.0, 1.0, 0.0, 0.0]))
    np.testing.assert_allclose(r, [0.5, 1.0, 1.0, 1.0])
    # a zero layer still moves, by lr * u (ratio 1)
    zero = np.zeros(3)
    g = np.array([1.0, -2.0, 0.5])
    x, _, _ = core.lamb_step(np, zero, g, zero, zero, step=1, lr=0.1, eps=1e-6)
    np.testing.assert_allclose(x, -0.1 * g / (np.abs(g) + 1e-6), rtol=1e-12)


@pytest.mark.parametrize("call, fragment", [
    (lambda: core.check_adam(-0.1, (0.9, 0.999), 1e-8, 0.0), "lr=-0.1"),
    (lambda: core.check_adam(0.1, (1.0, 0.999), 1e-8, 0.0), "beta1=1.0"),
    (lambda: core.check_adam(0.1, (0.9, -0.5), 1e-8, 0.0), "beta2=-0.5"),
    (lambda: core.check_adam(0.1, (0.9,), 1e-8, 0.0), "betas=(0.9,)"),
    (lambda: core.check_adam(0.1, (0.9, 0.999), 0.0, 0.0), "eps=0.0"),
    (lambda: core.check_adam(0.1, (0.9, 0.999), 1e-8, -1.0), "weight_decay=-1.0"),
    (lambda: core.check_sgd(0.1, 1.5, False, 0.0), "momentum=1.5"),
    (lambda: core.check_sgd(0.1, 0.0, True, 0.0), "nesterov=True"),
    (lambda: core.check_sgd(float("nan"), 0.0, False, 0.0), "lr=nan"),
])
def test_bad_hyperparameters_raise_one_line(call, fragment):
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert fragment in message and "\n" not in message and "expected" in message
