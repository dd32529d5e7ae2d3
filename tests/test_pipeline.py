"""Pipeline parallelism on real ranks: GPipe and 1F1B give the unsplit model's loss and gradients."""
from __future__ import annotations

import pytest

from tests.multirank import run_ranks

TOL = 1e-5


@pytest.mark.timeout(240)
@pytest.mark.parametrize("launcher,backend", [("gloo", "horovod"), ("mpirun", "mpi")])
def test_pp2_gpipe_and_1f1b_equal_unsplit(launcher: str, backend: str) -> None:
    reports = run_ranks("pipeline_worker.py", np=2, launcher=launcher, timeout=200)
    for rep in reports:
        assert rep["backend"] == backend and rep["stage"] == rep["rank"]
        for label in ("tied_l2_m4", "untied_l3_m3"):
            for kind in ("gpipe", "1f1b"):
                key = f"{label}_{kind}"
                for what in ("loss", "loss2", "grads"):
                    assert rep[f"{key}_{what}"] < TOL, (rep["rank"], key, what, rep[f"{key}_{what}"])
    first, last = reports
    # Stage 0 owns the embeddings, the last stage the final norm and the head (a copy of wte when tied).
    names0, names1 = first["tied_l2_m4_1f1b_names"], last["tied_l2_m4_1f1b_names"]
    assert "wte.weight" in names0 and "wpe.weight" in names0 and not any(n.startswith("ln_f") for n in names0)
    # tied: the last stage's head is a copy refreshed from stage 0, not a parameter of its own
    assert "lm_head.weight" not in names1 and "ln_f.weight" in names1 and "wpe.weight" not in names1
    assert "lm_head.weight" in last["untied_l3_m3_1f1b_names"]
    assert first["tied_l2_m4_1f1b_blocks"] == [0, 1] and last["tied_l2_m4_1f1b_blocks"] == [1, 2]
    assert first["untied_l3_m3_gpipe_blocks"][0] == 0 and last["untied_l3_m3_gpipe_blocks"][1] == 3
