"""A plain Keras 3 ``model.fit`` script made data-parallel with hvdllm (the lines marked ``# hvdllm``).

    python examples/keras_fit.py                          # one process
    horovodrun -np 2 python examples/keras_fit.py         # 2 ranks (Gloo or MPI), each on its own shard
    mpirun -np 2 python examples/keras_fit.py             # the same on mpi4py when Horovod is absent

Each rank reads its own shard of the data; gradients are averaged over the ranks every step, so the
ranks keep identical weights. The learning rate follows the linear scaling rule (lr x ranks), warmed
up gradually; only rank 0 prints and saves.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import hvdllm.tensorflow as hvd  # noqa: E402  # hvdllm


def make_data(n: int = 4096, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small 3-class problem: points in 8-D labelled by which of three directions they lean to."""
    rs = np.random.RandomState(seed)
    x = rs.randn(n, 8).astype("float32")
    y = np.argmax(x @ rs.randn(8, 3), axis=1).astype("int64")
    return x, y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--lr", type=float, default=1e-3, help="single-process learning rate")
    p.add_argument("--save", default="", help="save the trained model here (.keras), rank 0 only")
    args = p.parse_args()

    hvd.init()  # hvdllm
    tf.config.threading.set_intra_op_parallelism_threads(hvd.threads_per_rank())  # hvdllm: share the cores
    keras.utils.set_random_seed(1234)

    x, y = make_data()
    x, y = x[hvd.rank()::hvd.size()], y[hvd.rank()::hvd.size()]  # hvdllm: this rank's shard

    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(64, activation="relu"), keras.layers.Dense(3)])
    opt = keras.optimizers.Adam(args.lr * hvd.size())  # hvdllm: linear scaling rule
    opt = hvd.DistributedOptimizer(opt)  # hvdllm: average gradients over the ranks
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])

    callbacks = [
        hvd.callbacks.BroadcastGlobalVariablesCallback(0),  # hvdllm: every rank starts from rank 0's weights
        hvd.callbacks.MetricAverageCallback(),  # hvdllm: report metrics averaged over the ranks
        hvd.callbacks.LearningRateWarmupCallback(initial_lr=args.lr * hvd.size(), warmup_epochs=1),  # hvdllm
    ]
    hist = model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, callbacks=callbacks,
                     verbose=2 if hvd.rank() == 0 else 0)  # hvdllm: rank 0 prints

    if hvd.rank() == 0:
        print(f"ranks={hvd.size()} backend={hvd.backend()} final loss={hist.history['loss'][-1]:.4f} "
              f"accuracy={hist.history['accuracy'][-1]:.4f}")
        if args.save:
            model.save(args.save)


if __name__ == "__main__":
    main()
