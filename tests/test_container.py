"""The Dockerfile, built and run: the image builds from a local Debian base (tests/docker_env.py), and a
two-container job (a Docker network, sshd in each container, the job's keys mounted, a shared run
directory) trains with `horovodrun -np 2 -H c1:1,c2:1 hvdllm train` from c1 as the image's non-root user,
logging the losses of one process in the same image."""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.docker_env import Daemon, DockerUnavailable, built_image_daemon
from tests.test_multihost import TRAIN, assert_same_losses

UID = 1000      # the image's user (Dockerfile: useradd --uid 1000 hvdllm)


@pytest.fixture(scope="module")
def docker() -> Iterator[tuple[Daemon, str]]:
    try:
        with built_image_daemon() as (d, image, _ns):
            yield d, image
    except DockerUnavailable as e:
        pytest.skip(str(e))


def _keys(where: Path) -> Path:
    ssh = where / "ssh"
    ssh.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / "id_ed25519")], check=True)
    (ssh / "authorized_keys").write_text((ssh / "id_ed25519.pub").read_text())
    for p in (ssh, *ssh.iterdir()):
        os.chown(p, UID, UID)
    return ssh


@pytest.mark.timeout(3600)
def test_two_container_horovodrun_job_trains_like_one_process(docker: tuple[Daemon, str], tmp_path: Path) -> None:
    d, image = docker
    with tempfile.TemporaryDirectory(prefix="hvdllm-containers-") as work:
        ssh, runs = _keys(Path(work)), Path(work) / "runs"
        runs.mkdir()
        os.chown(runs, UID, UID)
        net = f"hvnet{os.getpid() % 100000}"
        names = ["c1", "c2"]
        d.docker("network", "create", "--internal", net)
        try:
            for n in names:
                d.docker("run", "-d", "--name", n, "--hostname", n, "--network", net, "--shm-size", "256m",
                         "-v", f"{ssh}:/home/hvdllm/.ssh", "-v", f"{runs}:/runs", image)
            # the ssh client settings really in effect, the user not root
            eff = d.docker("exec", "c1", "ssh", "-G", "c2").stdout.lower().splitlines()
            assert {"stricthostkeychecking false", "userknownhostsfile /dev/null", "port 2222"} <= set(eff), eff
            assert d.docker("exec", "c1", "id", "-u").stdout.strip() == str(UID)
            # the reference in the image too: its Python's documentation is the embedded corpus
            for cmd in (["hvdllm", "train", *TRAIN, "--out", "/runs/one"],
                        ["horovodrun", "-np", "2", "-H", "c1:1,c2:1", "--gloo", "--network-interfaces", "eth0",
                         "hvdllm", "train", *TRAIN, "--out", "/runs/two"]):
                job = d.docker("exec", "-e", "OMP_NUM_THREADS=1", "c1", *cmd, check=False, timeout=900)
                assert job.returncode == 0, job.stdout[-6000:] + job.stderr[-6000:]
            assert_same_losses(runs / "two", runs / "one", 1e-5)
        finally:
            for n in names:
                d.docker("rm", "-f", n, check=False)
            d.docker("network", "rm", net, check=False)
