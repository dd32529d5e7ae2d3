"""Horovod's TensorFlow 2 example (tensorflow2_mnist.py) for Keras 3: only the import line differs
(and ``opt.variables``, a list in Keras 3, where Keras 2 had a method).

    horovodrun -np 2 python tf_custom_loop.py --out DIR
"""
import argparse
import os
import sys

import keras
import numpy as np
import tensorflow as tf

import hvdllm.tensorflow as hvd   # Horovod: import horovod.tensorflow as hvd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import digits  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--out", required=True)
args = parser.parse_args()

# Horovod: initialize Horovod.
hvd.init()

x, y = digits(args.steps * args.batch_size)
dataset = tf.data.Dataset.from_tensor_slices((x[hvd.rank()::hvd.size()], y[hvd.rank()::hvd.size()]))
dataset = dataset.batch(args.batch_size)

keras.utils.set_random_seed(42)
mnist_model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"),
                                keras.layers.Dense(10)])
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

# Horovod: adjust learning rate based on number of workers.
opt = keras.optimizers.Adam(0.001 * hvd.size())


@tf.function
def training_step(images, labels, first_batch):
    with tf.GradientTape() as tape:
        probs = mnist_model(images, training=True)
        loss_value = loss(labels, probs)

    # Horovod: add Horovod Distributed GradientTape.
    tape = hvd.DistributedGradientTape(tape)

    grads = tape.gradient(loss_value, mnist_model.trainable_variables)
    opt.apply_gradients(zip(grads, mnist_model.trainable_variables))

    # Horovod: broadcast initial variable states from rank 0 to all other processes.
    # This is necessary to ensure consistent initialization of all workers when
    # training is started with random weights or restored from a checkpoint.
    #
    # Note: broadcast should be done after the first gradient step to ensure optimizer
    # initialization.
    if first_batch:
        hvd.broadcast_variables(mnist_model.variables, root_rank=0)
        hvd.broadcast_variables(opt.variables, root_rank=0)

    return loss_value


# Horovod: adjust number of steps based on number of workers.
losses = []
for batch, (images, labels) in enumerate(dataset.take(args.steps // hvd.size())):
    loss_value = training_step(images, labels, batch == 0)
    losses.append(float(hvd.allreduce(loss_value)))
    if batch % 2 == 0 and hvd.rank() == 0:
        print("Step #%d\tLoss: %.6f" % (batch, loss_value))

weights = np.concatenate([w.ravel() for w in mnist_model.get_weights()])
np.savez(os.path.join(args.out, f"rank{hvd.rank()}.npz"), weights=weights, loss=losses)
