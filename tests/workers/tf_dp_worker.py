"""TF/Keras 3 data parallelism on real ranks: many cases per launch (TF import is slow).

Each rank trains on its own data; rank 0 also trains a fresh single-process reference on the
concatenated batches (plain Keras optimizer, no collectives) and reports the largest difference.
Every rank reports its final weights so the test can check that the ranks agree bitwise.
Run as `<launcher> python tf_dp_worker.py [case,case,...]`.
"""
from __future__ import annotations

import faulthandler
import os
import sys

if os.environ.get("HVDLLM_DUMP_AFTER"):  # debugging hangs: every thread's stack after N seconds
    faulthandler.dump_traceback_later(float(os.environ["HVDLLM_DUMP_AFTER"]), exit=True)

from common import report, start  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import hvdllm.tensorflow as hvd  # noqa: E402

r, n = start(hvd, threads=None, inter_op=2)
B, STEPS = 4, 4  # per-rank batch, optimizer steps per epoch at k=1


def data(rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank ``rank``'s STEPS * B samples (a noisy linear target)."""
    rs = np.random.RandomState(100 + rank)
    x = rs.randn(STEPS * B, 4).astype("float32")
    y = (x @ np.array([[0.5], [-1.0], [2.0], [0.3]], "float32") + 0.1 * rs.randn(STEPS * B, 1)).astype("float32")
    return x, y


def combined(chunk: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The single-process batches: step i is every rank's i-th chunk of ``chunk`` samples, in rank order."""
    parts = [data(q) for q in range(n)]
    xs = [np.concatenate([p[0][i * chunk:(i + 1) * chunk] for p in parts]) for i in range(steps)]
    ys = [np.concatenate([p[1][i * chunk:(i + 1) * chunk] for p in parts]) for i in range(steps)]
    return np.concatenate(xs), np.concatenate(ys)


def model(seed: int = 1) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])


def make_opt(kind: str, **kw: object) -> keras.optimizers.Optimizer:
    if kind == "sgd":
        return keras.optimizers.SGD(0.1, **kw)
    if kind == "momentum":
        return keras.optimizers.SGD(0.05, momentum=0.9, **kw)
    if kind == "adam":
        return keras.optimizers.Adam(0.01, **kw)
    if kind == "hvdllm_adam":
        from hvdllm.tensorflow import optim

        return optim.Adam(0.01, **kw)
    raise ValueError(kind)


_REFERENCES: dict = {}


def reference_fit(kind: str, k: int = 1, loss_scale: float = 1.0, seed: int = 1, epochs: int = 1,
                  **opt_kw: object) -> keras.Model | None:
    """np=1 model.fit on the concatenated batches (rank 0 only; computed once per set of arguments)."""
    if r != 0:
        return None
    key = (kind, k, loss_scale, seed, epochs, tuple(sorted(opt_kw.items())))
    if key not in _REFERENCES:
        _REFERENCES[key] = _reference_fit(kind, k, loss_scale, seed, epochs, **opt_kw)
    return _REFERENCES[key]


