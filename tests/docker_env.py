"""A private Docker daemon for the container tests, and the hvdllm image built with it.

No image registry is reachable, so the base image is made locally (debootstrap Debian bookworm with
python3, `docker import`). Building needs the package registries (apt in the image), so the daemon
first runs in the machine's network namespace with `docker build --network host` and no networks of its
own (`--bridge=none --iptables=false`); the containers then run under the same daemon restarted inside
a network namespace of the test, so the Docker network and its addresses exist only there. The data
root lives under $HVDLLM_CACHE/docker (default ~/.cache/hvdllm/docker) as a build cache: a second run
reuses the base image and every unchanged layer. Pip wheels for the image are downloaded on this
machine (its pip configuration) and passed in the build context with the cached Horovod wheel.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("HVDLLM_CACHE", Path.home() / ".cache" / "hvdllm"))
BASE = "hvdllm-test/debian:bookworm"
IMAGE = "hvdllm-test/hvdllm:latest"


class DockerUnavailable(RuntimeError):
    """The kernel or the container forbids running a Docker daemon here (the test is then skipped)."""


class Daemon:
    """One dockerd with its own socket, exec root and data root, optionally inside network namespace ``ns``."""

    def __init__(self, state: Path, data_root: Path, ns: str | None = None) -> None:
        self.state = state
        self.sock = state / "docker.sock"
        cmd = ["dockerd", "--data-root", str(data_root), "--exec-root", str(state / "exec"),
               "-H", f"unix://{self.sock}", "--pidfile", str(state / "docker.pid"), "--iptables=false",
               "--ip6tables=false", "--ip-masq=false", "--bridge=none", "--userland-proxy=false"]
        if ns:      # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroups dockerd needs
            cmd = ["nsenter", f"--net=/run/netns/{ns}", *cmd]
        self.log = open(state / f"dockerd-{ns or 'host'}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while self.docker("version", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise DockerUnavailable(f"dockerd did not start: {Path(self.log.name).read_text()[-2000:]}")
            time.sleep(0.5)

    def docker(self, *args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(["docker", "-H", f"unix://{self.sock}", *args], capture_output=True, text=True,
                           timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: exit {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
        return r

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        # dockerd leaves its network namespace handles mounted under the exec root
        for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
            target = line.split()[1]
            if target.startswith(f"{self.state}/"):
                subprocess.run(["umount", "-l", target], capture_output=True)


def docker_supported() -> str | None:
    for tool in ("dockerd", "docker", "debootstrap"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is missing: run `bash launch/install.sh --test-tools` (docker.io, debootstrap)")
    return None


def debian_mirror() -> str:
    for src in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in src.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    return "http://deb.debian.org/debian"


def ensure_base(d: Daemon, work: Path) -> None:
    """The local Debian bookworm base image (python3 included), made once per data root."""
    if d.docker("image", "inspect", BASE, check=False).returncode == 0:
        return
    rootfs = work / "rootfs"
    subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,ca-certificates", "bookworm",
                    str(rootfs), debian_mirror()], check=True, capture_output=True, timeout=900)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    d.docker("import", "-", BASE, stdin=tar.stdout, timeout=600)
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)


def build_context(work: Path) -> Path:
    """The repository's files (tracked and new, not ignored) plus .hvdllm-cache: the cached Horovod
    wheel and every pip wheel the image installs (so the image build needs no PyPI of its own)."""
    ctx = work / "context"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, ctx / rel)
    wheels = CACHE / "docker-wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:", "-d", str(wheels),
                    "pip", "torch==2.13.0+cpu", "tensorflow-cpu==2.21.0", "-r", str(ROOT / "launch" / "requirements.txt")],
                   check=True, capture_output=True, timeout=1200)
    cache = ctx / ".hvdllm-cache"
    (cache / "wheels").mkdir(parents=True)
    for w in wheels.iterdir():
        os.link(w, cache / "wheels" / w.name)
    for hv in CACHE.glob("horovod-0.28.1-*"):
        if hv.is_dir() and not hv.name.endswith("-NCCL"):
            shutil.copytree(hv, cache / hv.name, copy_function=os.link)
    return ctx


def build_image(d: Daemon, work: Path) -> str:
    ctx = build_context(work)
    d.docker("build", "--network", "host", "-t", IMAGE, "--build-arg", f"BASE_IMAGE={BASE}",
             "--build-arg", "PIP_ARGS=--no-index --find-links /root/.cache/hvdllm/wheels", str(ctx), timeout=3000)
    shutil.rmtree(ctx, ignore_errors=True)       # (no image prune: it would drop the builder stage's cache)
    return IMAGE


@contextmanager
def built_image_daemon() -> Iterator[tuple[Daemon, str, str]]:
    """Build the image (cached), then yield (daemon inside a fresh network namespace, image, namespace)."""
    docker_supported()
    data_root = CACHE / "docker"
    data_root.mkdir(parents=True, exist_ok=True)
    ns = f"hvdock{os.getpid() % 100000}"
    with tempfile.TemporaryDirectory(prefix="hvd-", dir="/tmp") as state_dir:
        state = Path(state_dir)
        d = Daemon(state, data_root)
        try:
            ensure_base(d, state)
            image = build_image(d, state)
        finally:
            d.stop()
        made = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True)
        if made.returncode != 0:
            raise DockerUnavailable(f"network namespaces are not allowed here: {made.stderr.strip()}")
        try:
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
            d = Daemon(state, data_root, ns)
            try:
                yield d, image, ns
            finally:
                d.stop()
        finally:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
