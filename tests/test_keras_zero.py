"""Keras ZeRO-1/2 (``hvdllm.tensorflow.DistributedOptimizer(..., zero_stage=1|2)``) against zero_stage=0.

The worker (tests/workers/keras_zero_worker.py) trains a replicated and a ZeRO copy of one tiny model for
20 updates on each rank's own data (eager apply_gradients and model.fit, Adam/AdamW/SGD, clipping,
accumulation, 120-byte buckets that no rank count divides). Asserted per case: the ZeRO weights are
bitwise equal on every rank and within 1e-6 relative (||a-b||/||b||) of the replicated run (clipping, also
through a ``grad_norm_fn`` hook returning the norm of the per-variable squares,
sums the norm from the shards in float64, the replicated path in float32 per tensor: ~5e-8 seen); the
update count is the same; each rank holds about 1/N of the replicated optimizer-state bytes (padding
adds < N elements per bucket and slot). ``exclude_from_weight_decay`` (biases) trains as the replicated run.

State (the worker's "state" cases: Keras Adam, hvdllm AdamW with excluded biases, SGD momentum): the ZeRO
optimizer's ``save_own_variables`` (shards gathered) holds the replicated optimizer's variables, same
count, keys and shapes, within 1e-6; the replicated state loaded into a fresh ZeRO optimizer trains on as
the replicated optimizer does (1e-6); ``model.save`` on every rank writes that unsplit state and plain
``keras.saving.load_model`` reads it back exactly.
"""
from __future__ import annotations

import pytest

from tests.multirank import run_ranks

NEAR = 1e-6


def _check(reports: list[dict]) -> None:
    n = len(reports)
    assert [r["size"] for r in reports] == [n] * n
    for name in reports[0]["cases"]:
        per_rank = [rep["cases"][name] for rep in reports]
        assert len({c["hash"] for c in per_rank}) == 1, name      # every replica holds the same weights
        for c in per_rank:
            stage = 2 if "_s2" in name else 1
            assert c["norm_rel"] <= NEAR, (name, c)
            assert c["iterations_0"] == c[f"iterations_{stage}"] == 20, (name, c)
            # 3 buckets at most of 120 bytes: < N padding elements per bucket and per slot
            assert c[f"bytes_{stage}"] <= c["bytes_0"] / n + 2 * 3 * n * 4, (name, c)
            if n > 1:
                assert c[f"bytes_{stage}"] < c["bytes_0"] * 0.75, (name, c)
    for name in reports[0]["state"]:
        for c in (rep["state"][name] for rep in reports):
            assert c["keys"][0] == c["keys"][1] == c["saved_keys"] and c["shapes_equal"], (name, c)
            assert c["save_rel"] <= NEAR and c["resume_rel"] <= NEAR and c["saved_rel"] == 0.0, (name, c)
            assert c["iterations"] == [2 * 20, 2 * 20], (name, c)


# mpirun (mpi4py backend): every case, model.fit's graph included. mpi4py matches collectives by call order,
# and a graph may run independent ops in any order (a hang was seen with one op per collective: one rank in an
# allgather, the other in a reduce-scatter), so there the whole ZeRO update is one op (tf.py_function).
@pytest.mark.timeout(500)
@pytest.mark.parametrize("launcher,backend", [("gloo", "horovod"), ("mpirun", "mpi")])
def test_keras_zero_matches_replicated_at_2_ranks(launcher: str, backend: str) -> None:
    reports = run_ranks("keras_zero_worker.py", np=2, launcher=launcher, timeout=460)
    assert [r["backend"] for r in reports] == [backend] * 2
    _check(reports)
    assert reports[0]["state"] and any(name.startswith("fit_") for name in reports[0]["cases"]), reports[0]


@pytest.mark.timeout(300)
def test_keras_zero_one_process() -> None:
    reports = run_ranks("keras_zero_worker.py", np=1, launcher="python", timeout=240)
    assert reports[0]["backend"] == "local"
    _check(reports)


def test_keras_zero_bad_input_one_line() -> None:
    import keras

    import hvdllm.tensorflow as hvd

    cases = [
        (lambda: keras.optimizers.Adam(), {"zero_stage": 3}, "zero_stage=3"),
        (lambda: keras.optimizers.Adam(), {"zero_stage": True}, "zero_stage=True"),
        (lambda: keras.optimizers.Adam(), {"zero_stage": "1"}, "zero_stage='1'"),
        (lambda: keras.optimizers.Lamb(), {"zero_stage": 1}, "Lamb"),
        (lambda: keras.optimizers.Adam(clipnorm=1.0), {"zero_stage": 2}, "clipnorm=1.0"),
        (lambda: keras.optimizers.Adam(global_clipnorm=1.0), {"zero_stage": 1}, "global_clipnorm=1.0"),
        (lambda: keras.optimizers.Adam(use_ema=True), {"zero_stage": 1}, "use_ema"),
        (lambda: keras.optimizers.Adam(), {"zero_stage": 1, "groups": 2}, "groups=2"),
        (lambda: keras.optimizers.Adam(), {"grad_norm_fn": lambda squares: 1.0}, "grad_norm_fn= needs zero_stage"),
        (lambda: keras.optimizers.Adam(), {"zero_stage": 1, "grad_norm_fn": 3.0}, "grad_norm_fn=3.0"),
    ]
    for make, kwargs, needle in cases:
        with pytest.raises(ValueError) as e:
            hvd.DistributedOptimizer(make(), **kwargs)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    built = keras.optimizers.Adam()
    built.build([keras.Variable([1.0, 2.0])])
    with pytest.raises(ValueError, match="already built"):
        hvd.DistributedOptimizer(built, zero_stage=1)


def test_keras_zero_grad_norm_fn_gets_each_variables_square() -> None:
    """One process: ``grad_norm_fn`` receives, per variable in build order, its gradient's squared norm (the
    shards' pieces attributed back to their variables; 100-byte buckets: three buckets, one holding two
    variables), its result is the norm ``grad_norm`` reports and ``max_grad_norm`` clips by (SGD at lr 1: the
    update is the clipped gradient). Across ranks (pieces of one variable in two shards) the worker's hook
    cases and the 4-rank tp/pp trainer test check the summed norms."""
    import keras
    import numpy as np
    import tensorflow as tf

    import hvdllm.tensorflow as hvd

    hvd.init()
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((5,)), keras.layers.Dense(7), keras.layers.Dense(3)])
    variables = m.trainable_variables
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=tuple(v.shape)).astype("float32") for v in variables]
    seen = []

    def hook(squares: tf.Tensor) -> tf.Tensor:
        seen.append(np.asarray(squares))
        return 2.0 * tf.sqrt(tf.reduce_sum(squares))

    opt = hvd.DistributedOptimizer(keras.optimizers.SGD(1.0), zero_stage=1, bucket_cap_mb=100 / 2**20,
                                   max_grad_norm=0.5, grad_norm_fn=hook)
    before = [v.numpy() for v in variables]
    opt.apply([tf.constant(g) for g in grads], variables)
    want = [float(np.sum(np.square(g.astype(np.float64)))) for g in grads]
    assert len(seen) == 1 and seen[0].dtype == np.float64
    np.testing.assert_allclose(seen[0], want, rtol=1e-12)
    norm = 2.0 * np.sqrt(sum(want))
    assert float(opt.grad_norm.numpy()) == pytest.approx(norm, rel=1e-6)
    coef = 0.5 / (norm + 1e-6)
    for v, b, g in zip(variables, before, grads):
        np.testing.assert_allclose(v.numpy(), b - coef * g, rtol=1e-6, atol=1e-7)
