"""Horovod's small helpers and grouping rules as hvdllm writes them once (hvdllm.core), checked against
Horovod's own definitions where Horovod is importable, and the Keras-side argument errors."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from hvdllm.core import horovod_util as hu
from hvdllm.core.gradients import group_indices, validate_groups, warmup_multiplier
from hvdllm.core.ops import Average, Sum


def test_split_list_and_power_of_two_match_horovod() -> None:
    for n_items in range(0, 12):
        for n in range(1, 5):
            parts = hu.split_list(list(range(n_items)), n)
            assert sum(parts, []) == list(range(n_items)) and len(parts) == n
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert [hu.check_num_rank_power_of_2(k) for k in (0, 1, 2, 3, 4, 6, 8)] == [False, True, True, False, True,
                                                                                 False, True]
    if importlib.util.find_spec("horovod") is not None:
        from horovod.common import util

        assert all(hu.split_list(list(range(m)), k) == util.split_list(list(range(m)), k)
                   for m in range(10) for k in range(1, 4))
    with pytest.raises(ValueError, match="n=0"):
        hu.split_list([1], 0)


def test_average_back_compat_and_versions() -> None:
    assert hu.handle_average_backwards_compatibility(None, None) is Average
    assert hu.handle_average_backwards_compatibility(None, False) is Sum
    assert hu.handle_average_backwards_compatibility(Sum, None) is Sum
    with pytest.raises(ValueError, match="supersedes"):
        hu.handle_average_backwards_compatibility(Sum, True)
    assert hu.is_version_greater_equal_than("2.21.0", "2.6.0") and not hu.is_version_greater_equal_than("2.5", "2.6")
    with pytest.raises(ValueError):
        hu.is_version_greater_equal_than(2.6, "2.6")
    with pytest.raises(ImportError, match="HOROVOD_WITH_X"):
        hu.check_extension("x", "HOROVOD_WITH_X", __file__, "no_such_lib")
    assert isinstance(hu.gpu_available("tensorflow"), bool)


def test_groups_rules() -> None:
    assert validate_groups(None, 0) is None and validate_groups(None, 3) == 3 and validate_groups(2, 5) == 2
    for bad in (0, -1, "2", True):
        with pytest.raises(ValueError, match="groups"):
            validate_groups(bad)
    assert group_indices(5, 2, lambda v: None) == [[0, 1, 2], [3, 4]]
    assert group_indices(2, 3, lambda v: None) == [[0], [1]]
    where = {"a": 3, "b": 0, "c": None}
    assert group_indices(5, [["a", "b", "c"]], where.get) == [[0, 3], [1], [2], [4]]
    assert group_indices(3, None, where.get) is None


def test_warmup_multiplier_is_horovods() -> None:
    """Horovod: 1/size * (epoch * (size - 1) / warmup + 1) with epoch counted to the batch's end."""
    for size in (1, 2, 3):
        for progress in (0.25, 1.0, 2.5):
            want = min(1.0, 1.0 / size * (progress * (size - 1) / 3 + 1))
            assert warmup_multiplier(progress, size, 3) == pytest.approx(want)
    assert warmup_multiplier(3.0, 4, 3) == 1.0


def test_keras_argument_errors() -> None:
    keras = pytest.importorskip("keras")
    import hvdllm.tensorflow.keras as hvd

    hvd.init()
    with pytest.raises(ValueError, match="initial_lr=None"):
        hvd.callbacks.LearningRateScheduleCallback(None, 0.5)
    with pytest.raises(ValueError, match="multiplier="):
        hvd.callbacks.LearningRateScheduleCallback(0.1, "x")
    with pytest.raises(ValueError, match="local_variables"):
        hvd.callbacks.BroadcastGlobalVariablesCallback(0, local_variables=["v"])
    with pytest.raises(ValueError, match="local_layers"):
        hvd.PartialDistributedOptimizer(keras.optimizers.SGD(0.1), local_layers=["layer"])
    with pytest.raises(ValueError, match="legacy_opts"):
        hvd.load_model("x.keras", legacy_opts=True)
    with pytest.raises(RuntimeError, match="BroadcastGlobalVariablesCallback"):
        hvd.broadcast_global_variables(0)
    ckpt = hvd.callbacks.BestModelCheckpoint()
    assert ckpt.filepath is None and ckpt.save_best_only
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="filepath=None"):
        model.fit(np.ones((1, 2)), np.ones((1, 1)), callbacks=[ckpt], verbose=0)


def test_keras_elastic_state_and_callbacks_one_process() -> None:
    """KerasState with Horovod's three callbacks in model.fit: commits every 2 batches and at epoch ends,
    state.epoch/batch follow training, restore() puts the committed weights back; TensorFlowState too."""
    keras = pytest.importorskip("keras")
    import tensorflow as tf

    import hvdllm.keras as hk
    import hvdllm.tensorflow as hvd_tf

    hk.init()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=hk.DistributedOptimizer(keras.optimizers.SGD(0.1)), loss="mse")
    state = hk.elastic.KerasState(model, batch=0, epoch=0)
    commits = []
    commit = state.commit
    state.commit = lambda: (commits.append(state.batch), commit())
    callbacks = [hk.elastic.CommitStateCallback(state, batches_per_commit=2),
                 hk.elastic.UpdateBatchStateCallback(state), hk.elastic.UpdateEpochStateCallback(state)]
    model.fit(np.ones((8, 2)), np.zeros((8, 1)), batch_size=2, epochs=2, verbose=0, callbacks=callbacks)
    assert (state.epoch, state.batch, len(commits)) == (2, 0, 6)
    saved = [w.copy() for w in model.get_weights()]
    model.set_weights([w + 1 for w in saved])
    state.restore()
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), saved))
    v = tf.Variable([1.0, 2.0])
    tstate = hvd_tf.elastic.TensorFlowState([v], step=3)
    v.assign([5.0, 5.0])
    tstate.restore()
    assert v.numpy().tolist() == [1.0, 2.0] and tstate.step == 3
