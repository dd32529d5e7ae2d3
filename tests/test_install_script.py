"""launch/install.sh's argument handling, offline: a fake venv python records every call, so the test
sees exactly which arguments reach pip (HVDLLM_TORCH_SPEC split into the requirement and its options,
HVDLLM_PIP_ARGS on every install, the CPU wheel's fallback index) and how missing system tools are
reported where apt cannot run."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEP = "\x1f"
# Records its argv; `-m pip` succeeds (failing a +cpu install without an extra index when asked),
# stdin scripts print a cache key (or fail the "have" version probes), `-c` probes fail (no Horovod yet).
FAKE_PYTHON = r"""#!/usr/bin/env bash
{ printf '%s\x1f' "$@"; printf '\n'; } >> "$FAKE_LOG"
if [ "$1 $2" = "-m pip" ]; then
  for a in "$@"; do [ "$a" = "--extra-index-url" ] && exit 0; done
  for a in "$@"; do case "$a" in *+cpu) [ -n "${FAKE_NO_CPU_WHEEL:-}" ] && exit 1 ;; esac; done
  exit 0
fi
if [ "$1" = "-" ]; then cat > /dev/null; [ $# -gt 1 ] && exit 1; echo py311-fake; exit 0; fi
exit 1
"""


def fake_setup(tmp: Path) -> dict[str, str]:
    venv, cache, tools = tmp / "venv", tmp / "cache", tmp / "tools"
    (venv / "bin").mkdir(parents=True)
    tools.mkdir()
    for path, text in ((venv / "bin" / "python", FAKE_PYTHON), (venv / "bin" / "horovodrun", "#!/bin/sh\nexit 0\n")):
        path.write_text(text)
        path.chmod(0o755)
    for tool in ("mpicc", "mpirun", "cmake", "g++", "make"):      # the system tools "exist"
        (tools / tool).write_text("#!/bin/sh\nexit 0\n")
        (tools / tool).chmod(0o755)
    wheels = cache / "horovod-0.28.1-py311-fake"
    wheels.mkdir(parents=True)
    (wheels / "horovod-0.28.1-cp311-cp311-linux_x86_64.whl").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HVDLLM_", "HOROVOD_"))}
    env.update({"HVDLLM_VENV": str(venv), "HVDLLM_CACHE": str(cache), "HVDLLM_PYTHON": str(venv / "bin" / "python"),
                "HVDLLM_NO_APT": "1", "FAKE_LOG": str(tmp / "calls.log"), "PATH": f"{tools}:{env['PATH']}"})
    return env


def run_install(tmp: Path, args: tuple[str, ...] = (), **knobs: str) -> tuple[subprocess.CompletedProcess, list]:
    env = fake_setup(tmp)
    env.update(knobs)
    r = subprocess.run(["bash", str(ROOT / "launch" / "install.sh"), *args], env=env, capture_output=True, text=True,
                       timeout=60)
    log = tmp / "calls.log"
    calls = [line.split(SEP)[:-1] for line in log.read_text().splitlines()] if log.exists() else []
    return r, [c[3:] for c in calls if c[:3] == ["-m", "pip", "install"]]


def test_torch_spec_options_and_pip_args_reach_pip_as_separate_arguments(tmp_path: Path) -> None:
    r, pips = run_install(tmp_path, HVDLLM_TORCH_SPEC="torch==2.13.0  --index-url https://example.org/whl/cu126",
                          HVDLLM_PIP_ARGS="--proxy http://proxy:3128 --retries 2")
    assert r.returncode == 0, r.stdout + r.stderr
    common = ["-q", "--disable-pip-version-check", "--proxy", "http://proxy:3128", "--retries", "2"]
    torch = [c for c in pips if any(a.startswith("torch") for a in c)]
    assert torch == [[*common, "torch==2.13.0", "--index-url", "https://example.org/whl/cu126"]]
    assert [*common, "tensorflow-cpu==2.21.0"] in pips
    assert [*common, "-r", str(ROOT / "launch" / "requirements.txt")] in pips
    assert all(c[:6] == common for c in pips if c[0] == "-q"), pips
    assert [*common, "--no-deps", "-e", str(ROOT)] in pips
    assert any(c[-1].endswith("horovod-0.28.1-cp311-cp311-linux_x86_64.whl") for c in pips)


def test_default_is_the_cpu_wheel_with_pytorchs_cpu_index_as_fallback(tmp_path: Path) -> None:
    r, pips = run_install(tmp_path, HVDLLM_NO_TF="1", FAKE_NO_CPU_WHEEL="1")
    assert r.returncode == 0, r.stdout + r.stderr
    torch = [c[2:] for c in pips if any(a.startswith("torch") for a in c)]
    assert torch == [["torch==2.13.0+cpu"],
                     ["torch==2.13.0+cpu", "--extra-index-url", "https://download.pytorch.org/whl/cpu"]]
    assert not [c for c in pips if "tensorflow-cpu==2.21.0" in c]


def test_spaces_and_globs_in_the_spec_are_not_expanded(tmp_path: Path) -> None:
    (tmp_path / "torch==x").write_text("")               # a file a glob could match
    r, pips = run_install(tmp_path, HVDLLM_NO_TF="1", HVDLLM_TORCH_SPEC="\ttorch==* --pre ")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [c[2:] for c in pips if any(a.startswith("torch") for a in c)] == [["torch==*", "--pre"]]


@pytest.mark.parametrize("args, knobs, words", [
    (("--gpu",), {}, "unknown argument --gpu"),
    ((), {"HVDLLM_TORCH_SPEC": "  "}, "HVDLLM_TORCH_SPEC is blank"),
])
def test_bad_arguments_exit_2_before_anything_runs(tmp_path: Path, args: tuple[str, ...], knobs: dict[str, str],
                                                   words: str) -> None:
    r, pips = run_install(tmp_path, args, **knobs)
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "calls.log").exists()


def _apt_install(env_prefix: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    script = f". {ROOT / 'launch' / 'apt.sh'}; apt_install cmake libopenmpi-dev"
    return subprocess.run([*env_prefix, "bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)


def test_missing_tools_are_named_when_apt_cannot_run() -> None:
    env = {**os.environ, "HVDLLM_NO_APT": "1"}
    r = _apt_install([], env)
    assert r.returncode == 1 and "missing system packages: cmake libopenmpi-dev" in r.stderr, r.stderr
    if os.geteuid() == 0:       # as an unprivileged user (no password-less sudo): the apt command to run
        env.pop("HVDLLM_NO_APT")
        r = _apt_install(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"], env)
        assert r.returncode == 1 and "not root" in r.stderr and "apt-get install cmake libopenmpi-dev" in r.stderr, \
            r.stderr
