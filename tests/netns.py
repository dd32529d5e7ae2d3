"""Simulated hosts on one machine: network namespaces joined by a bridge, each with its own hostname
(a UTS namespace), address, /etc/hosts and an sshd (keys made per run), so that `horovodrun -H` and
`mpirun -H` launch over ssh and talk TCP between "hosts" exactly as on a cluster.

Layout: a switch namespace holds bridge ``br0``; every host namespace gets ``eth1`` (a veth into the
switch) with 10.99.0.<i>/24. The launcher is a host too (Horovod's launcher needs the named network
interface on the launching host). Addresses exist only inside these namespaces; nothing is added to
the machine's own network. ``ip netns exec`` bind-mounts ``/etc/netns/<ns>/{hosts,ssh}`` over
``/etc/hosts`` and ``/etc/ssh`` for the processes it starts, so the ssh client (of the launcher and of
every host: Open MPI's daemons ssh on) uses the run's key, no known_hosts file and the hosts' names.
Teardown kills every process in the namespaces, deletes them and their /etc/netns entries.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

SUBNET = "10.99.0"
IFACE = "eth1"
SSHD = "/usr/sbin/sshd"


class NamespacesUnavailable(RuntimeError):
    """The kernel or the container forbids network namespaces (the test is then skipped)."""


@dataclass(frozen=True)
class Hosts:
    """Running simulated hosts: ``names[i]`` lives in namespace ``namespaces[i]`` at ``addresses[i]``."""
    names: tuple[str, ...]
    namespaces: tuple[str, ...]
    addresses: tuple[str, ...]
    launcher: str            # the namespace commands are launched from (a host without sshd)
    iface: str = IFACE

    def command(self, argv: list[str], ns: str | None = None) -> list[str]:
        """``argv`` run inside namespace ``ns`` (default: the launcher's) with its hostname."""
        ns = ns or self.launcher
        return ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c",
                f'hostname "$0" && exec "$@"', ns_hostname(ns), *argv]


def ns_hostname(ns: str) -> str:
    return ns.split("-", 1)[1]


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


def netns_supported() -> str | None:
    """None when network namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    probe = f"hvprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"network namespaces are not allowed here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _write_ssh_config(etc: Path, key: Path) -> None:
    (etc / "ssh").mkdir(parents=True)
    (etc / "ssh" / "ssh_config").write_text(
        "Host *\n"
        f"  IdentityFile {key}\n"
        "  IdentitiesOnly yes\n"
        "  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n"
        "  LogLevel ERROR\n"
        "  BatchMode yes\n"
        "  ConnectTimeout 10\n")


def _sshd_config(state: Path, address: str, name: str) -> Path:
    cfg = state / f"sshd_{name}.conf"
    cfg.write_text(
        f"ListenAddress {address}\n"
        "Port 22\n"
        f"HostKey {state / 'host_key'}\n"
        f"AuthorizedKeysFile {state / 'authorized_keys'}\n"
        f"PidFile {state / f'sshd_{name}.pid'}\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "StrictModes no\n"
        "PermitUserEnvironment no\n"
        "MaxStartups 100\n"
        "MaxSessions 100\n"
        "LogLevel ERROR\n")
    return cfg


def _wait_for_port(hosts: Hosts, address: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    probe = ("import socket,sys\ns=socket.socket(); s.settimeout(1)\n"
             f"sys.exit(s.connect_ex(('{address}', 22)))")
    while time.monotonic() < deadline:
        if subprocess.run(["ip", "netns", "exec", hosts.launcher, "python3", "-c", probe]).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"sshd at {address} did not come up within {timeout}s")


def _kill_all(ns: str) -> None:
    """SIGKILL every process in namespace ``ns`` (all of them were started by this fixture's tests)."""
    for _ in range(20):
        r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        pids = [int(p) for p in r.stdout.split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


@contextmanager
def simulated_hosts(state: Path, names: tuple[str, ...] = ("hostA", "hostB")) -> Iterator[Hosts]:
    """Start ``names`` as ssh-reachable hosts plus a launcher host; tear everything down on exit."""
    for tool in ("ip", "unshare", "ssh", "ssh-keygen", SSHD):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is missing: run `bash launch/install.sh --test-tools` (openssh-server)")
    tag = f"hv{os.getpid() % 100000}"
    all_names = (*names, "launcher")
    namespaces = tuple(f"{tag}-{n}" for n in all_names)
    switch = f"{tag}-switch"
    addresses = tuple(f"{SUBNET}.{i + 1}" for i in range(len(all_names)))
    hosts = Hosts(names=tuple(names), namespaces=namespaces[:-1], addresses=addresses[:-1], launcher=namespaces[-1])
    made: list[str] = []
    etc_dirs: list[Path] = []
    try:
        _run("ip", "netns", "add", switch)
        made.append(switch)
        _run("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", switch, "link", "set", "br0", "up")
        state.mkdir(parents=True, exist_ok=True)
        key = state / "id_ed25519"
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(state / "host_key"))
        shutil.copy(f"{key}.pub", state / "authorized_keys")
        hosts_file = "127.0.0.1 localhost\n" + "".join(
            f"{a} {n}\n" for a, n in zip(addresses, (*names, ns_hostname(namespaces[-1]))))
        for i, (ns, addr) in enumerate(zip(namespaces, addresses)):
            _run("ip", "netns", "add", ns)
            made.append(ns)
            etc = Path("/etc/netns") / ns
            etc_dirs.append(etc)
            shutil.rmtree(etc, ignore_errors=True)
            etc.mkdir(parents=True)
            (etc / "hosts").write_text(hosts_file)
            _write_ssh_config(etc, key)
            port = f"p{i}"
            _run("ip", "-n", switch, "link", "add", port, "type", "veth", "peer", "name", IFACE, "netns", ns)
            _run("ip", "-n", switch, "link", "set", port, "master", "br0", "up")
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", IFACE)
            _run("ip", "-n", ns, "link", "set", IFACE, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        Path("/run/sshd").mkdir(exist_ok=True)     # sshd's privilege-separation directory
        for name, ns, addr in zip(names, hosts.namespaces, hosts.addresses):
            cfg = _sshd_config(state, addr, name)
            subprocess.run(hosts.command([SSHD, "-f", str(cfg)], ns), check=True)
            _wait_for_port(hosts, addr)
        yield hosts
    finally:
        for ns in reversed(made):
            _kill_all(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for etc in etc_dirs:
            shutil.rmtree(etc, ignore_errors=True)
