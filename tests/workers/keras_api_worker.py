"""horovod.tensorflow / horovod.tensorflow.keras / horovod.keras names of hvdllm on real ranks, each case
against a numpy or one-process Keras reference that every rank rebuilds from seeds.

Run as `<launcher> python keras_api_worker.py`. Reports the cases it checked and any mismatch.
"""
from __future__ import annotations

import os
import tempfile
import traceback

import numpy as np

from common import leave_together, start

import keras
import tensorflow as tf

import hvdllm.keras as hk
import hvdllm.tensorflow as hvd
import hvdllm.tensorflow.keras as htk

r, n = start(hvd, inter_op=1)
OUT = os.environ.get("HVDLLM_TEST_OUT") or tempfile.gettempdir()
checked: list[str] = []
failures: list[str] = []


def check(name: str, got, want, tol: float = 1e-10) -> None:
    """Record one case: arrays (or lists of arrays) equal to ``tol`` (float64 throughout)."""
    checked.append(name)
    try:
        pairs = zip(got, want) if isinstance(got, (list, tuple)) else [(got, want)]
        if isinstance(got, (list, tuple)):
            assert len(got) == len(want), f"{len(got)} results != {len(want)}"
        for g, w in pairs:
            g, w = np.asarray(g), np.asarray(w)
            assert g.shape == w.shape, f"shape {g.shape} != {w.shape}"
            np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
    except Exception as e:  # noqa: BLE001 - every mismatch is reported, the run continues
        failures.append(f"{name}: {type(e).__name__}: {str(e)[:800]}")


def run(name: str, fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001
        failures.append(f"{name}: {traceback.format_exc(limit=4)}")


def rows_of(q: int) -> int:
    """Uneven per-rank batches: 2, 3, 4, ... rows."""
    return q + 2


def data(q: int, seed: int, cols: int) -> np.ndarray:
    return np.random.default_rng([seed, q]).normal(1.0, 2.0, size=(rows_of(q), cols))


# --- SyncBatchNormalization: one-process BatchNormalization on the combined (uneven) batch ---------
GAMMA = np.array([1.0, 0.5, 2.0])


def syncbn_reference(xs: list[np.ndarray], ws: list[np.ndarray]) -> list[np.ndarray]:
    """One-process BatchNormalization on the concatenated batch, loss ``sum(y * w)``: outputs, input,
    gamma and beta gradients, moving mean and variance after the step."""
    ref = keras.layers.BatchNormalization(momentum=0.9, dtype="float64")
    ref.build((None, 3))
    ref.gamma.assign(GAMMA)
    xall = tf.constant(np.concatenate(xs))
    with tf.GradientTape() as tape:
        tape.watch(xall)
        y = ref(xall, training=True)
        loss = tf.reduce_sum(y * np.concatenate(ws))
    gx, gg, gb = tape.gradient(loss, [xall, ref.gamma, ref.beta])
    return [y.numpy(), gx.numpy(), gg.numpy(), gb.numpy(), ref.moving_mean.numpy(), ref.moving_variance.numpy()]


def syncbn_step(x: np.ndarray, w: np.ndarray, mask: np.ndarray | None, mode: str) -> list[np.ndarray]:
    """One training step of a fresh SyncBatchNormalization on this rank's rows: outputs, input gradients,
    gamma and beta gradients summed over the ranks, moving mean and variance."""
    layer = hvd.SyncBatchNormalization(momentum=0.9, dtype="float64")
    layer.build((None, 3))
    layer.gamma.assign(GAMMA)

    def step(x: tf.Tensor) -> tuple:
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x, training=True) if mask is None else layer(x, training=True, mask=tf.constant(mask))
            local = tf.reduce_sum(out * w)
        gx, gg, gb = tape.gradient(local, [x, layer.gamma, layer.beta])
        return out, gx, gg, gb

    out, gx, gg, gb = step(tf.constant(x)) if mode == "eager" else tf.function(step)(tf.constant(x))
    return [out.numpy(), gx.numpy(), hvd.allreduce(gg, op=hvd.Sum), hvd.allreduce(gb, op=hvd.Sum),
            layer.moving_mean.numpy(), layer.moving_variance.numpy()]


