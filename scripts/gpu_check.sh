#!/usr/bin/env bash
# The GPU self-check, prepared for one run on a lent NVIDIA machine (at most 5 minutes).
# Installs nothing: it uses the machine's python3 (with a CUDA build of torch) and this
# checkout on PYTHONPATH. Prints one table; exit 0 all checks passed, 1 a check failed,
# 2 no GPU visible or a piece the check needs is missing (said on one `gpu_check:` line
# before anything runs), 124 it ran out of time. The table also goes to $OUT/gpu_check.txt
# when OUT is set (the device tool's output folder).
set -uo pipefail
cd "$(dirname "$0")/.." || { echo "gpu_check: cannot enter the checkout" >&2; exit 2; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

missing() { echo "gpu_check: $*; nothing was run" >&2; exit 2; }

command -v "$PY" >/dev/null 2>&1 || missing "no Python interpreter '$PY' (set PYTHON=/path/to/python)"
command -v timeout >/dev/null 2>&1 || missing "no 'timeout' command (coreutils)"
command -v nvidia-smi >/dev/null 2>&1 || missing "no nvidia-smi on PATH: no NVIDIA driver here, or the container lacks the NVIDIA runtime"
[ -f sentinel/gpu/selfcheck.py ] || missing "sentinel/gpu/selfcheck.py not found under $PWD"
[ -d golden_sets/digits/v3 ] || missing "golden_sets/digits/v3 not found under $PWD (the CUDA vs CPU check reads it)"

# nvidia-smi answering is the first sign the driver works; a hung driver must not eat the slot.
timeout --kill-after=5 30 nvidia-smi --query-gpu=index,name,driver_version,memory.used,memory.total --format=csv \
    || missing "nvidia-smi failed (exit $?): the NVIDIA driver is not working"

timeout --kill-after=5 120 "$PY" - <<'PYEOF' || missing "the Python side is not ready (see the line above)"
import importlib.util
import sys

need = {"torch": "torch (a CUDA build)", "pynvml": "nvidia-ml-py", "prometheus_client": "prometheus-client",
        "yaml": "PyYAML", "numpy": "numpy"}
gone = [pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None]
if gone:
    sys.exit(f"gpu_check: missing Python packages: {', '.join(gone)} (for {sys.executable})")
import torch

print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, CUDA available: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} cannot use CUDA here (a CPU-only build, or no GPU visible to it)")
PYEOF

# 290 s leaves the 5-minute slot some room for start-up; --kill-after stops a wedged child.
out_dir="${OUT:-/tmp}"
mkdir -p "$out_dir" 2>/dev/null && [ -w "$out_dir" ] || missing "cannot write to $out_dir (OUT)"
log="$out_dir/gpu_check.txt"
timeout --kill-after=10 290 "$PY" -m sentinel.gpu.selfcheck --json "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
case "$rc" in
    0) what="all checks passed" ;;
    1) what="a check failed" ;;
    2) what="no GPU visible, nothing checked" ;;
    124|137) what="ran out of time" ;;
    *) what="the self-check crashed" ;;
esac
echo "gpu_check: exit $rc, $what (table in $log)"
exit "$rc"
