"""Keras ZeRO-1/2 (``hvdllm.tensorflow.DistributedOptimizer(..., zero_stage=1|2)``) against zero_stage=0.

Run as `<launcher> python keras_zero_worker.py`. Every case trains two copies of one tiny model from the
same initial weights on this rank's own data for 20 updates, one with the replicated wrapper and one
with ZeRO, and reports per case: ||a - b|| / ||b|| over all weights, a hash of the ZeRO weights (equal
on every rank), both optimizers' state bytes and iteration counts.
"""
from __future__ import annotations

import hashlib
import sys

import numpy as np

from common import leave_together, start

import keras
import tensorflow as tf

import hvdllm.keras as hk
import hvdllm.tensorflow as hvd

r, n = start(hvd, inter_op=1)
STEPS = 20
CAP_MB = 120 / 2**20    # 120-byte buckets: several per model, sizes no rank count divides


def model() -> keras.Model:
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((5,)), keras.layers.Dense(7, activation="tanh"), keras.layers.Dense(3)])
    return m


def data(step: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([step, r])
    return rng.normal(size=(4, 5)).astype("float32"), rng.normal(size=(4, 3)).astype("float32")


def state_bytes(opt) -> int:
    skip = {id(opt.iterations), id(opt._learning_rate)}
    return sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for v in opt.variables if id(v) not in skip)


def train_eager(m: keras.Model, opt, passes: int) -> None:
    for step in range(STEPS * passes):
        x, y = data(step)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((m(x) - y) ** 2)
        opt.apply_gradients(zip(tape.gradient(loss, m.trainable_variables), m.trainable_variables))


def train_fit(m: keras.Model, opt, passes: int) -> None:
    m.compile(optimizer=opt, loss="mse", jit_compile=False)
    xs, ys = zip(*[data(step) for step in range(STEPS * passes)])
    m.fit(np.concatenate(xs), np.concatenate(ys), batch_size=4, epochs=1, shuffle=False, verbose=0)


CASES = {
    # name: (optimizer factory, wrapper options, stage, training loop, backward passes)
    "adam_s1": (lambda: keras.optimizers.Adam(0.01), {}, 1, train_eager, 1),
    "adam_s2": (lambda: keras.optimizers.Adam(0.01), {}, 2, train_eager, 1),
    "adamw_clip_s2": (lambda: keras.optimizers.AdamW(0.02, weight_decay=0.1), {"max_grad_norm": 0.5}, 2,
                      train_eager, 1),
    "sgd_accum_s1": (lambda: keras.optimizers.SGD(0.05, momentum=0.9), {"backward_passes_per_step": 2}, 1,
                     train_eager, 2),
    "fit_adam_s2": (lambda: keras.optimizers.Adam(0.01), {}, 2, train_fit, 1),
    "fit_sgd_clip_s1": (lambda: keras.optimizers.SGD(0.05, momentum=0.9), {"max_grad_norm": 0.3}, 1, train_fit, 1),
    "fit_hk_adamw_s2": (lambda: keras.optimizers.AdamW(0.01), {"backward_passes_per_step": 2}, 2, train_fit, 2),
}


def run(name: str) -> dict:
    make, options, stage, loop, passes = CASES[name]
    wrap = hk.DistributedOptimizer if name.startswith("fit_hk") else hvd.DistributedOptimizer
    out = {}
    weights = {}
    for z in (0, stage):
        m = model()
        opt = wrap(make(), bucket_cap_mb=CAP_MB, zero_stage=z, **options)
        loop(m, opt, passes)
        weights[z] = np.concatenate([np.asarray(v).ravel().astype("float64") for v in m.trainable_variables])
        out[f"iterations_{z}"] = int(opt.iterations.numpy())
        out[f"bytes_{z}"] = opt.state_bytes() if z else state_bytes(opt)
    a, b = weights[stage], weights[0]
    out["norm_rel"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    out["bitwise"] = bool(np.array_equal(a, b))
    out["hash"] = hashlib.sha256(a.tobytes()).hexdigest()
    return out


def mpi_graph_refusal() -> str:
    """On the mpi4py backend a ZeRO step inside model.fit's graph is a one-line ValueError (no hang)."""
    opt = hvd.DistributedOptimizer(keras.optimizers.Adam(0.01), bucket_cap_mb=CAP_MB, zero_stage=1)
    try:
        train_fit(model(), opt, 1)
    except ValueError as e:
        return str(e)
    return ""


selected = sys.argv[1].split(",") if len(sys.argv) > 1 else list(CASES)
refusal = mpi_graph_refusal() if hvd.backend() == "mpi" and n > 1 else None
leave_together(hvd, r, {"size": n, "backend": hvd.backend(), "mpi_graph_refusal": refusal,
                        "cases": {name: run(name) for name in selected}})
