"""A Keras 3 model trained with pipeline parallelism on Horovod process sets (the lines marked ``# hvdllm``).

    horovodrun -np 2 --gloo python examples/keras_pipeline.py            # 2 stages
    horovodrun -np 4 --gloo python examples/keras_pipeline.py --pp 2     # 2 stages x 2 data-parallel replicas
    python examples/keras_pipeline.py                                    # one stage (plain training)

Every rank builds the same seeded ``keras.Sequential``; ``split_layers`` cuts its layers into ``pp``
consecutive groups balanced by parameter count and each rank keeps its stage's group. Each step's batch
is split into micro-batches that ``PipelineExecutor`` runs with the 1F1B (or GPipe) schedule: activations
and gradients cross between stages as broadcasts in two-rank process sets. ``step`` returns the mean loss
and this stage's gradients of it, which are averaged over the data-parallel replicas of the stage and
applied by an ordinary Keras optimizer. ``--verify`` checks the first step's gradients against the
unsplit model's (each rank has all layers), so the split is exact, not approximately right.
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
from hvdllm.core.backend import launched_size  # noqa: E402  # hvdllm
from hvdllm.tensorflow.parallel import PipelineExecutor, ProcessGrid, Stage, split_layers  # noqa: E402  # hvdllm


def make_model(width: int, depth: int, classes: int, seed: int) -> keras.Sequential:
    keras.utils.set_random_seed(seed)
    layers = [keras.layers.Dense(width, activation="gelu") for _ in range(depth)]
    return keras.Sequential([keras.Input((16,)), *layers, keras.layers.Dense(classes)])


def make_data(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rs = np.random.RandomState(seed)
    x = rs.randn(n, 16).astype("float32")
    return x, np.argmax(x @ rs.randn(16, classes), axis=1).astype("int32")


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pp", type=int, default=None, help="pipeline stages (default: every rank one stage)")
    p.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--micro", type=int, default=4, help="micro-batches per step")
    p.add_argument("--verify", action="store_true", help="check step 1's gradients against the unsplit model")
    args = p.parse_args(argv)

    n = launched_size()
    grid = ProcessGrid.infer(n, pp=args.pp or n)                         # hvdllm: dp x 1 x pp ranks
    hvd.init(process_sets=grid.process_sets())                             # hvdllm
    rank = hvd.rank()
    c = grid.coords(rank)
    model = make_model(64, 6, 4, seed=0)                                   # identical on every rank
    pieces = split_layers(model.layers, grid.pp)                           # hvdllm
    before = pieces[c.pp - 1][-1] if c.pp > 0 else None
    stage = Stage(pieces[c.pp], c.pp, grid.pp,                             # hvdllm: this rank's layers
                  loss=lambda out, y: keras.losses.sparse_categorical_crossentropy(y, out, from_logits=True),
                  activation_shape=lambda x: (x.shape[0], before.units))
    pipeline = PipelineExecutor(stage, grid, rank, schedule=args.schedule)  # hvdllm
    variables = stage.trainable_variables
    optimizer = keras.optimizers.Adam(1e-2)
    x, y = make_data(4096, 4, seed=1)
    per_replica = args.batch // grid.dp
    loss = float("nan")
    for step in range(args.steps):
        lo = (step * args.batch + c.dp * per_replica) % (len(x) - per_replica)   # this replica's slice
        xs = np.array_split(x[lo: lo + per_replica], args.micro)
        ys = np.array_split(y[lo: lo + per_replica], args.micro)
        if args.verify and step == 0:
            with tf.GradientTape() as tape:
                ref = tf.add_n([tf.reduce_mean(stage.loss(model(xi), yi)) for xi, yi in zip(xs, ys)]) / len(xs)
            ref_grads = tape.gradient(ref, variables)
        loss, grads = pipeline.step(xs, ys)                                # hvdllm: forward + backward
        if args.verify and step == 0:
            err = max(float(tf.reduce_max(tf.abs(g - r))) for g, r in zip(grads, ref_grads))
            print(f"rank {rank}: loss {loss:.6f} (unsplit {float(ref):.6f}), max |grad - unsplit| {err:.2e}")
            if abs(loss - float(ref)) > 1e-5 or err > 1e-5:
                raise SystemExit(f"rank {rank}: the pipeline's step differs from the unsplit model's")
        if grid.dp > 1:                                                    # hvdllm: average over replicas
            grads = hvd.grouped_allreduce(grads, op=hvd.Average, process_set=grid.dp_group(rank))
        optimizer.apply(grads, variables)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step}: loss {loss:.4f}")
    hvd.barrier()                                                          # hvdllm: leave together
    return loss


if __name__ == "__main__":
    main()