def syncbn_cases() -> None:
    xs = [data(q, 1, 3) for q in range(n)]
    ws = [data(q, 2, 3) for q in range(n)]                  # the loss weights each output
    lo = sum(rows_of(q) for q in range(r))
    want = syncbn_reference(xs, ws)
    want[:2] = [a[lo:lo + rows_of(r)] for a in want[:2]]
    for mode in ("eager", "function"):
        check(f"syncbn_{mode}", syncbn_step(xs[r], ws[r], None, mode), want, tol=1e-9)
    checked.append("syncbn_fused_error")
    try:
        hvd.SyncBatchNormalization(fused=True)
        failures.append("syncbn_fused_error: no error")
    except ValueError as e:
        if "fused" not in str(e):
            failures.append(f"syncbn_fused_error: {e}")


def syncbn_mask_cases() -> None:
    """A Keras mask (every rank's first row masked out, per-channel counts on the wire): the statistics and
    gradients of one-process BatchNormalization on every rank's kept rows; masked rows get no gradient."""
    xs = [np.random.default_rng([3, q]).normal(1.0, 2.0, size=(q + 4, 3)) for q in range(n)]
    keep = [np.arange(q + 4) > 0 for q in range(n)]
    ws = [np.random.default_rng([4, q]).normal(1.0, 2.0, size=(q + 4, 3)) * keep[q][:, None] for q in range(n)]
    want = syncbn_reference([x[k] for x, k in zip(xs, keep)], [w[k] for w, k in zip(ws, keep)])
    lo = sum(q + 3 for q in range(r))
    gx = np.zeros_like(xs[r])
    gx[keep[r]] = want[1][lo:lo + r + 3]
    want[:2] = [want[0][lo:lo + r + 3], gx]
    # one rank: Keras's own masked moments, which divide by count + 1e-7 (relative ~3e-8 here)
    tol = 1e-9 if n > 1 else 1e-6
    for mode in ("eager", "function"):
        got = syncbn_step(xs[r], ws[r], keep[r], mode)
        got[0] = got[0][keep[r]]
        check(f"syncbn_mask_{mode}", got, want, tol=tol)


# --- PartialDistributedGradientTape / DistributedOptimizer arguments ---------------------------
def two_layer_model() -> keras.Model:
    keras.utils.set_random_seed(5)
    m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, dtype="float64"),
                          keras.layers.Dense(2, dtype="float64")])
    return m


def local_grads(model: keras.Model, q: int) -> list[np.ndarray]:
    """Rank q's own gradients of its loss (plain tape): the reference's parts."""
    x, y = data(q, 10, 3), data(q, 11, 2)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((model(x) - y) ** 2)
    return [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]


def rank_loss(model: keras.Model) -> tf.Tensor:
    x, y = data(r, 10, 3), data(r, 11, 2)
    return tf.reduce_mean((model(x) - y) ** 2)


def partial_cases() -> None:
    model = two_layer_model()
    per_rank = [local_grads(model, q) for q in range(n)]
    mean = [np.mean([g[i] for g in per_rank], axis=0) for i in range(4)]
    for scale in (True, False):
        with tf.GradientTape() as tape:
            loss = rank_loss(model)
        ptape = hvd.PartialDistributedGradientTape(tape, local_layers=model.layers[1], scale_local_gradients=scale)
        got = ptape.gradient(loss, model.trainable_variables)
        own = [g / n if scale else g for g in per_rank[r][2:]]
        check(f"partial_tape_scale_{scale}", got, mean[:2] + own)
    with tf.GradientTape() as tape:
        loss = rank_loss(model)
    dtape = hvd.DistributedGradientTape(tape, groups=[[model.trainable_variables[3], model.trainable_variables[0]]])
    local, shared = dtape.get_local_and_global_gradients(loss, model.trainable_variables)
    check("tape_groups", [g for _, g in shared], mean)
    checked.append("tape_groups_local_empty")
    if local:
        failures.append(f"tape_groups_local_empty: {local}")
    for groups, num in ((2, 0), (None, 3), ([[model.trainable_variables[1]]], 0)):
        with tf.GradientTape() as tape:
            loss = rank_loss(model)
        got = hvd.DistributedGradientTape(tape, num_groups=num, groups=groups).gradient(
            loss, model.trainable_variables)
        check(f"tape_groups_{groups}_{num}", got, mean)


