#!/usr/bin/env bash
# One set-up for README, CI and the Dockerfile: system MPI, a venv with torch 2.13 (CPU),
# TensorFlow 2.21 (Keras 3), mpi4py, Horovod 0.28.1 built against them (patched), and hvdllm.
# Idempotent: every step checks before it acts; the Horovod wheel is cached under ~/.cache.
#
# Usage: bash launch/install.sh [--test-tools] [--deps-only]
#   --test-tools        also install what the cluster tests need (launch/test-tools.sh: sshd, shellcheck,
#                       hadolint, schema validators)
#   --deps-only         everything but hvdllm itself (the Dockerfile installs the sources in a later layer)
#
# Environment knobs:
#   HVDLLM_VENV         virtual environment path (default: <repo>/.venv)
#   HVDLLM_PYTHON       interpreter that creates the venv (default: python3)
#   HVDLLM_CACHE        wheel cache (default: ~/.cache/hvdllm)
#   HVDLLM_TORCH_SPEC   torch requirement, optionally followed by pip options for it, split on blanks
#                       (default: torch==2.13.0+cpu, from the index pip is configured with or else from
#                       https://download.pytorch.org/whl/cpu); GPU users pass e.g.
#                       "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" and set
#                       HOROVOD_GPU_OPERATIONS=NCCL (see README)
#   HVDLLM_PIP_ARGS     extra pip options for every pip install (e.g. "--proxy http://p:3128"), split on blanks
#   HVDLLM_NO_TF=1      skip TensorFlow (Horovod is then built for PyTorch only)
#   HVDLLM_NO_APT=1     never call apt-get (missing system tools are then named and the script stops)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HVDLLM_VENV:-$ROOT/.venv}"
PY="${HVDLLM_PYTHON:-python3}"
CACHE="${HVDLLM_CACHE:-$HOME/.cache/hvdllm}"
CPU_TORCH="torch==2.13.0+cpu"
CPU_TORCH_INDEX="https://download.pytorch.org/whl/cpu"
TORCH_SPEC="${HVDLLM_TORCH_SPEC:-$CPU_TORCH}"
TF_SPEC="tensorflow-cpu==2.21.0"
HOROVOD_VERSION="0.28.1"
TEST_TOOLS=0
DEPS_ONLY=0
STEP="start"

for arg in "$@"; do
  case "$arg" in
    --test-tools) TEST_TOOLS=1 ;;
    --deps-only) DEPS_ONLY=1 ;;
    -h|--help) sed -n '2,24p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) printf '[install] unknown argument %q; allowed: --test-tools, --deps-only\n' "$arg" >&2; exit 2 ;;
  esac
done

# Word-split the knobs that carry several pip arguments, without glob expansion.
read -r -a TORCH_ARGS <<< "$TORCH_SPEC"
read -r -a PIP_ARGS <<< "${HVDLLM_PIP_ARGS:-}"
[ ${#TORCH_ARGS[@]} -gt 0 ] || { echo "[install] HVDLLM_TORCH_SPEC is blank; e.g. torch==2.13.0" >&2; exit 2; }

say() { printf '[install] %s\n' "$*"; }
fail() { printf '[install] FAILED at step "%s" (see the output above)\n' "$STEP" >&2; exit 1; }
trap fail ERR
step() { STEP="$1"; say "== $1"; }

# shellcheck source=launch/apt.sh
. "$ROOT/launch/apt.sh"

step "system tools (Open MPI, cmake, compilers, Python venv and headers)"
need=()
command -v mpicc >/dev/null 2>&1 && command -v mpirun >/dev/null 2>&1 || need+=(libopenmpi-dev openmpi-bin)
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v make >/dev/null 2>&1 || need+=(make)
if ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1 && [ ! -x "$VENV/bin/python" ]; then
  need+=("$("$PY" -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])' 2>/dev/null || echo python3-venv)")
fi
"$PY" - <<'PY' || need+=(python3-dev)
import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))
PY
apt_install "${need[@]}"
step "virtual environment at $VENV"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} --upgrade pip
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip install -q --disable-pip-version-check ${PIP_ARGS[@]+"${PIP_ARGS[@]}"})

# have NAME VERSION: NAME is installed at VERSION (the local label, e.g. +cpu, only compared when given).
have() { "$VPY" - "$@" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
name, want = sys.argv[1], sys.argv[2]
got = version(name)
sys.exit(0 if (got if "+" in want else got.split("+")[0]) == want else 1)
PY
}

