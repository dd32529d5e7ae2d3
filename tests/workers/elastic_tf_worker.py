"""A Horovod-style elastic Keras script on hvdllm (eager custom loop, import swapped).

Tiny linear regression, keras SGD with momentum, commit every 3 steps; the global batch is kept (each
worker takes every size-th of the step's 16 shuffled indices), so any number of workers walks the same
trajectory. ``--kill-at N MARKER``: rank 1 of the first attempt SIGKILLs itself before step N.
"""
from __future__ import annotations

import argparse

import numpy as np

from common import elastic_checkpoint, report, start

import keras
import tensorflow as tf

import hvdllm.tensorflow as hvd

GLOBAL, N, EPOCHS, COMMIT_EVERY = 16, 192, 2, 3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kill-at", nargs=2, metavar=("STEP", "MARKER"))
    a = p.parse_args()
    start(hvd)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, 8)).astype(np.float32)
    y = (x @ rng.standard_normal((8, 1)) + 0.1 * rng.standard_normal((N, 1))).astype(np.float32)
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    state = hvd.elastic.TensorFlowKerasState(model, optimizer, epoch=0, step=0)
    sizes: list[list[int]] = []
    resets: list[int] = []
    state.register_reset_callbacks([lambda: resets.append(hvd.size())])
    per_epoch = N // GLOBAL

    @hvd.elastic.run
    def train(state: hvd.elastic.TensorFlowKerasState) -> None:
        while state.step < EPOCHS * per_epoch:
            elastic_checkpoint(sizes, state.step, hvd.size(), hvd.rank(), a.kill_at)
            epoch, k = divmod(state.step, per_epoch)
            perm = np.random.default_rng(3 + epoch).permutation(N)
            idx = perm[k * GLOBAL:(k + 1) * GLOBAL][hvd.rank()::hvd.size()]
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x[idx]) - y[idx]))
            grads = hvd.DistributedGradientTape(tape).gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            state.step += 1
            state.epoch = state.step // per_epoch
            if state.step % COMMIT_EVERY == 0:
                state.commit()

    train(state)
    final = float(tf.reduce_mean(tf.square(model(x) - y)))
    hvd.barrier()
    report(hvd.rank(), {"rank": hvd.rank(), "size": hvd.size(), "backend": hvd.backend(), "steps": state.step,
                        "final_loss": final, "sizes": sizes, "resets": resets,
                        "weight": model.layers[0].kernel.numpy().flatten().tolist()})


if __name__ == "__main__":
    main()
