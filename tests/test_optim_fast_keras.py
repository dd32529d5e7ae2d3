"""Fast defaults of hvdllm.tensorflow.optim: an eager ``apply_gradients`` runs as one traced function
(traced once per set of variables, reused) and steps exactly as the graph-mode update does."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from hvdllm.tensorflow import optim as kopt  # noqa: E402
from tests.test_optim_keras import _init, _keras_run, _rel  # noqa: E402


@pytest.mark.parametrize("make", [lambda: kopt.SGD(0.05, momentum=0.9), lambda: kopt.Adam(3e-3),
                                  lambda: kopt.AdamW(3e-3), lambda: kopt.LAMB(3e-3)],
                         ids=["momentum", "adam", "adamw", "lamb"])
def test_eager_apply_gradients_is_one_traced_update_equal_to_the_graph_step(make):
    eager_opt = make()
    got, _ = _keras_run(eager_opt, steps=30, eager=True)
    traced = list(eager_opt._traced_updates.values())
    assert len(traced) == 1 and traced[0].experimental_get_tracing_count() == 1   # traced once, reused 29 times
    expected, _ = _keras_run(make(), steps=30)  # the whole loop in one tf.function: the update inlined
    assert _rel(got, expected) < 1e-6


def test_a_new_set_of_variables_gets_its_own_trace_and_sparse_gradients_work():
    w0, _, _ = _init()
    opt = kopt.Adam(1e-2)  # no weight decay: rows without a gradient stay put
    a = [keras.Variable(w) for w in w0]
    table = keras.Variable(np.ones((5, 3), np.float32))
    opt.build(a + [table])
    opt.apply_gradients(zip([tf.ones_like(v) for v in a], a))
    rows = tf.IndexedSlices(tf.ones((2, 3)), tf.constant([0, 3]), tf.constant([5, 3]))
    opt.apply_gradients([(rows, table)])
    assert len(opt._traced_updates) == 2
    assert all(float(tf.reduce_max(v - w)) < 0 for v, w in zip(a, w0))
    moved = np.abs(table.numpy() - 1).sum(axis=1) > 0
    assert moved.tolist() == [True, False, False, True, False]
