"""Tensor parallelism on real ranks: layers and the GPT equal the unsplit model (forward, loss, grads)."""
from __future__ import annotations

import pytest

from tests.multirank import run_ranks

TOL = 1e-5


@pytest.mark.timeout(240)
@pytest.mark.parametrize("launcher,backend", [("gloo", "horovod")])
def test_tp2_layers_and_gpt_equal_unsplit(launcher: str, backend: str) -> None:
    reports = run_ranks("tensor_parallel_worker.py", np=2, launcher=launcher, timeout=200)
    for rep in reports:
        assert rep["backend"] == backend
        for key in ("layers_out", "layers_dx", "row_bias_grad", "col_gather_out", "col_gather_dx", "row_scatter_dx",
                    "vocab_emb", "vocab_ce", "vocab_ce_grad"):
            assert rep[key] < TOL, (rep["rank"], key, rep[key])
        for label in ("tied", "untied_nobias"):
            for key in ("logits", "loss", "grads", "state_dict"):
                assert rep[f"{label}_{key}"] < TOL, (rep["rank"], label, key, rep[f"{label}_{key}"])
            assert rep[f"{label}_grad_names_equal"] and rep[f"{label}_state_keys_equal"]
            # Each rank holds about half of the sharded weights.
            assert rep[f"{label}_local_params"] < 0.65 * rep[f"{label}_full_params"]
        assert rep["bad_heads"] == "model.n_head=3 is not divisible by tp=2; allowed: tp dividing 3"
