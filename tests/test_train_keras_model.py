"""The Keras GPT is the PyTorch GPT: same parameters by name, same logits and loss on the same weights."""
from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("keras")

from hvdllm.models import GPTConfig  # noqa: E402
from hvdllm.models.gpt import GPT as TorchGPT  # noqa: E402
from hvdllm.models.gpt_keras import GPT, load_torch_state_dict, torch_names, torch_state_dict  # noqa: E402

TINY = GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_embd=64)
UNTIED = dataclasses.replace(TINY, n_layer=3, bias=False, tie_embeddings=False)


@pytest.mark.parametrize("cfg", [TINY, UNTIED], ids=["tied-bias", "untied-nobias"])
def test_same_logits_and_loss_as_torch(cfg: GPTConfig) -> None:
    torch.manual_seed(0)
    tm = TorchGPT(cfg).eval()
    km = load_torch_state_dict(GPT(cfg, seed=1), tm.state_dict())
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, cfg.vocab_size, (3, cfg.block_size)), rng.integers(0, cfg.vocab_size, (3, cfg.block_size))
    with torch.no_grad():
        t_logits, t_loss = tm(torch.from_numpy(x), torch.from_numpy(y))
    k_logits, k_loss = km.loss_on(x.astype("int32"), y.astype("int32"))
    np.testing.assert_allclose(np.asarray(k_logits), t_logits.numpy(), atol=1e-5, rtol=0)
    assert abs(float(k_loss) - float(t_loss)) < 1e-5
    # a shorter sequence too (positions 0..T-1 only)
    with torch.no_grad():
        t_short, _ = tm(torch.from_numpy(x[:, :7]))
    np.testing.assert_allclose(np.asarray(km(x[:, :7].astype("int32"))), t_short.numpy(), atol=1e-5, rtol=0)
    # and back: Keras weights in torch's names load into a torch GPT unchanged
    sd = torch_state_dict(km)
    tm2 = TorchGPT(cfg)
    missing, unexpected = tm2.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    for k, v in tm.state_dict().items():
        assert torch.equal(tm2.state_dict()[k], v), k


def test_same_gradients_as_torch() -> None:
    import tensorflow as tf

    torch.manual_seed(1)
    tm = TorchGPT(TINY)
    km = load_torch_state_dict(GPT(TINY), tm.state_dict())
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 256, (2, 16)), rng.integers(0, 256, (2, 16))
    _, loss = tm(torch.from_numpy(x), torch.from_numpy(y))
    loss.backward()
    with tf.GradientTape() as tape:
        _, k_loss = km.loss_on(x.astype("int32"), y.astype("int32"), training=True)
    names = list(torch_names(km))
    grads = tape.gradient(k_loss, [v for _, v, _ in names])
    params = dict(tm.named_parameters())
    for (name, _, transposed), g in zip(names, grads):
        g = np.asarray(tf.convert_to_tensor(g))
        np.testing.assert_allclose(g.T if transposed else g, params[name].grad.numpy(), atol=2e-6, rtol=0,
                                   err_msg=name)


def test_init_scheme_matches_torch_statistics() -> None:
    cfg = dataclasses.replace(TINY, n_layer=3, n_embd=128)
    km = GPT(cfg, seed=0)
    w = {n: np.asarray(v) for n, v, _ in torch_names(km)}
    assert len(km.trainable_variables) == len(w) and sum(a.size for a in w.values()) == cfg.num_params()
    for name, a in w.items():
        if name.endswith("c_proj.weight"):
            assert abs(a.std() - cfg.residual_init_std) < 0.05 * cfg.residual_init_std, name
        elif name.startswith(("wte", "wpe")) or name.endswith((".c_attn.weight", ".c_fc.weight")):
            assert abs(a.std() - cfg.init_std) < 0.05 * cfg.init_std, name
        elif ".ln_" in name or name.startswith("ln_f"):
            assert np.all(a == (1.0 if name.endswith("weight") else 0.0)), name
        else:
            assert name.endswith(".bias") and np.all(a == 0.0), name
    again = GPT(cfg, seed=0)
    other = GPT(cfg, seed=1)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(km.weights, again.weights))
    assert not np.array_equal(np.asarray(km.wte.embeddings), np.asarray(other.wte.embeddings))


def test_generate_and_bad_input() -> None:
    km = GPT(TINY, seed=0)
    prompt = np.array([[1, 2, 3]])
    a = km.generate(prompt, 40, top_k=5, seed=7)      # runs past block_size=32: the context is cropped
    b = km.generate(prompt, 40, top_k=5, seed=7)
    assert a.shape == (1, 43) and np.array_equal(a, b) and np.array_equal(a[:, :3], prompt)
    assert a.min() >= 0 and a.max() < TINY.vocab_size
    with pytest.raises(ValueError, match="exceeds the model's context"):
        km(np.zeros((1, TINY.block_size + 1), dtype="int32"))
    with pytest.raises(ValueError, match="lacks 'wte.weight'"):
        load_torch_state_dict(km, {})
    bad = torch_state_dict(km)
    bad["wpe.weight"] = np.zeros((5, 64), np.float32)
    with pytest.raises(ValueError, match="wpe.weight"):
        load_torch_state_dict(km, bad)
