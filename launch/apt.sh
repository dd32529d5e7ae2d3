# shellcheck shell=bash
# apt_install PKG...: install missing Debian packages, or name them and stop where apt cannot run
# (not root and no password-less sudo, no apt-get, or HVDLLM_NO_APT=1). Sourced by the launch/ scripts.
apt_install() {
  [ $# -gt 0 ] || { printf '[install] system packages: nothing to install\n'; return 0; }
  local sudo=()
  if [ -n "${HVDLLM_NO_APT:-}" ] || ! command -v apt-get >/dev/null 2>&1; then
    printf '[install] missing system packages: %s (Debian names); install them (or their equivalents) and rerun\n' \
      "$*" >&2
    return 1
  fi
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo=(sudo -n)
    else
      printf '[install] missing system packages: %s; not root: run "sudo apt-get install %s" and rerun\n' "$*" "$*" >&2
      return 1
    fi
  fi
  printf '[install] installing system packages: %s\n' "$*"
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}
