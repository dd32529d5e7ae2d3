#!/usr/bin/env bash
# What the cluster tests need beyond launch/install.sh (idempotent; run by `install.sh --test-tools`):
# sshd and ssh for the simulated hosts, Docker and debootstrap for the image test, shellcheck (Debian), and
# into the venv the linters and schema
# validators of launch/requirements-test.txt (hadolint, check-jsonschema, kubernetes-validate).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HVDLLM_VENV:-$ROOT/.venv}"
# shellcheck source=launch/apt.sh
. "$ROOT/launch/apt.sh"

need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v git >/dev/null 2>&1 || need+=(git)
apt_install "${need[@]}"

read -r -a PIP_ARGS <<< "${HVDLLM_PIP_ARGS:-}"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} \
  -r "$ROOT/launch/requirements-test.txt"
