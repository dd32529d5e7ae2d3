#!/usr/bin/env bash
# One set-up for README, CI and the Dockerfile: system MPI, a venv with torch 2.13 (CPU),
# TensorFlow 2.21 (Keras 3), mpi4py, Horovod 0.28.1 built against them (patched), and hvdllm.
# Idempotent: every step checks before it acts; the Horovod wheel is cached under ~/.cache.
#
# Environment knobs:
#   HVDLLM_VENV         virtual environment path (default: <repo>/.venv)
#   HVDLLM_PYTHON       interpreter that creates the venv (default: python3)
#   HVDLLM_CACHE        wheel cache (default: ~/.cache/hvdllm)
#   HVDLLM_TORCH_SPEC   torch requirement (default: torch==2.13.0, the CPU build); GPU users pass a
#                       CUDA build here and set HOROVOD_GPU_OPERATIONS=NCCL (see README)
#   HVDLLM_NO_TF=1      skip TensorFlow (Horovod is then built for PyTorch only)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HVDLLM_VENV:-$ROOT/.venv}"
PY="${HVDLLM_PYTHON:-python3}"
CACHE="${HVDLLM_CACHE:-$HOME/.cache/hvdllm}"
TORCH_SPEC="${HVDLLM_TORCH_SPEC:-torch==2.13.0}"
TF_SPEC="tensorflow-cpu==2.21.0"
HOROVOD_VERSION="0.28.1"
STEP="start"

say() { printf '[install] %s\n' "$*"; }
fail() { printf '[install] FAILED at step "%s" (see the output above)\n' "$STEP" >&2; exit 1; }
trap fail ERR
step() { STEP="$1"; say "== $1"; }

step "system packages (Open MPI, cmake, compilers)"
need=()
for pkg in libopenmpi-dev openmpi-bin cmake g++ make; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  say "installing: ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
else
  say "already installed"
fi

step "virtual environment at $VENV"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip install -q --disable-pip-version-check)

have() { "$VPY" - "$@" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
name, want = sys.argv[1], sys.argv[2]
sys.exit(0 if version(name).split("+")[0] == want else 1)
PY
}

step "frameworks: $TORCH_SPEC ${HVDLLM_NO_TF:+(no TensorFlow)}${HVDLLM_NO_TF:-and $TF_SPEC}"
torch_ver="${TORCH_SPEC#torch==}"
if [ "$torch_ver" != "$TORCH_SPEC" ] && have torch "$torch_ver"; then
  say "torch $torch_ver present"
else
  "${PIP[@]}" "$TORCH_SPEC"
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
wheel=$(ls "$WHEELDIR"/horovod-*.whl 2>/dev/null | head -n1 || true)
if "$VPY" -c "import horovod, sys; sys.exit(horovod.__version__ != '$HOROVOD_VERSION')" 2>/dev/null \
   && [ -f "$VENV/.horovod-key" ] && [ "$(cat "$VENV/.horovod-key")" = "$key" ]; then
  say "Horovod $HOROVOD_VERSION already installed for $key"
else
  if [ -z "$wheel" ]; then
    say "no cached wheel for $key: building from source (about 5 minutes on 2 cores)"
    build=$(mktemp -d)
    "$VPY" -m pip download -q --no-deps --no-binary :all: -d "$build" "horovod==$HOROVOD_VERSION"
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
    ok=0
    for attempt in 1 2; do   # the configure step's `import torch` has failed once, transiently
      if "$VPY" -m pip wheel --no-build-isolation --no-deps -w "$WHEELDIR" "$src"; then ok=1; break; fi
      say "Horovod build attempt $attempt failed; retrying once"
    done
    [ "$ok" = 1 ] || false
    rm -rf "$build"
    wheel=$(ls "$WHEELDIR"/horovod-*.whl | head -n1)
  else
    say "using cached wheel $wheel"
  fi
  "$VPY" -m pip install -q --no-deps --force-reinstall "$wheel"
  echo "$key" > "$VENV/.horovod-key"
fi

step "hvdllm (editable)"
"${PIP[@]}" --no-deps -e "$ROOT"

step "check the Horovod build"
TF_CPP_MIN_LOG_LEVEL=2 "$VENV/bin/horovodrun" --check-build
say "done: activate with 'source $VENV/bin/activate'"
