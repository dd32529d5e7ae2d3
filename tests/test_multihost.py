"""Two hosts on one machine (network namespaces + sshd, tests/netns.py): `horovodrun -H hostA:1,hostB:1`
(Gloo over the hosts' network) and `mpirun -H hostA,hostB` launch over ssh; `hvdllm train` (torch and
Keras) logs the one-process losses, and a user's script's collectives see both hosts."""
from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from hvdllm.cli import main
from hvdllm.train.metrics import read_metrics
from tests.multirank import BIN, ROOT, base_env
from tests.netns import Hosts, netns_supported, simulated_hosts

QUIET = ["--set", "run.threads=1", "--set", "run.tensorboard=false", "--set", "run.progress=false"]
# A small shape; 6 steps logged one by one, evaluated twice: equality is what matters here.
TRAIN = ["--preset", "tiny", "--set", "model.n_layer=2", "--set", "model.n_embd=64", "--set", "model.block_size=64",
         "--max-steps", "6", "--global-batch", "8", "--micro-batch", "4", "--set", "run.log_interval=1",
         "--set", "run.eval_interval=3", "--set", "run.eval_sequences=16", "--set", "sample.tokens=5", *QUIET]
# Open MPI over the hosts' eth1 only, daemons started from the launcher (no ssh hop between hosts).
MPI_TCP = ["--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", "eth1", "--mca", "oob_tcp_if_include", "eth1",
           "--mca", "plm_rsh_no_tree_spawn", "1", "--bind-to", "none"]
FORWARD = ("PYTHONPATH", "OMP_NUM_THREADS", "TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "PYTHONHASHSEED",
           "PYTHONUNBUFFERED", "HVDLLM_TEST_OUT", "HVDLLM_BACKEND")


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    why = netns_supported()
    if why:
        pytest.skip(why)
    with tempfile.TemporaryDirectory(prefix="hvdllm-hosts-") as state:
        with simulated_hosts(Path(state)) as h:
            yield h


def horovodrun(hosts: Hosts, argv: list[str], *extra: str) -> list[str]:
    spec = ",".join(f"{n}:1" for n in hosts.names)
    return [str(BIN / "horovodrun"), "-np", str(len(hosts.names)), "-H", spec, "--network-interfaces", hosts.iface,
            *extra, *argv]


def mpirun(hosts: Hosts, argv: list[str], env: dict[str, str]) -> list[str]:
    forward = [a for v in FORWARD if v in env for a in ("-x", v)]
    return ["mpirun", "-np", str(len(hosts.names)), "-H", ",".join(hosts.names), *MPI_TCP, *forward, *argv]


def launch(hosts: Hosts, cmd: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """Run ``cmd`` from the launcher host; fail with its whole output unless it exits 0."""
    full = base_env(env)
    proc = subprocess.run(hosts.command(cmd), env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, cwd=str(ROOT))
    assert proc.returncode == 0, f"{' '.join(cmd)}: exit {proc.returncode}; output:\n{proc.stdout}"
    return proc.stdout


def columns(run: Path) -> dict[str, list[tuple[int, float]]]:
    rows = read_metrics(run / "metrics.csv")
    return {c: [(int(r["step"]), float(r[c])) for r in rows if r[c]] for c in ("loss", "val_loss", "grad_norm")}


def assert_same_losses(got: Path, want: Path, rtol: float) -> None:
    a, b = columns(got), columns(want)
    assert [s for s, _ in b["loss"]] == list(range(1, 7))
    for c in b:
        assert [s for s, _ in a[c]] == [s for s, _ in b[c]], c
        np.testing.assert_allclose([v for _, v in a[c]], [v for _, v in b[c]], rtol=rtol, err_msg=c)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The one-process reference runs (torch, Keras) on the same global batch."""
    base = tmp_path_factory.mktemp("np1")
    runs = {"torch": base / "torch", "tensorflow": base / "keras"}
    for fw, out in runs.items():
        assert main(["train", "--framework", fw, *TRAIN, "--out", str(out)]) == 0
    return runs


@pytest.mark.timeout(600)
def test_horovodrun_gloo_across_hosts_trains_like_one_process(hosts: Hosts, one_process: dict[str, Path],
                                                             tmp_path: Path) -> None:
    for fw, rtol in (("torch", 1e-5), ("tensorflow", 1e-5)):
        out = tmp_path / fw
        launch(hosts, horovodrun(hosts, [str(BIN / "hvdllm"), "train", "--framework", fw, *TRAIN,
                                               "--out", str(out)], "--gloo"))
        assert_same_losses(out, one_process[fw], rtol)


@pytest.mark.timeout(600)
def test_mpirun_across_hosts_trains_like_one_process(hosts: Hosts, one_process: dict[str, Path],
                                                     tmp_path: Path) -> None:
    out = tmp_path / "torch"
    env = base_env()
    launch(hosts, mpirun(hosts, [str(BIN / "hvdllm"), "train", *TRAIN, "--out", str(out)], env))
    assert_same_losses(out, one_process["torch"], 1e-5)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("launcher", ["horovodrun-gloo", "horovodrun-mpi", "mpirun-mpi4py"])
def test_user_script_collectives_span_both_hosts(hosts: Hosts, launcher: str, tmp_path: Path) -> None:
    script = [str(BIN / "python"), str(ROOT / "tests" / "workers" / "hosts_worker.py")]
    env = {"HVDLLM_TEST_OUT": str(tmp_path)}
    if launcher == "horovodrun-gloo":
        cmd = horovodrun(hosts, script, "--gloo")
    elif launcher == "horovodrun-mpi":
        # horovodrun adds btl_tcp_if_include, no binding and no tree spawn itself
        cmd = horovodrun(hosts, script, "--mpi", "--mpi-args=--mca oob_tcp_if_include eth1")
    else:
        env["HVDLLM_BACKEND"] = "mpi"
        cmd = mpirun(hosts, script, base_env(env))
    launch(hosts, cmd, env)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, rep in enumerate(reports):
        assert rep["hosts"] == ["hostA", "hostB"], rep
        assert (rep["size"], rep["local_rank"], rep["local_size"]) == (2, 0, 1), rep
        assert rep["backend"] == ("mpi" if launcher == "mpirun-mpi4py" else "horovod")
        assert rep["sum"] == [10.0, 12.0, 14.0]
        assert rep["gather"] == [0.0, 1.0, 1.0]
        assert rep["bcast"] == [6.0]