def _reference_fit(kind: str, k: int, loss_scale: float, seed: int, epochs: int, **opt_kw: object) -> keras.Model:
    m = model(seed)
    loss = "mse" if loss_scale == 1.0 else (lambda yt, yp: loss_scale * keras.losses.mean_squared_error(yt, yp))
    m.compile(optimizer=make_opt(kind, **opt_kw), loss=loss)
    x, y = combined(k * B, STEPS // k)
    m.fit(x, y, batch_size=n * k * B, epochs=epochs, shuffle=False, verbose=0)
    return m


out: dict = {"rank": r, "size": n, "backend": hvd.backend()}
cases = sys.argv[1].split(",") if len(sys.argv) > 1 and sys.argv[1] else None


def want(case: str) -> bool:
    return cases is None or case in cases


def record(name: str, m: keras.Model, ref: keras.Model | None) -> None:
    record_weights(name, m.get_weights(), None if ref is None else ref.get_weights())


def record_weights(name: str, ws: list[np.ndarray], ref: list[np.ndarray] | None) -> None:
    out[f"{name}_w"] = np.concatenate([w.ravel() for w in ws]).astype(np.float64).tolist()
    if ref is not None:
        out[f"{name}_diff"] = float(max(np.abs(u - v).max() for u, v in zip(ws, ref)))


x, y = data(r)

# --- model.fit with the distributed optimizer, k = 1 -----------------------------------------------
for kind in ("sgd", "momentum", "adam"):
    if want(f"fit_{kind}"):
        m = model()
        m.compile(optimizer=hvd.DistributedOptimizer(make_opt(kind)), loss="mse")
        m.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
        record(f"fit_{kind}", m, reference_fit(kind))

# --- accumulation: k=2 local passes summed (Horovod), or averaged ------------------------------------
if want("fit_accum_sum"):
    m = model()
    m.compile(optimizer=hvd.DistributedOptimizer(make_opt("sgd"), backward_passes_per_step=2), loss="mse")
    m.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    out["fit_accum_sum_iterations"] = int(m.optimizer.iterations.numpy())
    # sum of 2 local mean-gradients, averaged over ranks == gradient of 2 * (mean over the 2*n*B batch)
    record("fit_accum_sum", m, reference_fit("sgd", k=2, loss_scale=2.0))
if want("fit_accum_mean"):
    m = model()
    m.compile(optimizer=hvd.DistributedOptimizer(make_opt("adam"), backward_passes_per_step=2,
                                                 average_aggregated_gradients=True), loss="mse")
    m.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    record("fit_accum_mean", m, reference_fit("adam", k=2))

# --- clipping after averaging == Keras global_clipnorm on the combined batch --------------------------
if want("fit_clip"):
    m = model()
    m.compile(optimizer=hvd.DistributedOptimizer(make_opt("sgd"), max_grad_norm=0.05), loss="mse")
    m.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    record("fit_clip", m, reference_fit("sgd", global_clipnorm=0.05))
    out["fit_clip_grad_norm"] = float(m.optimizer.grad_norm.numpy())  # last update's norm, before clipping

# --- fp16 / bf16 compression: close to the reference, identical on every rank -------------------------
for comp in ("fp16", "bf16"):
    if want(f"fit_{comp}"):
        m = model()
        m.compile(optimizer=hvd.DistributedOptimizer(make_opt("sgd"), compression=getattr(hvd.Compression, comp)),
                  loss="mse")
        m.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
        record(f"fit_{comp}", m, reference_fit("sgd"))

# --- hvdllm's own Keras optimizer ---------------------------------------------------------------------
if want("fit_hvdllm_adam"):
    m = model()
    m.compile(optimizer=hvd.DistributedOptimizer(make_opt("hvdllm_adam")), loss="mse")
    m.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    record("fit_hvdllm_adam", m, reference_fit("hvdllm_adam"))


# --- custom loops: DistributedGradientTape (eager and tf.function), apply_gradients ---------------
def custom_loop(kind: str, mode: str, k: int = 1) -> keras.Model:
    m = model()
    if mode == "optimizer":
        opt = hvd.DistributedOptimizer(make_opt(kind), backward_passes_per_step=k, average_aggregated_gradients=True)
    else:
        opt = make_opt(kind)

    def step(xb: tf.Tensor, yb: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(m(xb, training=True) - yb))
        if mode != "optimizer":
            tape = hvd.DistributedGradientTape(tape)
        grads = tape.gradient(loss, m.trainable_variables)
        opt.apply_gradients(zip(grads, m.trainable_variables))
        return loss

    if mode in ("tape_function", "optimizer"):
        step = tf.function(step)
    for i in range(STEPS):
        step(tf.constant(x[i * B:(i + 1) * B]), tf.constant(y[i * B:(i + 1) * B]))
    return m


for kind, mode in (("sgd", "tape_eager"), ("adam", "tape_function"), ("adam", "optimizer")):
    if want(f"loop_{mode}"):
        record(f"loop_{mode}", custom_loop(kind, mode), reference_fit(kind))
if want("loop_optimizer_accum"):
    record("loop_optimizer_accum", custom_loop("adam", "optimizer", k=2), reference_fit("adam", k=2))


# --- a branch some ranks' losses do not touch (their gradients are None), and a layer no rank uses ------
def uses_branch(rank: int, micro: int) -> bool:
    """Rank 0's first micro-batch of each window only: None on other ranks, and on rank 0's reduction pass."""
    return rank % 2 == 0 and micro == 0


def branch_net() -> tuple[list[keras.layers.Layer], list]:
    keras.utils.set_random_seed(3)
    layers = [keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1), keras.layers.Dense(1),
              keras.layers.Dense(1)]  # trunk, head, branch, dead
    for layer, width in zip(layers, (4, 8, 8, 8)):
        layer.build((None, width))
    return layers, [w for layer in layers for w in layer.trainable_variables]