def f32(value: float) -> float:
    """Keras keeps the learning rate in a float32 variable: the reference uses the same rounded value."""
    return float(np.float32(value))


def sgd_reference(model: keras.Model, grads: list[np.ndarray], lr: float) -> list[np.ndarray]:
    return [v.numpy() - f32(lr) * g for v, g in zip(model.trainable_variables, grads)]


def optimizer_cases() -> None:
    for label, wrap in (("groups_int", lambda o: htk.DistributedOptimizer(o, groups=2)),
                        ("num_groups", lambda o: hk.DistributedOptimizer(o, num_groups=3)),
                        ("sparse_device",
                         lambda o: htk.DistributedOptimizer(o, sparse_as_dense=True, device_dense="/cpu:0")),
                        ("predivide", lambda o: htk.DistributedOptimizer(o, gradient_predivide_factor=2.0)),
                        ("partial", None), ("register_local", None)):
        model = two_layer_model()
        per_rank = [local_grads(model, q) for q in range(n)]
        mean = [np.mean([g[i] for g in per_rank], axis=0) for i in range(4)]
        if label == "partial":
            opt = hk.PartialDistributedOptimizer(keras.optimizers.SGD(0.1), local_layers=[model.layers[1]])
            want_grads = mean[:2] + [g / n for g in per_rank[r][2:]]
        elif label == "register_local":
            opt = htk.DistributedOptimizer(keras.optimizers.SGD(0.1), scale_local_gradients=False)
            opt.register_local_var(model.trainable_variables[0])
            want_grads = [per_rank[r][0]] + mean[1:]
        else:
            opt = wrap(keras.optimizers.SGD(0.1))
            want_grads = mean
        want = sgd_reference(model, want_grads, 0.1)
        with tf.GradientTape() as tape:
            loss = rank_loss(model)
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        check(f"optimizer_{label}", [v.numpy() for v in model.trainable_variables], want)
    checked.append("optimizer_bad_groups")
    try:
        htk.DistributedOptimizer(keras.optimizers.SGD(0.1), groups=0)
        failures.append("optimizer_bad_groups: no error")
    except ValueError as e:
        if "groups=0" not in str(e):
            failures.append(f"optimizer_bad_groups: {e}")


def aggregation_cases() -> None:
    """LocalGradientAggregationHelper with k=2: local sums until the 2nd pass, then reduced and applied."""
    v = tf.Variable(np.zeros(3))
    opt = keras.optimizers.SGD(1.0)
    helper = hvd.LocalGradientAggregationHelper(
        2, lambda gs, vs: [hvd.allreduce(g) for g in gs], False, True, r,
        hvd.LocalGradientAggregationHelper._OPTIMIZER_TYPE_KERAS)
    gs = [np.random.default_rng([20, q]).normal(size=(2, 3)) for q in range(n)]
    first = helper.compute_gradients([tf.constant(gs[r][0])], [v])
    helper.apply_gradients(lambda: opt.apply_gradients([(first[0], v)]), opt)
    check("aggregation_pass1", [first[0], v.numpy()], [gs[r][0], np.zeros(3)])
    second = helper.compute_gradients([tf.constant(gs[r][1])], [v])
    helper.apply_gradients(lambda: opt.apply_gradients([(second[0], v)]), opt)
    mean = np.mean([g.sum(0) / 2 for g in gs], axis=0)
    check("aggregation_pass2", [second[0], v.numpy()], [mean, -mean])


