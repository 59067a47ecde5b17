#!/usr/bin/env bash
# Sets up sentinel on a fresh Debian 12 machine with Python 3.11:
#   1. (root only) the Debian tools the tests run against: Prometheus/promtool,
#      Alertmanager/amtool, nginx and wrk (benchmarks), python3-venv when missing;
#   2. a project virtualenv (.venv, or $SENTINEL_VENV) with the package installed into it.
#
# Extras: SENTINEL_EXTRAS (default "full,test") picks what goes into the venv:
#   ""           the sidecar alone (sentinel run/replay/rules/dashboards/gpu): no torch, no kserve
#   "torch"      + export/verify/train/golden build (PyTorch CPU build)
#   "serve"      + the kserve model server (sentinel serve, sentinel demo)
#   "full"       torch + serve;  "test" the test tools.
# PyTorch: constraints.txt pins torch==2.13.0. On this workplace pip finds the CPU build of
# that pin on local disk. Elsewhere set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# so pip takes the CPU wheel from PyTorch's CPU index instead of the multi-GB CUDA build.
# Without root, step 1 is skipped with a message: tests that need those tools then skip.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${SENTINEL_VENV:-.venv}
EXTRAS=${SENTINEL_EXTRAS-full,test}
PYTHON=${PYTHON:-python3}

is_root() { [ "$(id -u)" = 0 ]; }
apt_install() {
  if is_root && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    if [ -z "${_apt_updated:-}" ]; then apt-get update -qq; _apt_updated=1; fi
    # --no-install-recommends: no node-exporter or other services started beside us.
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  else
    echo "setup: missing $* (not root: install these Debian packages, or the tests that need them skip)" >&2
    return 1
  fi
}

need_apt=()
if [[ ",$EXTRAS," == *",test,"* ]]; then
  command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
  command -v amtool >/dev/null 2>&1 || need_apt+=(prometheus-alertmanager)
  command -v nginx >/dev/null 2>&1 || need_apt+=(nginx-light)
  command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
fi
if ((${#need_apt[@]})); then
  apt_install "${need_apt[@]}" || true
  # Debian's prometheus package starts a Prometheus on :9090 (and alertmanager on :9093).
  # The tests start their own; sentinel's admin listener defaults to :9464, so no clash.
fi

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    # Debian's python3 has no ensurepip until python3-venv is installed.
    apt_install python3-venv || { echo "setup: cannot create a venv: install python3-venv (as root: apt-get install python3-venv)" >&2; exit 1; }
    "$PYTHON" -m venv "$VENV"
  fi
fi

pip_args=(-q --disable-pip-version-check -c constraints.txt)
if [ -n "${TORCH_INDEX_URL:-}" ]; then pip_args+=(--extra-index-url "$TORCH_INDEX_URL"); fi
target="."
[ -n "$EXTRAS" ] && target=".[$EXTRAS]"
"$VENV/bin/python" -m pip install "${pip_args[@]}" -e "$target"
echo "setup: installed into $VENV (extras: ${EXTRAS:-none}); run $VENV/bin/sentinel --help"
