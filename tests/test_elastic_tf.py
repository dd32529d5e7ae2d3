"""hvdllm.tensorflow.elastic: Horovod's elastic Keras API on hvdllm, with a real worker killed.

Same design as tests/test_elastic_torch.py: the worker keeps the global batch (each worker takes every
size-th of the step's 16 shuffled indices), so the interrupted run follows the uninterrupted one up to
the fp32 order of the gradient mean's additions: rtol 1e-5.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import keras
import numpy as np
import pytest

import hvdllm.tensorflow as hvd
from tests.multirank import run_elastic, run_ranks

WORKER = "elastic_tf_worker.py"
RTOL = 1e-5


def test_kill_one_worker_survivor_finishes_on_the_curve() -> None:
    (ref,) = run_ranks(WORKER, np=1, launcher="python", timeout=120)
    assert ref["backend"] == "local" and ref["steps"] == 24
    with tempfile.TemporaryDirectory(prefix="hvdllm-elastic-tf-") as d:
        reports, output = run_elastic(WORKER, Path(d), ["--kill-at", "5", f"{d}/killed"], grow=False)
        assert (Path(d) / "killed").exists(), output
    (survivor,) = reports
    assert survivor["backend"] == "horovod" and survivor["size"] == 1, output
    assert survivor["sizes"] == [[0, 2], [3, 1]] and survivor["resets"][-1] == 1, output
    assert survivor["steps"] == ref["steps"]
    assert survivor["final_loss"] == pytest.approx(ref["final_loss"], rel=RTOL), output
    assert survivor["weight"] == pytest.approx(ref["weight"], rel=RTOL, abs=1e-6), output


def test_one_process_commit_restore() -> None:
    hvd.init()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    state = hvd.elastic.TensorFlowKerasState(model, optimizer, epoch=1)
    assert optimizer.built  # built up front, so a late worker holds the same variables

    def step() -> None:
        import tensorflow as tf
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(np.ones((4, 3), np.float32))))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))

    @hvd.elastic.run
    def train(state: hvd.elastic.TensorFlowKerasState) -> list:
        step()
        state.epoch = 2
        state.commit()
        saved = [v.numpy().copy() for v in model.variables + optimizer.variables]
        step()
        step()
        state.epoch = 7
        state.restore()
        return saved

    saved = train(state)
    assert state.epoch == 2
    for v, s in zip(model.variables + optimizer.variables, saved):
        np.testing.assert_array_equal(v.numpy(), s)
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="must be built first"):
        hvd.elastic.TensorFlowKerasState(unbuilt)
