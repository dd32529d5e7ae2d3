"""Replica divergence detector: the pure comparison, and on 2 real ranks (gloo) one element changed by
one ulp on one rank -- in a parameter or an Adam moment -- is caught, naming the step and the rank."""
from __future__ import annotations

import numpy as np
import pytest

from hvdllm.train import config as C
from hvdllm.train import replicas
from tests.multirank import run_ranks


def test_digest_and_differing_rows() -> None:
    a, b = replicas.digest(np.array([1, 2, 3])), replicas.digest(np.array([1, 2, 4]))
    assert a.shape == (replicas.DIGEST_WORDS,) and not np.array_equal(a, b)
    rows = np.stack([a, a, b, a])
    assert replicas.differing(rows, [[0, 1, 2, 3]]) == [([0, 1, 3], [2])]
    assert replicas.differing(rows, [[0, 2], [1, 3]]) == [([0], [2])]     # two dp groups: only one disagrees
    assert replicas.differing(rows, [[0, 1], [3]]) == []
    with pytest.raises(replicas.ReplicaMismatch, match=r"at step 12: ranks 2 differ from ranks 0, 1, 3"):
        replicas.check(12, rows, [[0, 1, 2, 3]])


def test_due_every_n_and_at_checkpoints() -> None:
    cfg = C.build([{"run.check_replicas_every": 5}])
    assert [s for s in range(1, 12) if replicas.due(s, cfg, s == 7)] == [5, 7, 10]
    off = C.build([{"run.check_replicas_every": 0}])
    assert not any(replicas.due(s, off, True) for s in range(1, 12))
    assert C.build([]).run.check_replicas_every == 1000


def test_state_checksums_see_one_ulp() -> None:
    import torch

    from hvdllm.train.trainer_torch import bit_sum
    t = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    u = t.clone()
    u[3] = float(np.nextafter(np.float32(u[3]), np.float32(np.inf)))
    assert int(bit_sum(t)) != int(bit_sum(u))
    assert int(bit_sum(t)) == int(bit_sum(t.flip(0)))            # order-independent: exact integer sums


@pytest.mark.timeout(240)
def test_two_ranks_catch_one_changed_element() -> None:
    for r in run_ranks("replicas_worker.py", np=2, launcher="gloo", timeout=200):
        assert r["same"] is None and r["restored"] is None, r
        assert "at step 7: ranks 1 differ from ranks 0" in r["param"], r
        assert "at step 9: ranks 1 differ from ranks 0" in r["moment"], r


def test_keras_state_checksums_see_one_ulp_and_skip_dropout_seeds() -> None:
    pytest.importorskip("tensorflow")
    import keras

    from hvdllm.models.config import GPTConfig
    from hvdllm.models.gpt_keras import GPT
    from hvdllm.train.trainer_keras import state_checksums
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.1), seed=0)
    model(np.zeros((1, 8), np.int32))
    opt = keras.optimizers.AdamW(1e-3)
    opt.build(model.trainable_variables)
    base = state_checksums(model, opt)
    assert len(base) == len(model.trainable_variables) + len(opt.variables)
    for v in [model.trainable_variables[0], opt.variables[-1]]:          # a weight, then an Adam moment
        old = v.numpy()
        new = old.copy()
        new.flat[3] = np.nextafter(new.flat[3], np.float32(np.inf))
        v.assign(new)
        assert not np.array_equal(state_checksums(model, opt), base), v.path
        v.assign(old)
        assert np.array_equal(state_checksums(model, opt), base)
    seeds = [v for v in model.non_trainable_variables if "seed_generator" in v.path]
    assert seeds
    seeds[0].assign(seeds[0].numpy() + 7)                                 # differs per rank by design
    assert np.array_equal(state_checksums(model, opt), base)
