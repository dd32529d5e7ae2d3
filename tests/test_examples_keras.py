"""Horovod's Keras and TF2 example scripts (tests/examples/), written in Horovod's documented style with
only the import line changed, trained on 2 ranks: the result must equal one process on the combined
batch (the reference: plain Keras, no hvdllm; Horovod's own Keras glue breaks on Keras 3).

keras_fit.py runs as written (``import hvdllm.tensorflow.keras as hvd``) and with the import swapped to
``import hvdllm.keras as hvd``; tf_custom_loop.py uses ``DistributedGradientTape``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.multirank import ROOT, _launch, base_env, command

EXAMPLES = ROOT / "tests" / "examples"
# float32 training: the 2-rank run sums each batch's gradient in another order than one process does
TOL = 2e-5


def run_example(script: Path, launcher: str, np_: int, out: Path) -> list[dict]:
    cmd, extra = command(launcher, np_, [str(script), "--out", str(out)])
    code, output = _launch(cmd, base_env(extra), 400, f"{script.name} {launcher} np={np_}")
    assert code == 0, output[-6000:]
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(np_)]


def swapped_import(tmp: Path) -> Path:
    """keras_fit.py with its one hvdllm line changed to horovod.keras's drop-in, nothing else."""
    text = (EXAMPLES / "keras_fit.py").read_text()
    lines = [line for line in text.splitlines() if "hvdllm" in line]
    assert lines == ["import hvdllm.tensorflow.keras as hvd   # Horovod: import horovod.tensorflow.keras as hvd"]
    script = tmp / "keras_fit_hk.py"
    script.write_text(text.replace(lines[0], "import hvdllm.keras as hvd   # Horovod: import horovod.keras as hvd")
                      .replace("os.path.dirname(os.path.abspath(__file__))", repr(str(EXAMPLES))))
    return script


def _combined(x: np.ndarray, y: np.ndarray, n: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """One process's data: step i is every rank's i-th batch of its shard ``x[r::n]``, in rank order."""
    shards = [(x[r::n], y[r::n]) for r in range(n)]
    steps = len(shards[0][0]) // batch
    xs = [s[0][i * batch:(i + 1) * batch] for i in range(steps) for s in shards]
    ys = [s[1][i * batch:(i + 1) * batch] for i in range(steps) for s in shards]
    return np.concatenate(xs), np.concatenate(ys)


def _model(seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])


def keras_fit_reference(n: int, epochs: int = 3, batch: int = 8, lr: float = 0.01) -> dict:
    """Plain Keras on the combined batch, rank 0's initial weights, and Horovod's warmup written out:
    lr = scaled / n * ((epoch + (batch + 1) / steps) * (n - 1) / warmup + 1) during the warmup epochs."""
    import keras

    from tests.examples.data import digits

    (x, y), (xv, yv) = digits(64), digits(32, seed=1)
    xc, yc = _combined(x, y, n, batch)
    steps, scaled, warmup = len(xc) // (n * batch), lr * n, 2
    model = _model(42)
    opt = keras.optimizers.Adam(scaled)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), optimizer=opt,
                  metrics=["accuracy"])

    class Warmup(keras.callbacks.Callback):
        epoch = 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_begin(self, b, logs=None):
            if self.epoch < warmup:
                opt.learning_rate = scaled / n * ((self.epoch + (b + 1) / steps) * (n - 1) / warmup + 1)

    hist = model.fit(xc, yc, batch_size=n * batch, epochs=epochs, validation_data=(xv, yv), shuffle=False,
                     verbose=0, callbacks=[Warmup()])
    return {"weights": np.concatenate([w.ravel() for w in model.get_weights()]), "loss": hist.history["loss"],
            "val_loss": hist.history["val_loss"], "lr": float(opt.learning_rate.numpy())}


def custom_loop_reference(n: int, steps: int = 8, batch: int = 8) -> dict:
    import keras
    import tensorflow as tf

    from tests.examples.data import digits

    x, y = digits(steps * batch)
    xc, yc = _combined(x, y, n, batch)
    model = _model(42)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    opt = keras.optimizers.Adam(0.001 * n)
    losses = []
    for i in range(steps // n):
        xb, yb = xc[i * n * batch:(i + 1) * n * batch], yc[i * n * batch:(i + 1) * n * batch]
        with tf.GradientTape() as tape:
            value = loss(yb, model(xb, training=True))
        opt.apply_gradients(zip(tape.gradient(value, model.trainable_variables), model.trainable_variables))
        losses.append(float(value))
    return {"weights": np.concatenate([w.ravel() for w in model.get_weights()]), "loss": losses}


def _same_replicas(reports: list[dict]) -> None:
    for rep in reports[1:]:
        np.testing.assert_array_equal(rep["weights"], reports[0]["weights"])


KERAS_RUNS = [("tensorflow.keras", "gloo"), ("keras", "mpirun")]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("module,launcher", KERAS_RUNS, ids=[f"{m}-{l}" for m, l in KERAS_RUNS])
def test_keras_fit_example_matches_one_process(module: str, launcher: str, tmp_path: Path) -> None:
    script = EXAMPLES / "keras_fit.py" if module == "tensorflow.keras" else swapped_import(tmp_path)
    reports = run_example(script, launcher, 2, tmp_path)
    _same_replicas(reports)
    ref = keras_fit_reference(2)
    got = reports[0]
    np.testing.assert_allclose(got["weights"], ref["weights"], atol=TOL, rtol=0)
    np.testing.assert_allclose(got["loss"], ref["loss"], atol=TOL, rtol=0)
    np.testing.assert_allclose(got["val_loss"], ref["val_loss"], atol=TOL, rtol=0)
    assert got["lr"][-1] == pytest.approx(ref["lr"], rel=1e-6) and got["lr"][0] < got["lr"][-1]   # warmed up
    import keras

    best = keras.models.load_model(tmp_path / "best.keras")      # saved with the plain optimizer's config
    from tests.examples.data import digits

    xv, yv = digits(32, seed=1)
    val = best.evaluate(xv, yv, verbose=0, return_dict=True)["loss"]
    assert val == pytest.approx(min(ref["val_loss"]), abs=TOL)


@pytest.mark.timeout(600)
def test_tf_custom_loop_example_matches_one_process(tmp_path: Path) -> None:
    reports = run_example(EXAMPLES / "tf_custom_loop.py", "gloo", 2, tmp_path)
    _same_replicas(reports)
    ref = custom_loop_reference(2)
    np.testing.assert_allclose(reports[0]["weights"], ref["weights"], atol=TOL, rtol=0)
    np.testing.assert_allclose(reports[0]["loss"], ref["loss"], atol=TOL, rtol=0)


def test_examples_are_horovod_scripts_but_for_the_import() -> None:
    """Each example's only hvdllm line is its import, commented with Horovod's."""
    for name, want in (("keras_fit.py", "horovod.tensorflow.keras"), ("tf_custom_loop.py", "horovod.tensorflow")):
        lines = [line for line in (EXAMPLES / name).read_text().splitlines() if "hvdllm" in line]
        assert lines == [f"import hvdllm.{want[8:]} as hvd   # Horovod: import {want} as hvd"], (name, lines)