# --- horovod.tensorflow's functions with Horovod's signatures -------------------------------------
def function_cases() -> None:
    xs = [np.random.default_rng([30, q]).normal(size=(4,)) for q in range(n)]
    check("allreduce_fp16", hvd.allreduce(tf.constant(xs[r], tf.float32), compression=hvd.Compression.fp16),
          np.mean(xs, axis=0).astype(np.float32), tol=1e-2)
    check("allreduce_average_positional", hvd.allreduce(tf.constant(xs[r]), False), np.sum(xs, axis=0))
    values = [np.full((q + 1, 2), float(q)) for q in range(n)]
    sl = hvd.allreduce(tf.IndexedSlices(tf.constant(values[r]), tf.constant(np.arange(r + 1)), [5, 2]))
    check("allreduce_indexed_slices", [sl.values, sl.indices],
          [np.concatenate(values) / n, np.concatenate([np.arange(q + 1) for q in range(n)])])
    check("broadcast_object_session", [hvd.broadcast_object({"r": r} if r == 0 else None, 0, None, "bo")["r"]], [0])
    check("allgather_object_session", hvd.allgather_object(r * 10, None, "ag"), [10 * q for q in range(n)])
    check("broadcast_object_fn", [hvd.broadcast_object_fn(root_rank=n - 1)(r)], [n - 1])
    var = tf.Variable(xs[r])
    hvd.broadcast_([var], n - 1)
    check("broadcast_inplace", var.numpy(), xs[n - 1])
    var.assign(xs[r])
    hvd.broadcast_variables([var], 0, inplace=True)
    check("broadcast_variables_inplace", var.numpy(), xs[0])
    ops = tf.function(lambda: tf.stack([hvd.rank_op(), hvd.size_op(), hvd.local_rank_op(), hvd.local_size_op(),
                                        hvd.process_set_included_op(0), hvd.size_op(process_set_id=0)]))()
    check("query_ops", ops.numpy(), [r, n, hvd.local_rank(), hvd.local_size(), 1, n])
    kv = keras.Variable(np.ones(2))
    refs = hvd.vars_to_refs([kv, var])
    check("refs", [float(len(set(refs))), float(hvd.refs_to_vars(refs)[0] is kv)], [2.0, 1.0])
    check("split_list", [len(c) for c in hvd.split_list(list(range(7)), 3)], [3, 2, 2])
    check("helpers", [hvd.check_num_rank_power_of_2(4), hvd.check_num_rank_power_of_2(3),
                      hvd.handle_average_backwards_compatibility(None, False) is hvd.Sum], [True, False, True])


def keras_value_cases() -> None:
    """horovod.tensorflow.keras / horovod.keras collectives take plain values and return eager results."""
    xs = [[float(q), 2.0 * q] for q in range(n)]
    check("keras_allreduce", htk.allreduce(xs[r]), np.mean(xs, axis=0))
    check("keras_allreduce_sum", htk.allreduce(xs[r], op=htk.Sum), np.sum(xs, axis=0))
    check("hk_allreduce_default_average", hk.allreduce(xs[r]), np.mean(xs, axis=0))
    check("hk_allreduce_average_false", hk.allreduce(xs[r], average=False), np.sum(xs, axis=0))
    check("hk_allreduce_op_sum", hk.allreduce(xs[r], op=hk.Sum), np.sum(xs, axis=0))
    check("keras_allgather_uneven", hk.allgather(np.full((r + 1, 2), float(r))),
          np.concatenate([np.full((q + 1, 2), float(q)) for q in range(n)]))
    check("keras_broadcast", htk.broadcast(xs[r], n - 1), xs[n - 1])
    rs = np.arange(2 * n * 2, dtype=np.float64).reshape(2 * n, 2) * (r + 1)
    want = np.arange(2 * n * 2, dtype=np.float64).reshape(2 * n, 2) * sum(q + 1 for q in range(n)) / n
    check("keras_reducescatter", hk.reducescatter(rs), want[2 * r:2 * r + 2])


