"""Horovod's Keras example (tensorflow2_keras_mnist.py) for Keras 3: only the import line differs.

    horovodrun -np 2 python keras_fit.py --out DIR
"""
import argparse
import os
import sys

import keras
import numpy as np

import hvdllm.tensorflow.keras as hvd   # Horovod: import horovod.tensorflow.keras as hvd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import digits  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--lr", type=float, default=0.01)
parser.add_argument("--out", required=True)
args = parser.parse_args()

# Horovod: initialize Horovod.
hvd.init()

(x, y), (x_val, y_val) = digits(64), digits(32, seed=1)
# Horovod: each worker trains on its own shard of the data.
x_shard, y_shard = x[hvd.rank()::hvd.size()], y[hvd.rank()::hvd.size()]

# Different initial weights per worker: the broadcast callback makes them rank 0's.
keras.utils.set_random_seed(42 + hvd.rank())
model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])

# Horovod: adjust learning rate based on number of workers.
scaled_lr = args.lr * hvd.size()
opt = keras.optimizers.Adam(scaled_lr)

# Horovod: add Horovod DistributedOptimizer.
opt = hvd.DistributedOptimizer(opt)

model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), optimizer=opt,
              metrics=["accuracy"])

callbacks = [
    # Horovod: broadcast initial variable states from rank 0 to all other processes.
    hvd.callbacks.BroadcastGlobalVariablesCallback(0),
    # Horovod: average metrics among workers at the end of every epoch.
    hvd.callbacks.MetricAverageCallback(),
    # Horovod: using `lr = 1.0 * hvd.size()` from the very beginning leads to worse final accuracy;
    # scale the learning rate `lr = 1.0` ---> `lr = 1.0 * hvd.size()` during the first epochs.
    hvd.callbacks.LearningRateWarmupCallback(initial_lr=scaled_lr, warmup_epochs=2, verbose=1),
]

# Horovod: save checkpoints only on worker 0 to prevent other workers from corrupting them.
if hvd.rank() == 0:
    best = hvd.callbacks.BestModelCheckpoint(monitor="val_loss", mode="min")
    best.filepath = os.path.join(args.out, "best.keras")
    callbacks.append(best)

history = model.fit(x_shard, y_shard, batch_size=args.batch_size, epochs=args.epochs, callbacks=callbacks,
                    validation_data=(x_val, y_val), shuffle=False, verbose=1 if hvd.rank() == 0 else 0)

weights = np.concatenate([w.ravel() for w in model.get_weights()])
np.savez(os.path.join(args.out, f"rank{hvd.rank()}.npz"), weights=weights, loss=history.history["loss"],
         val_loss=history.history["val_loss"], lr=history.history["lr"])
