"""Pipeline parallelism as a Keras library feature (hvdllm.tensorflow.parallel.Stage / split_layers /
PipelineExecutor): examples/keras_pipeline.py splits a keras.Sequential into 2 stages on 2 ranks, checks
the first step's loss and every stage's gradients against the unsplit model (1e-5, or it exits non-zero)
with 1F1B and GPipe, and both schedules then train to the same losses."""
from __future__ import annotations

import numpy as np
import pytest

from tests.multirank import run_ranks


@pytest.mark.timeout(300)
def test_keras_sequential_split_into_two_stages_equals_unsplit() -> None:
    reps = run_ranks("keras_pipeline_worker.py", np=2, launcher="gloo", timeout=280)
    assert [r["rank"] for r in reps] == [0, 1]
    for r in reps:
        np.testing.assert_allclose(r["losses"]["gpipe"], r["losses"]["1f1b"], rtol=1e-6)
    assert reps[0]["losses"] == reps[1]["losses"]            # the loss is shared by every stage