step "frameworks: ${TORCH_ARGS[*]} ${HVDLLM_NO_TF:+(no TensorFlow)}${HVDLLM_NO_TF:-and $TF_SPEC}"
torch_ver="${TORCH_ARGS[0]#torch==}"
if [ ${#TORCH_ARGS[@]} -eq 1 ] && [ "$torch_ver" != "${TORCH_ARGS[0]}" ] && have torch "$torch_ver"; then
  say "torch $torch_ver present"
elif [ "$TORCH_SPEC" = "$CPU_TORCH" ]; then
  # The CPU wheel (a +cpu local version) comes from the configured index when it has one, else
  # from PyTorch's CPU index (PyPI's own Linux torch wheel is the multi-GB CUDA build).
  "${PIP[@]}" "$CPU_TORCH" || "${PIP[@]}" "$CPU_TORCH" --extra-index-url "$CPU_TORCH_INDEX"
else
  "${PIP[@]}" "${TORCH_ARGS[@]}"
fi
if [ -z "${HVDLLM_NO_TF:-}" ]; then
  if have tensorflow-cpu 2.21.0; then say "tensorflow-cpu 2.21.0 present"; else "${PIP[@]}" "$TF_SPEC"; fi
fi

step "python dependencies (mpi4py, build and test tools, training extras)"
"${PIP[@]}" -r "$ROOT/launch/requirements.txt"

step "Horovod $HOROVOD_VERSION (cached wheel or patched source build)"
key=$("$VPY" - <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
parts = [f"py{sys.version_info[0]}{sys.version_info[1]}", "torch" + version("torch").replace("+", "_")]
for dist in ("tensorflow-cpu", "tensorflow"):
    try:
        parts.append("tf" + version(dist)); break
    except PackageNotFoundError:
        pass
print("-".join(parts))
PY
)
gpu_ops="${HOROVOD_GPU_OPERATIONS:-}"
[ -z "$gpu_ops" ] || key="$key-$gpu_ops"
WHEELDIR="$CACHE/horovod-$HOROVOD_VERSION-$key"
mkdir -p "$WHEELDIR"
newest_wheel() { find "$WHEELDIR" -maxdepth 1 -name 'horovod-*.whl' | sort | tail -n1; }
wheel=$(newest_wheel)
if "$VPY" -c "import horovod, sys; sys.exit(horovod.__version__ != '$HOROVOD_VERSION')" 2>/dev/null \
   && [ -f "$VENV/.horovod-key" ] && [ "$(cat "$VENV/.horovod-key")" = "$key" ]; then
  say "Horovod $HOROVOD_VERSION already installed for $key"
else
  if [ -z "$wheel" ]; then
    say "no cached wheel for $key: building from source (about 5 minutes on 2 cores)"
    build=$(mktemp -d)
    "$VPY" -m pip download -q ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} --no-deps --no-binary :all: -d "$build" \
      "horovod==$HOROVOD_VERSION"
    tar -xzf "$build/horovod-$HOROVOD_VERSION.tar.gz" -C "$build"
    src="$build/horovod-$HOROVOD_VERSION"
    # PyTorch >= 2.1 needs C++17 (upstream PR #3998, issue #3996).
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
      "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    # TF 2.21 wheels lack the highwayhash headers that the optional XLA ops include.
    sed -i '/xla_mpi_ops.cc/d' "$src/horovod/tensorflow/CMakeLists.txt"
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
    if [ -z "${HVDLLM_NO_TF:-}" ]; then export HOROVOD_WITH_TENSORFLOW=1; else export HOROVOD_WITHOUT_TENSORFLOW=1; fi
    export MAKEFLAGS="${MAKEFLAGS:--j$(nproc)}"
    export CMAKE_POLICY_VERSION_MINIMUM=3.5   # Gloo's old cmake_minimum_required, for a cmake 4.x on PATH
    ok=0
    for attempt in 1 2; do   # the configure step's `import torch` has failed once, transiently
      if "$VPY" -m pip wheel --no-build-isolation --no-deps -w "$WHEELDIR" "$src"; then ok=1; break; fi
      say "Horovod build attempt $attempt failed; retrying once"
    done
    [ "$ok" = 1 ] || false
    rm -rf "$build"
    wheel=$(newest_wheel)
    [ -n "$wheel" ] || false
  else
    say "using cached wheel $wheel"
  fi
  "${PIP[@]}" --no-deps --force-reinstall "$wheel"
  echo "$key" > "$VENV/.horovod-key"
fi

if [ "$DEPS_ONLY" = 0 ]; then
  step "hvdllm (editable)"
  "${PIP[@]}" --no-deps -e "$ROOT"
fi

step "check the Horovod build"
TF_CPP_MIN_LOG_LEVEL=2 "$VENV/bin/horovodrun" --check-build
if [ "$TEST_TOOLS" = 1 ]; then
  step "test tools (launch/test-tools.sh)"
  HVDLLM_VENV="$VENV" bash "$ROOT/launch/test-tools.sh"
fi
say "done: activate with 'source $VENV/bin/activate'"
