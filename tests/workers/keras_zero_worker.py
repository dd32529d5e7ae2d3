"""Keras ZeRO-1/2 (``hvdllm.tensorflow.DistributedOptimizer(..., zero_stage=1|2)``) against zero_stage=0.

Run as `<launcher> python keras_zero_worker.py`. Every case trains two copies of one tiny model from the
same initial weights on this rank's own data for 20 updates, one with the replicated wrapper and one
with ZeRO, and reports per case: ||a - b|| / ||b|| over all weights, a hash of the ZeRO weights (equal
on every rank), both optimizers' state bytes and iteration counts. The "state" cases compare the ZeRO
optimizer's ``save_own_variables`` (gathered) with the replicated one's, load the replicated state into a
fresh ZeRO optimizer and train both on, and round-trip ``model.save`` / ``keras.saving.load_model``.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile

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
    # weight decay off for the biases (exclude_from_weight_decay by name): their own buckets and shards
    "adamw_exclude_s2": (lambda: keras.optimizers.AdamW(0.02, weight_decay=0.1), {}, 2, train_eager, 1),
    # grad_norm_fn (ZeRO only; the replicated copy clips on max_grad_norm alone): the norm of the per-variable
    # squares allreduced over the ranks; eager, and in model.fit's graph (mpirun: inside the one-op update)
    "adamw_hook_clip_s2": (lambda: keras.optimizers.AdamW(0.02, weight_decay=0.1),
                           {"max_grad_norm": 0.5, "grad_norm_fn": lambda squares: tf.sqrt(tf.reduce_sum(squares))},
                           2, train_eager, 1),
    "fit_adam_hook_clip_s1": (lambda: keras.optimizers.Adam(0.01),
                              {"max_grad_norm": 0.3, "grad_norm_fn": lambda squares: tf.sqrt(tf.reduce_sum(squares))},
                              1, train_fit, 1),
}


def make_inner(make, name: str):
    inner = make()
    if "exclude" in name:
        inner.exclude_from_weight_decay(var_names=["bias"])
    return inner


def flat(m: keras.Model) -> np.ndarray:
    return np.concatenate([np.asarray(v).ravel().astype("float64") for v in m.trainable_variables])


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


STATE_CASES = {
    # name: (optimizer factory, stage); keras Adam makes its slots interleaved (m0, v0, m1, ...), hvdllm's
    # AdamW all m then all v: the unsplit order is each class's own
    "state_keras_adam_s1": (lambda: keras.optimizers.Adam(0.01), 1),
    "state_hvd_adamw_exclude_s2": (lambda: hvd.optim.AdamW(0.02, weight_decay=0.1), 2),
    "state_sgd_s2": (lambda: keras.optimizers.SGD(0.05, momentum=0.9), 2),
}


def state_case(name: str) -> dict:
    make, stage = STATE_CASES[name]
    ms, opts, stores = {}, {}, {}
    for z in (0, stage):
        ms[z] = model()
        opts[z] = hvd.DistributedOptimizer(make_inner(make, name), bucket_cap_mb=CAP_MB, zero_stage=z)
        train_eager(ms[z], opts[z], 1)
        stores[z] = {}
        opts[z].save_own_variables(stores[z])          # ZeRO: gathered on every rank
    out = {"keys": [len(stores[0]), len(stores[stage])],
           "save_rel": max(rel(stores[stage][k], stores[0][k]) for k in stores[0]),
           "shapes_equal": all(np.shape(stores[stage][k]) == np.shape(stores[0][k]) for k in stores[0])}
    # the replicated state into a fresh ZeRO optimizer over the replicated weights; both train on
    m = model()
    m.set_weights(ms[0].get_weights())
    fresh = hvd.DistributedOptimizer(make_inner(make, name), bucket_cap_mb=CAP_MB, zero_stage=stage)
    fresh.build(m.trainable_variables)
    fresh.load_own_variables(stores[0])
    train_eager(ms[0], opts[0], 1)
    train_eager(m, fresh, 1)
    out["resume_rel"] = rel(flat(m), flat(ms[0]))
    out["iterations"] = [int(opts[0].iterations.numpy()), int(fresh.iterations.numpy())]
    # model.save on every rank writes the unsplit state; plain Keras loads it
    ms[stage].compile(optimizer=opts[stage], loss="mse", jit_compile=False)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.keras")
        ms[stage].save(path)
        loaded = keras.saving.load_model(path)
    got = {}
    loaded.optimizer.save_own_variables(got)
    out["saved_keys"] = len(got)
    out["saved_rel"] = max(rel(got[k], stores[stage][k]) for k in stores[stage]) if len(got) == len(stores[stage]) \
        else None
    return out


def run(name: str) -> dict:
    make, options, stage, loop, passes = CASES[name]
    wrap = hk.DistributedOptimizer if name.startswith("fit_hk") else hvd.DistributedOptimizer
    out = {}
    weights = {}
    for z in (0, stage):
        m = model()
        opts = {k: v for k, v in options.items() if z or k != "grad_norm_fn"}
        opt = wrap(make_inner(make, name), bucket_cap_mb=CAP_MB, zero_stage=z, **opts)
        loop(m, opt, passes)
        weights[z] = flat(m)
        out[f"iterations_{z}"] = int(opt.iterations.numpy())
        out[f"bytes_{z}"] = opt.state_bytes() if z else state_bytes(opt)
    a, b = weights[stage], weights[0]
    out["norm_rel"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    out["bitwise"] = bool(np.array_equal(a, b))
    out["hash"] = hashlib.sha256(a.tobytes()).hexdigest()
    return out


selected = sys.argv[1].split(",") if len(sys.argv) > 1 else [*CASES, *STATE_CASES]
leave_together(hvd, r, {"size": n, "backend": hvd.backend(),
                        "cases": {name: run(name) for name in selected if name in CASES},
                        "state": {name: state_case(name) for name in selected if name in STATE_CASES}})