def branch_loss(layers: list, xb: tf.Tensor, yb: tf.Tensor, use_branch: bool) -> tf.Tensor:
    h = layers[0](xb)
    pred = layers[1](h) + layers[2](h) if use_branch else layers[1](h)
    return tf.reduce_mean(tf.square(pred - yb))


def unused_branch(kind: str, k: int) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """k=1: DistributedGradientTape in a tf.function; k>1: eager apply_gradients with accumulation. Both
    with Horovod's gradient_predivide_factor = n. The reference: one process, every rank's micro-batches."""
    layers, vs = branch_net()
    if k == 1:
        opt = make_opt(kind)
    else:
        opt = hvd.DistributedOptimizer(make_opt(kind), backward_passes_per_step=k, average_aggregated_gradients=True,
                                       gradient_predivide_factor=float(n))

    def step(xb: tf.Tensor, yb: tf.Tensor, use_branch: bool) -> None:
        with tf.GradientTape() as tape:
            loss = branch_loss(layers, xb, yb, use_branch)
        if k == 1:
            tape = hvd.DistributedGradientTape(tape, gradient_predivide_factor=float(n))
        opt.apply_gradients(zip(tape.gradient(loss, vs), vs))

    run = tf.function(step) if k == 1 else step
    for i in range(STEPS):
        run(x[i * B:(i + 1) * B], y[i * B:(i + 1) * B], uses_branch(r, i % k))
    if r != 0:
        return [v.numpy() for v in vs], None
    ref_layers, ref_vs = branch_net()
    ref_opt = make_opt(kind)
    for s in range(STEPS // k):
        with tf.GradientTape() as tape:
            loss = tf.add_n([branch_loss(ref_layers, *(a[(s * k + j) * B:(s * k + j + 1) * B] for a in data(q)),
                                         uses_branch(q, j)) for q in range(n) for j in range(k)]) / (n * k)
        ref_opt.apply_gradients(zip(tape.gradient(loss, ref_vs), ref_vs))
    return [v.numpy() for v in vs], [v.numpy() for v in ref_vs]


for name, kind, k in (("unused_tape", "sgd", 1), ("unused_optimizer_accum", "adam", 2)):
    if want(name):
        record_weights(name, *unused_branch(kind, k))

# --- tape with Sum and a nested structure of sources ---------------------------------------------
if want("tape_sum"):
    v = {"a": tf.Variable([1.0 + r, 2.0]), "b": [tf.Variable(3.0 * (r + 1))]}
    with tf.GradientTape() as t:
        loss = tf.reduce_sum(v["a"] * v["a"]) + v["b"][0] * 2.0
    g = hvd.DistributedGradientTape(t, op=hvd.Sum).gradient(loss, v)
    out["tape_sum"] = {"a": g["a"].numpy().tolist(), "b": float(g["b"][0].numpy())}
    # fp16 wire, every rank's gradient 40000: the sum overflows fp16 unless predivided (Horovod's factor)
    big = tf.Variable(1.0)
    for f in (1.0, float(n)):
        with tf.GradientTape() as t:
            loss = 40000.0 * big
        tape = hvd.DistributedGradientTape(t, compression=hvd.Compression.fp16, gradient_predivide_factor=f)
        out[f"tape_fp16_predivide_{f:g}"] = float(tape.gradient(loss, big).numpy())

# --- callbacks ---------------------------------------------------------------------------------------
if want("broadcast_callback"):
    m = model(seed=10 + r)  # different initial weights on every rank
    m.compile(optimizer=hvd.DistributedOptimizer(make_opt("adam")), loss="mse")
    m.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0,
          callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])
    record("broadcast_callback", m, reference_fit("adam", seed=10))

if want("broadcast_variables"):
    vs = [tf.Variable(tf.fill([3], float(r))), tf.Variable(tf.constant([r, r + 1], tf.int64)),
          tf.Variable(tf.fill([2, 2], 10.0 + r))]
    hvd.broadcast_variables(vs, root_rank=n - 1)
    out["bcast_eager"] = [v.numpy().tolist() for v in vs]
    kv = model(seed=20 + r)
    tf.function(lambda: hvd.broadcast_variables(kv.variables, root_rank=0))()
    record("bcast_function", kv, model(seed=20) if r == 0 else None)


