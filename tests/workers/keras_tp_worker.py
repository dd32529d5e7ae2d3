"""Keras tensor-parallel Dense layers on real ranks against unsplit keras.layers.Dense (computed here)."""
from __future__ import annotations

from common import leave_together, start

import keras
import numpy as np
import tensorflow as tf

import hvdllm.tensorflow as hvd
from hvdllm.core.grid import ProcessGrid
from hvdllm.tensorflow.parallel import ColumnParallelDense, RowParallelDense

rank, size = start(hvd, threads=None)
group = ProcessGrid(1, size, 1, world_size=size).group("tp", rank)
out: dict = {"rank": rank, "backend": hvd.backend()}

keras.utils.set_random_seed(0)
d1 = keras.layers.Dense(12, activation="gelu")
d2 = keras.layers.Dense(6)
x = tf.constant(np.random.default_rng(0).normal(size=(5, 8)).astype("float32"))
with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    ref = d2(d1(x))
    ref_loss = tf.reduce_sum(ref * ref)
ref_dx = tape.gradient(ref_loss, x)
ref_g = tape.gradient(ref_loss, [d1.kernel, d1.bias, d2.kernel, d2.bias])

col = ColumnParallelDense.from_dense(d1, group)
row = RowParallelDense.from_dense(d2, group)


def shard_errors(g: list) -> list[float]:
    """This rank's kernel/bias gradients against its slice of the unsplit ones."""
    want = [np.split(np.asarray(ref_g[0]), size, axis=1)[rank], np.split(np.asarray(ref_g[1]), size)[rank],
            np.split(np.asarray(ref_g[2]), size, axis=0)[rank], np.asarray(ref_g[3])]
    return [float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(g, want)]


def run(xin: tf.Tensor) -> tuple:
    with tf.GradientTape() as t:
        t.watch(xin)
        y = row(col(xin))
        loss = tf.reduce_sum(y * y)
    return (y, *t.gradient(loss, [xin, col.kernel, col.bias, row.kernel, row.bias]))


y, dx, *g = run(x)
out["eager_out"] = float(np.max(np.abs(y - ref)))
out["eager_dx"] = float(np.max(np.abs(dx - ref_dx)))
out["eager_grads"] = shard_errors(g)
y, dx, *g = tf.function(run)(x)
out["graph_out"] = float(np.max(np.abs(y - ref)))
out["graph_dx"] = float(np.max(np.abs(dx - ref_dx)))
out["graph_grads"] = shard_errors(g)

# gather_output and input_is_parallel=False (each a single layer against its Dense)
colg = ColumnParallelDense.from_dense(d1, group, gather_output=True)
rows = RowParallelDense.from_dense(d2, group, input_is_parallel=False)
h = tf.constant(np.random.default_rng(1).normal(size=(3, 12)).astype("float32"))
with tf.GradientTape(persistent=True) as t:
    t.watch(x)
    t.watch(h)
    a, b = colg(x), rows(h)
    la, lb = tf.reduce_sum(a * tf.range(12.0)), tf.reduce_sum(b * b)
with tf.GradientTape(persistent=True) as t2:
    t2.watch(x)
    t2.watch(h)
    ra, rb = d1(x), d2(h)
    rla, rlb = tf.reduce_sum(ra * tf.range(12.0)), tf.reduce_sum(rb * rb)
out["gather_out"] = float(np.max(np.abs(a - ra)))
out["gather_dx"] = float(np.max(np.abs(t.gradient(la, x) - t2.gradient(rla, x))))
out["scatter_out"] = float(np.max(np.abs(b - rb)))
out["scatter_dh"] = float(np.max(np.abs(t.gradient(lb, h) - t2.gradient(rlb, h))))

# a functional Keras model with the parallel pair trains like the unsplit one (two SGD steps in fit)
inp = keras.Input((8,))
m_ref = keras.Model(inp, d2(d1(inp)))
m_tp = keras.Model(inp, RowParallelDense.from_dense(d2, group)(ColumnParallelDense.from_dense(d1, group)(inp)))
ys = tf.constant(np.random.default_rng(2).normal(size=(5, 6)).astype("float32"))
for m in (m_ref, m_tp):
    m.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    m.fit(x, ys, batch_size=5, epochs=2, verbose=0, shuffle=False)
out["fit_pred"] = float(np.max(np.abs(m_tp.predict(x, verbose=0) - m_ref.predict(x, verbose=0))))
try:
    ColumnParallelDense(7, group)
    out["bad_units"] = "no error"
except ValueError as e:
    out["bad_units"] = str(e)
leave_together(hvd, rank, out)
