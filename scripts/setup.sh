#!/usr/bin/env bash
# Installs everything sentinel and its tests need on a fresh Debian machine:
# the real tools the tests run against (Prometheus/promtool, Alertmanager/amtool,
# nginx and wrk for benchmarks) and the Python package with the CPU build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v amtool >/dev/null 2>&1 || need_apt+=(prometheus-alertmanager)
command -v nginx >/dev/null 2>&1 || need_apt+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
if ((${#need_apt[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends: no node-exporter or other services started beside us.
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "setup: missing ${need_apt[*]} (install the Debian packages, or some tests will skip)" >&2
  fi
fi

# constraints.txt pins torch to the CPU build (a bare 'torch' would pull a multi-GB CUDA build).
python3 -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