def load_model_cases() -> None:
    """A model saved with a distributed optimizer reloads with it wrapped again, its state kept; one more
    distributed step keeps the ranks identical (reported for the test to compare)."""
    path = os.path.join(OUT, "model.keras")
    model = two_layer_model()
    model.compile(optimizer=htk.DistributedOptimizer(keras.optimizers.Adam(0.01)), loss="mse")
    model.fit(data(0, 10, 3), data(0, 11, 2), batch_size=2, epochs=1, verbose=0, shuffle=False)
    if r == 0:
        model.save(path)
    hvd.barrier()
    for label, mod in (("htk", htk), ("hk", hk)):
        loaded = mod.load_model(path)
        checked.append(f"load_model_{label}")
        from hvdllm.tensorflow.distributed import is_distributed

        if not is_distributed(loaded.optimizer) or int(loaded.optimizer.iterations.numpy()) != \
                int(model.optimizer.iterations.numpy()):
            failures.append(f"load_model_{label}: optimizer {type(loaded.optimizer)} iterations "
                            f"{int(loaded.optimizer.iterations.numpy())}")
        loaded.fit(data(r, 12, 3), data(r, 13, 2), batch_size=rows_of(r), epochs=1, verbose=0)
        mine = np.concatenate([v.numpy().ravel() for v in loaded.trainable_variables])
        check(f"load_model_{label}_replicas", hvd.allreduce(tf.constant(mine), op=hvd.Max), mine, tol=0)


def lr_schedule_cases() -> None:
    """LearningRateScheduleCallback (staircase and per batch, momentum correction) against numpy SGD with
    momentum on a linear model: the combined batch's mean gradient, the schedule's lr and momentum."""
    steps, epochs, b = 3, 2, 2
    xs = [np.random.default_rng([40, q]).normal(size=(steps * b, 3)) for q in range(n)]
    ys = [x @ np.array([[1.0], [-2.0], [0.5]]) for x in xs]
    w0 = np.array([[0.1], [0.2], [-0.3]])
    for staircase in (True, False):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((3,), dtype="float64"),
                                  keras.layers.Dense(1, use_bias=False, dtype="float64")])
        model.layers[0].kernel.assign(w0)
        model.compile(optimizer=hk.DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9)),
                      loss=keras.losses.MeanSquaredError(dtype="float64"))
        mult = (lambda e: 0.5 ** e) if staircase else 0.5
        cb = hk.callbacks.LearningRateScheduleCallback(0.1, mult, staircase=staircase, steps_per_epoch=steps)
        model.fit(xs[r], ys[r], batch_size=b, epochs=epochs, verbose=0, shuffle=False, callbacks=[cb])
        w, vel, lr_old, mom = w0.copy(), np.zeros_like(w0), f32(0.1), 0.9
        for e in range(epochs):
            for i in range(steps):
                xb = np.concatenate([x[i * b:(i + 1) * b] for x in xs])
                yb = np.concatenate([y[i * b:(i + 1) * b] for y in ys])
                g = 2 * xb.T @ (xb @ w - yb) / len(xb)
                m = mom
                if staircase and i == 0 or not staircase:
                    lr = f32(0.1 * (0.5 ** e if staircase else 0.5 ** (e + i / steps)))
                    m, lr_old = mom * lr / lr_old, lr
                vel = m * vel - lr_old * g
                w = w + vel
        # 1e-6: Keras's compiled loss rounds through float32 somewhere (~1e-8 here even without the callback);
        # a momentum correction that did not reach the compiled step would be off by ~1e-1
        check(f"lr_schedule_staircase_{staircase}", model.layers[0].kernel.numpy(), w, tol=1e-6)
        checked.append(f"lr_schedule_momentum_restored_{staircase}")
        if not isinstance(model.optimizer.momentum, float) or model.optimizer.momentum != 0.9:
            failures.append(f"lr_schedule_momentum_restored_{staircase}: {model.optimizer.momentum!r}")


for case in (syncbn_cases, syncbn_mask_cases, partial_cases, optimizer_cases, aggregation_cases, function_cases,
             keras_value_cases, load_model_cases, lr_schedule_cases):
    run(case.__name__, case)
leave_together(hvd, r, {"rank": r, "size": n, "backend": hvd.backend(), "checked": checked, "failures": failures})
