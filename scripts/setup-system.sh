#!/usr/bin/env bash
# The system packages `make run` and `make test` need on Debian 12, installed when missing.
#
# Each tool is looked up with `command -v`; nothing is installed when all are there. As root the
# missing packages are installed with apt-get (one `apt-get update` first, non-interactive);
# otherwise the script stops and prints the exact command to run. It never removes anything.
set -euo pipefail

# tool -> the Debian package that provides it
tools=(
  "bwrap bubblewrap"          # the embedded engine sandboxes every job with bubblewrap
  "redis-server redis-server" # the suite starts its own Redis on a free port
  "setpriv util-linux"        # the engine drops privileges with setpriv
  "gcc gcc"                   # C jobs in the engine's tests
  "g++ g++"                   # C++ jobs in the engine's tests
  "wrk wrk"                   # the bench smoke test drives load with wrk
  "chromium chromium"         # the real-browser test of browser keys (Playwright drives it)
  "make make"
  "python3.11 python3"        # the project's interpreter (Debian 12's python3 is 3.11)
)

missing=()
packages=()
check() {
  missing=()
  packages=()
  local entry tool package
  for entry in "${tools[@]}"; do
    read -r tool package <<<"$entry"
    if ! command -v "$tool" >/dev/null 2>&1; then
      missing+=("$tool")
      [[ " ${packages[*]} " == *" $package "* ]] || packages+=("$package")
    fi
  done
  # uv comes from PyPI through pip (Makefile); Debian's python3 has no pip of its own.
  if ! command -v uv >/dev/null 2>&1 && ! python3 -m uv --version >/dev/null 2>&1 \
    && ! python3 -m pip --version >/dev/null 2>&1; then
    missing+=("pip")
    packages+=("python3-pip")
  fi
}

check
if [ ${#packages[@]} -eq 0 ]; then
  exit 0
fi

install=(apt-get install -y -qq --no-install-recommends "${packages[@]}")
if [ "$(id -u)" != "0" ]; then
  echo "error: missing ${missing[*]}; install them with:" >&2
  echo "  sudo apt-get update && sudo ${install[*]}" >&2
  exit 1
fi

echo "installing ${packages[*]} (missing: ${missing[*]})"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
"${install[@]}"

check
if [ ${#missing[@]} -gt 0 ]; then
  echo "error: still missing after apt-get install: ${missing[*]}" >&2
  exit 1
fi