class Recorder(keras.callbacks.Callback):
    """Copies of the logs as this callback sees them, and the optimizer's lr during each batch."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[dict] = []
        self.lrs: list[float] = []

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.lrs.append(float(self.model.optimizer.learning_rate))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.epochs.append({k: float(v) for k, v in (logs or {}).items()})


if want("metric_average"):
    m = model()
    m.compile(optimizer=hvd.DistributedOptimizer(make_opt("sgd")), loss="mse", metrics=["mae"])
    raw = Recorder()
    hist = m.fit(x, y, batch_size=B, epochs=2, shuffle=False, verbose=0, validation_data=(x[:8], y[:8]),
                 callbacks=[raw, hvd.callbacks.MetricAverageCallback()])
    out["metric_raw"] = raw.epochs
    out["metric_avg"] = {k: [float(v) for v in vals] for k, vals in hist.history.items()}

if want("warmup"):
    m = model()
    m.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.3)), loss="mse")
    rec = Recorder()
    hist = m.fit(x, y, batch_size=B, epochs=3, shuffle=False, verbose=0,
                 callbacks=[hvd.callbacks.LearningRateWarmupCallback(initial_lr=0.2, warmup_epochs=2), rec])
    out["warmup_lrs"] = rec.lrs
    out["warmup_logged_lr"] = [float(v) for v in hist.history["lr"]]
    out["warmup_steps"] = STEPS

# --- XLA: a clear error, and the callback that turns it off --------------------------------------------
if want("jit"):
    m = model()
    m.compile(optimizer=hvd.DistributedOptimizer(make_opt("sgd")), loss="mse", jit_compile=True)
    try:
        m.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
        out["jit_error"] = None
    except Exception as e:  # Keras may wrap the trace-time error
        out["jit_error"] = f"{type(e).__name__}: {e}"[:400]
    m2 = model()
    m2.compile(optimizer=hvd.DistributedOptimizer(make_opt("sgd")), loss="mse", jit_compile=True)
    m2.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0,
           callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])
    record("jit_callback", m2, reference_fit("sgd"))

# --- bad input: one-line ValueErrors -------------------------------------------------------------------
if want("errors"):
    def error_of(fn: object) -> str | None:
        try:
            fn()
        except ValueError as e:
            return str(e)
        return None

    out["errors"] = {
        "not_optimizer": error_of(lambda: hvd.DistributedOptimizer("adam")),
        "passes": error_of(lambda: hvd.DistributedOptimizer(make_opt("sgd"), backward_passes_per_step=0)),
        "clip": error_of(lambda: hvd.DistributedOptimizer(make_opt("sgd"), max_grad_norm=-1.0)),
        "compression": error_of(lambda: hvd.DistributedOptimizer(make_opt("sgd"), compression="int4")),
        "op": error_of(lambda: hvd.DistributedOptimizer(make_opt("sgd"), op="max")),
        "twice": error_of(lambda: hvd.DistributedOptimizer(hvd.DistributedOptimizer(make_opt("sgd")))),
        "keras_accumulation": error_of(lambda: hvd.DistributedOptimizer(
            keras.optimizers.SGD(0.1, gradient_accumulation_steps=2))),
        "tape": error_of(lambda: hvd.DistributedGradientTape("tape")),
        "predivide": error_of(lambda: hvd.DistributedGradientTape(tf.GradientTape(), gradient_predivide_factor=0.0)),
        "predivide_sum": error_of(lambda: hvd.DistributedOptimizer(make_opt("sgd"), op=hvd.Sum,
                                                                   gradient_predivide_factor=2.0)),
        "root_rank": error_of(lambda: hvd.callbacks.BroadcastGlobalVariablesCallback(-1)),
        "warmup_lr": error_of(lambda: hvd.callbacks.LearningRateWarmupCallback(initial_lr=0.0)),
    }
    d = hvd.DistributedOptimizer(make_opt("adam"))
    out["wrapped"] = {"isinstance": isinstance(d, keras.optimizers.Adam), "class": type(d).__name__,
                      "config_class": keras.saving.serialize_keras_object(d)["class_name"]}

hvd.barrier()
report(r, out)
