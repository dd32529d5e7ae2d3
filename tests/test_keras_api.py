"""horovod.tensorflow / horovod.tensorflow.keras / horovod.keras names of hvdllm on real ranks: SyncBatchNormalization
against one-process BatchNormalization on the combined uneven batch (and on the kept rows under a mask),
PartialDistributedGradientTape and the Keras DistributedOptimizer's Horovod arguments against numpy, the Keras
value collectives, load_model and the learning-rate schedule callback (tests/workers/keras_api_worker.py; one
launch runs every case)."""
from __future__ import annotations

import pytest

from tests.multirank import run_ranks

CASES = {"syncbn_eager", "syncbn_function", "syncbn_fused_error", "syncbn_mask_eager", "syncbn_mask_function",
         "partial_tape_scale_True", "partial_tape_scale_False", "tape_groups", "tape_groups_local_empty",
         "tape_groups_2_0", "tape_groups_None_3",
         "optimizer_groups_int", "optimizer_num_groups", "optimizer_sparse_device", "optimizer_predivide",
         "optimizer_partial", "optimizer_register_local", "optimizer_bad_groups", "aggregation_pass1",
         "aggregation_pass2", "allreduce_fp16", "allreduce_average_positional", "allreduce_indexed_slices",
         "broadcast_object_session", "allgather_object_session", "broadcast_object_fn", "broadcast_inplace",
         "broadcast_variables_inplace", "query_ops", "refs", "split_list", "helpers", "keras_allreduce",
         "keras_allreduce_sum", "hk_allreduce_default_average", "hk_allreduce_average_false", "hk_allreduce_op_sum",
         "keras_allgather_uneven", "keras_broadcast", "keras_reducescatter", "load_model_htk",
         "load_model_htk_replicas", "load_model_hk", "load_model_hk_replicas", "lr_schedule_staircase_True",
         "lr_schedule_momentum_restored_True", "lr_schedule_staircase_False", "lr_schedule_momentum_restored_False"}
LAUNCHES = [("python", 1, "local"), ("gloo", 2, "horovod"), ("gloo", 3, "horovod"), ("horovod-mpi", 2, "horovod"),
            ("mpirun", 2, "mpi"), ("mpirun", 3, "mpi")]


@pytest.mark.timeout(500)
@pytest.mark.parametrize("launcher,np,backend", LAUNCHES, ids=[f"{l}-np{n}" for l, n, _ in LAUNCHES])
def test_keras_api(launcher: str, np: int, backend: str) -> None:
    reports = run_ranks("keras_api_worker.py", np=np, launcher=launcher, timeout=450)
    for rank, rep in enumerate(reports):
        assert (rep["rank"], rep["size"], rep["backend"]) == (rank, np, backend)
        assert rep["failures"] == [], (rank, rep["failures"])
        got = {c for c in rep["checked"] if not c.startswith("tape_groups_[[")}
        assert got == CASES, (rank, sorted(got ^ CASES))
