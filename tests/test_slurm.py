"""A real two-node Slurm cluster on this machine (launch/slurm-local-cluster.sh: munge, slurmctld, two
slurmd, each daemon in its own network namespace as its own node): `sbatch launch/slurm.sbatch` trains
across both nodes like one process, a job requeued after a checkpoint resumes to the same losses as an
uninterrupted run, plain `srun` steps (data parallel, --tp 2, --pp 2) and horovodrun / mpirun inside an
allocation log the one-process losses."""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from hvdllm.cli import main
from hvdllm.train import checkpoint as ckpt
from tests.multirank import BIN, ROOT, base_env
from tests.netns import netns_supported
from tests.test_multihost import TRAIN, assert_same_losses, columns

SCRIPT = ROOT / "launch" / "slurm-local-cluster.sh"
NODES = ["-N2", "--ntasks-per-node=1"]
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


class Cluster:
    """A running local cluster: ``run`` executes a command on its submit host (the controller's node)."""

    def __init__(self, state: Path, tag: str) -> None:
        self.state = state
        self.env = {"HVDLLM_SLURM_TAG": tag}       # the namespaces' prefix

    def run(self, argv: list[str], timeout: float = 300) -> str:
        proc = subprocess.run(["bash", str(SCRIPT), "exec", str(self.state), *argv], env=base_env(self.env),
                              cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stdout}\n{self.logs()}"
        return proc.stdout

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run(["scontrol", "show", "job", "-o", job_id])
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait(self, job_id: str, timeout: float = 300) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in DONE:
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout}s\n{self.logs()}")

    def logs(self) -> str:
        return "".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.state / "log").glob("*")))


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    why = netns_supported()
    if why:
        pytest.skip(why)
    # Not under /tmp: every node mounts its own /tmp, and the run directories must be shared.
    state = Path(tempfile.mkdtemp(prefix="hvdllm-slurm-", dir="/var/tmp"))
    tag = f"hvsl{os.getpid() % 100000}"
    env = {**os.environ, "HVDLLM_SLURM_TAG": tag}
    try:
        up = subprocess.run(["bash", str(SCRIPT), "up", str(state)], env=env, capture_output=True, text=True,
                            timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr
        yield Cluster(state, tag)
    finally:
        subprocess.run(["bash", str(SCRIPT), "down", str(state)], env=env, capture_output=True, timeout=120)


@pytest.fixture()
def shared(cluster: Cluster) -> Path:
    """A run directory every node sees (the cluster's state folder, removed with it)."""
    return Path(tempfile.mkdtemp(dir=cluster.state))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("slurm-np1") / "torch"
    assert main(["train", *TRAIN, "--out", str(out)]) == 0
    return out


def sbatch(cluster: Cluster, out: Path, args: list[str]) -> str:
    return cluster.run(["sbatch", "--parsable", *NODES, "-o", str(out / "job.out"),
                        str(ROOT / "launch" / "slurm.sbatch"), *args, "--out", str(out / "run")]).strip()


@pytest.mark.timeout(600)
def test_sbatch_trains_across_both_nodes_like_one_process(cluster: Cluster, shared: Path, one_process: Path) -> None:
    info = cluster.wait(sbatch(cluster, shared, TRAIN))
    log = (shared / "job.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert info["NodeList"] == "n[1-2]", info
    assert "hvdllm train: 2 rank(s), data-parallel 2" in log, log
    assert_same_losses(shared / "run", one_process, 1e-5)


@pytest.mark.timeout(600)
def test_requeued_job_resumes_to_the_uninterrupted_losses(cluster: Cluster, shared: Path,
                                                          tmp_path: Path) -> None:
    """`scontrol requeue` kills the running job after its first checkpoint; the requeued job (restart 1)
    resumes from it (slurm.sbatch adds --resume) and logs what an uninterrupted run logs."""
    args = [*TRAIN, "--max-steps", "40", "--set", "run.checkpoint_interval=4", "--set", "run.eval_interval=20"]
    assert main(["train", *args, "--out", str(tmp_path / "uninterrupted")]) == 0
    job = sbatch(cluster, shared, args)
    deadline = time.monotonic() + 300
    while not ckpt.list_checkpoints(shared / "run"):
        assert time.monotonic() < deadline and cluster.job(job)["JobState"] not in DONE, cluster.job(job)
        time.sleep(0.1)
    cluster.run(["scontrol", "requeue", job])     # fails if the job already finished: the test would prove nothing
    info = cluster.wait(job)
    log = (shared / "job.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log)
    assert "requeued (restart 1): resuming from the newest checkpoint" in log, log
    assert log.count("hvdllm train: 2 rank(s), data-parallel 2") == 2, log
    got, want = columns(shared / "run"), columns(tmp_path / "uninterrupted")
    for c in want:
        assert [s for s, _ in got[c]] == [s for s, _ in want[c]], c
        np.testing.assert_allclose([v for _, v in got[c]], [v for _, v in want[c]], rtol=1e-5, err_msg=c)
    assert got["loss"][-1][0] == 40


@pytest.mark.timeout(600)
@pytest.mark.parametrize("extra, grid", [([], "data-parallel 2, tp 1, pp 1"),
                                         (["--tp", "2"], "data-parallel 1, tp 2, pp 1"),
                                         (["--pp", "2"], "data-parallel 1, tp 1, pp 2")], ids=["dp", "tp2", "pp2"])
def test_srun_step_trains_like_one_process(cluster: Cluster, shared: Path, one_process: Path,
                                          extra: list[str], grid: str) -> None:
    log = cluster.run(["srun", *NODES, "--mpi=pmix", "--export=ALL,OMP_NUM_THREADS=1", str(BIN / "hvdllm"),
                       "train", *TRAIN, *extra, "--out", str(shared / "run")])
    assert f"hvdllm train: 2 rank(s), {grid}" in log, log
    assert_same_losses(shared / "run", one_process, 1e-5 if not extra else 1e-4)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("launcher", ["horovodrun-gloo", "mpirun"])
def test_launcher_inside_an_allocation_trains_like_one_process(cluster: Cluster, shared: Path, one_process: Path,
                                                               launcher: str) -> None:
    """A batch job that starts its own launcher: horovodrun (ssh between the allocated nodes, Gloo over
    their network) or Open MPI's mpirun (which reads the allocation and starts its daemons with srun)."""
    train = " ".join([str(BIN / "hvdllm"), "train", *TRAIN, "--out", str(shared / "run")])
    if launcher == "mpirun":
        cmd = f"mpirun -np 2 --bind-to none {train}"
    else:
        cmd = f"{BIN / 'horovodrun'} -np 2 -H n1:1,n2:1 --gloo --network-interfaces eth1 {train}"
    job = cluster.run(["sbatch", "--parsable", *NODES, "-o", str(shared / "job.out"), "--wrap", cmd]).strip()
    info, log = cluster.wait(job), (shared / "job.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert "hvdllm train: 2 rank(s), data-parallel 2" in log, log
    assert_same_losses(shared / "run", one_process, 1e-5)
