"""Launch detection (hvdllm.core.launch): every launcher's environment is recognised with its size and
rank; torchrun and srun without PMI are one-line errors naming the fix (exit 2 from the CLI, nothing
written), never N independent one-rank jobs; a real `torchrun --nproc-per-node 2 hvdllm train` proves it."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hvdllm.core import choose_backend, launched_by
from hvdllm.core.launch import Launch, LaunchError, check, check_world, detect
from tests.multirank import BIN, ROOT, base_env

SLURM_BATCH = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_NODEID": "0"}
SRUN = {**SLURM_BATCH, "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}
TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none"}

CASES = [
    ({}, Launch(None)),
    ({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2", "HOROVOD_GLOO_RENDEZVOUS_ADDR": "10.0.0.1"}, Launch("horovodrun", 2, 1)),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "PMIX_RANK": "3"}, Launch("mpirun", 4, 3)),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "PMI_FD": "5"}, Launch("pmi", 2, 1)),   # MPICH/Hydra
    ({**SRUN, "PMI_RANK": "2", "PMI_SIZE": "4"}, Launch("pmi", 4, 2)),                                # srun --mpi=pmi2
    ({**SRUN, "PMIX_RANK": "2", "PMIX_NAMESPACE": "slurm.pmix.7.0"}, Launch("pmix", 4, 2)),           # srun --mpi=pmix
    ({"PMIX_RANK": "1", "PMIX_SIZE": "2"}, Launch("pmix", 2, 1)),
    (SRUN, Launch("srun", 4, 2)),
    ({**SRUN, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}, Launch("srun", 1, 0)),
    (SLURM_BATCH, Launch(None)),                 # the batch script itself is one process
    ({**SLURM_BATCH, "HOROVOD_RANK": "0", "HOROVOD_SIZE": "8"}, Launch("horovodrun", 8, 0)),  # inside an allocation
    (TORCHRUN, Launch("torchrun", 2, 1)),
]


@pytest.mark.parametrize("env, want", CASES)
def test_detect(env: dict[str, str], want: Launch) -> None:
    assert detect(env) == want


def test_launched_by_and_backend_choice() -> None:
    assert launched_by(SLURM_BATCH) is None and launched_by({**SRUN, "SLURM_STEP_NUM_TASKS": "1"}) is None
    assert launched_by({**SRUN, "PMIX_RANK": "2"}) == "pmix"
    yes, no = (lambda: True), (lambda: False)
    assert choose_backend(yes, yes, {**SRUN, "PMIX_RANK": "2"}) == "horovod"
    assert choose_backend(no, yes, {"PMI_RANK": "0", "PMI_SIZE": "2"}) == "mpi"
    assert choose_backend(yes, yes, SLURM_BATCH) == "local"


@pytest.mark.parametrize("env, words", [
    (TORCHRUN, ["torchrun", "WORLD_SIZE=2", "horovodrun -np 2"]),
    (SRUN, ["srun", "4 tasks", "without PMI", "srun --mpi=pmix"]),
])
def test_launches_hvdllm_cannot_join_are_one_line_errors(env: dict[str, str], words: list[str]) -> None:
    with pytest.raises(LaunchError) as e:
        check(detect(env))
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value), e.value
    for forced in ({}, {"HVDLLM_BACKEND": "local"}):       # a forced backend does not make it N jobs either
        with pytest.raises(LaunchError):
            choose_backend(lambda: True, lambda: True, {**env, **forced})
    check(detect({**env, "WORLD_SIZE": "1", "SLURM_STEP_NUM_TASKS": "1"}))     # one rank: fine


def test_a_backend_world_smaller_than_the_launch_is_an_error() -> None:
    check_world(Launch("pmix", 4, 0), 4, "horovod")
    check_world(Launch("horovodrun", 4, 0), 2, "horovod")       # elastic: the size changes on purpose
    with pytest.raises(LaunchError, match="pmix started 4 ranks but the horovod backend sees a world of 1"):
        check_world(Launch("pmix", 4, 0), 1, "horovod")


@pytest.mark.timeout(180)
def test_torchrun_two_processes_is_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    torchrun = BIN / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not in this venv")
    out = tmp_path / "run"
    r = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "hvdllm.cli", "train",
                        "--preset", "tiny", "--max-steps", "2", "--out", str(out)],
                       env=base_env(), capture_output=True, text=True, timeout=170, cwd=str(ROOT))
    assert r.returncode != 0, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("hvdllm: error:")]
    assert len(errors) == 1 and "torchrun with WORLD_SIZE=2" in errors[0], r.stderr
    assert "exitcode: 2" in r.stderr.replace(" ", "").replace(":", ": "), r.stderr      # both ranks exit 2
    assert not out.exists()
