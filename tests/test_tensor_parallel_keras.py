"""Keras column/row-parallel Dense on 2 real ranks equal unsplit Dense layers (forward and gradients)."""
from __future__ import annotations

import pytest

from tests.multirank import run_ranks

TOL = 1e-5


@pytest.mark.timeout(240)
def test_keras_column_row_dense_equal_unsplit() -> None:
    reports = run_ranks("keras_tp_worker.py", np=2, launcher="gloo", timeout=220)
    for rep in reports:
        assert rep["backend"] == "horovod"
        for key in ("eager_out", "eager_dx", "graph_out", "graph_dx", "gather_out", "gather_dx", "scatter_out",
                    "scatter_dh", "fit_pred"):
            assert rep[key] < TOL, (rep["rank"], key, rep[key])
        assert max(rep["eager_grads"]) < TOL and max(rep["graph_grads"]) < TOL, rep
        assert rep["bad_units"] == "units=7 is not divisible by the tensor-parallel size 2; allowed: multiples of 2"
